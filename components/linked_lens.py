"""Linked views on the lens page, and the links that lead there.

- :func:`features_here_panel`: the SAE features active at the selected cell (dashboards of this model whose SAE
  reads that row's residual, :func:`engine.features.here.dashboards_at`), ranked, each with its label and a link
  to its page on the feature browser; selecting a row draws that feature over the lens.
- :func:`concept_link`: "where this token sits in concept space", a link to the concept page at that layer.
- :func:`feature_overlay` / :func:`reading_panel`: ``?lens_feature=<dashboard>:<id>`` (from "Show on my prompt"
  on the feature page, :func:`show_on_prompt_link`) draws the feature's activation per input token above the
  heatmap (:func:`components.lens_plots.add_feature_strip`) and reads its decoder direction through the lens.

Links are relative to the current page (so they work under a base path) and open a fresh view: everything they
show comes from their query parameters. Page url paths are the ones app.py gives the pages.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from components.autointerp_ui import explained, feature_labels
from components.lens_plots import show_token
from components.links import LONG_CHARS, SHARE_PREFIX
from components.session import cache_key, show_user_error
from engine.core import shares
from engine.core.errors import UserError
from engine.features.here import (
    MAX_TOKENS,
    DirectionReading,
    dashboards_at,
    feature_activations,
    feature_reading,
    features_here,
    resolve_feature_ref,
    row_sites,
)
from engine.features.read import Dashboard, list_dashboards

LENS_PAGE = "./"                 # the lens is app.py's default page, served at the root
FEATURES_PAGE = "sae-features"   # url paths from app.PAGES
CONCEPTS_PAGE = "concept-space"
HERE_K = 20                      # features listed per cell
READING_K = 6                    # tokens per layer in the decoder-direction reading


@st.cache_resource(show_spinner=False, max_entries=4)
def open_dashboard(path: str, stamp: float) -> Dashboard:
    """One shared :class:`Dashboard` per build (and its SAE, loaded once): callers must not change it."""
    return Dashboard.open(path)


@st.cache_data(show_spinner=False, max_entries=32)
def _here(path: str, stamp: float, model: str, prompt: str, positions: tuple[int, ...], _lm):
    dash = open_dashboard(path, stamp)
    return features_here(_lm, dash.sae(), dash.site, dash.layer, prompt, positions, k=HERE_K, max_tokens=MAX_TOKENS)


@st.cache_data(show_spinner=False, max_entries=32)
def _strip(path: str, stamp: float, model: str, prompt: str, feature: int, positions: tuple[int, ...],
           _lm) -> list[float]:
    dash = open_dashboard(path, stamp)
    return feature_activations(_lm, dash.sae(), dash.site, dash.layer, prompt, feature, positions).tolist()


@st.cache_data(show_spinner=False, max_entries=32)
def _reading(path: str, stamp: float, model: str, prompt: str, position: int, feature: int, scale: float,
             _lm) -> DirectionReading:
    return feature_reading(_lm, open_dashboard(path, stamp).sae(), feature, scale, prompt, position, k=READING_K)


@st.cache_data(show_spinner=False, max_entries=64)
def _max_act(path: str, stamp: float, feature: int) -> float:
    table = open_dashboard(path, stamp).query("SELECT max_act FROM features WHERE feature = ?", [int(feature)])
    return float(table["max_act"].iloc[0]) if len(table) else 0.0


def _names(entry: dict, features: list[int], tokenizer) -> dict[int, str]:
    """Each feature's cheap label, else its top activating tokens."""
    labels = feature_labels(entry["path"], entry["mtime"], tokenizer)
    missing = [f for f in features if not labels.get(f)]
    tokens = open_dashboard(entry["path"], entry["mtime"]).labels(missing) if missing else {}
    return {f: labels.get(f) or tokens.get(f, "") for f in features}


# --- links -----------------------------------------------------------------------------------------
def _model_param() -> dict:
    return {"model": st.query_params["model"]} if "model" in st.query_params else {}


def _prompt_param(name: str, prompt: str) -> dict:
    """``name=prompt``, or ``s_<name>=<share id>`` for a prompt too long for a link."""
    if len(prompt) > LONG_CHARS:
        return {SHARE_PREFIX + name: shares.put(prompt)}
    return {name: prompt}


def feature_page_link(entry: dict, feature: int) -> str:
    """The feature's page on the feature browser (the parameters pages/features.py reads)."""
    return FEATURES_PAGE + "?" + urlencode({**_model_param(), "dashboard": entry["name"],
                                            "sae": entry["manifest"]["sae_name"], "feature": int(feature)})


