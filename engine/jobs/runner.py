"""Runners: submit, get, list, cancel, wait and follow jobs. One interface, one local implementation.

:class:`Runner` is the interface the UI and the CLI use; a Ray backend can implement it later. The
state of every job lives on disk (:mod:`engine.jobs.state`), so any runner, in any process, sees every
job, including those of a previous server.

:class:`LocalRunner` runs each job in a fresh worker process started with ``multiprocessing``'s
*spawn* context (never in the caller's thread), at most ``workers`` at once (default: one per GPU,
one on a CPU-only machine). Its dispatcher thread takes queued jobs from disk oldest first, claims each
under the job's lock (so two runners never start the same job), starts a worker, and notices workers
that end without recording an outcome (killed, out of memory, crashed): those jobs become failed with
"worker died". When the process that holds the runner exits, its running workers are stopped (SIGTERM;
they record "interrupted"), so a later submit of the same spec resumes them.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours: ours runs first)
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.core.errors import UserError
from engine.jobs import state as st
from engine.jobs.spec import JobSpec, get_kind, validate
from engine.jobs.state import JobState

_MAIN_LOCK = threading.Lock()


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """A spawned worker needs nothing from the parent's ``__main__`` (a Streamlit page script, ``app.py``, a test),
    and multiprocessing would import it again in the child: hide its path while the process starts."""
    main = sys.modules.get("__main__")
    with _MAIN_LOCK:
        saved = {name: vars(main)[name] for name in ("__file__", "__spec__") if main is not None and name in vars(main)}
        try:
            if main is not None:
                vars(main).pop("__file__", None)
                if "__spec__" in saved:
                    main.__spec__ = None
            yield
        finally:
            for name, value in saved.items():
                setattr(main, name, value)


class JobNotFound(UserError):
    pass


class Runner(ABC):
    """Submit job specs and watch them; every method returns :class:`JobState` snapshots."""

    root: Path

    @abstractmethod
    def submit(self, spec: JobSpec | dict, rerun: bool = False) -> JobState:
        """Validate and queue a job; an identical queued, running or done job is returned instead (a done
        one is run again with ``rerun``, or when its output folder has gone), and a failed or cancelled one
        is queued again (it resumes from its last checkpoint)."""

    @abstractmethod
    def get(self, job_id: str) -> JobState:
        ...

    @abstractmethod
    def list(self, states: Iterable[str] | None = None) -> list[JobState]:
        """Jobs, newest first (only those in ``states`` when given)."""

    # state files are shared by every runner: cancelling, logs and metrics work the same on each
    def cancel(self, job_id: str) -> JobState:
        """Queued: cancelled at once. Running: asked to stop at its next progress report."""
        self.get(job_id)  # JobNotFound, and a dead worker recorded first
        with st.locked_state(self.root, job_id) as job:
            if job.state == st.QUEUED:
                job.state, job.ended, job.message = st.CANCELLED, time.time(), "cancelled before it started"
            elif job.state == st.RUNNING:
                st.set_cancel_flag(self.root, job_id)
                job.message = "cancelling: stops at its next progress report"
        st.append_log(self.root, job_id, f"cancel requested by pid {os.getpid()}")
        return job

    def logs(self, job_id: str, tail: int | None = None) -> str:
        self.get(job_id)
        return st.read_log(self.root, job_id, tail)

    def metrics(self, job_id: str) -> list[dict]:
        return st.read_metrics(self.root, job_id)

    def close(self, stop_jobs: bool = True) -> None:
        """Release the runner (stopping the jobs it runs unless ``stop_jobs`` is False)."""

    # --- built on the methods above ---------------------------------------------------------------
    def retry(self, job_id: str) -> JobState:
        return self.submit(self.get(job_id).spec)

    def resolve(self, prefix: str) -> str:
        """A job id from a unique prefix of it (as typed on the command line)."""
        ids = [job.id for job in self.list()]
        if prefix in ids:
            return prefix
        found = [job_id for job_id in ids if job_id.startswith(prefix)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise JobNotFound(f"There is no job '{prefix}'; 'python -m engine jobs list' shows them.")
        raise JobNotFound(f"'{prefix}' matches {len(found)} jobs ({', '.join(found[:3])}...); type more of the id.")

    def follow(self, job_id: str, poll: float = 0.5, timeout: float | None = None) -> Iterator[JobState]:
        """Yield the job's state whenever it changes, ending with its finished state (or at ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.get(job_id)
            seen = (job.state, job.progress, job.message, job.error)
            if seen != last:
                last = seen
                yield job
            if job.finished or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> JobState:
        """The job's state once it has finished (or when ``timeout`` seconds have passed)."""
        job = self.get(job_id)
        for job in self.follow(job_id, poll=poll, timeout=timeout):
            pass
        return job

    def wait_all(self, timeout: float = 300.0, poll: float = 0.2) -> list[JobState]:
        """Every job once none is queued or running (or at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.list()
            if not any(job.active for job in jobs) or time.monotonic() > deadline:
                return jobs
            time.sleep(poll)


# --- the local implementation ---------------------------------------------------------------------
def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU workers
        return 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (", often the out-of-memory killer" if name == "SIGKILL" else "")
    return f"exit code {code}"


class LocalRunner(Runner):
    """Worker processes on this machine (``multiprocessing`` spawn context), ``workers`` at a time.

    ``threads``: CPU threads per worker (``LATENT_EXPLORER_JOB_THREADS``); ``lock_timeout``: seconds a job
    waits for an output folder another job holds before failing (None: waits); ``start``: begin taking
    queued jobs from disk now (otherwise at the first submit).
    """

    def __init__(self, root: str | Path | None = None, workers: int | None = None, *, threads: int | None = None,
                 lock_timeout: float | None = None, start: bool = False, poll: float = 0.25,
                 scan_every: float = 5.0):
        self.root = st.jobs_root(root)
        self._workers = workers or _env_int("LATENT_EXPLORER_JOB_WORKERS")
        self.threads = threads or _env_int("LATENT_EXPLORER_JOB_THREADS")
        self.lock_timeout = lock_timeout
        self.poll, self.scan_every = poll, scan_every
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[str, tuple[multiprocessing.process.BaseProcess, int]] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._gpus: int | None = None
        if start:
            self.start()

    @property
    def workers(self) -> int:
        if self._workers is None:
            self._workers = max(1, self._gpu_count())
        return self._workers

    def _gpu_count(self) -> int:
        if self._gpus is None:
            self._gpus = gpu_count()
        return self._gpus

    # --- the interface ------------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict, rerun: bool = False) -> JobState:
        spec = validate(spec)
        kind = get_kind(spec.kind)
        job_id = spec.id
        st.job_dir(self.root, job_id).mkdir(parents=True, exist_ok=True)
        with st.job_lock(self.root, job_id):
            job = st.read_state(self.root, job_id)
            died = job is not None and job.state == st.RUNNING and not self._alive(job)
            if died:  # its worker is gone: queued again below
                job.state = st.FAILED
            if job is not None and (job.active or (job.state == st.DONE and not rerun and self._outputs_exist(job))):
                return job
            st.clear_cancel_flag(self.root, job_id)
            fresh = JobState(id=job_id, kind=kind.name, spec=spec.to_json(), entry=kind.run,
                             message="queued" if job is None else "queued again: resumes from its last checkpoint")
            if job is not None:  # failed, cancelled, or done but its output is gone: run it again
                fresh.created, fresh.attempts, fresh.outputs = job.created, job.attempts, job.outputs
                fresh.output, fresh.progress = job.output, job.progress if job.state != st.DONE else 0.0
            st.write_state(self.root, fresh)
        note = "submitted" if job is None else "worker died; submitted again" if died else "submitted again"
        st.append_log(self.root, job_id, f"{note} by pid {os.getpid()}")
        self.start()
        self._wake.set()
        return fresh

    def get(self, job_id: str) -> JobState:
        job = st.read_state(self.root, job_id)
        if job is None:
            raise JobNotFound(f"There is no job '{job_id}'; 'python -m engine jobs list' shows them.")
        if job.state == st.RUNNING and not self._alive(job):
            job = st.mark_died(self.root, job_id) or job
        return job

    def list(self, states: Iterable[str] | None = None) -> list[JobState]:
        wanted = set(states) if states is not None else None
        jobs = []
        for job_id in st.list_job_ids(self.root):
            try:
                job = self.get(job_id)
            except JobNotFound:  # removed meanwhile
                continue
            if wanted is None or job.state in wanted:
                jobs.append(job)
        return sorted(jobs, key=lambda job: job.created, reverse=True)

    # --- workers ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the dispatcher thread (idempotent)."""
        with self._lock:
            if self._thread is None and not self._closed:
                atexit.register(self.close)  # runs before multiprocessing's own exit handler, which would wait
                self._thread = threading.Thread(target=self._loop, name=f"jobs {self.root}", daemon=True)
                self._thread.start()

    def _alive(self, job: JobState) -> bool:
        with self._lock:
            mine = self._procs.get(job.id)
            if mine is not None:
                return mine[0].is_alive()
        return st.worker_alive(job)

    def _outputs_exist(self, job: JobState) -> bool:
        return all(Path(folder).exists() for folder in job.outputs)

    def _loop(self) -> None:
        last_scan = 0.0
        while not self._closed:
            woken = self._wake.wait(self.poll if self._procs else self.scan_every)  # idle: look at the disk rarely
            self._wake.clear()
            try:
                ended = self._reap()
                if woken or ended or time.monotonic() - last_scan >= self.scan_every:
                    last_scan = time.monotonic()
                    self._fill()
            except Exception as exc:  # noqa: BLE001 - the dispatcher must outlive any one bad job folder
                print(f"job dispatcher: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _reap(self) -> int:
        with self._lock:
            done = [(job_id, proc) for job_id, (proc, _) in self._procs.items() if not proc.is_alive()]
            for job_id, _ in done:
                del self._procs[job_id]
        for job_id, proc in done:
            job = st.read_state(self.root, job_id)
            if job is not None and job.state == st.RUNNING:
                st.mark_died(self.root, job_id, _describe_exit(proc.exitcode), known_dead=True)
            proc.close()
        return len(done)

    def _fill(self) -> None:
        free = self.workers - len(self._procs)
        if free <= 0:
            return
        queued = [job for job in map(lambda i: st.read_state(self.root, i), st.list_job_ids(self.root))
                  if job is not None and job.state == st.QUEUED]
        for job in sorted(queued, key=lambda job: job.created):
            if free <= 0 or self._closed:
                return
            if self._claim(job.id):
                self._spawn(job.id)
                free -= 1

    def _claim(self, job_id: str) -> bool:
        with st.locked_state(self.root, job_id) as job:
            if job is None or job.state != st.QUEUED:
                return False
            job.state, job.started, job.ended, job.error = st.RUNNING, time.time(), None, None
            job.pid, job.runner_pid, job.attempts = None, os.getpid(), job.attempts + 1
            job.message = "starting a worker"
        return True

    def _worker_env(self, job_id: str, slot: int) -> dict[str, str]:
        env = {}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        job = st.read_state(self.root, job_id)
        device = str((job.spec.get("params") or {}).get("device", "auto")) if job else "auto"
        if device in ("auto", "cuda") and self._gpu_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self._gpu_count())  # one GPU per worker slot
        return env

    def _spawn(self, job_id: str) -> None:
        from engine.jobs.worker import run_worker

        with self._lock:
            used = {slot for _, slot in self._procs.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
        try:
            proc = self._context.Process(target=run_worker, name=f"job {job_id}",
                                         args=(str(self.root), job_id, self._worker_env(job_id, slot),
                                               self.lock_timeout))
            with _main_not_reimported():
                proc.start()
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for another process
            st.update_state(self.root, job_id, state=st.FAILED, ended=time.time(),
                            error=f"The worker process could not start ({type(exc).__name__}: {exc}).")
            return
        with self._lock:
            self._procs[job_id] = (proc, slot)
        with st.locked_state(self.root, job_id) as job:
            if job is not None and job.state == st.RUNNING and job.pid is None:
                job.pid = proc.pid

    def close(self, stop_jobs: bool = True, grace: float = 10.0) -> None:
        """Stop dispatching; with ``stop_jobs``, SIGTERM this runner's workers (they record "interrupted")."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)  # the dispatcher reaps and closes processes: let it stop first
        if not stop_jobs:
            return
        with self._lock:
            procs = [proc for proc, _ in self._procs.values()]
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        self._reap()


def make_runner(backend: str | None = None, root: str | Path | None = None, **options) -> Runner:
    """The runner named by ``backend`` or ``LATENT_EXPLORER_RUNNER`` (``local``, the default, or ``ray``).

    Ray: ``address`` (or ``LATENT_EXPLORER_RAY_ADDRESS``; ``auto`` starts a local Ray) and ``workers`` (or
    ``LATENT_EXPLORER_RAY_WORKERS``: CPUs of a local Ray and the number of parts a job is split into).
    """
    backend = (backend or os.environ.get("LATENT_EXPLORER_RUNNER", "local")).strip().lower()
    if backend == "local":
        options.pop("address", None)
        return LocalRunner(root, **options)
    if backend == "ray":
        from engine.jobs.ray_runner import RAY_ADDRESS_ENV, RayRunner

        address = options.pop("address", None) or os.environ.get(RAY_ADDRESS_ENV) or "auto"
        workers = options.pop("workers", None) or _env_int("LATENT_EXPLORER_RAY_WORKERS")
        return RayRunner(root, address=address, workers=workers, **options)
    raise UserError(f"Unknown job runner '{backend}'; choose 'local' or 'ray'.")


def wait_idle(root: str | Path | None = None, timeout: float = 300.0) -> list[JobState]:
    """Wait until no job under ``root`` (default ``cache_root()/jobs``) is queued or running; the jobs."""
    return LocalRunner(root).wait_all(timeout)
