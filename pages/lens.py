"""Layer-by-layer token probabilities: logit lens heatmap, tracked tokens, latent language."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from components.export import file_name, lens_html
from components.lens_plots import (
    METRICS,
    add_feature_strip,
    latent_language_figure,
    lens_heatmap,
    position_labels,
    show_token,
    topk_table,
    tracked_lines,
)
from components.linked_lens import concept_panel, feature_overlay, features_here_panel, reading_panel
from components.links import SHARE_PREFIX, sync_query_params
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


# --- links: every piece of the view lives in the URL ---------------------------------------------
TABS = ["Lens", "Logit vs tuned lens", "Latent language"]
LEGACY = {"prompt": "lens_prompt", "metric": "lens_metric", "track": "lens_track"}  # links made before the keys


def _link_keys(lens_dirs: list[str]) -> tuple[dict, dict]:
    """Session-state keys kept in the URL (``?key=value``; a long prompt as ``?s_lens_prompt=<share id>``), with
    their defaults and allowed values. The cell and window defaults (''/-1) mean "the last row/position"."""
    keys = {"lens_prompt": DEFAULT_PROMPT, "lens_metric": "top1", "lens_track": " Paris", "lens_topk": 10,
            "lens_sublayers": False, "lens_kind": "", "lens_tab": TABS[0], "lens_cell_row": "", "lens_cell_pos": -1,
            "lens_window": -1, "ll_source": "fr", "ll_target": "zh", "lens_feature": "", "lens_here": ""}
    options = {"lens_metric": list(METRICS), "lens_kind": ["", *lens_dirs], "lens_tab": TABS,
               "lens_topk": range(1, 51), "ll_source": list(LANGUAGES), "ll_target": list(LANGUAGES)}
    return keys, options


def _sync_link(lens_dirs: list[str], show: bool = False) -> None:
    """Fill the view's state from this session or the link, and write the current view back into the URL."""
    params = st.query_params
    for old, new in LEGACY.items():
        if old in params:
            if new not in params and SHARE_PREFIX + new not in params:
                params[new] = params[old]
            del params[old]
    keys, options = _link_keys(lens_dirs)
    problems = sync_query_params(keys, long_keys={"lens_prompt", "lens_track"}, options=options)
    for problem in problems if show else ():
        st.warning(problem)


def _clicked_cell(rows: int, cols: int) -> tuple[int, int] | None:
    """A cell clicked (or boxed) on the heatmap since the last run, read from the chart's state."""
    for data in selected_customdata(st.session_state.get("lens_heatmap") or {}):
        if len(data) == 2:
            r, c = int(data[0]), int(data[1])
            if 0 <= r < rows and 0 <= c < cols:
                return r, c
    return None


def _resolve_cell(result, prompt: str) -> tuple[int, int]:
    """The selected cell as (row, column) indices; a click wins, a new prompt starts at the last layer."""
    state = st.session_state
    names, positions = result.row_names, result.positions
    click = _clicked_cell(len(names), len(positions))
    if click != state.get("lens_last_click"):
        state["lens_last_click"] = click
        if click is not None:
            state["lens_cell_row"], state["lens_cell_pos"] = names[click[0]], positions[click[1]]
    elif state.get("lens_cell_prompt") not in (None, prompt):
        state.pop("lens_cell_row", None)
        state.pop("lens_cell_pos", None)
    state["lens_cell_prompt"] = prompt
    if state.get("lens_cell_row") not in names:
        state["lens_cell_row"] = names[-1]
    if state.get("lens_cell_pos") not in positions:
        state["lens_cell_pos"] = positions[-1]
    return names.index(state["lens_cell_row"]), positions.index(state["lens_cell_pos"])


