"""Jobs page section: train a tuned lens for the loaded model, with a progress bar and loss curve."""
from __future__ import annotations

import re

import plotly.graph_objects as go
import streamlit as st

from components.session import progress_to, show_user_error
from engine.core.errors import UserError
from engine.lens.tuned import TrainConfig, default_lens_dir, list_lenses, train_tuned_lens


def render_tuned_lens_section(lm) -> None:
    st.subheader("Tuned lens")
    existing = list_lenses(lm)
    st.caption("One affine translator per layer, trained to match the final distribution (KL). "
               + (f"Lenses for this model: {', '.join(p.name for p in existing)}." if existing else
                  "No lens is trained for this model yet.")
               + " An interrupted run resumes from its last checkpoint.")
    c1, c2, c3, c4 = st.columns(4)
    corpus = c1.text_input("Corpus", value="builtin", key="tl_corpus",
                           help="builtin, a .txt file, a folder of .txt files or a .jsonl file")
    steps = c2.number_input("Steps", 10, 5000, value=60, step=10, key="tl_steps")
    batch = c3.number_input("Windows per step", 1, 64, value=4, key="tl_batch")
    subset = c4.selectbox("Vocabulary", [None, 8192, 32768], key="tl_vocab",
                          format_func=lambda v: "full (exact)" if v is None else f"{v:,} most likely tokens",
                          help="A subset makes each step much cheaper on CPU for large vocabularies.")
    if not st.button("Train tuned lens", key="tl_start", type="primary"):
        return
    out = default_lens_dir(lm.name)
    bar = st.progress(0.0, text="Starting…")
    chart = st.empty()
    losses: list[float] = []

    show = progress_to(bar)

    def progress(fraction: float, message: str) -> None:
        show(fraction, message)
        found = re.search(r"KL ([0-9.]+)", message)  # "step 12/60  KL 3.210 nats"
        if found:
            losses.append(float(found.group(1)))
            fig = go.Figure(go.Scatter(y=losses, mode="lines"))
            fig.update_layout(height=220, margin={"t": 10, "b": 30}, xaxis_title="step", yaxis_title="KL (nats)")
            chart.plotly_chart(fig, width="stretch")

    config = TrainConfig(steps=int(steps), batch_size=int(batch), seq_len=64, vocab_subset=subset)
    try:
        result = train_tuned_lens(lm, corpus, out, config, corpus_name=corpus, progress=progress)
    except UserError as exc:
        show_user_error(exc)
        return
    bar.progress(1.0, text=f"Done: {result.steps_done} steps in {result.seconds:.0f} s, saved to {out}")
    st.success("Choose it on the Lens page with the 'Lens' selector.")
