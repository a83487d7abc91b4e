"""Jobs page section: build feature dashboards of an SAE over an activation store (one streaming pass)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from components.session import progress_to, show_user_error
from engine.core.errors import UserError


def render_dashboards_section(lm) -> None:
    """Pick an SAE and a store of the current model, then build every feature's dashboard with progress."""
    from engine.data.store import list_stores
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.read import list_dashboards
    from engine.sae.io import list_saes

    st.subheader("Feature dashboards")
    st.caption("One pass over a store encodes every token with the SAE and keeps, for all features at once, "
               "density, histogram, top examples, interval samples, logit effects and neighbours. "
               "Open them on the **SAE features** page.")
    saes = list_saes()
    stores = list_stores(complete=True, weights_hash=lm.weights_hash)
    if not saes or not stores:
        st.info("Needs an SAE (train one above) and a complete activation store of this model (capture one above).")
        return
    cols = st.columns(2)
    sae_dir = cols[0].selectbox("SAE", saes, format_func=lambda p: Path(p).name, key="dash_sae")
    store = cols[1].selectbox("Activation store", stores, key="dash_store",
                              format_func=lambda s: f"{s['name']} ({s['manifest']['n_tokens']:,} tokens, "
                                                    f"{', '.join(s['manifest']['sites'])} L{s['manifest']['layers']})")
    cols = st.columns(3)
    top_k = cols[0].number_input("Top examples per feature", 5, 100, 20, key="dash_topk")
    batch = cols[1].number_input("Batch size (tokens)", 256, 65536, 4096, step=256, key="dash_batch")
    force = cols[2].checkbox("Rebuild even if up to date", key="dash_force")
    done = {entry["manifest"].get("sae_name") for entry in list_dashboards(weights_hash=lm.weights_hash)}
    if Path(sae_dir).name in done:
        st.caption(f"Dashboards for `{Path(sae_dir).name}` exist already.")
    if st.button("Build dashboards", key="dash_build", type="primary"):
        bar = st.progress(0.0, text="starting")
        try:
            out = build_dashboards(sae_dir, store["path"], lm, config=DashboardConfig(top_k=int(top_k),
                                                                                      batch_size=int(batch)),
                                   force=force, progress=progress_to(bar))
        except UserError as exc:
            show_user_error(exc)
            return
        st.success(f"Dashboards saved in `{out}`.")
        st.page_link("pages/features.py", label="Open the SAE feature browser", icon=":material/extension:")
