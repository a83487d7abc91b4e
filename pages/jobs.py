"""Jobs & data: every job (state, progress, log, Cancel/Retry) above the forms that start them.

The forms live in ``components/``; each submits a job spec to the shared runner and returns at once.
"""
from __future__ import annotations

import streamlit as st

from components.jobs_capture import render_capture_section, render_stores_section
from components.jobs_dashboards import render_dashboards_section
from components.jobs_sae import render_sae_training_section
from components.jobs_tuned_lens import render_tuned_lens_section
from components.jobs_ui import render_jobs_list
from components.session import current_model

SECTIONS = [render_capture_section, render_stores_section, render_sae_training_section, render_tuned_lens_section,
            render_dashboards_section]  # display order; each takes the loaded model

st.title("Jobs & data")
render_jobs_list()
lm = current_model()  # once per run: it also writes the model's caption into the sidebar
for render in SECTIONS:
    st.divider()
    render(lm)
