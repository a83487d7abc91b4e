"""Jobs & data: long-running jobs, one section each.

Sections are functions living in ``components/``; a section whose module is not there (yet) is
skipped, so each job type is added by writing its module and listing it in ``SECTIONS``.
"""
from __future__ import annotations

import importlib
import importlib.util

import streamlit as st

from components.session import current_model

SECTIONS = [  # (module, function) in display order
    ("components.jobs_capture", "render_capture_section"),
    ("components.jobs_capture", "render_stores_section"),
    ("components.jobs_sae", "render_sae_training_section"),
    ("components.jobs_tuned_lens", "render_tuned_lens_section"),
    ("components.jobs_dashboards", "render_dashboards_section"),
]


def available_sections() -> list:
    found = []
    for module_name, function in SECTIONS:
        if importlib.util.find_spec(module_name) is None:
            continue
        render = getattr(importlib.import_module(module_name), function, None)
        if callable(render):
            found.append(render)
    return found


st.title("Jobs & data")
current_model()
for index, render in enumerate(available_sections()):
    if index:
        st.divider()
    render()
