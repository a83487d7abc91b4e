"""Linked views on the concept page: a token of any prompt placed in the projection, and the lens and SAE features of a
selection of points. The computing is in :mod:`engine.geometry.selection`; this module draws and caches.

URL state (kept by the page's ``sync_query_params``): ``concept_point_prompt`` (or ``s_concept_point_prompt``, a share
for a long prompt) and ``concept_point_pos`` (-1: the last token) place the token; ``concept_sel`` (a share id in
``s_concept_sel``) holds the selected point numbers, ``concept_sel_dash`` the dashboard whose features are listed.

A selection made on the chart is Plotly's own; a selection from a link is drawn with ``selectedpoints``. Streamlit
names a chart by its figure, so a figure that changes is a new chart with no selection: :func:`selection_marks`
keeps drawing the same figure while the chart itself shows the selection, and :func:`take_event` takes a change of
selection only from the chart that was drawn last time.
"""
from __future__ import annotations

import re
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from components.autointerp_ui import feature_labels
from components.concept_plots import mean_lens_figure
from components.session import get_model_by_key, show_user_error
from engine.core.errors import UserError
from engine.features.read import Dashboard, list_dashboards
from engine.geometry.projections import procrustes_fit
from engine.geometry.selection import (
    LENS_SITES,
    MeanLens,
    Projector,
    SelectionFeatures,
    TokenPoint,
    check_points,
    fit_projector,
    selection_features,
    selection_lens,
    token_point,
)

FEATURES_PAGE = "sae-features"   # url path of pages/features.py (app.PAGES)
LENS_K = 5                       # tokens per layer in the lens of the selection's mean
FEATURES_N = 15                  # features listed for a selection
POINT_KEYS = {"concept_point_prompt": "", "concept_point_pos": -1}
SELECTION_KEYS = {"concept_sel": [], "concept_sel_dash": ""}
_CHART = "_concept_sel_chart"    # session_state: the chart drawn last time, its marks and its selection
_GENERATION = "_concept_chart_generation"


# --- cached computations (string keys; clouds and models come from the page's resource caches) -----------
@st.cache_data(show_spinner=False, max_entries=64)
def _token(key: tuple, model_id: str, prompt: str, position: int, site: str, layer: int) -> TokenPoint:
    return token_point(get_model_by_key(key), prompt, position, site, layer)


@st.cache_resource(show_spinner=False, max_entries=4)
def _projector(spec: tuple, layer: int, method: str, dims: int, normalize: bool, _cloud) -> Projector:
    return fit_projector(_cloud.at(layer), method, dims, normalize=normalize)


@st.cache_data(show_spinner=False, max_entries=64)
def _mean_lens(spec: tuple, points: tuple[int, ...], top_k: int, _cloud) -> MeanLens:
    return selection_lens(get_model_by_key(spec[1]), _cloud, points, top_k)


