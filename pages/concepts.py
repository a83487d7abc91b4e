"""Concept space: PCA/UMAP of hidden states per layer, spread measures per layer, layer-wise probes.

Linked views (:mod:`components.linked_concepts`): ``?concept_layer=L&concept_point_prompt=…&concept_point_pos=P``
places one token of any prompt in the projection (a link from the lens page); a box or lasso selection, kept in the
URL as ``s_concept_sel``, shows the lens of the selected points' mean and the SAE features most active on them.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from components.concept_plots import (
    MANY,
    TOP_N,
    add_token_point,
    category_count,
    find_highlight,
    geometry_figure,
    is_numeric_label,
    mark_selection,
    probe_figure,
    scatter_figure,
)
from components.export import concept_html, file_name
from components.linked_concepts import (
    POINT_KEYS,
    SELECTION_KEYS,
    chart_key,
    clear_selection_button,
    place_token,
    point_inputs,
    selection_marks,
    selection_panels,
    take_event,
    valid_selection,
)
from components.links import sync_query_params
from components.session import (
    cache_key,
    current_model,
    get_model_by_key,
    model_key,
    selected_customdata,
    show_user_error,
)
from engine.core.errors import UserError
from engine.core.models import cache_root
from engine.core.sites import SITES
from engine.data.corpora import PROMPT_SETS, prompt_set
from engine.data.store import ActivationStore, list_stores
from engine.geometry.probes import probe_by_layer
from engine.geometry.projections import (
    POSITION_MODES,
    procrustes_align,
    project,
    prompt_cloud,
    store_cloud,
    umap_ready,
    warm_up_umap,
)
from engine.geometry.spread import geometry_by_layer

POSITION_NAMES = {"last": "last token of each prompt", "all": "every token", "mean": "mean over tokens"}


# --- cached computations (string keys; the model comes from the shared resource cache) ---------
@st.cache_resource(show_spinner=False, max_entries=12)
def prompt_points(key: tuple, model_id: str, set_name: str, site: str, positions: str):
    return prompt_cloud(get_model_by_key(key), prompt_set(set_name), site=site, positions=positions)


@st.cache_resource(show_spinner=False, max_entries=6)
def store_points(key: tuple, model_id: str, path: str, updated: str, site: str, max_points: int):
    store = ActivationStore.open(path)
    lm = get_model_by_key(key)
    store.check_model(lm)
    return store_cloud(store, site=site, max_points=max_points, tokenizer=lm.tokenizer)


def _cloud(spec: tuple):
    kind, *rest = spec
    return prompt_points(*rest) if kind == "prompts" else store_points(*rest)


@st.cache_data(show_spinner=False, max_entries=512)
def projection(spec: tuple, layer: int, method: str, dims: int, normalize: bool):
    return project(_cloud(spec).at(layer), method, dims, normalize=normalize, cache_dir=cache_root() / "projections")


@st.cache_data(show_spinner=False, max_entries=512)
def aligned_projection(spec: tuple, layer: int, method: str, dims: int, normalize: bool):
    """Procrustes chain from the first layer: each layer is aligned onto the (aligned) previous one."""
    layers = _cloud(spec).layers
    coords = projection(spec, layer, method, dims, normalize)
    position = layers.index(layer)
    if position == 0:
        return coords
    return procrustes_align(coords, aligned_projection(spec, layers[position - 1], method, dims, normalize))


@st.cache_data(show_spinner=False, max_entries=64)
def geometry(spec: tuple, concept_label: str | None, language_label: str | None) -> dict:
    return geometry_by_layer(_cloud(spec), concept_label, language_label)


@st.cache_data(show_spinner=False, max_entries=64)
def probes(spec: tuple, label: str, group_label: str | None = None) -> dict:
    return probe_by_layer(_cloud(spec), label, group_label=group_label).to_json()


# --- widgets ------------------------------------------------------------------------------
def _selected_points(event) -> list[int]:
    return sorted({int(data[0]) for data in selected_customdata(event)})


def choose_source(lm, key: tuple, mid: str) -> tuple | None:
    source = st.radio("Points from", ["Prompt set", "Activation store"], horizontal=True, key="concept_source")
    if source == "Prompt set":
        cols = st.columns([2, 2, 2])
        name = cols[0].selectbox("Prompt set", list(PROMPT_SETS), key="concept_set",
                                 format_func=lambda n: f"{n} ({len(prompt_set(n).texts)} prompts)")
        positions = cols[1].selectbox("Positions", POSITION_MODES, key="concept_positions",
                                      format_func=POSITION_NAMES.get)
        site = cols[2].selectbox("Site", SITES, key="concept_site")  # resid_post unless the link says otherwise
        st.caption(prompt_set(name).description)
        return ("prompts", key, mid, name, site, positions)
    entries = list_stores(complete=True)
    if not entries:
        st.info("No activation store yet: capture one on the Jobs page, or use a prompt set.")
        return None
    ours = [e for e in entries if e["manifest"].get("weights_hash") == lm.weights_hash]
    if not ours:
        st.warning(f"None of the {len(entries)} stores was captured from {lm.name}; load the model a store was "
                   "captured from, or capture one for this model on the Jobs page.")
        return None
    cols = st.columns([4, 2, 2])
    labels = {e["path"]: f"{e['manifest'].get('corpus') or e['name']} · {e['manifest']['n_tokens']:,} tokens · "
                         f"{e['name']}" for e in ours}
    path = cols[0].selectbox("Store", list(labels), format_func=labels.get, key="concept_store")
    entry = next(e for e in ours if e["path"] == path)
    site = cols[1].selectbox("Site", entry["manifest"]["sites"], key="concept_store_site")
    max_points = cols[2].number_input("Points (sampled tokens)", 100, 50_000, 3000, step=500,
                                      key="concept_store_points")
    return ("store", key, mid, path, str(entry["manifest"].get("updated", entry["mtime"])), site, int(max_points))


def _points_table(coords, cloud, spec: tuple) -> pd.DataFrame:
    table = pd.DataFrame({"point": range(cloud.n_points), **{axis: coords[:, k] for k, axis in
                                                              enumerate("xyz"[:coords.shape[1]])}})
    for name, values in cloud.labels.items():
        table[name] = values
    if "text" not in cloud.labels:
        table["context"] = cloud.hover
    if spec[0] == "store":
        table.insert(1, "store row", cloud.row_ids)
    return table


@st.fragment
def scatter_with_selection(spec: tuple, cloud, layer: int, method: str, dims: int, normalize: bool, align: bool,
                           color: str, top_n: int, highlight: str) -> None:
    """Scatter and the table of selected points live in one fragment, so a selection reruns only this; so do the
    linked views (a token placed in the projection, the lens and features of the selection)."""
    point_inputs()
    busy = "Projecting" if method == "pca" or umap_ready() else "Projecting (the first UMAP compiles; ~30-60 s)"
    try:
        with st.spinner(f"{busy}…"):
            coords = projection(spec, layer, method, dims, normalize)
            shown = aligned_projection(spec, layer, method, dims, normalize) if align else coords
    except UserError as exc:
        show_user_error(exc)
        return
    token = place_token(spec, cloud, layer, method, dims, normalize, coords, shown)
    points, found = find_highlight(cloud.labels, color, highlight)
    if highlight.strip():
        st.caption(f"Highlighting {len(points)} points: {found}." if points else
                   f"Nothing matches '{highlight.strip()}' in the labels; showing every point.")
    title = f"{cloud.name}: {method.upper()} of {cloud.site}, layer {layer} ({cloud.n_points:,} points)"
    figure = scatter_figure(shown, cloud.label(color), cloud.hover, color, title=title, top_n=top_n,
                            highlight=points, highlight_name=highlight.strip())
    if token is not None:
        add_token_point(figure, *token)
    chosen = valid_selection(cloud.n_points)
    base = (spec, layer, method, dims, normalize, align, color, top_n, highlight, token and tuple(token[0]))
    marks = selection_marks(base)
    if marks:
        mark_selection(figure, marks)
    event = st.plotly_chart(figure, on_select="rerun", selection_mode=("box", "lasso", "points"),
                            key=chart_key(dims), width="stretch")
    if take_event(base, marks, _selected_points(event)):
        chosen = valid_selection(cloud.n_points)
    sync_link()  # a new selection or token into the URL (a fragment rerun does not reach the page's own call)

    def html_file() -> str:  # made on click: the file embeds plotly.js
        notes = [f"Colour: {color}" + (f"; highlighted: {found}" if points else "") + ".",
                 "Points normalised to unit length before projecting." if normalize else "",
                 "Each layer's projection aligned onto the previous one (Procrustes)." if align else ""]
        source = {"model": spec[2].split("|")[0], "points": cloud.name, "site": cloud.site, "layer": layer,
                  "projection": f"{method.upper()} ({dims}-D)"}
        return concept_html(figure, _points_table(shown, cloud, spec), title=title, notes=notes, source=source)

    d1, d2, _ = st.columns([1, 1, 3])
    d1.download_button("Download points (CSV)", lambda: _points_table(shown, cloud, spec).to_csv(index=False),
                       file_name=file_name("concept", cloud.name, method, f"layer{layer}", ext="csv"),
                       mime="text/csv", on_click="ignore", key="concept_points_csv")
    d2.download_button("Download HTML", html_file, file_name=file_name("concept", cloud.name, method, f"layer{layer}"),
                       mime="text/html", on_click="ignore", key="concept_html",
                       help="One self-contained page (the interactive scatter and every point) that opens offline.")
    if not chosen:
        st.caption("Select points (box or lasso) to list their contexts, read their mean through the lens and see "
                   "the SAE features most active on them.")
        return
    table = pd.DataFrame({"point": chosen, "context": [cloud.hover[i] for i in chosen],
                          **{name: [values[i] for i in chosen] for name, values in cloud.labels.items()}})
    if spec[0] == "store":
        table.insert(1, "store row", [cloud.row_ids[i] for i in chosen])
    st.markdown(f"**{len(chosen)} selected points**")
    st.dataframe(table, hide_index=True, width="stretch", height=min(400, 40 + 35 * len(chosen)))
    c1, c2, _ = st.columns([1, 1, 3])
    c1.download_button("Download selection (CSV)", table.to_csv(index=False).encode(), file_name="selection.csv",
                       mime="text/csv", key="concept_download")
    with c2:
        clear_selection_button()
    selection_panels(spec, cloud, layer, chosen)


def geometry_section(spec: tuple, cloud, concept_label: str | None) -> None:
    st.caption("Spread of the point cloud per layer. Average cosine and I(V) are known to mislead; the PCA-based "
               "and entropy-based measures (effective rank) are the reliable ones. For multilingual sets, "
               "translations of one concept against different concepts (centred cosine).")
    multilingual = bool(concept_label) and "language" in cloud.labels and concept_label in cloud.labels
    if st.button("Compute spread measures", key="concept_geometry_button"):
        st.session_state["concept_geometry_for"] = spec
    if st.session_state.get("concept_geometry_for") == spec:
        try:
            with st.spinner("Measuring every layer…"):
                result = geometry(spec, concept_label if multilingual else None,
                                  "language" if multilingual else None)
        except UserError as exc:
            show_user_error(exc)
            return
        st.plotly_chart(geometry_figure(result), width="stretch", key="concept_geometry_chart")
        frame = pd.DataFrame({"layer": result["layers"], **result["measures"]})
        st.download_button("Download measures (CSV)", frame.to_csv(index=False).encode(), file_name="spread.csv",
                           mime="text/csv", key="concept_geometry_download")


def probe_section(spec: tuple, cloud, default: str, concept_label: str | None) -> None:
    st.caption("Cross-validated logistic-regression accuracy per layer for one label (\"concept depth\").")
    labels = [name for name in cloud.labels if name not in ("text",)]
    label = st.selectbox("Label to probe", labels, index=labels.index(default) if default in labels else 0,
                         key="concept_probe_label")
    if st.button("Run probes", key="concept_probe_button"):
        st.session_state["concept_probe_for"] = (spec, label)
    if st.session_state.get("concept_probe_for") == (spec, label):
        try:
            with st.spinner("Training one probe per layer…"):
                curve = probes(spec, label, concept_label)
        except UserError as exc:
            show_user_error(exc)
            return
        st.plotly_chart(probe_figure(curve), width="stretch", key="concept_probe_chart")
        if curve.get("grouped_by"):
            st.caption(f"Folds are grouped by '{curve['grouped_by']}': every translation of a concept is in the same "
                       "fold, so a probe is never tested on a concept it saw in another language. The dotted line "
                       "ignores the groups (for comparison only: there the probe can recognise the concept itself).")


# --- links -------------------------------------------------------------------------------
TABS = ["Projection", "Spread & geometry", "Concept depth (probes)"]
SOURCES = ["Prompt set", "Activation store"]
LINK_KEYS = {"concept_source": SOURCES[0], "concept_set": next(iter(PROMPT_SETS)), "concept_positions": "last",
             "concept_site": "resid_post", "concept_layer": -1, "concept_method": "pca", "concept_dims": 2,
             "concept_color": "", "concept_top_n": TOP_N, "concept_highlight": "", "concept_normalize": False,
             "concept_align": False, "concept_tab": TABS[0], **POINT_KEYS, **SELECTION_KEYS}
# layer -1, colour '': the prompt set's defaults; the linked views' keys: components.linked_concepts
LINK_OPTIONS = {"concept_source": SOURCES, "concept_set": list(PROMPT_SETS), "concept_positions": POSITION_MODES,
                "concept_site": SITES, "concept_method": ["pca", "umap"], "concept_dims": [2, 3],
                "concept_top_n": range(1, 49), "concept_tab": TABS}


def sync_link(show: bool = False) -> None:
    """The view's state from this session or the link (``?concept_set=months&concept_layer=3…``), and the current
    view back into the URL; a long highlight or token prompt, and the selection, go in as share ids."""
    problems = sync_query_params(LINK_KEYS, long_keys={"concept_highlight", "concept_point_prompt", "concept_sel"},
                                 options=LINK_OPTIONS)
    for problem in problems if show else ():
        st.warning(problem)


def resolve_view(spec: tuple, cloud, color_options: list[str], default_color: str) -> None:
    """Put the cloud-dependent widgets (layer, colour) on valid values: the link's, else the set's defaults."""
    state = st.session_state
    if state.get("concept_color_for") not in (None, spec[3]):  # another set: its own default colour
        state["concept_color"] = ""
    state["concept_color_for"] = spec[3]
    site_at = 4 if spec[0] == "prompts" else 5
    points_from = spec[:site_at] + spec[site_at + 1:]  # the same points at another site keep their numbers
    if state.get("concept_sel_for") not in (None, points_from):  # other points: the selected numbers mean nothing
        state["concept_sel"] = []
    state["concept_sel_for"] = points_from
    if state.get("concept_color") not in color_options:
        state["concept_color"] = default_color if default_color in color_options else color_options[0]
    if state.get("concept_layer") not in cloud.layers:
        state["concept_layer"] = cloud.layers[len(cloud.layers) // 2]


# --- page ---------------------------------------------------------------------------------
st.title("Concept space")
lm = current_model()
key, mid = model_key(), cache_key(lm)
warm_up_umap()  # numba compiles in a background thread while the user looks around

sync_link(show=True)
spec = choose_source(lm, key, mid)
if spec is None:
    st.stop()
try:
    with st.spinner("Capturing hidden states…"):
        cloud = _cloud(spec)
except UserError as exc:
    show_user_error(exc)
    st.stop()

pset = prompt_set(spec[3]) if spec[0] == "prompts" else None
color_options = [name for name in cloud.labels if name != "text" or cloud.n_points <= 200]
resolve_view(spec, cloud, color_options, pset.default_color if pset else "position")
sync_link()

cols = st.columns([5, 2, 1, 2])
layer = cols[0].select_slider("Layer", options=cloud.layers, key="concept_layer")
method = cols[1].radio("Projection", ["pca", "umap"], horizontal=True, key="concept_method",
                       format_func=str.upper)
dims = cols[2].radio("Dims", [2, 3], horizontal=True, key="concept_dims")
color = cols[3].selectbox("Colour by", color_options, key="concept_color")
labels = cloud.label(color)
many = not is_numeric_label(labels) and category_count(labels) > MANY
cols = st.columns([3, 2, 2, 3] if many else [3, 2, 3])
highlight = cols[0].text_input("Highlight", key="concept_highlight", placeholder="type a concept, e.g. dog",
                               help="Points whose label is (or, failing that, contains) this text are drawn larger; "
                                    "the others are dimmed.")
top_n = TOP_N
if many:
    top_n = int(cols[1].number_input(f"Top {color}s coloured", 1, 48, key="concept_top_n",
                                     help=f"{category_count(labels)} {color} values: the N with the most points get "
                                          "their own colour and legend entry, the rest are grey ('other')."))
normalize = cols[-2].checkbox("Unit-normalise points", key="concept_normalize",
                              help="Divide each hidden state by its norm before projecting (tames outlier norms).")
align = cols[-1].checkbox("Align consecutive layers (Procrustes)", key="concept_align",
                          help="Rotate each layer's projection onto the previous one so points move smoothly.")
warming = st.empty()
if method == "umap" and not umap_ready():
    warming.caption("UMAP is still compiling in the background (once per server, up to a minute).")
tab_projection, tab_geometry, tab_probe = st.tabs(TABS, key="concept_tab", on_change="rerun")
with tab_projection:
    scatter_with_selection(spec, cloud, layer, method, dims, normalize, align, color, top_n, highlight)
    warming.empty()  # the projection above has waited for the compilation
with tab_geometry:
    geometry_section(spec, cloud, pset.concept_label if pset else None)
with tab_probe:
    probe_section(spec, cloud, pset.default_probe if pset else "position", pset.concept_label if pset else None)
