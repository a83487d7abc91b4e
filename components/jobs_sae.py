"""Jobs page section: train a sparse autoencoder (as a job), its training curves and its report card.

``render_sae_training_section()`` lets the user pick an activation store, a site/layer and the
training settings, then submits a ``train_sae`` job (or the ``sae_demo`` job: capture, train and
dashboards) and returns at once; the job list shows live curves of loss, L0, explained variance and
dead %, and the section shows the report card once the job is done.
``render_sae_report_card(report)`` shows what :mod:`engine.sae.evaluation` measured.
"""
from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from components.jobs_ui import get_runner, metrics_figure, show_session_job
from components.session import show_user_error, submit_within_limits
from engine.core.errors import UserError

CURVES = (("loss", "loss"), ("l0", "L0"), ("explained_variance", "explained variance"), ("dead_fraction", "dead %"))


# --- figures (pure functions, no Streamlit) ---------------------------------------------------
def training_curves_figure(history: list[dict]) -> go.Figure:
    """2×2 curves against tokens seen: loss (log), L0, explained variance, dead %."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title in CURVES],
                        horizontal_spacing=0.1, vertical_spacing=0.18)
    tokens = [record["tokens"] for record in history]
    for index, (key, title) in enumerate(CURVES):
        scale = 100.0 if key == "dead_fraction" else 1.0
        values = [None if record.get(key) is None else record[key] * scale for record in history]
        fig.add_trace(go.Scatter(x=tokens, y=values, mode="lines", name=title, showlegend=False),
                      row=index // 2 + 1, col=index % 2 + 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="tokens", row=2)
    fig.update_layout(height=460, margin=dict(l=40, r=20, t=40, b=40))
    return fig


def density_histogram_figure(report: dict) -> go.Figure:
    """Histogram of log10 feature firing density (live latents), dead ones noted in the title."""
    hist = report["density_histogram"]
    edges, counts = hist["log10_density_edges"], hist["counts"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    fig = go.Figure(go.Bar(x=centres, y=counts, width=width, marker_line_width=0))
    dead = report.get("dead_fraction", 0.0)
    fig.add_vline(x=-1.0, line_dash="dot", annotation_text="dense (10 %)")
    fig.update_layout(title=f"Feature density (log10), {100 * dead:.1f} % dead not shown", height=300,
                      xaxis_title="log10 firing frequency", yaxis_title="latents",
                      margin=dict(l=40, r=20, t=50, b=40), bargap=0.02)
    return fig


# --- report card ----------------------------------------------------------------------------
def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_sae_report_card(report: dict) -> None:
    """Metrics, CE loss with the SAE spliced in, and the density histogram of one evaluation report."""
    sae = report.get("sae", {})
    st.markdown(f"**{sae.get('architecture', '?')} SAE**, {sae.get('d_sae', '?'):,} latents"
                f"{' (k=' + str(sae['k']) + ')' if sae.get('k') else ''} on `{report.get('site')}` layer "
                f"{report.get('layer')} of `{report.get('model') or sae.get('model_name') or '?'}` — "
                f"{report.get('n_tokens', 0):,} tokens from the {report.get('source', '?')}")
    cols = st.columns(6)
    cols[0].metric("L0", _fmt(report.get("l0"), ".1f"))
    cols[1].metric("Explained variance", _fmt(report.get("explained_variance")))
    cols[2].metric("MSE", _fmt(report.get("mse"), ".3g"))
    cols[3].metric("Cosine", _fmt(report.get("cosine")))
    cols[4].metric("Dead", f"{100 * report.get('dead_fraction', 0):.1f} %")
    cols[5].metric("Dense (>10 %)", f"{100 * report.get('dense_fraction', 0):.1f} %")
    ce = report.get("ce")
    if ce:
        cols = st.columns(4)
        cols[0].metric("CE clean", _fmt(ce.get("clean")))
        cols[1].metric("CE with SAE", _fmt(ce.get("spliced")), delta=f"+{_fmt(ce.get('delta'))}",
                       delta_color="inverse")
        cols[2].metric("CE zero-ablated", _fmt(ce.get("zero_ablated")))
        cols[3].metric("CE loss recovered", _fmt(ce.get("recovered")))
    else:
        st.caption("CE loss not measured (evaluated from cached activations without the model).")
    if report.get("density_histogram"):
        st.plotly_chart(density_histogram_figure(report), width="stretch")


# --- training section -----------------------------------------------------------------------
def _store_entries() -> list[dict]:
    from engine.data.store import list_stores

    return list_stores(complete=True)


def _store_label(entry: dict) -> str:
    manifest = entry["manifest"]
    layers = manifest.get("layers", [])
    span = f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0]) if layers else "-"
    return (f"{manifest.get('model')} · {manifest.get('corpus') or 'corpus'} · {manifest.get('n_tokens', 0):,} tokens "
            f"· layers {span} · {entry['name']}")


def _training_form(entry: dict) -> None:
    """Site, layer and settings for one store; the button submits a train_sae job."""
    manifest = entry["manifest"]
    cols = st.columns(3)
    site = cols[0].selectbox("Site", manifest.get("sites", ["resid_post"]), key="sae_site")
    layers = manifest.get("layers", [0])
    layer = cols[1].selectbox("Layer", layers, index=len(layers) // 2, key="sae_layer")
    arch = cols[2].radio("Architecture", ["topk", "standard"], horizontal=True, key="sae_arch")
    d_in = int(manifest.get("widths", {}).get(site, manifest.get("d_model", 0)) or 0)
    cols = st.columns(4)
    width = cols[0].number_input("Latents (d_sae)", 16, 1 << 20, value=max(16, 8 * d_in), step=256,
                                 key="sae_width")
    if arch == "topk":
        k = cols[1].number_input("k (active latents)", 1, 4096, value=32, key="sae_k")
        l1 = 5.0
    else:
        l1 = cols[1].number_input("L1 coefficient", 0.0, 1000.0, value=5.0, key="sae_l1")
        k = 32
    lr = cols[2].number_input("Learning rate", 1e-6, 1.0, value=1e-3, format="%.5f", key="sae_lr")
    batch = cols[3].number_input("Batch size", 16, 65536, value=1024, step=256, key="sae_batch")
    n_tokens = int(manifest.get("n_tokens", 0))
    cols = st.columns(2)
    tokens = cols[0].number_input("Token budget", 1024, 10 ** 10, value=max(1024, 2 * n_tokens), step=10_000,
                                  key="sae_tokens", help="more than the store holds means several epochs")
    default_name = f"{Path(entry['name']).name}-L{layer}-{site}-{arch}-w{int(width)}"
    name = cols[1].text_input("Save as (folder under cache/saes)", value=default_name, key="sae_name")
    if not st.button("Start training", type="primary", key="sae_start"):
        return
    from engine.core.models import cache_root

    clean = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.strip()).strip(".")
    if not clean:
        st.error("Give the SAE a folder name made of letters, digits, '-', '_' or '.'.")
        return
    settings = dict(architecture=arch, d_sae=int(width), k=int(k), l1_coefficient=float(l1), lr=float(lr),
                    batch_size=int(batch), total_tokens=int(tokens), warmup_steps=20, log_every=5,
                    checkpoint_every=100)
    spec = {"kind": "train_sae", "params": {"store": str(entry["path"]), "site": site, "layer": int(layer),
                                            "config": settings, "out": str(cache_root() / "saes" / clean)}}
    submit_within_limits(spec, "sae", "its report card appears below when it is done.")


def _show_result() -> None:
    """The outcome of this session's last SAE job: curves, then the saved path and its report card."""
    job = show_session_job("sae")
    if job is None:
        return
    fig = metrics_figure(job, get_runner().metrics(job.id))
    if fig is not None:
        st.plotly_chart(fig, width="stretch", key="sae_result_curves")
    path = (job.result or {}).get("path")
    report = Path(path) / "report.json" if job.state == "done" and path else None
    if report is not None and report.is_file():
        render_sae_report_card(json.loads(report.read_text()))


def render_sae_training_section(lm=None) -> None:
    """Submit an SAE training job (or the demo SAE job) for a store of any model; the result shows when done."""
    st.subheader("Train a sparse autoencoder")
    st.caption("TopK (default) or L1 SAEs on cached activations, saved in the SAELens format under cache/saes, "
               "trained by a job that goes on when you leave this page. A cancelled or failed run resumes from its "
               "last checkpoint when started again with the same settings.")
    try:
        entries = _store_entries()
    except UserError as exc:
        show_user_error(exc)
        entries = []

    with st.expander("Demo SAE: built-in corpus on gemma-3-270m, middle layer, with its dashboards "
                     "(a few minutes on CPU)"):
        if st.button("Train the demo SAE", key="sae_demo_button"):
            submit_within_limits({"kind": "sae_demo", "params": {}}, "sae",
                                 "the SAE and its dashboards appear on the SAE features page when it is done.")

    if not entries:
        st.info("No activation store yet: cache activations above (or train the demo SAE, which captures its own).")
    else:
        labels = [_store_label(entry) for entry in entries]
        choice = st.selectbox("Activation store", range(len(entries)), format_func=lambda i: labels[i],
                              key="sae_store")
        _training_form(entries[choice])
    _show_result()