@st.cache_resource(show_spinner=False, max_entries=4)
def _dashboard(path: str, stamp: float) -> Dashboard:
    """One shared dashboard (and its SAE, loaded once) per build: callers must not change it."""
    return Dashboard.open(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _features(spec: tuple, layer: int, path: str, stamp: float, points: tuple[int, ...], top_n: int,
              _cloud) -> SelectionFeatures:
    vectors = _cloud.at(layer)[check_points(points, _cloud.n_points)]
    return selection_features(_dashboard(path, stamp).sae(), vectors, top_n=top_n)


# --- the token placed in the projection ----------------------------------------------------------------------
def point_inputs() -> None:
    """The prompt and position of the token to place (filled by a link from the lens page, or typed here)."""
    state = st.session_state
    with st.expander("Place a token of your own prompt", expanded=bool(state.get("concept_point_prompt"))):
        cols = st.columns([6, 2])
        cols[0].text_input("Prompt", key="concept_point_prompt", placeholder="e.g. The capital of France is Paris",
                           help="Runs the model on this text and marks one of its tokens in the projection.")
        cols[1].number_input("Position", step=1, key="concept_point_pos",
                             help="Token position counted from 0 (the first token, e.g. BOS); -1 is the last token.")


def _clear_point() -> None:
    st.session_state.update(POINT_KEYS)


def place_token(spec: tuple, cloud, layer: int, method: str, dims: int, normalize: bool, raw: np.ndarray,
                shown: np.ndarray) -> tuple[list[float], str] | None:
    """The linked token's coordinates in the drawn projection and its label, or None (nothing asked, or an error
    shown). ``raw``: the layer's projection; ``shown``: what is drawn (the same, or aligned to the previous layer)."""
    state = st.session_state
    prompt, position = state.get("concept_point_prompt", ""), int(state.get("concept_point_pos", -1))
    if not prompt:
        if position != -1:
            show_user_error(UserError(f"The link gives position {position} but no prompt: type the prompt whose "
                                      "token to place."))
        return None
    slow = method == "umap"
    try:
        with st.spinner("Placing your token" + (" (fitting UMAP once more to transform it)…" if slow else "…")):
            point = _token(spec[1], spec[2], prompt, position, cloud.site, layer)
            xy = _projector(spec, layer, method, dims, normalize, cloud).transform(point.vector)[0]
    except UserError as exc:
        show_user_error(exc)
        return None
    if shown is not raw:  # the drawn layer is aligned onto the previous one: move the token the same way
        start, matrix, end = procrustes_fit(raw, shown)
        xy = (xy - start) @ matrix + end
    cols = st.columns([8, 1])
    where = "one token; the cloud's points are means over each prompt's tokens" if spec[-1] == "mean" else "one token"
    cols[0].caption(f"★ {point.label} of “{prompt if len(prompt) <= 80 else prompt[:79] + '…'}”, {point.site} "
                    f"layer {point.layer} ({where}), placed with the cloud's own {method.upper()} fit.")
    cols[1].button("Clear", key="concept_point_clear", on_click=_clear_point, help="Remove the token from the view.")
    return [float(v) for v in xy], point.label


# --- the selection ----------------------------------------------------------------------------------------------
def valid_selection(n_points: int) -> list[int]:
    """The selection (from the chart or the link) checked against the cloud; a bad one is dropped with a sentence."""
    state = st.session_state
    chosen = state.get("concept_sel") or []
    if not chosen:
        return []
    try:
        return check_points(chosen, n_points).tolist()
    except UserError as exc:
        show_user_error(exc)
        state["concept_sel"] = []
        return []


def chart_key(dims: int) -> str:
    """The scatter's widget key; a new generation (after "clear selection") is a new chart without a selection."""
    return f"concept_scatter_{dims}_{st.session_state.get(_GENERATION, 0)}"


def selection_marks(base: tuple) -> list[int]:
    """The points the figure drawn for ``base`` marks as selected: the selection, unless the chart drawn last time
    with the same inputs made it itself (then the same figure again, so the chart keeps showing it)."""
    last = st.session_state.get(_CHART)
    selection = list(st.session_state.get("concept_sel") or [])
    if last and last["base"] == base and last["event"] and last["event"] == selection:
        return last["marks"]
    return selection


def take_event(base: tuple, marks: list[int], chosen: list[int]) -> bool:
    """Record what the chart reports; a change on the chart drawn last time becomes the selection (True)."""
    state = st.session_state
    last = state.get(_CHART)
    changed = bool(last) and last["base"] == base and last["marks"] == marks and chosen != last["event"]
    if changed:
        state["concept_sel"] = list(chosen)
    state[_CHART] = {"base": base, "marks": list(marks), "event": list(chosen)}
    return changed


def _clear_selection() -> None:
    state = st.session_state
    state["concept_sel"] = []
    state[_GENERATION] = state.get(_GENERATION, 0) + 1


def clear_selection_button() -> None:
    st.button("Clear selection", key="concept_sel_clear", on_click=_clear_selection)


# --- what the selection means -----------------------------------------------------------------------------------
def _escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|~$])", r"\\\1", " ".join(str(text).split()))


def feature_link(entry: dict, feature: int) -> str:
    """The feature's page in the feature browser (relative, so it works under any base path)."""
    model = {"model": st.query_params["model"]} if "model" in st.query_params else {}
    sae = {"sae": entry["manifest"]["sae_name"]} if entry["manifest"].get("sae_name") else {}
    return FEATURES_PAGE + "?" + urlencode({**model, "dashboard": entry["name"], **sae, "feature": int(feature)})


