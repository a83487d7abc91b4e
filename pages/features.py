"""SAE features: the feature browser (search, list, feature page, what fires on my text, feature map).

Reads dashboards built by :mod:`engine.features.build` (Jobs & data page or ``python -m engine dashboards``).
The view lives in the URL, so a copied link opens the same view in a fresh browser: ``dashboard`` (the build's
folder name; ``sae``, the SAE folder name, is the fallback), ``feature``, ``tab`` (feature, list, text, map), the
list's ``q``, ``sort``, ``order``, ``dense``, ``min_max``, ``min_det``, the search's ``find`` and ``find_mode``,
``text`` (what fires on my text), ``test`` (the feature's test text) and the map's ``map`` and ``map_color``;
default values are left out. The feature page downloads as one self-contained HTML file
(:func:`components.export.feature_html`) and its tables as CSV or parquet.
With no SAE for an embedded model, the page shows the demo SAE being built in the background
(:mod:`components.first_run`) and opens it when ready.
Every feature id comes with its cheap label (:mod:`engine.autointerp.labels`, built on a dashboard's first open),
and with its explanation and scores once explained (:mod:`components.autointerp_ui`).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from components.autointerp_ui import (
    FIND_MODES,
    explain_panel,
    explained,
    explanation_block,
    feature_labels,
    search_panel,
)
from components.export import feature_html, feature_tables, file_name, table_csv, table_parquet
from components.feature_views import (
    density_text,
    feature_map_figure,
    highlight_tokens_html,
    histogram_figure,
    logit_table,
    short_label,
    with_words,
)
from components.first_run import demo_progress, ensure_demo
from components.lens_plots import show_token
from components.linked_lens import open_dashboard, show_on_prompt_link
from components.session import cache_key, current_model, selected_customdata, show_user_error
from engine.core.errors import UserError
from engine.features.feature_map import decoder_cosines, feature_map
from engine.features.folder import DENSE_DENSITY
from engine.features.read import Dashboard, list_dashboards
from engine.features.text import text_activations

SORTS = {"density": "density", "max activation": "max_act", "mean activation": "mean_act", "feature id": "feature",
         "top logit token": "top_logits"}
SCORE_SORTS = {"detection score": "detection", "fuzzing score": "fuzzing"}  # offered once scores exist
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
TABS = {"Feature": "feature", "Feature list": "list", "What fires on my text": "text", "Feature map": "map"}
MAP_COLORS = {"log10 density": "density", "cosine to the current feature": "cosine"}
LINK_LIMIT = 200  # longer texts stay out of the URL
EXPORT_TABLES = {"top_activations": "top activations", "interval_samples": "interval samples",
                 "logits": "logit effects", "histogram": "histogram", "neighbours": "nearest features",
                 "cooccurring": "fires together with", "stats": "stats"}


def _dashboard(path: str, stamp: float) -> Dashboard:
    return open_dashboard(path, stamp)  # one shared object per build, also for the lens page's linked views


@st.cache_data(show_spinner=False, max_entries=64)
def _feature_data(path: str, stamp: float, feature: int) -> dict:
    return _dashboard(path, stamp).feature(feature)


# the tabs below all run on every rerun: every dashboard query goes through a cache keyed on the build
@st.cache_data(show_spinner=False, max_entries=8)
def _summary(path: str, stamp: float) -> dict:
    return _dashboard(path, stamp).summary()


@st.cache_data(show_spinner=False, max_entries=64)
def _feature_table(path: str, stamp: float, **query) -> pd.DataFrame:
    return _dashboard(path, stamp).feature_table(**query)


@st.cache_data(show_spinner=False, max_entries=256)
def _labels(path: str, stamp: float, features: tuple[int, ...]) -> dict:
    return _dashboard(path, stamp).labels(list(features))


@st.cache_data(show_spinner=False, max_entries=8)
def _map_data(path: str, stamp: float, method: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    dash = _dashboard(path, stamp)
    return feature_map(dash, method), dash.query("SELECT feature, density, act_tokens FROM features ORDER BY feature")


@st.cache_data(show_spinner=False, max_entries=64)
def _decoder_cosines(path: str, stamp: float, feature: int) -> list[float]:
    return decoder_cosines(_dashboard(path, stamp), feature)


@st.cache_data(show_spinner=False, max_entries=64)
def _contexts(path: str, stamp: float, feature: int, rows: tuple[int, ...], _tokenizer) -> list[dict]:
    return _dashboard(path, stamp).contexts(feature, list(rows), _tokenizer)


@st.cache_data(show_spinner=False, max_entries=16)
def _text_acts(path: str, stamp: float, model: str, text: str, _lm) -> tuple[list[str], np.ndarray]:
    dash = _dashboard(path, stamp)
    tokens, acts = text_activations(_lm, dash.sae(), dash.site, dash.layer, text)  # the cached SAE is left as is
    return tokens, acts.numpy()  # float32 on the host (text_activations sends it through to_host)


def _names(features) -> dict[int, str]:
    """Labels of a few features: the cheap label, else the dashboard's top activating tokens."""
    ids = tuple(sorted({int(f) for f in features}))
    missing = tuple(f for f in ids if not labels_of.get(f))
    tokens = _labels(path, stamp, missing) if missing else {}
    return {f: labels_of.get(f) or tokens.get(f, "") for f in ids}