# --- page -------------------------------------------------------------------------------------
def lens_tab(result, prompt: str, metric: str, top_k: int, lens_dir: str, lm) -> None:
    """Heatmap (with a linked feature's strip above it), the selected cell's top-k and the features active there,
    the tracked tokens, the linked feature's decoder reading and the downloads."""
    row, col = _resolve_cell(result, prompt)
    overlay = feature_overlay(lm, result, prompt)  # ?lens_feature=<dashboard>:<id>, from "Show on my prompt"
    fig = lens_heatmap(result, metric, selected=(row, col))
    if overlay is not None:
        add_feature_strip(fig, overlay.values, f"#{overlay.feature}", overlay.scale, position_labels(result))
    st.plotly_chart(fig, width="stretch", on_select="rerun", selection_mode=("points", "box"), key="lens_heatmap")
    st.caption(f"Self-check: the last layer read through the lens differs from the model's logits by at most "
               f"{result.self_check_max_abs_diff:.2g}. Click a cell (or drag a box over it) for its top-{top_k}.")
    left, right = st.columns([1, 2])
    with left:
        name = st.selectbox("Layer", result.row_names, key="lens_cell_row")
        pos = st.selectbox("Position", result.positions, key="lens_cell_pos",
                           format_func=lambda p: f"{p}: {result.tokens[p]!r}")
        row, col = result.row_names.index(name), result.positions.index(pos)
        st.dataframe(topk_table(result, row, col), hide_index=True, width="stretch")
        concept_panel(prompt, name, pos)
    figures = [fig]
    with right:
        if result.tracked_labels:
            kind = st.radio("Tracked tokens", ["prob", "rank"], horizontal=True,
                            format_func={"prob": "probability", "rank": "rank"}.get, key="lens_track_kind")
            lines = tracked_lines(result, col, kind)
            figures.append(lines)
            st.plotly_chart(lines, width="stretch", key="lens_tracked_chart")
            st.caption("Following " + "; ".join(result.tracked_notes))
        else:
            st.info("Add tracked tokens above to follow their probability and rank across layers.")
    features_here_panel(lm, result, row, col, prompt)
    if overlay is not None:
        reading_panel(lm, overlay, result, col, prompt)

    def html_file() -> str:  # made on click: the file embeds plotly.js (megabytes per rerun otherwise)
        source = {"model": lm.name, "lens": Path(lens_dir).name if lens_dir else "logit", "colour": METRICS[metric],
                  "selected cell": f"layer {name}, position {pos} ({show_token(result.tokens[pos], 20)})"}
        return lens_html(result, figures, source=source)

    d1, d2, _ = st.columns([1, 1, 2])
    d1.download_button("Download data (CSV)", lambda: pd.DataFrame(result.to_records()).to_csv(index=False),
                       file_name="logit_lens.csv", mime="text/csv", on_click="ignore", key="lens_csv")
    d2.download_button("Download HTML", html_file, file_name=file_name(result.lens, "lens", lm.name),
                       mime="text/html", on_click="ignore", key="lens_html",
                       help="One self-contained page (figures, tokens, tables) that opens offline.")


def comparison_tab(key: tuple, mid: str, result, args: tuple, lens_dir: str, lens_dirs: list[str]) -> None:
    if not lens_dirs:
        st.info("No tuned lens is trained for this model yet: train one on the Jobs page or with "
                "`make demo-lens`, then compare it with the logit lens here.")
        return
    chosen = lens_dir or lens_dirs[0]
    try:
        logit_result = result if not lens_dir else compute_lens(key, mid, *args, "")
        tuned_result = result if lens_dir == chosen else compute_lens(key, mid, *args, chosen)
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


