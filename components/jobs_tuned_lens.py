"""Jobs page section: train a tuned lens for the loaded model (as a job; its KL curve shows in the job list)."""
from __future__ import annotations

import streamlit as st

from components.jobs_capture import PATH_PLACEHOLDER, checked_corpus, roots_help, with_enforced_roots
from components.jobs_ui import model_params, show_session_job
from components.session import submit_within_limits
from engine.lens.tuned import list_lenses


def render_tuned_lens_section(lm) -> None:
    st.subheader("Tuned lens")
    existing = list_lenses(lm)
    st.caption("One affine translator per layer, trained to match the final distribution (KL). "
               + (f"Lenses for this model: {', '.join(p.name for p in existing)}." if existing else
                  "No lens is trained for this model yet.")
               + " A cancelled or failed run resumes from its last checkpoint.")
    c1, c2, c3, c4 = st.columns(4)
    corpus = c1.text_input("Corpus", value="builtin", key="tl_corpus", placeholder="builtin, " + PATH_PLACEHOLDER,
                           help="builtin, builtin-multilingual, a .txt file, a folder of .txt files or a .jsonl "
                                "file. " + roots_help())
    steps = c2.number_input("Steps", 10, 5000, value=60, step=10, key="tl_steps")
    batch = c3.number_input("Windows per step", 1, 64, value=4, key="tl_batch")
    subset = c4.selectbox("Vocabulary", [None, 8192, 32768], key="tl_vocab",
                          format_func=lambda v: "full (exact)" if v is None else f"{v:,} most likely tokens",
                          help="A subset makes each step much cheaper on CPU for large vocabularies.")
    if st.button("Train tuned lens", key="tl_start", type="primary"):
        checked = checked_corpus(corpus)
        if checked is not None:
            config = {"steps": int(steps), "batch_size": int(batch), "seq_len": 64, "vocab_subset": subset}
            params = with_enforced_roots("train_tuned_lens", {**model_params(), "corpus": checked, "config": config})
            submit_within_limits({"kind": "train_tuned_lens", "params": params}, "tuned_lens",
                                 "choose the lens on the Lens page with the 'Lens' selector when it is done.")
    show_session_job("tuned_lens")