def _number(text: str, hi: float = math.inf) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= hi:
        raise ValueError(text)
    return value


def _seed(key: str, param: str, parse, default) -> None:
    """A widget's first value: the link's ``param`` (parsed) on a fresh open, else ``default``; afterwards the
    widget's own state wins. A value the page cannot read falls back to the default."""
    if key in st.session_state:
        return
    raw = st.query_params.get(param)
    try:
        st.session_state[key] = default if raw is None else parse(raw)
    except (ValueError, KeyError):
        st.session_state[key] = default


def _keep(param: str, value, default=None) -> None:
    """Put ``value`` in the URL as ``param``; a default value (or a text too long for a link) is left out."""
    text = None if value is None or value == default else str(value)
    if text is None or len(text) > LINK_LIMIT:
        if param in st.query_params:
            del st.query_params[param]
    elif st.query_params.get(param) != text:
        st.query_params[param] = text


def _seed_view() -> None:
    """The page's widgets start from the link (see the module docstring for the parameters)."""
    by_slug = {slug: label for label, slug in TABS.items()}
    _seed("features_tab", "tab", by_slug.__getitem__, "Feature")
    _seed("features_find", "find", str, "")
    _seed("features_find_mode", "find_mode", lambda s: s if s in FIND_MODES else FIND_MODES[s], "words")
    sorts = {slug: label for label, slug in {**SORTS, **SCORE_SORTS}.items()}
    _seed("features_search", "q", str, "")
    _seed("features_sort", "sort", sorts.__getitem__, "density")
    _seed("features_desc", "order", {"desc": True, "asc": False}.__getitem__, True)
    _seed("features_hide_dense", "dense", {"hide": True, "show": False}.__getitem__, True)
    _seed("features_min_max", "min_max", _number, 0.0)
    _seed("features_min_detection", "min_det", partial(_number, hi=1.0), 0.0)
    _seed("fires_text", "text", str, DEFAULT_TEXT)
    _seed("feature_test_text", "test", str, "")
    _seed("map_method", "map", lambda s: s if s in ("umap", "pca") else {}[s], "umap")
    _seed("map_color", "map_color", {slug: label for label, slug in MAP_COLORS.items()}.__getitem__,
          "log10 density")


