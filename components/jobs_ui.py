"""Jobs in the UI: the shared runner, submitting from a form, the sidebar tray and the Jobs page list.

The runner (:class:`engine.jobs.LocalRunner`) lives in ``st.cache_resource``, one per cache folder,
shared by every session: forms submit a job spec and return at once; the work happens in worker
processes that go on when the browser is closed or the page changes. Job state is read from disk on
every run, so the list is the same in every session and after a server restart.
"""
from __future__ import annotations

import time

import plotly.graph_objects as go
import streamlit as st

from components.session import model_key, show_user_error
from engine.core.errors import UserError
from engine.jobs import JobState, Runner

STATE_ICONS = {"queued": ":material/schedule:", "running": ":material/autorenew:", "done": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/cancel:"}
STATE_COLOURS = {"queued": "gray", "running": "blue", "done": "green", "failed": "red", "cancelled": "orange"}
LIST_LIMIT = 15


@st.cache_resource(show_spinner=False)
def _runner(root: str) -> Runner:
    from engine.jobs import make_runner

    return make_runner(root=root, start=True)  # start: take up jobs a previous server left queued


def get_runner() -> Runner:
    """The runner for the current cache folder (``LATENT_EXPLORER_CACHE``), shared by every session."""
    from engine.core.models import cache_root

    return _runner(str(cache_root() / "jobs"))


def model_params() -> dict:
    """The sidebar's model choice as job parameters."""
    spec, device, dtype, trust = model_key()[:4]
    return {"model": spec, "device": device, "dtype": dtype, "trust_remote_code": trust}


# --- submitting from a form ---------------------------------------------------------------------
def submit_job(spec: dict, slot: str, where: str, rerun: bool = False) -> JobState | None:
    """Submit ``spec``, remember it as this session's job for ``slot`` and say where its result will appear.

    Returns at once (the job runs in a worker process); a bad spec shows its one sentence and returns None.
    """
    try:
        job = get_runner().submit(spec, rerun=rerun)
    except UserError as exc:
        show_user_error(exc)
        return None
    st.session_state[f"job_{slot}"] = job.id
    verb = {"queued": "queued", "running": "is running", "done": "has already finished"}.get(job.state, job.state)
    st.info(f"Job `{job.id}` {verb}. Follow it in the job list at the top of this page or in the sidebar; "
            f"{where}", icon=":material/rocket_launch:")
    return job


def session_job(slot: str) -> JobState | None:
    """The job this session last submitted from ``slot`` (None if none, or if it has been removed)."""
    job_id = st.session_state.get(f"job_{slot}")
    if not job_id:
        return None
    try:
        return get_runner().get(job_id)
    except UserError:
        return None


def show_session_job(slot: str) -> JobState | None:
    """Under a form: the outcome of its last job once finished (success or error), else where it stands."""
    job = session_job(slot)
    if job is None:
        return None
    if job.state == "done":
        st.success(job.message, icon=":material/check_circle:")
    elif job.state == "failed":
        st.error(f"Job `{job.id}` failed: {job.error}")
    elif job.state == "cancelled":
        st.warning(f"Job `{job.id}` was cancelled ({job.message}); Retry it in the job list to resume.")
    else:
        st.progress(job.progress, text=f"`{job.id}` {job.state}: {job.message}")
    return job


# --- formatting -----------------------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def job_caption(job: JobState) -> str:
    parts = [f"elapsed {_duration(job.elapsed())}"]
    if job.throughput:
        parts.append(f"{job.throughput:,.0f} {job.throughput_unit}")
    if job.eta_s is not None and job.active:
        parts.append(f"about {_duration(job.eta_s)} left")
    if job.attempts > 1:
        parts.append(f"attempt {job.attempts}")
    if job.output:
        parts.append(f"output `{job.output}`")
    return " · ".join(parts)


def metrics_figure(job: JobState, records: list[dict]) -> go.Figure | None:
    """Live curves from the job's metric records: SAE training (loss, L0, EV, dead %) or tuned-lens KL."""
    if not records:
        return None
    if "loss" in records[0]:
        from components.jobs_sae import training_curves_figure

        return training_curves_figure(records)
    if "kl" in records[0]:
        fig = go.Figure(go.Scatter(x=[r["step"] for r in records], y=[r["kl"] for r in records], mode="lines"))
        fig.update_layout(height=220, margin={"t": 10, "b": 30}, xaxis_title="step", yaxis_title="KL (nats)")
        return fig
    return None


# --- the Jobs page list ---------------------------------------------------------------------------
def _job_buttons(runner: Runner, job: JobState, column) -> JobState:
    """Cancel (queued or running) or Retry (failed or cancelled); returns the job as it is after the click."""
    if job.active and column.button("Cancel", key=f"job_cancel_{job.id}", icon=":material/stop_circle:"):
        return runner.cancel(job.id)
    if job.state in ("failed", "cancelled") and column.button("Retry", key=f"job_retry_{job.id}",
                                                              icon=":material/replay:",
                                                              help="runs it again from its last checkpoint"):
        try:
            return runner.retry(job.id)
        except UserError as exc:  # e.g. an input that has gone since
            show_user_error(exc)
    return job


def render_job(runner: Runner, job: JobState) -> None:
    """One job: state, progress bar, elapsed/throughput/ETA, Cancel or Retry, log tail and curves."""
    with st.container(border=True):
        head, buttons = st.columns([6, 1])
        job = _job_buttons(runner, job, buttons)
        colour = STATE_COLOURS.get(job.state, "gray")
        head.markdown(f"{STATE_ICONS.get(job.state, '')} **{job.kind}** `{job.id}` :{colour}[{job.state}] · "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(job.created))}")
        text = (f":red[{job.error}]" if job.state == "failed" and job.error else job.message) or job.state
        head.progress(min(max(job.progress, 0.0), 1.0), text=text[:300])
        head.caption(job_caption(job))
        records = runner.metrics(job.id)
        fig = metrics_figure(job, records)
        if fig is not None:
            with st.expander("Curves", expanded=job.active):
                st.plotly_chart(fig, width="stretch", key=f"job_curves_{job.id}")
        with st.expander("Log", expanded=False):
            st.code(runner.logs(job.id, tail=40) or "(empty)", language=None)


