"""First run: with no SAE for the loaded embedded model, queue the demo SAE (an ``sae_demo`` job) in the background.

:func:`ensure_demo` is cheap and idempotent (called on every script run, from ``app.py`` and from the SAE features
page): the demo job's id is derived from its spec, so every session and every rerun finds the same job, and a
demo that has been queued once (even if it failed or was cancelled since) is never queued again by this hook;
Retry on the Jobs page resumes it. :func:`demo_progress` shows where the build stands ("being built: 40 %"),
refreshing every 2 s and rerunning the page once the demo's dashboards are ready.

Off with ``LATENT_EXPLORER_NO_DEMO=1``, in demo mode (:func:`engine.serving.current_policy`) unless the caller
allows it, and for models other than the embedded ones (and the ``tiny:`` test models).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import streamlit as st

from engine.core.errors import UserError
from engine.jobs import JobState

ENV_NO_DEMO = "LATENT_EXPLORER_NO_DEMO"
DEMO_SOURCES = ("embedded", "tiny")  # models the demo is queued for on its own
DEMO_SETTINGS: dict = {}  # DemoSettings overrides sent with the job (the engine's defaults when empty)
DEMO_DASHBOARD_CONFIG: dict = {}
_TRUE = ("1", "true", "yes", "on")
log = logging.getLogger(__name__)


def demo_disabled() -> bool:
    return os.environ.get(ENV_NO_DEMO, "").strip().lower() in _TRUE


def demo_spec(lm) -> dict:
    """The ``sae_demo`` job for this model: capture the built-in corpus, train, evaluate, build the dashboards.

    Device and dtype stay ``auto`` (not the sidebar's), so the job, and its id, depend on the model alone; for the
    demo's own model it is the Jobs page's "Train the demo SAE" job (the same id: one job, whichever starts it)."""
    from engine.sae.demo import DemoSettings

    params: dict = {} if lm.name == DemoSettings.model else {"model": lm.name}
    if DEMO_SETTINGS:
        params["settings"] = dict(DEMO_SETTINGS)
    if DEMO_DASHBOARD_CONFIG:
        params["dashboard_config"] = dict(DEMO_DASHBOARD_CONFIG)
    return {"kind": "sae_demo", "params": params}


def has_sae(lm) -> bool:
    """Dashboards of this model, or an SAE folder that names it, exist in the cache."""
    from engine.features.read import list_dashboards
    from engine.sae.io import list_saes, read_config

    if list_dashboards(weights_hash=lm.weights_hash):
        return True
    for folder in list_saes():
        try:
            if read_config(folder).model_name == lm.name:
                return True
        except (UserError, OSError, ValueError):
            continue
    return False


def _loaded_model():
    """The sidebar's model, loaded once (shared with the pages); None if it cannot be loaded (the page says why)."""
    from components.session import check_model_choice, get_model_by_key, model_key

    key = model_key()  # (spec, device, dtype, trust, device_map): the pages' key, so the same cached model
    spec, trust = key[0], key[3]
    if not spec:
        return None
    try:
        check_model_choice(spec, trust)
        return get_model_by_key(key)
    except UserError:
        return None


def ensure_demo(lm=None, *, allow_in_demo: bool = False) -> JobState | None:
    """The demo job for ``lm`` (default: the sidebar's model): the existing one, or a newly queued one when the
    model is an embedded one without any SAE; None when there is none and none is due. Never raises."""
    from engine.serving import current_policy

    if demo_disabled() or (current_policy().demo and not allow_in_demo):
        return None
    try:
        lm = lm if lm is not None else _loaded_model()
        if lm is None or getattr(lm.source, "kind", None) not in DEMO_SOURCES:
            return None
        from components.jobs_ui import get_runner
        from engine.jobs import validate

        runner = get_runner()
        spec = validate(demo_spec(lm))
        try:
            return runner.get(spec.id)  # queued, running or finished before: never queued twice
        except UserError:
            pass
        if has_sae(lm):
            return None
        job = runner.submit(demo_spec(lm))
        log.info("first run: queued the demo SAE for %s as job %s", lm.name, job.id)
        return job
    except Exception as exc:  # noqa: BLE001 - the first-run hook never takes a page down
        log.warning("first run: the demo SAE could not be queued (%s)", exc)
        return None


@st.fragment(run_every=2)
def demo_progress(job_id: str, model: str, what: str = "SAE features", until: Callable[[], bool] | None = None
                  ) -> None:
    """Where the demo build stands (refreshes every 2 s); reruns the whole page once it is done, or as soon as
    ``until()`` is true (e.g. the demo's activation store exists, long before its dashboards)."""
    from components.jobs_ui import get_runner

    try:
        job = get_runner().get(job_id)
    except UserError:
        st.info(f"The demo job `{job_id}` is gone; build an SAE on the **Jobs & data** page.")
        return
    seen = st.session_state.setdefault("_demo_seen_active", {})
    if job.state == "done":
        if seen.pop(job_id, False):
            st.rerun(scope="app")
        st.info(f"The demo SAE is built ({job.message}), but it has no dashboards for **{model}** here; build them "
                "on the **Jobs & data** page.")
        return
    if job.state in ("failed", "cancelled"):
        st.warning(f"The demo SAE for **{model}** {job.state} ({job.error or job.message}). Retry it from the "
                   f"**Jobs & data** page (job `{job.id}`); it resumes where it stopped.")
        return
    if job_id in seen and until is not None and until():
        seen.pop(job_id)
        st.rerun(scope="app")
    seen[job_id] = True
    percent = 100 * job.progress
    st.progress(min(max(job.progress, 0.0), 1.0),
                text=f"{what} for **{model}** — being built: {percent:.0f} %"
                     + (f" ({job.message})" if job.message else ""))
    st.caption("The first start builds a small demo SAE (capture the built-in corpus, train, dashboards) in the "
               "background; this page opens it when it is ready. Set LATENT_EXPLORER_NO_DEMO=1 to skip it.")