def _keep_view(dashboard: str, sae_name: str, feature) -> None:
    """Write the view into the URL (defaults left out), so that a copied link reproduces it."""
    state = st.session_state
    _keep("dashboard", dashboard)
    _keep("sae", sae_name)
    _keep("feature", None if feature is None else int(feature))
    _keep("tab", TABS.get(state.get("features_tab", "Feature")), "feature")
    _keep("find", state.get("features_find", "").strip(), "")
    _keep("find_mode", state.get("features_find_mode"), "words")
    _keep("q", state.get("features_search", "").strip(), "")
    _keep("sort", {**SORTS, **SCORE_SORTS}.get(state.get("features_sort")), "density")
    _keep("order", "desc" if state.get("features_desc", True) else "asc", "desc")
    _keep("dense", "hide" if state.get("features_hide_dense", True) else "show", "hide")
    _keep("min_max", f"{float(state.get('features_min_max') or 0):g}", "0")
    _keep("min_det", f"{float(state.get('features_min_detection') or 0):g}", "0")
    _keep("text", state.get("fires_text"), DEFAULT_TEXT)
    _keep("test", state.get("feature_test_text", "").strip(), "")
    _keep("map", state.get("map_method"), "umap")
    _keep("map_color", MAP_COLORS.get(state.get("map_color")), "density")


def _link(feature: int, dashboard: str, sae_name: str) -> str:
    """A relative link to ``feature``'s page on this dashboard (with the model's parameter)."""
    model = {"model": st.query_params["model"]} if "model" in st.query_params else {}
    return "?" + urlencode({**model, "dashboard": dashboard, "sae": sae_name, "feature": int(feature)})


def _downloads(feature: int, data: dict, top_contexts: list[dict], interval_contexts: list[dict] | None,
               label: str) -> None:
    """Download the feature page as one self-contained HTML file (made on click), and its tables."""
    row = words[words["feature"] == feature]
    explanation = row.iloc[0].to_dict() if len(row) else None
    tables = feature_tables(data, top_contexts, interval_contexts)
    stem = f"feature-{feature}-{chosen}"
    cols = st.columns([1.4, 2, 1, 1, 2.6], vertical_alignment="bottom")
    cols[0].download_button(
        "Download HTML", partial(feature_html, feature, data, top_contexts, label=label, explanation=explanation,
                                 manifest=dash.manifest, dashboard=chosen, interval_contexts=interval_contexts),
        file_name=file_name(stem), mime="text/html", on_click="ignore", key="feature_export_html",
        icon=":material/download:", help="One self-contained HTML file (works offline): stats, histogram, "
                                          "contexts, logit table, neighbours; PNGs from each figure's toolbar.")
    which = cols[1].selectbox("Table (CSV / parquet)", list(EXPORT_TABLES), key="feature_export_table",
                              format_func=EXPORT_TABLES.get)
    cols[2].download_button("CSV", partial(table_csv, tables[which]), file_name=file_name(stem, which, ext="csv"),
                            mime="text/csv", on_click="ignore", key="feature_export_csv")
    cols[3].download_button("Parquet", partial(table_parquet, tables[which]),
                            file_name=file_name(stem, which, ext="parquet"), mime="application/octet-stream",
                            on_click="ignore", key="feature_export_parquet")


def _open_feature(feature: int) -> None:
    """Callback: show ``feature`` on the Feature tab (applied before its widget is drawn)."""
    st.session_state["_features_pending"] = int(feature)


# --- page -----------------------------------------------------------------------------------
st.title("SAE features")
lm = current_model()
entries = list_dashboards(weights_hash=lm.weights_hash)
if not entries:
    demo = ensure_demo(lm)  # first run: the demo SAE is queued in the background (LATENT_EXPLORER_NO_DEMO=1: off)
    if demo is not None:
        demo_progress(demo.id, lm.name)
    else:
        st.info(f"No feature dashboards for **{lm.name}** yet. Build them on the **Jobs & data** page, or run "
                "`python -m engine dashboards --sae DIR --store DIR`.")
    st.stop()

params = st.query_params
_seed_view()
names = [entry["name"] for entry in entries]
labels = {entry["name"]: f"{entry['manifest']['sae_name']} · {entry['manifest']['site']} L{entry['manifest']['layer']}"
                         f" · {entry['manifest']['d_sae']:,} features" for entry in entries}
