"""Tours: short guided walks that reproduce the papers' findings live on the loaded model.

Thin page: pick a tour and its one "try this" setting (both kept in the URL), run it through
``st.cache_data`` (string keys), then show its steps, figures, verdict and checks: every step at once, or one
step at a time with Previous / Next (the step on screen is in the URL too, ``?tour_step=2``).
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from components.links import sync_query_params
from components.session import cache_key, current_model, get_model_by_key, model_key, show_user_error
from components.tour_views import tour_view, verdict_badge
from engine.core.errors import UserError
from engine.tours import TOURS, default_params, disk_inputs, parse_params, run_tour, tuned_lens_job_spec

PREFIX = "t_"  # query parameters of the tour's settings: ?tour=circular&t_layer=9
STEP = "tour_step"  # the step on screen, 1..n; 0 shows every step at once
MAX_STEPS = 12


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


def _restart_walk() -> None:
    """Another tour: a walk in progress starts again at its first step."""
    if st.session_state.get(STEP, 0):
        st.session_state[STEP] = 1


def _move(delta: int, n_steps: int) -> None:
    st.session_state[STEP] = min(max(st.session_state.get(STEP, 0) + delta, 0), n_steps)


def _step_picker(steps: list[dict]) -> int:
    """The step on screen (0: all of them), clamped to this tour's steps and kept in the URL."""
    n_steps = len(steps)
    if st.session_state[STEP] > n_steps:
        st.session_state[STEP] = n_steps
        sync_query_params({STEP: 0})
    labels = ["All steps"] + [f"{k}. {step['title']}" for k, step in enumerate(steps, start=1)]
    return st.radio("Step", range(n_steps + 1), format_func=labels.__getitem__, horizontal=True, key=STEP)


def _step_buttons(step: int, n_steps: int) -> None:
    left, middle, right = st.columns([1, 2, 1], vertical_alignment="center")
    left.button("◀ Previous", key="tour_prev", disabled=step <= 1, on_click=_move, args=(-1, n_steps),
                width="stretch")
    middle.markdown(f"<div style='text-align:center'>step {step} of {n_steps}</div>" if step else "",
                    unsafe_allow_html=True)
    right.button("Next ▶", key="tour_next", disabled=step >= n_steps, on_click=_move, args=(1, n_steps),
                 width="stretch", type="primary")


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
    steps = result["steps"]
    step = _step_picker(steps)
    chosen = list(enumerate(steps, start=1)) if step == 0 else [(step, steps[step - 1])]
    shown: set[str] = set()
    for number, each in chosen:
        st.markdown(f"**{number}. {each['title']}**  \n{each['text']}")
        name = each.get("figure")
        if name and name not in shown and name in result["figures"]:
            shown.add(name)
            _show(name, result["figures"][name])
    if step in (0, len(steps)):  # figures no step refers to come after the last step
        referenced = {each.get("figure") for each in steps}
        for name, data in result["figures"].items():
            if name not in shown and name not in referenced:
                _show(name, data)
    _step_buttons(step, len(steps))
    if step in (0, len(steps)) and result["tour"] == "lens_comparison" and not result["measured"].get("tuned_lens"):
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
for problem in sync_query_params({STEP: 0}, options={STEP: range(MAX_STEPS + 1)}):
    st.warning(problem)
top = st.columns([2, 3])
tour = top[0].selectbox("Tour", list(TOURS), format_func=lambda k: TOURS[k].title, key="tour_choice",
                        on_change=_restart_walk)
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
