"""Shared UI state: the sidebar's model picker and the one cached model per (model, device, dtype).

The model object lives in ``st.cache_resource`` and is shared by every browser session; each
``LoadedModel`` carries an ``RLock`` that the engine holds around forward passes and hook
installation, so concurrent sessions never see each other's hooks.
"""
from __future__ import annotations

import os
import threading

import streamlit as st
import torch

from engine.core.errors import UserError
from engine.core.models import DEFAULT_MODEL, EMBEDDED, LoadedModel, load_model
from engine.serving import ServingPolicy, current_policy

OTHER = "Other (Hugging Face id, folder or .gguf)…"
_LOAD_LOCK = threading.Lock()


def default_model() -> str:
    legacy = os.environ.get("LATENT_EXPLORER_TEST_MODEL")  # e.g. "tiny-llama" in page tests
    if legacy:
        return "tiny:" + legacy.removeprefix("tiny-")
    return os.environ.get("LATENT_EXPLORER_MODEL", DEFAULT_MODEL)


@st.cache_resource(show_spinner=False, max_entries=3)
def _cached_model(spec: str, device: str, dtype: str, trust_remote_code: bool, device_map: str = "") -> LoadedModel:
    with _LOAD_LOCK:  # one load at a time: two sessions asking for a 1 GB model must not load it twice
        return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          device_map=device_map.strip() or None)


def model_key() -> tuple[str, str, str, bool, str]:
    """The sidebar's current choice; a plain tuple so st.cache_data can key results by it.

    No choice yet (``None``): the model a ``?model=`` link asked for, which :func:`current_model` checks
    against the serving policy before anything is loaded."""
    state = st.session_state
    choice = state.get("model_choice", default_model())
    if choice is None:
        spec = state.get("model_link", "")
    else:
        spec = state.get("model_other", "").strip() if choice == OTHER else choice
    return (spec, state.get("device", "auto"), state.get("dtype", "auto"), bool(state.get("trust_remote_code", False)),
            str(state.get("device_map", "") or ""))


def _is_pattern(entry: str) -> bool:
    return any(ch in entry for ch in "*?[")


def model_options(policy: ServingPolicy, default: str) -> list[str]:
    """What the picker offers: in demo mode the allow-list (plus the free box only when the list holds patterns
    such as ``tiny:*``), else the embedded models, the server's default and the free box."""
    if policy.demo:
        allowed = policy.allowed_models()
        return [m for m in allowed if not _is_pattern(m)] + ([OTHER] if any(map(_is_pattern, allowed)) else [])
    return list(EMBEDDED) + ([default] if default not in EMBEDDED else []) + [OTHER]


def _first_choice(wanted: str | None, options: list[str], default: str) -> None:
    """The picker's value on a session's first run, from ``?model=`` or the default (nothing is loaded here)."""
    state = st.session_state
    if wanted and wanted in options and wanted != OTHER:
        state["model_choice"] = wanted
    elif wanted and OTHER in options:
        state["model_choice"], state["model_other"] = OTHER, wanted
    elif wanted:  # a demo link to a model the list does not show: current_model() checks it, then loads or refuses
        state["model_choice"], state["model_link"] = None, wanted
    else:
        state["model_choice"] = default if default in options else (options[0] if options else None)


def _model_label(name: str) -> str:
    if name in EMBEDDED:
        return f"{name} — {EMBEDDED[name].description}"
    return os.path.basename(name.rstrip("/")) if name.startswith("/") else name


def sidebar(policy: ServingPolicy | None = None) -> None:
    """Model picker, device and dtype; drawn once by app.py so the choice persists across pages.

    In demo mode the picker lists only the allowed models and the 'Trust remote code' box is hidden (and off)."""
    policy = policy or current_policy()
    default = default_model()
    options = model_options(policy, default)
    if "model_choice" not in st.session_state:
        _first_choice(st.query_params.get("model"), options, default)
    elif st.session_state["model_choice"] not in options + [None]:  # e.g. the allow-list changed
        st.session_state["model_choice"] = None
    with st.sidebar:
        st.markdown("### Model")
        st.selectbox("Model", options, key="model_choice", format_func=_model_label, placeholder="Choose a model",
                     label_visibility="collapsed")
        if st.session_state["model_choice"] == OTHER:
            st.text_input("Model id or path", key="model_other",
                          placeholder="e.g. tiny:llama" if policy.demo else
                          "e.g. Qwen/Qwen2.5-0.5B, data/my-model, cache/models/x.gguf")
        devices = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        col1, col2 = st.columns(2)
        col1.selectbox("Device", devices, key="device")
        col2.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"], key="dtype")
        if not policy.demo:
            st.text_input("Device map", key="device_map", placeholder="none: the whole model on Device",
                          help="Split a model too big for one device with accelerate: auto, balanced, or JSON "
                               'from module-name prefixes to cuda:N, cpu or disk, e.g. {"model.layers.20": "cuda:1"}; '
                               "modules it does not name stay on Device.")
        if policy.allow_remote_code:
            st.checkbox("Trust remote code", key="trust_remote_code",
                        help="Lets a hub model run its own Python code. Off unless you trust the model's authors.")
        else:
            st.session_state["trust_remote_code"] = False


