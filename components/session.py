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

OTHER = "Other (Hugging Face id, folder or .gguf)…"
_LOAD_LOCK = threading.Lock()


def default_model() -> str:
    legacy = os.environ.get("LATENT_EXPLORER_TEST_MODEL")  # e.g. "tiny-llama" in page tests
    if legacy:
        return "tiny:" + legacy.removeprefix("tiny-")
    return os.environ.get("LATENT_EXPLORER_MODEL", DEFAULT_MODEL)


@st.cache_resource(show_spinner=False, max_entries=3)
def _cached_model(spec: str, device: str, dtype: str, trust_remote_code: bool) -> LoadedModel:
    with _LOAD_LOCK:  # one load at a time: two sessions asking for a 1 GB model must not load it twice
        return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def model_key() -> tuple[str, str, str, bool]:
    """The sidebar's current choice; a plain tuple so st.cache_data can key results by it."""
    state = st.session_state
    choice = state.get("model_choice", default_model())
    spec = state.get("model_other", "").strip() if choice == OTHER else choice
    return spec, state.get("device", "auto"), state.get("dtype", "auto"), bool(state.get("trust_remote_code", False))


def sidebar() -> None:
    """Model picker, device and dtype; drawn once by app.py so the choice persists across pages."""
    default = default_model()
    params = st.query_params
    options = list(EMBEDDED) + ([default] if default not in EMBEDDED else []) + [OTHER]
    wanted = params.get("model")
    if "model_choice" not in st.session_state:
        if wanted and wanted not in options:
            st.session_state["model_choice"], st.session_state["model_other"] = OTHER, wanted
        else:
            st.session_state["model_choice"] = wanted or default
    with st.sidebar:
        st.markdown("### Model")
        st.selectbox("Model", options, key="model_choice",
                     format_func=lambda name: f"{name} — {EMBEDDED[name].description}" if name in EMBEDDED else name,
                     label_visibility="collapsed")
        if st.session_state["model_choice"] == OTHER:
            st.text_input("Model id or path", key="model_other",
                          placeholder="e.g. Qwen/Qwen2.5-0.5B, ./my-model, ~/models/x.gguf")
        devices = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        col1, col2 = st.columns(2)
        col1.selectbox("Device", devices, key="device")
        col2.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"], key="dtype")
        st.checkbox("Trust remote code", key="trust_remote_code",
                    help="Lets a hub model run its own Python code. Off unless you trust the model's authors.")


def current_model() -> LoadedModel:
    """The selected model, loaded once and shared; on bad input shows the message and stops the page."""
    spec, device, dtype, trust = model_key()
    try:
        with st.spinner(f"Loading {spec or 'model'} (the first load of an embedded model converts it once)…"):
            lm = _cached_model(spec, device, dtype, trust)
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


def show_user_error(exc: Exception) -> None:
    st.error(str(exc))


def cache_key(lm: LoadedModel) -> str:
    """String identity of a loaded model for st.cache_data keys (never pass the model itself)."""
    return f"{lm.name}|{lm.weights_hash}|{lm.device}|{lm.dtype}"


def get_model_by_key(key: tuple[str, str, str, bool]) -> LoadedModel:
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
