"""SAE features: the feature browser (search, list, feature page, what fires on my text, feature map).

Reads dashboards built by :mod:`engine.features.build` (Jobs & data page or ``python -m engine dashboards``).
Query parameters ``sae`` (SAE folder name or dashboard folder name) and ``feature`` open a feature directly.
Every feature id comes with its cheap label (:mod:`engine.autointerp.labels`, built on a dashboard's first open),
and with its explanation and scores once explained (:mod:`components.autointerp_ui`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from components.autointerp_ui import explain_panel, explained, explanation_block, feature_labels, search_panel
from components.feature_views import (
    density_text,
    feature_map_figure,
    highlight_tokens_html,
    histogram_figure,
    logit_table,
    short_label,
    with_words,
)
from components.lens_plots import show_token
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


@st.cache_resource(show_spinner=False, max_entries=4)
def _dashboard(path: str, stamp: float) -> Dashboard:
    return Dashboard.open(path)


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


def _open_feature(feature: int) -> None:
    """Callback: show ``feature`` on the Feature tab (applied before its widget is drawn)."""
    st.session_state["_features_pending"] = int(feature)


# --- page -----------------------------------------------------------------------------------
st.title("SAE features")
lm = current_model()
entries = list_dashboards(weights_hash=lm.weights_hash)
if not entries:
    st.info(f"No feature dashboards for **{lm.name}** yet. Build them on the **Jobs & data** page, or run "
            "`python -m engine dashboards --sae DIR --store DIR`.")
    st.stop()

params = st.query_params
names = [entry["name"] for entry in entries]
labels = {entry["name"]: f"{entry['manifest']['sae_name']} · {entry['manifest']['site']} L{entry['manifest']['layer']}"
                         f" · {entry['manifest']['d_sae']:,} features" for entry in entries}
if "features_sae" not in st.session_state or st.session_state["features_sae"] not in names:
    wanted = params.get("sae")
    match = [e["name"] for e in entries if wanted in (e["name"], e["manifest"]["sae_name"])]
    if wanted and not match:
        st.error(f"No dashboard for the SAE '{wanted}' on this model; showing another one.")
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
params["sae"] = entry["manifest"]["sae_name"]
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
            params["feature"] = str(int(feature))
            stats = data["stats"]
            title = labels_of.get(int(feature)) or (stats["act_tokens"] or "").split(" | ")[0]
            st.subheader(f"Feature #{int(feature)}" + (f" — {title}" if title else ""))
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
                contexts = _contexts(path, stamp, int(feature), tuple(int(r) for r in top["row"]), lm.tokenizer)
                st.markdown("".join(highlight_tokens_html(c["tokens"], c["acts"], scale, c["focus"],
                                                          prefix=f"{act:.3g}")
                                    for c, act in zip(contexts, top["act"])), unsafe_allow_html=True)
            samples = data["intervals"]
            if len(samples):
                with st.expander("Samples from activation intervals", expanded=False):
                    contexts = _contexts(path, stamp, int(feature), tuple(int(r) for r in samples["row"]),
                                         lm.tokenizer)
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
    cols = st.columns([3, 2, 1.4, 2, 2] + ([2] if scored else []))
    search = cols[0].text_input("Search tokens and logits", key="features_search",
                                placeholder="a word, or a feature id")
    sort = cols[1].selectbox("Sort by", list(sorts), key="features_sort")
    descending = cols[2].toggle("Descending", value=True, key="features_desc")
    hide_dense = cols[3].checkbox(f"Hide dense (>{100 * DENSE_DENSITY:g} %)", value=True, key="features_hide_dense")
    min_max = cols[4].number_input("Min max activation", min_value=0.0, value=0.0, key="features_min_max")
    min_detection = cols[5].slider("Min detection score", 0.0, 1.0, 0.0, 0.05, key="features_min_detection",
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
        shown = table.assign(density=100 * table["density"], link=[f"?sae={params['sae']}&feature={f}"
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
    text = st.text_area("Your text", value=DEFAULT_TEXT, key="fires_text", height=90)
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