def latent_tab(key: tuple, mid: str, lens_dir: str) -> None:
    st.caption("Few-shot translation prompts from the built-in concept list; per layer, the probability of the "
               "answer in the target language vs the same concept in English (Wendler et al., *Do Llamas Work in "
               "English?*). Bands: 95% confidence interval of the mean across items.")
    l1, l2, l3 = st.columns([1, 1, 1])
    codes = list(LANGUAGES)
    source = l1.selectbox("From", codes, format_func=lambda c: f"{LANGUAGES[c]} ({c})", key="ll_source")
    target = l2.selectbox("To", codes, format_func=lambda c: f"{LANGUAGES[c]} ({c})", key="ll_target")
    l3.write("")
    if not (l3.button("Run latent-language analysis", type="primary")
            or st.session_state.get("ll_done") == (mid, source, target)):
        return
    try:
        bar = st.progress(0.0, text=f"Reading out {source}→{target} translation prompts layer by layer…")
        summary = compute_latent(key, mid, source, target, lens_dir, _progress=progress_to(bar))
        bar.empty()
        st.session_state["ll_done"] = (mid, source, target)
        st.plotly_chart(latent_language_figure(summary, LANGUAGES[target]), width="stretch")
        items = summary["items"]
        st.caption(f"{items['kept']} of {items['total']} concepts kept: {items['answer_not_single_token']} answers "
                   f"are not a single token for this tokenizer, {items['english_overlaps_answer']} share their token "
                   "with English.")
    except UserError as exc:
        show_user_error(exc)


def _window(n: int, prompt: str) -> int:
    """First position shown of a prompt longer than MAX_COLUMNS (a new prompt starts at its end)."""
    state = st.session_state
    if n <= MAX_COLUMNS:
        state["lens_window"] = -1
        return 0
    last = n - MAX_COLUMNS
    if state.get("lens_window_prompt") not in (None, prompt) or not 0 <= state.get("lens_window", -1) <= last:
        state["lens_window"] = last
    state["lens_window_prompt"] = prompt
    return st.slider(f"The prompt has {n} tokens; showing {MAX_COLUMNS} positions from", 0, last, key="lens_window")


def main() -> None:
    st.title("Lens: layer-by-layer token probabilities")
    lm = current_model()
    key = model_key()
    mid = cache_key(lm)
    lens_dirs = [str(p) for p in list_lenses(lm)]
    _sync_link(lens_dirs, show=True)

    st.text_area("Prompt", key="lens_prompt", height=90,
                 help=f"Up to {min(lm.context_length or MAX_VIEW_TOKENS, MAX_VIEW_TOKENS):,} tokens.")
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    metric = c1.selectbox("Colour cells by", list(METRICS), format_func=METRICS.get, key="lens_metric")
    track_text = c2.text_input("Tracked tokens (comma-separated, spaces matter)", key="lens_track",
                               help="e.g. ' Paris, Paris, London': each is tokenised as the model would write it "
                                    "after the prompt; for a word of several tokens its first token is followed "
                                    "across layers.")
    top_k = int(c3.number_input("Top-k", min_value=1, max_value=50, key="lens_topk"))
    sublayers = c4.toggle("Sub-blocks", key="lens_sublayers", help="Also read out after each attention block.")
    track = tuple(t for t in track_text.split(",") if t.strip())
    lens_dir = st.radio(
        "Lens", ["", *lens_dirs], horizontal=True, key="lens_kind",
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

    positions = tuple(range(start := _window(len(ids), prompt), min(len(ids), start + MAX_COLUMNS)))
    if metric.startswith("tracked") and not track:
        st.info("Add a tracked token to colour by its probability or rank; showing top-1 probability.")
        metric = "top1"
    try:
        with st.spinner("Running the lens…"):
            result = compute_lens(key, mid, prompt, top_k, track, sublayers, positions, lens_dir)
    except UserError as exc:
        show_user_error(exc)
        st.stop()

    tab_lens, tab_compare, tab_latent = st.tabs(TABS, key="lens_tab", on_change="rerun")
    with tab_lens:
        lens_tab(result, prompt, metric, top_k, lens_dir, lm)
    _sync_link(lens_dirs)  # the cell and the window as this run resolved them
    with tab_compare:
        comparison_tab(key, mid, result, (prompt, top_k, track, sublayers, positions), lens_dir, lens_dirs)
    with tab_latent:
        latent_tab(key, mid, lens_dir)


main()
