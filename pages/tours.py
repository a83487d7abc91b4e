"""Tours: short guided walks that reproduce the papers' findings live on the loaded model.

Thin page: pick a tour and its one "try this" setting (both kept in the URL), run it through
``st.cache_data`` (string keys), then show its steps, figures, verdict and checks.
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from components.session import cache_key, current_model, get_model_by_key, model_key, show_user_error
from components.tour_views import tour_view, verdict_badge
from engine.core.errors import UserError
from engine.tours import TOURS, default_params, disk_inputs, parse_params, run_tour, tuned_lens_job_spec

PREFIX = "t_"  # query parameters of the tour's settings: ?tour=circular&t_layer=9


@st.cache_data(show_spinner=False, max_entries=64)
def compute(key: tuple, model_id: str, tour: str, params_json: str, on_disk: str) -> dict:
    """One tour run, as plain data (``on_disk`` only keys the cache: lenses, dashboards)."""
    return run_tour(get_model_by_key(key), tour, **json.loads(params_json)).to_json()


def _init_state(n_layers: int) -> None:
    """First visit: the tour and its settings from the URL (bad values fall back to the defaults)."""
    if "tour_choice" in st.session_state:
        return
    params = st.query_params
    tour = params.get("tour", next(iter(TOURS)))
    tour = tour if tour in TOURS else next(iter(TOURS))
    st.session_state["tour_choice"] = tour
    raw = {name[len(PREFIX):]: value for name, value in params.items() if name.startswith(PREFIX)}
    try:
        values = parse_params(tour, raw, n_layers)
    except UserError as exc:
        show_user_error(exc)
        values = default_params(tour, n_layers)
    for name, value in values.items():
        st.session_state[f"tour_{tour}_{name}"] = value


def _control(tour: str, param, n_layers: int, column) -> object:
    key = f"tour_{tour}_{param.name}"
    st.session_state.setdefault(key, default_params(tour, n_layers)[param.name])
    if param.kind == "choice":
        return column.selectbox(param.label, param.choices, key=key)
    if param.kind == "bool":
        return column.toggle(param.label, key=key)
    hi = n_layers - 1 if param.kind == "layer" else param.hi
    return column.number_input(param.label, min_value=param.lo, max_value=hi, step=1, key=key)


def _sync_url(tour: str, values: dict) -> None:
    for name in [n for n in st.query_params if n.startswith(PREFIX) and n[len(PREFIX):] not in values]:
        del st.query_params[name]
    st.query_params["tour"] = tour
    for name, value in values.items():
        st.query_params[PREFIX + name] = str(value).lower() if isinstance(value, bool) else str(value)


def _show(view_key: str, data: dict) -> None:
    kind, obj = tour_view(data)
    if kind == "figure":
        st.plotly_chart(obj, width="stretch", key=f"tour_fig_{view_key}")
    elif kind == "table":
        st.dataframe(obj, hide_index=True, width="stretch")
    else:
        st.markdown(obj, unsafe_allow_html=True)


def _checks_table(checks: list[dict]) -> pd.DataFrame:
    rows = []
    for check in checks:
        values = check["values"]
        rows.append({"measured": check["name"], "n": len(values), "min": min(values) if values else None,
                     "max": max(values) if values else None, "valid range": f"[{check['lo']:g}, {check['hi']:g}]",
                     "ok": all(check["lo"] <= v <= check["hi"] for v in values)})
    return pd.DataFrame(rows)


def _render(result: dict) -> None:
    st.markdown(f"### {result['title']}  {verdict_badge(result['matches_paper'])}")
    st.caption(f"{result['paper']} · measured on **{result['model']}** in {result['seconds']:.1f} s")
    shown: set[str] = set()
    for number, step in enumerate(result["steps"], start=1):
        st.markdown(f"**{number}. {step['title']}**  \n{step['text']}")
        name = step.get("figure")
        if name and name not in shown and name in result["figures"]:
            shown.add(name)
            _show(name, result["figures"][name])
    for name, data in result["figures"].items():
        if name not in shown:
            _show(name, data)
    if result["tour"] == "lens_comparison" and not result["measured"].get("tuned_lens"):
        with st.expander("Train a tuned lens for this model"):
            st.caption("Submit this job from the Jobs page (or any job runner); the tour picks the lens up when "
                       "it is saved.")
            st.json(tuned_lens_job_spec(result["model"]))
    if result["checks"]:
        with st.expander("Checks: every measured figure and its valid range"):
            st.dataframe(_checks_table(result["checks"]), hide_index=True, width="stretch")
    st.download_button("Download this run (JSON)", json.dumps(result, default=str, ensure_ascii=False, indent=1),
                       file_name=f"tour-{result['tour']}.json", mime="application/json", key="tour_download")


st.title("Tours")
st.caption("Short guided walks through findings from the papers this tool is built on. Every number in the text "
           "is measured when the tour runs, on the model chosen in the sidebar; where this model does not show "
           "the paper's effect, the tour says so.")
lm = current_model()
_init_state(lm.n_layers)
top = st.columns([2, 3])
tour = top[0].selectbox("Tour", list(TOURS), format_func=lambda k: TOURS[k].title, key="tour_choice")
controls = top[1].columns(max(1, len(TOURS[tour].params)))
values = {p.name: _control(tour, p, lm.n_layers, controls[i]) for i, p in enumerate(TOURS[tour].params)}
try:
    values = parse_params(tour, values, lm.n_layers)
except UserError as exc:
    show_user_error(exc)
    st.stop()
_sync_url(tour, values)
try:
    with st.spinner(f"Running '{TOURS[tour].title}' on {lm.name}…"):
        found = compute(model_key(), cache_key(lm), tour, json.dumps(values, sort_keys=True), disk_inputs(lm, tour))
except UserError as exc:
    show_user_error(exc)
    st.stop()
st.caption("Try this: change the setting above; the tour runs again and the text follows the new measurement.")
_render(found)