def lens_panel(spec: tuple, cloud, points: list[int]) -> None:
    st.markdown("**Lens of the selection's mean**")
    if cloud.site not in LENS_SITES:
        st.info(f"The logit lens reads the residual stream; these points are at {cloud.site}. Choose the site "
                f"{' or '.join(LENS_SITES)} to read the selection's mean.")
        return
    try:
        with st.spinner("Reading the mean through the lens…"):
            lens = _mean_lens(spec, tuple(points), LENS_K, cloud)
    except UserError as exc:
        show_user_error(exc)
        return
    st.caption(f"The mean hidden state of the {lens.n_points} selected points at every layer ({cloud.site}), read "
               "through the model's final norm and unembedding (logit lens): its top tokens and probabilities.")
    st.plotly_chart(mean_lens_figure(lens.layers, lens.top_tokens, lens.top_probs, lens.site, lens.n_points),
                    key="concept_sel_lens", width="stretch")
    st.download_button("Download lens (CSV)", pd.DataFrame(lens.records()).to_csv(index=False).encode(),
                       file_name="selection-lens.csv", mime="text/csv", key="concept_sel_lens_csv")


def _choose_dashboard(entries: list[dict]) -> dict:
    state = st.session_state
    names = [e["name"] for e in entries]
    if state.get("concept_sel_dash") not in names:
        state["concept_sel_dash"] = names[0]  # the newest
    if len(entries) > 1:
        st.selectbox("Dashboard", names, key="concept_sel_dash")
    return entries[names.index(state["concept_sel_dash"])]


def features_panel(spec: tuple, cloud, layer: int, points: list[int]) -> None:
    st.markdown("**Features most active on them**")
    lm = get_model_by_key(spec[1])
    entries = [e for e in list_dashboards(weights_hash=lm.weights_hash)
               if e["manifest"].get("site") == cloud.site and int(e["manifest"].get("layer", -1)) == int(layer)]
    if not entries:
        st.info(f"No SAE feature dashboard of {lm.name} reads {cloud.site} at layer {layer}: train an SAE there and "
                "build its dashboards on the Jobs & data page, or move to a layer that has one.")
        return
    entry = _choose_dashboard(entries)
    try:
        with st.spinner("Encoding the selected points with the SAE…"):
            found = _features(spec, layer, entry["path"], entry["mtime"], tuple(points), FEATURES_N, cloud)
            names = feature_labels(entry["path"], entry["mtime"]) or {}
            missing = [f for f in found.features if not names.get(f)]
            names = {**_dashboard(entry["path"], entry["mtime"]).labels(missing), **names} if missing else names
    except UserError as exc:
        show_user_error(exc)
        return
    if not found.features:
        st.caption(f"No feature of {entry['name']} fires on any of the {found.n_points} selected points.")
        return
    st.caption(f"SAE '{entry['manifest'].get('sae_name', entry['name'])}' ({cloud.site}, layer {layer}) on each of "
               f"the {found.n_points} selected points, ranked by mean activation; *fires on* counts the points where "
               "it is active, *on the mean* is its activation on the selection's mean vector.")
    lines = ["| feature | label | mean act | fires on | max act | on the mean |", "|---|---|---:|---:|---:|---:|"]
    for row in found.records():
        f = row["feature"]
        lines.append(f"| [#{f}]({feature_link(entry, f)}) | {_escape(names.get(f, ''))[:80]} | {row['mean_act']:.3g} "
                     f"| {row['fires_on']} of {found.n_points} | {row['max_act']:.3g} | {row['on_mean']:.3g} |")
    st.markdown("\n".join(lines))


def selection_panels(spec: tuple, cloud, layer: int, points: list[int]) -> None:
    """The lens of the selection's mean and the features most active on it, side by side."""
    left, right = st.columns([1, 1])
    with left:
        lens_panel(spec, cloud, points)
    with right:
        features_panel(spec, cloud, layer, points)
