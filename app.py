"""Latent Explorer: look inside language models. Entry point: navigation and the shared sidebar."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from components.session import sidebar

st.set_page_config(page_title="Latent Explorer", page_icon=":material/visibility:", layout="wide")

HERE = Path(__file__).resolve().parent
# (file, title, icon, url path). The url paths differ from the file names on purpose: Streamlit
# still maps /<file stem> to pages/<file stem>.py as a stand-alone script (without this entry
# file, so without the sidebar) when such a link is opened directly.
PAGES = [
    ("pages/lens.py", "Lens", ":material/stacked_line_chart:", "lens-view"),
    ("pages/concepts.py", "Concept space", ":material/scatter_plot:", "concept-space"),
    ("pages/features.py", "SAE features", ":material/extension:", "sae-features"),
    ("pages/interventions.py", "Interventions", ":material/tune:", "intervene"),
    ("pages/jobs.py", "Jobs & data", ":material/settings:", "jobs-and-data"),
]

pages = [st.Page(str(HERE / file), title=title, icon=icon, url_path=path, default=(i == 0))
         for i, (file, title, icon, path) in enumerate(PAGES) if (HERE / file).exists()]
navigation = st.navigation(pages)
sidebar()
navigation.run()
