"""Latent Explorer: look inside language models. Entry point: navigation and the shared sidebar."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from components.session import sidebar

st.set_page_config(page_title="Latent Explorer", page_icon=":material/visibility:", layout="wide")

HERE = Path(__file__).resolve().parent
PAGES = [  # (file, title, icon); a page is listed once its file exists
    ("pages/lens.py", "Lens", ":material/stacked_line_chart:"),
    ("pages/concepts.py", "Concept space", ":material/scatter_plot:"),
    ("pages/features.py", "SAE features", ":material/extension:"),
    ("pages/interventions.py", "Interventions", ":material/tune:"),
    ("pages/jobs.py", "Jobs & data", ":material/settings:"),
]

pages = [st.Page(str(HERE / file), title=title, icon=icon, default=(i == 0))
         for i, (file, title, icon) in enumerate(PAGES) if (HERE / file).exists()]
navigation = st.navigation(pages)
sidebar()
navigation.run()