if "features_sae" not in st.session_state or st.session_state["features_sae"] not in names:
    wanted, build = params.get("sae"), params.get("dashboard")
    match = [e["name"] for e in entries if e["name"] == build]
    match = match or [e["name"] for e in entries if wanted in (e["name"], e["manifest"]["sae_name"])]
    if (wanted or build) and not match:
        st.error(f"No dashboard '{build or wanted}' for this model; showing another one.")
    st.session_state["features_sae"] = match[0] if match else names[0]
chosen = st.selectbox("SAE", names, key="features_sae", format_func=labels.get)
entry = next(e for e in entries if e["name"] == chosen)
path, stamp = entry["path"], entry["mtime"]
try:
    dash = _dashboard(path, stamp)
    summary = _summary(path, stamp)
except UserError as exc:
    show_user_error(exc)
    st.stop()
labels_of = feature_labels(path, stamp, lm.tokenizer)  # {feature: label}; built on this dashboard's first open
words = explained(path)  # explanations and scores, one row per explained feature
st.caption(f"{summary['features']:,} features · {summary['tokens']:,} tokens · {summary['dead']:,} dead · "
           f"{summary['dense']:,} dense (>{100 * DENSE_DENSITY:g} %) · store `{Path(dash.manifest['store_path']).name}`"
           + (f" · {len(words):,} explained" if len(words) else ""))

# the feature shown: query param on first load, then the number input; clicks elsewhere go through _pending
if "feature_id" not in st.session_state:
    raw = params.get("feature")
    try:
        st.session_state["feature_id"] = int(raw) if raw is not None else None
    except ValueError:
        st.error(f"The link's feature '{raw}' is not a number; enter a feature id.")
        st.session_state["feature_id"] = None
if "_features_pending" in st.session_state:
    st.session_state["feature_id"] = st.session_state.pop("_features_pending")
    st.session_state["features_tab"] = "Feature"  # a feature opened from a list, the map or a search: show it

search_panel(path, stamp, lm=lm, model=cache_key(lm), sae=dash.sae, labels=labels_of, open_feature=_open_feature)
tab_feature, tab_list, tab_text, tab_map = st.tabs(["Feature", "Feature list", "What fires on my text",
                                                    "Feature map"], key="features_tab", on_change="rerun")