def check_model_choice(spec: str, trust: bool, policy: ServingPolicy | None = None) -> None:
    """The serving policy's check of a model before it is loaded (raises ``NotAllowed`` with one sentence).

    The server's own default model (``LATENT_EXPLORER_MODEL``) is the operator's choice, so outside demo mode
    it skips the data-folder rule that applies to paths visitors type."""
    policy = policy or current_policy()
    if policy.demo or trust or spec != default_model():
        policy.check_model(spec, trust_remote_code=trust)


def current_model() -> LoadedModel:
    """The selected model, checked against the serving policy, loaded once and shared; on bad input shows the
    message and stops the page (nothing is loaded or downloaded for a model the policy refuses)."""
    spec, device, dtype, trust, device_map = model_key()
    try:
        check_model_choice(spec, trust)
        with st.spinner(f"Loading {spec or 'model'} (the first load of an embedded model converts it once)…"):
            lm = _cached_model(spec, device, dtype, trust, device_map)
    except UserError as exc:
        show_user_error(exc)
        st.stop()
    st.query_params["model"] = spec
    with st.sidebar:
        info = lm.describe()
        st.caption(f"**{info['architecture']}** · {info['layers']} layers · d={info['d_model']} · "
                   f"vocab {info['vocab']:,} · {info['device']} · {info['dtype']}  \n"
                   f"lens self-check: max |Δlogit| = {info['self_check_max_abs_diff']:.2g}")
    return lm


def submit_within_limits(spec: dict, slot: str, where: str, rerun: bool = False):
    """:func:`components.jobs_ui.submit_job` under the serving policy: a session runs at most
    ``LATENT_EXPLORER_MAX_JOBS`` jobs at once (1 in demo mode); over it, one sentence and nothing is submitted."""
    from components.jobs_ui import get_runner, submit_job

    mine = st.session_state.setdefault("session_job_ids", [])
    running = 0
    for job_id in mine:
        try:
            running += get_runner().get(job_id).active
        except UserError:  # removed since
            continue
    try:
        current_policy().check_jobs(running)
    except UserError as exc:
        show_user_error(exc)
        return None
    job = submit_job(spec, slot, where, rerun=rerun)
    if job is not None and job.id not in mine:
        mine.append(job.id)
    return job


def show_user_error(exc: Exception) -> None:
    st.error(str(exc))


def cache_key(lm: LoadedModel) -> str:
    """String identity of a loaded model for st.cache_data keys (never pass the model itself)."""
    return f"{lm.name}|{lm.weights_hash}|{lm.device}|{lm.dtype}|{lm.device_map}"


def get_model_by_key(key: tuple[str, str, str, bool, str]) -> LoadedModel:
    return _cached_model(*key)


def progress_to(bar):
    """The engine's ``progress(fraction, message="")`` callback drawn on an ``st.progress`` bar."""
    def progress(fraction: float, message: str = "") -> None:
        value = min(max(float(fraction), 0.0), 1.0)
        if message:
            bar.progress(value, text=message)
        else:
            bar.progress(value)
    return progress


def selected_customdata(event) -> list[list[float]]:
    """The numeric ``customdata`` lists of the points selected in an ``st.plotly_chart(on_select=...)`` event
    (the event is a dict in some Streamlit paths and an attribute object in others)."""
    selection = event.get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", None) or {}
    points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    found = []
    for point in points or []:
        data = point.get("customdata")
        if isinstance(data, list) and data and all(isinstance(v, (int, float)) for v in data):
            found.append(data)
    return found