@st.fragment(run_every=2)
def render_jobs_list() -> None:
    """Every job, newest first (active ones always shown), refreshed every 2 s without rerunning the page."""
    runner = get_runner()
    jobs = runner.list()
    st.subheader("Jobs")
    if not jobs:
        st.caption("No jobs yet: the forms below start captures, trainings and dashboard builds as jobs that keep "
                   "running when you leave the page or close the browser.")
        return
    active = [job for job in jobs if job.active]
    finished = [job for job in jobs if not job.active]
    show_all = len(finished) > LIST_LIMIT and st.toggle(f"Show all {len(finished)} finished jobs", key="jobs_all")
    for job in active + (finished if show_all else finished[:LIST_LIMIT]):
        render_job(runner, job)
    _rerun_when_one_finishes(active)


def _rerun_when_one_finishes(active: list[JobState]) -> None:
    """When a job this list showed running has finished, rerun the page once so its forms and tables update."""
    now = {job.id for job in active}
    before = st.session_state.get("jobs_active_seen", set())
    st.session_state["jobs_active_seen"] = now
    if before - now:
        st.rerun()


# --- the sidebar tray -----------------------------------------------------------------------------
@st.fragment(run_every=2)
def job_tray(jobs_page=None) -> None:
    """Running and queued jobs with progress bars, and a link to the Jobs page (drawn in the sidebar)."""
    try:
        active = get_runner().list(states=("running", "queued"))
    except Exception:  # noqa: BLE001 - the tray must never break a page
        return
    if not active:
        return
    st.markdown(f"### Jobs ({len(active)})")
    for job in active[:5]:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"{job.kind}: {job.message or job.state}"[:80])
    if len(active) > 5:
        st.caption(f"and {len(active) - 5} more")
    if jobs_page is not None:
        st.page_link(jobs_page, label="Open the job list", icon=":material/list:")