def show_on_prompt_link(dashboard: str, feature: int, text: str = "") -> str:
    """The lens page on ``text`` (its default prompt when empty) with the feature drawn over it."""
    prompt = _prompt_param("lens_prompt", text) if text.strip() else {}
    return LENS_PAGE + "?" + urlencode({**_model_param(), **prompt, "lens_feature": f"{dashboard}:{int(feature)}"})


def concept_link(prompt: str, position: int, row: str) -> str | None:
    """The concept page at the row's layer, with this prompt's token at ``position`` (a lens position, BOS = 0)
    marked; None for a row name that is not a lens row."""
    sites = row_sites(row)
    if not sites:
        return None
    site, layer = sites[0]
    params = {**_model_param(), "concept_layer": layer, **({} if site == "resid_post" else {"concept_site": site}),
              **_prompt_param("concept_point_prompt", prompt), "concept_point_pos": int(position)}
    return CONCEPTS_PAGE + "?" + urlencode(params)


# --- features active here --------------------------------------------------------------------------
def _no_sae_line(lm, row: str, entries: list[dict]) -> str:
    where = " or ".join(f"{site} at layer {layer}" for site, layer in row_sites(row)
                        if layer < lm.anatomy.n_layers)
    have = sorted({f"{e['manifest']['site']} L{e['manifest']['layer']}" for e in entries})
    return (f"No SAE of {lm.name} reads layer {row} ({where}): train one on the **Jobs & data** page (capture "
            "that site, train an SAE, build its dashboards) or run `python -m engine dashboards --sae DIR --store "
            "DIR`." + (f" Dashboards exist for {', '.join(have)}." if have else ""))


def _pick_dashboard(matching: list[dict]) -> dict:
    """The dashboard for the panel (a selectbox when several SAEs read this row; kept in ``lens_here``)."""
    names = [e["name"] for e in matching]
    if len(names) == 1:
        return matching[0]
    if st.session_state.get("lens_here") not in names:
        st.session_state["lens_here"] = names[0]
    labels = {e["name"]: f"{e['manifest']['sae_name']} · {e['manifest']['site']} L{e['manifest']['layer']} · "
                         f"{e['manifest']['d_sae']:,} features" for e in matching}
    if len(set(labels.values())) < len(labels):  # builds of one SAE (e.g. on two stores): name the builds too
        labels = {name: f"{label} · {name}" for name, label in labels.items()}
    st.selectbox("SAE", names, key="lens_here", format_func=labels.get)
    return matching[names.index(st.session_state["lens_here"])]


def _here_table(lm, entry: dict, ranked: list[tuple[int, float]]) -> pd.DataFrame:
    ids = [f for f, _ in ranked]
    names = _names(entry, ids, lm.tokenizer)
    table = pd.DataFrame({"feature": ids, "activation": [a for _, a in ranked],
                          "label": [names.get(f, "") for f in ids]})
    words = explained(entry["path"])
    explanations = dict(zip(words["feature"], words["explanation"]))
    if any(explanations.get(f) for f in ids):
        table["explanation"] = [explanations.get(f, "") for f in ids]
    table["page"] = [feature_page_link(entry, f) for f in ids]
    return table


def features_here_panel(lm, result, row: int, col: int, prompt: str) -> None:
    """Under the selected cell: the features of an SAE reading that row, ranked by activation at its position."""
    name, position = result.row_names[row], result.positions[col]
    st.markdown(f"**Features active here** (layer {name}, position {position}: "
                f"`{show_token(result.tokens[position], 20)}`)")
    entries = list_dashboards(weights_hash=lm.weights_hash)
    matching = dashboards_at(entries, name)
    if not matching:
        st.caption(_no_sae_line(lm, name, entries))
        return
    entry = _pick_dashboard(matching)
    try:
        found = _here(entry["path"], entry["mtime"], cache_key(lm), prompt, tuple(result.positions), lm)
    except UserError as exc:
        show_user_error(exc)
        return
    if not found.read[found.positions.index(position)]:
        st.caption(f"Position {position} is the tokenizer's special token {result.tokens[position]!r}: SAEs are not "
                   "read there (their dashboards skip it too). Pick a later position.")
        return
    ranked = found.at(position)
    if not ranked:
        st.caption("No feature of this SAE fires at this position.")
        return
    table = _here_table(lm, entry, ranked)
    event = st.dataframe(table, hide_index=True, key="lens_here_table", on_select="rerun",
                         selection_mode="single-row", column_config={
                             "activation": st.column_config.NumberColumn("activation", format="%.3g"),
                             "page": st.column_config.LinkColumn("feature page", display_text="open")})
    st.caption(f"SAE `{entry['manifest']['sae_name']}` ({entry['manifest']['site']} at layer "
               f"{entry['manifest']['layer']}), strongest first. *open* shows a feature's page; select a row to draw "
               "that feature over the lens.")
    picked = event.selection.rows if event is not None else []
    marker = (tuple(picked), entry["name"], name, position, prompt)
    if picked and st.session_state.get("_lens_here_pick") != marker:
        st.session_state["_lens_here_pick"] = marker
        st.session_state["lens_feature"] = f"{entry['name']}:{int(table['feature'].iloc[picked[0]])}"
        st.rerun()