# --- feature page -----------------------------------------------------------------------------
with tab_feature:
    st.number_input("Feature id", min_value=0, step=1, key="feature_id", placeholder="pick a feature from the list")
    feature = st.session_state.get("feature_id")
    if feature is None:
        st.info("Choose a feature in the list, on the map, or on your text; or type its id.")
    else:
        try:
            data = _feature_data(path, stamp, int(feature))
        except UserError as exc:
            show_user_error(exc)
            data = None
        if data is not None:
            stats = data["stats"]
            title = labels_of.get(int(feature)) or (stats["act_tokens"] or "").split(" | ")[0]
            st.subheader(f"Feature #{int(feature)}" + (f" — {title}" if title else ""))
            export_row = st.container()
            top_contexts, interval_contexts = [], None
            explanation_block(int(feature), words, path)
            cols = st.columns(4)
            cols[0].metric("Density", f"{100 * stats['density']:.3g} %", help=density_text(stats["density"]))
            cols[1].metric("Max activation", f"{stats['max_act']:.3g}")
            cols[2].metric("Mean when firing", f"{stats['mean_act']:.3g}")
            cols[3].metric("Firing tokens", f"{int(stats['count']):,}")
            if stats["dead"]:
                st.warning("This feature never fired on the store's tokens.")
            left, right = st.columns([3, 2])
            with left:
                if len(data["histogram"]):
                    st.plotly_chart(histogram_figure(data["histogram"], mark=data["top"]["act"].tolist()[:1]),
                                    key="feature_hist")
            with right:
                st.markdown("**Logit effects** (decoder direction · final-norm gain · unembedding)")
                st.dataframe(logit_table(data["logits"]), hide_index=True, height=260)
            top = data["top"]
            scale = float(stats["max_act"]) or 1.0
            if len(top):
                st.markdown("**Top activations**")
                top_contexts = _contexts(path, stamp, int(feature), tuple(int(r) for r in top["row"]),
                                         lm.tokenizer)
                st.markdown("".join(highlight_tokens_html(c["tokens"], c["acts"], scale, c["focus"],
                                                          prefix=f"{act:.3g}")
                                    for c, act in zip(top_contexts, top["act"])), unsafe_allow_html=True)
            samples = data["intervals"]
            if len(samples):
                with st.expander("Samples from activation intervals", expanded=False):
                    contexts = _contexts(path, stamp, int(feature), tuple(int(r) for r in samples["row"]),
                                         lm.tokenizer)
                    interval_contexts = contexts
                    blocks = []
                    for interval, group in samples.groupby("interval", sort=False):
                        first = group.iloc[0]
                        blocks.append(f"<div style='margin-top:8px;font-weight:600'>Interval {first['lo']:.3g} – "
                                      f"{first['hi']:.3g}</div>")
                        for index in group.index:
                            ctx = contexts[samples.index.get_loc(index)]
                            blocks.append(highlight_tokens_html(ctx["tokens"], ctx["acts"], scale, ctx["focus"],
                                                                prefix=f"{samples.loc[index, 'act']:.3g}"))
                    st.markdown("".join(blocks), unsafe_allow_html=True)
            with export_row:
                _downloads(int(feature), data, top_contexts, interval_contexts, title)
            st.markdown("**Nearest features** (decoder cosine)")
            neighbours = data["neighbours"]
            cols = st.columns(5)
            for i, row in enumerate(neighbours.itertuples()):
                label = labels_of.get(int(row.neighbour), "")
                cols[i % 5].button(f"#{row.neighbour} · {row.cosine:.2f} · {short_label(label, row.act_tokens)}",
                                   key=f"neighbour_{i}", on_click=_open_feature, args=(int(row.neighbour),),
                                   help=label or None)
            cooccurring = data["cooccurring"]
            if len(cooccurring):
                st.markdown("**Fires together with** (Jaccard index of the tokens each fires on)")
                cols = st.columns(5)
                for i, row in enumerate(cooccurring.itertuples()):
                    label = labels_of.get(int(row.other), "")
                    cols[i % 5].button(f"#{row.other} · {row.jaccard:.2f} · {short_label(label, row.act_tokens)}",
                                       key=f"cooccur_{i}", on_click=_open_feature, args=(int(row.other),),
                                       help=(f"{label} · " if label else "") + f"both fire on {row.together:,} tokens")
            test_text = st.text_input("Test this feature on your text", key="feature_test_text",
                                      placeholder="type a sentence and press Enter")
            st.link_button("Show on my prompt", show_on_prompt_link(chosen, int(feature), test_text),
                           icon=":material/stacked_line_chart:",
                           help="Open the lens on this text (or the lens's default prompt) with this feature's "
                                "activation drawn over the input tokens and its decoder direction read per layer.")
            if test_text.strip():
                try:
                    tokens, acts = _text_acts(path, stamp, cache_key(lm), test_text, lm)
                    column = acts[:, int(feature)]
                    st.markdown(highlight_tokens_html(tokens, column.tolist(), scale,
                                                      prefix=f"max {float(column.max()):.3g}"),
                                unsafe_allow_html=True)
                except UserError as exc:
                    show_user_error(exc)

