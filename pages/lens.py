"""Layer-by-layer token probabilities: logit lens heatmap, tracked tokens, latent language."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from components.lens_plots import METRICS, latent_language_figure, lens_heatmap, topk_table, tracked_lines
from components.session import (
    cache_key,
    current_model,
    get_model_by_key,
    model_key,
    progress_to,
    selected_customdata,
    show_user_error,
)
from components.tuned_lens_ui import DISAGREEMENT, comparison_figure, disagreement_heatmap, summary_line
from engine.core.errors import UserError
from engine.data.prompt_sets import LANGUAGES
from engine.lens.compare import compare_lenses
from engine.lens.latent_language import run_latent_language
from engine.lens.logit import check_prompt, run_lens
from engine.lens.tuned import TunedLens, list_lenses

DEFAULT_PROMPT = "The capital of France is"
MAX_COLUMNS = 40        # heatmap columns drawn at once; longer prompts get a window slider
MAX_VIEW_TOKENS = 4096  # the view's own limit on top of the model's context length


@st.cache_resource(show_spinner=False, max_entries=4)
def load_tuned_lens(key: tuple, model_id: str, folder: str, mtime: float) -> TunedLens:
    return TunedLens.load(folder, get_model_by_key(key)).to(get_model_by_key(key).device)


def _lens_transform(key: tuple, model_id: str, lens_dir: str):
    """(transform, name) for the chosen lens; '' is the logit lens."""
    if not lens_dir:
        return None, "logit"
    return load_tuned_lens(key, model_id, lens_dir, Path(lens_dir).stat().st_mtime), "tuned"


@st.cache_data(show_spinner=False, max_entries=64)
def compute_lens(key: tuple, model_id: str, prompt: str, top_k: int, track: tuple[str, ...], sublayers: bool,
                 positions: tuple[int, ...], lens_dir: str = ""):
    lm = get_model_by_key(key)
    transform, name = _lens_transform(key, model_id, lens_dir)
    return run_lens(lm, prompt, top_k=top_k, track=list(track), sublayers=sublayers, positions=list(positions),
                    max_tokens=MAX_VIEW_TOKENS, transform=transform, lens_name=name)


@st.cache_data(show_spinner=False, max_entries=32)
def compute_latent(key: tuple, model_id: str, source: str, target: str, lens_dir: str = "", _progress=None) -> dict:
    lm = get_model_by_key(key)
    transform, name = _lens_transform(key, model_id, lens_dir)
    return run_latent_language(lm, source, target, transform=transform, lens_name=name, progress=_progress).summary()


@st.cache_data(show_spinner=False, max_entries=8)
def compute_comparison(key: tuple, model_id: str, lens_dir: str, tokens: int, _progress=None):
    lm = get_model_by_key(key)
    transform, _ = _lens_transform(key, model_id, lens_dir)
    return compare_lenses(lm, transform, "builtin", max_tokens=tokens, progress=_progress)


def _init_state() -> None:
    params = st.query_params
    defaults = {"lens_prompt": params.get("prompt", DEFAULT_PROMPT), "lens_metric": params.get("metric", "top1"),
                "lens_track": params.get("track", " Paris"), "lens_topk": 10, "lens_sublayers": False}
    for name, value in defaults.items():
        st.session_state.setdefault(name, value)
    if st.session_state["lens_metric"] not in METRICS:
        st.session_state["lens_metric"] = "top1"


def _selected_cell(event, rows: int, cols: int) -> tuple[int, int] | None:
    for data in selected_customdata(event):
        if len(data) == 2:
            r, c = int(data[0]), int(data[1])
            if 0 <= r < rows and 0 <= c < cols:
                return r, c
    return None


st.title("Lens: layer-by-layer token probabilities")
lm = current_model()
key = model_key()
mid = cache_key(lm)
_init_state()

st.text_area("Prompt", key="lens_prompt", height=90,
             help=f"Up to {min(lm.context_length or MAX_VIEW_TOKENS, MAX_VIEW_TOKENS):,} tokens.")
c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
metric = c1.selectbox("Colour cells by", list(METRICS), format_func=METRICS.get, key="lens_metric")
track_text = c2.text_input("Tracked tokens (comma-separated, spaces matter)", key="lens_track",
                           help="e.g. ' Paris, Paris, London': each is tokenised as the model would write it after "
                                "the prompt; for a word of several tokens its first token is followed across layers.")
top_k = c3.number_input("Top-k", min_value=1, max_value=50, key="lens_topk")
sublayers = c4.toggle("Sub-blocks", key="lens_sublayers", help="Also read out after each attention block.")
track = tuple(t for t in (part for part in track_text.split(",")) if t.strip())

lens_dirs = [str(p) for p in list_lenses(lm)]
lens_options = [""] + lens_dirs
lens_dir = st.radio(
    "Lens", lens_options, horizontal=True, key="lens_kind",
    format_func=lambda d: "Logit lens" if not d else f"Tuned lens ({Path(d).name})",
    help="The tuned lens adds a learned affine translator per layer before the final norm and unembedding. "
         "Train one on the Jobs page or with `make demo-lens`." + ("" if lens_dirs else
                                                                    " None is trained for this model yet."))

prompt = st.session_state["lens_prompt"]
try:
    ids = check_prompt(prompt, lm.tokenizer, lm.context_length, MAX_VIEW_TOKENS)
except UserError as exc:
    show_user_error(exc)
    st.stop()

n = len(ids)
start = 0
if n > MAX_COLUMNS:
    start = st.slider(f"The prompt has {n} tokens; showing {MAX_COLUMNS} positions from", 0, n - MAX_COLUMNS,
                      value=n - MAX_COLUMNS, key="lens_window")
positions = tuple(range(start, min(n, start + MAX_COLUMNS)))

if metric.startswith("tracked") and not track:
    st.info("Add a tracked token to colour by its probability or rank; showing top-1 probability.")
    metric = "top1"
try:
    with st.spinner("Running the lens…"):
        result = compute_lens(key, mid, prompt, int(top_k), track, sublayers, positions, lens_dir)
except UserError as exc:
    show_user_error(exc)
    st.stop()
st.query_params.update({"prompt": prompt, "metric": metric, "track": track_text})

fig = lens_heatmap(result, metric)
event = st.plotly_chart(fig, width="stretch", on_select="rerun", selection_mode=("points", "box"),
                        key="lens_heatmap")
st.caption(f"Self-check: the last layer read through the lens differs from the model's logits by at most "
           f"{result.self_check_max_abs_diff:.2g}. Click a cell (or drag a box over it) for its top-{int(top_k)}.")

rows, cols = len(result.row_names), len(result.positions)
picked = _selected_cell(event, rows, cols)
view = hash((prompt, positions, sublayers, picked))  # a new prompt or a click resets the cell pickers
left, right = st.columns([1, 2])
with left:
    default_row, default_col = picked or (rows - 1, cols - 1)
    row = st.selectbox("Layer", range(rows), index=default_row, format_func=lambda r: result.row_names[r],
                       key=f"cell_row_{view}")
    col = st.selectbox("Position", range(cols), index=default_col,
                       format_func=lambda c: f"{result.positions[c]}: {result.tokens[result.positions[c]]!r}",
                       key=f"cell_col_{view}")
    st.dataframe(topk_table(result, row, col), hide_index=True, width="stretch")
with right:
    if result.tracked_labels:
        kind = st.radio("Tracked tokens", ["prob", "rank"], horizontal=True,
                        format_func={"prob": "probability", "rank": "rank"}.get, key="lens_track_kind")
        st.plotly_chart(tracked_lines(result, col, kind), width="stretch")
        st.caption("Following " + "; ".join(result.tracked_notes))
    else:
        st.info("Add tracked tokens above to follow their probability and rank across layers.")

d1, d2 = st.columns(2)  # the files are made on click (the HTML embeds plotly.js: megabytes per rerun otherwise)
d1.download_button("Download data (CSV)", lambda: pd.DataFrame(result.to_records()).to_csv(index=False),
                   file_name="logit_lens.csv", mime="text/csv", on_click="ignore")
d2.download_button("Download figure (HTML)", lambda: fig.to_html(include_plotlyjs=True), file_name="logit_lens.html",
                   mime="text/html", on_click="ignore")

if lens_dirs:
    st.divider()
    st.subheader("Logit lens vs tuned lens")
    chosen = lens_dir or lens_dirs[0]
    try:
        logit_result = result if not lens_dir else compute_lens(key, mid, prompt, int(top_k), track, sublayers,
                                                                positions, "")
        tuned_result = result if lens_dir == chosen else compute_lens(key, mid, prompt, int(top_k), track,
                                                                      sublayers, positions, chosen)
        how = st.selectbox("Disagreement on this prompt", list(DISAGREEMENT), format_func=DISAGREEMENT.get,
                           key="lens_disagreement")
        st.plotly_chart(disagreement_heatmap(logit_result, tuned_result, how), width="stretch")
        st.caption(summary_line(logit_result, tuned_result))
        tokens = st.select_slider("Held-out tokens for the per-layer comparison", [128, 256, 512, 1024], value=256,
                                  key="lens_cmp_tokens")
        if st.button("Compare KL and cross-entropy per layer on held-out text", key="lens_cmp_run") or \
                st.session_state.get("lens_cmp_done") == (mid, chosen, tokens):
            bar = st.progress(0.0, text="Scoring held-out text with both lenses…")
            comparison = compute_comparison(key, mid, chosen, tokens, _progress=progress_to(bar))
            bar.empty()
            st.session_state["lens_cmp_done"] = (mid, chosen, tokens)
            st.plotly_chart(comparison_figure(comparison), width="stretch")
            st.dataframe(pd.DataFrame(comparison.to_records()).round(3), hide_index=True)
    except UserError as exc:
        show_user_error(exc)

st.divider()
st.subheader("Latent language")
st.caption("Few-shot translation prompts from the built-in concept list; per layer, the probability of the answer "
           "in the target language vs the same concept in English (Wendler et al., *Do Llamas Work in English?*). "
           "Bands: 95% confidence interval of the mean across items.")
l1, l2, l3 = st.columns([1, 1, 1])
codes = list(LANGUAGES)
source = l1.selectbox("From", codes, index=codes.index("fr"), format_func=lambda c: f"{LANGUAGES[c]} ({c})",
                      key="ll_source")
target = l2.selectbox("To", codes, index=codes.index("zh"), format_func=lambda c: f"{LANGUAGES[c]} ({c})",
                      key="ll_target")
l3.write("")
if l3.button("Run latent-language analysis", type="primary") or st.session_state.get("ll_done") == (mid, source,
                                                                                                     target):
    try:
        bar = st.progress(0.0, text=f"Reading out {source}→{target} translation prompts layer by layer…")
        summary = compute_latent(key, mid, source, target, lens_dir, _progress=progress_to(bar))
        bar.empty()
        st.session_state["ll_done"] = (mid, source, target)
        st.plotly_chart(latent_language_figure(summary, LANGUAGES[target]), width="stretch")
        items = summary["items"]
        st.caption(f"{items['kept']} of {items['total']} concepts kept: {items['answer_not_single_token']} answers are "
                   f"not a single token for this tokenizer, {items['english_overlaps_answer']} share their token "
                   "with English.")
    except UserError as exc:
        show_user_error(exc)