def concept_panel(prompt: str, row: str, position: int) -> None:
    url = concept_link(prompt, position, row)
    if url is not None:
        st.link_button("Where this token sits in concept space", url, icon=":material/scatter_plot:",
                       help=f"The concept page at layer {row_sites(row)[0][1]}, with this token's point marked.")


# --- a feature drawn over the lens ------------------------------------------------------------------
@dataclass
class Overlay:
    entry: dict
    feature: int
    label: str
    values: list[float]  # activation per shown position (NaN on special tokens)
    scale: float         # the feature's max activation on the dashboard (0: it never fired there)


def _hide_feature() -> None:
    st.session_state["lens_feature"] = ""


def feature_overlay(lm, result, prompt: str) -> Overlay | None:
    """The feature ``lens_feature`` names, with its activation at the shown positions; a bad link: one sentence."""
    ref = str(st.session_state.get("lens_feature") or "")
    if not ref:
        return None
    try:
        entry, feature = resolve_feature_ref(ref, lm.weights_hash, lm.name, list_dashboards())
        path, stamp = entry["path"], entry["mtime"]
        values = _strip(path, stamp, cache_key(lm), prompt, feature, tuple(result.positions), lm)
        scale = _max_act(path, stamp, feature)
    except UserError as exc:
        show_user_error(exc)
        st.button("Remove the feature from the view", key="lens_feature_clear", on_click=_hide_feature)
        return None
    label = _names(entry, [feature], lm.tokenizer).get(feature, "")
    return Overlay(entry, feature, label, values, scale)


def _reading_table(reading: DirectionReading) -> pd.DataFrame:
    rows = []
    for r, name in enumerate(reading.rows):
        rows.append({"layer": name, "top-1 before": show_token(reading.before[r], 16),
                     "top-1 after": show_token(reading.after[r], 16),
                     **{f"rise {j + 1}": f"{show_token(reading.tokens[r][j], 16)} ({reading.rises[r, j]:+.2f})"
                        for j in range(reading.rises.shape[1])}})
    return pd.DataFrame(rows)


def reading_panel(lm, overlay: Overlay, result, col: int, prompt: str) -> None:
    """The decoder direction at the feature's max activation, added at the selected position, read per layer."""
    entry, feature = overlay.entry, overlay.feature
    position = result.positions[col]
    scale = overlay.scale if overlay.scale > 0 else 1.0
    head, hide = st.columns([5, 1])
    head.markdown(f"**Feature #{feature}** of `{entry['name']}`" + (f" — {overlay.label}" if overlay.label else "")
                  + f": its activation per token is the strip above the heatmap ([feature page]"
                    f"({feature_page_link(entry, feature)})).")
    hide.button("Hide the feature", key="lens_feature_hide", on_click=_hide_feature)
    try:
        reading = _reading(entry["path"], entry["mtime"], cache_key(lm), prompt, position, feature, scale, lm)
    except UserError as exc:
        show_user_error(exc)
        return
    st.markdown(f"**Its decoder direction through the lens**: added to the residual at position {position} "
                f"(`{show_token(result.tokens[position], 20)}`), the tokens whose log-probability rises most at each "
                "layer (nats).")
    st.dataframe(_reading_table(reading), hide_index=True, key="lens_feature_reading")
    size = (f"its largest activation on the dashboard, {scale:.3g}" if overlay.scale > 0 else
            "activation 1 (it never fired on the dashboard's tokens)")
    st.caption(f"Decoder row × {size}, added where the SAE writes ({reading.site} at layer {reading.layer}; norm of the added "
               f"vector {reading.norm:.3g}); logit lens. Select another position to move it.")