# --- feature list -----------------------------------------------------------------------------
with tab_list:
    scored = bool(len(words)) and bool(words[["detection", "fuzzing"]].notna().any().any())
    sorts = {**SORTS, **(SCORE_SORTS if scored else {})}
    if st.session_state.get("features_sort") not in sorts:  # a link's score sort on a dashboard without scores
        st.session_state["features_sort"] = "density"
    cols = st.columns([3, 2, 1.4, 2, 2] + ([2] if scored else []))
    search = cols[0].text_input("Search tokens and logits", key="features_search",
                                placeholder="a word, or a feature id")
    sort = cols[1].selectbox("Sort by", list(sorts), key="features_sort")
    descending = cols[2].toggle("Descending", key="features_desc")
    hide_dense = cols[3].checkbox(f"Hide dense (>{100 * DENSE_DENSITY:g} %)", key="features_hide_dense")
    min_max = cols[4].number_input("Min max activation", min_value=0.0, key="features_min_max")
    min_detection = cols[5].slider("Min detection score", 0.0, 1.0, step=0.05, key="features_min_detection",
                                   help="keep explained features whose detection score reaches this (0.5 is "
                                        "chance)") if scored else 0.0
    by_score = sort in SCORE_SORTS or min_detection > 0  # the score filter and sort need every row
    try:
        table = _feature_table(path, stamp, sort="feature" if sort in SCORE_SORTS else SORTS[sort],
                               descending=descending, hide_dense=hide_dense, min_max_act=min_max, search=search,
                               limit=max(summary["features"], 1) if by_score else 1000)
        table = with_words(table, labels_of, words, sort=SCORE_SORTS.get(sort), descending=descending,
                           min_detection=min_detection)
    except UserError as exc:
        show_user_error(exc)
        table = pd.DataFrame()
    st.caption(f"{len(table):,} features shown (at most 1,000); select a row to open it.")
    if len(table):
        shown = table.assign(density=100 * table["density"], link=[_link(f, chosen, entry["manifest"]["sae_name"])
                                                                    for f in table["feature"]])
        extra = [c for c in ("explanation", "detection", "fuzzing") if c in shown and shown[c].notna().any()
                 and (shown[c] != "").any()]
        event = st.dataframe(
            shown[["feature", "label", *extra, "density", "max_act", "mean_act", "act_tokens", "top_logits",
                   "bottom_logits", "link"]],
            hide_index=True, on_select="rerun", selection_mode="single-row", key="features_table", height=460,
            column_config={"label": st.column_config.TextColumn("label", width="medium"),
                           "explanation": st.column_config.TextColumn("explanation", width="large"),
                           "detection": st.column_config.NumberColumn("detection", format="%.2f"),
                           "fuzzing": st.column_config.NumberColumn("fuzzing", format="%.2f"),
                           "density": st.column_config.NumberColumn("density %", format="%.3g"),
                           "max_act": st.column_config.NumberColumn("max", format="%.3g"),
                           "mean_act": st.column_config.NumberColumn("mean", format="%.3g"),
                           "act_tokens": "top activating tokens", "top_logits": "promotes",
                           "bottom_logits": "suppresses",
                           "link": st.column_config.LinkColumn("link", display_text="open")})
        selected = event.selection.rows if event is not None else []
        marker = (tuple(selected), search, sort, descending, hide_dense, min_max, min_detection)
        if selected and st.session_state.get("_features_list_pick") != marker:
            st.session_state["_features_list_pick"] = marker
            _open_feature(int(table["feature"].iloc[selected[0]]))
            st.rerun()
    explain_panel(path, dash.d_sae, table["feature"].tolist() if len(table) else [],
                  st.session_state.get("feature_id"))
    dead = _feature_table(path, stamp, dead=True, sort="feature", descending=False, limit=100_000)
    with st.expander(f"Dead features ({len(dead):,})"):
        st.write(", ".join(map(str, dead["feature"].tolist())) or "none")

