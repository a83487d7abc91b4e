"""Jobs page section: build feature dashboards of an SAE over an activation store (one streaming pass, as a job)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from components.jobs_ui import model_params, show_session_job
from components.session import submit_within_limits


def render_dashboards_section(lm) -> None:
    """Pick an SAE and a store of the current model, then submit a job that builds every feature's dashboard."""
    from engine.data.store import list_stores
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
        spec = {"kind": "dashboards", "params": {**model_params(), "sae": str(sae_dir), "store": str(store["path"]),
                                                 "config": {"top_k": int(top_k), "batch_size": int(batch)},
                                                 "force": bool(force)}}
        submit_within_limits(spec, "dashboards", "the SAE features page lists them when it is done.", rerun=force)
    job = show_session_job("dashboards")
    if job is not None and job.state == "done":
        st.page_link("pages/features.py", label="Open the SAE feature browser", icon=":material/extension:")