# --- what fires on my text ----------------------------------------------------------------------
with tab_text:
    text = st.text_area("Your text", key="fires_text", height=90)
    if text.strip():
        try:
            tokens, acts = _text_acts(path, stamp, cache_key(lm), text, lm)
        except UserError as exc:
            show_user_error(exc)
            tokens, acts = [], np.zeros((0, dash.d_sae))
        if tokens:
            best = acts.max(axis=1)
            st.markdown(highlight_tokens_html(tokens, best.tolist(), float(best.max()) or 1.0,
                                              prefix="strongest feature per token"), unsafe_allow_html=True)
            k = min(3, acts.shape[1])
            top_ids = np.argsort(-acts, axis=1)[:, :k]
            names_of = _names(top_ids.reshape(-1).tolist())
            rows = [{"position": i, "token": show_token(tok, 16),
                     **{f"feature {j + 1}": (f"#{top_ids[i, j]} ({acts[i, top_ids[i, j]]:.2f}) "
                                             f"{names_of.get(int(top_ids[i, j]), '')}"
                                             if acts[i, top_ids[i, j]] > 0 else "")
                        for j in range(k)}} for i, tok in enumerate(tokens)]
            st.dataframe(pd.DataFrame(rows), hide_index=True, key="fires_tokens")
            position = st.selectbox("Rank features at token", list(range(len(tokens))), key="fires_position",
                                    index=int(np.argmax(best)),
                                    format_func=lambda i: f"{i}: {show_token(tokens[i], 20)}")
            order = np.argsort(-acts[position])[:20]
            order = [int(f) for f in order if acts[position, f] > 0]
            if order:
                ranked_labels = _names(order)
                ranked = pd.DataFrame({"feature": order, "activation": [float(acts[position, f]) for f in order],
                                       "label": [ranked_labels.get(f, "") for f in order]})
                explanations = dict(zip(words["feature"], words["explanation"]))
                if any(explanations.get(f) for f in order):
                    ranked["explanation"] = [explanations.get(f, "") for f in order]
                event = st.dataframe(ranked, hide_index=True, on_select="rerun", selection_mode="single-row",
                                     key="fires_ranked")
                selected = event.selection.rows if event is not None else []
                marker = (tuple(selected), position, text)
                if selected and st.session_state.get("_features_text_pick") != marker:
                    st.session_state["_features_text_pick"] = marker
                    _open_feature(order[selected[0]])
                    st.rerun()
                st.caption("Select a row to open that feature on the Feature tab.")
            else:
                st.caption("No feature fires on this token.")

# --- feature map --------------------------------------------------------------------------------
with tab_map:
    cols = st.columns([1, 2])
    method = cols[0].radio("Projection", ["umap", "pca"], key="map_method", horizontal=True)
    color_by = cols[1].radio("Colour by", ["log10 density", "cosine to the current feature"], key="map_color",
                             horizontal=True)
    ready = (Path(path) / f"map_{method}.parquet").is_file()
    if ready or st.button("Compute the map", key="map_compute",
                          help="UMAP of all decoder directions; the first UMAP in a session compiles for ~1 min."):
        try:
            with st.spinner("Projecting decoder directions…"):
                coords, stats = _map_data(path, stamp, method)
            current = st.session_state.get("feature_id")
            if color_by.startswith("cosine") and current is not None and 0 <= int(current) < dash.d_sae:
                color, title = _decoder_cosines(path, stamp, int(current)), f"cos to #{int(current)}"
                highlight = [int(current)]
            else:
                color, title = np.log10(stats["density"].to_numpy() + 1e-7).tolist(), "log10 density"
                highlight = [int(current)] if current is not None and 0 <= int(current) < dash.d_sae else []
            labels_map = [labels_of.get(int(f)) or str(t).split(" | ")[0]
                          for f, t in zip(stats["feature"], stats["act_tokens"])]
            event = st.plotly_chart(feature_map_figure(coords, color, title, labels_map, highlight),
                                    on_select="rerun", selection_mode="points", key="feature_map")
            points = selected_customdata(event)
            if points:
                picked = int(points[0][0])
                if st.session_state.get("_features_map_pick") != picked:
                    st.session_state["_features_map_pick"] = picked
                    _open_feature(picked)
                    st.rerun()
            st.caption("Click a point to open that feature on the Feature tab.")
        except UserError as exc:
            show_user_error(exc)

_keep_view(chosen, entry["manifest"]["sae_name"], st.session_state.get("feature_id"))
