"""Job state on disk: ``<cache>/jobs/<id>/state.json`` plus ``log.txt``, and the output-folder locks.

Every change to a job's ``state.json`` is a read-modify-write under the job's own file lock and is
written atomically, so the worker (progress, result), the runner (queued, cancelled, worker died) and
any reader in another process never see a half-written file or lose an update. A restarted server
reads every job from disk. A job whose state says ``running`` but whose worker process is gone is
reported (and recorded) as failed, "worker died", and can be submitted again.

Cancelling a running job creates ``cancel`` in its folder; the worker's progress callback sees it and
stops at its next progress report. Output folders are guarded by one ``filelock.FileLock`` each under
``<cache>/jobs/locks/`` (see :func:`output_lock`), so two jobs never write into the same folder at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.fileio import atomic_write_json

if TYPE_CHECKING:
    from filelock import FileLock

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINISHED = (DONE, FAILED, CANCELLED)
STATE_FILE, LOG_FILE, CANCEL_FLAG, METRICS_FILE = "state.json", "log.txt", "cancel", "metrics.jsonl"
WORKER_DIED = "worker died"


def jobs_root(root: str | Path | None = None) -> Path:
    """``cache_root()/jobs`` unless ``root`` is given."""
    if root is not None:
        return Path(root)
    from engine.core.paths import default_cache_root  # the same rule as engine.core.models.cache_root, no torch

    return default_cache_root() / "jobs"


@dataclass
class JobState:
    """Everything known about one job; ``state.json`` is this dataclass as JSON."""

    id: str
    kind: str
    spec: dict
    entry: str = ""  # the kind's run function, "module:function"
    state: str = QUEUED
    progress: float = 0.0
    message: str = ""
    throughput: float | None = None  # units per second over the last seconds of progress
    throughput_unit: str = ""
    eta_s: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    updated: float = field(default_factory=time.time)
    error: str | None = None
    output: str | None = None  # the main output folder, once the worker has locked it
    outputs: list = field(default_factory=list)
    result: dict | None = None
    pid: int | None = None  # the worker process
    runner_pid: int | None = None  # the process that started the worker
    attempts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return max(0.0, (self.ended if self.ended is not None else (now or time.time())) - self.started)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JobState:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


# --- paths ------------------------------------------------------------------------------------
def job_dir(root: Path, job_id: str) -> Path:
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ValueError(f"not a job id: {job_id!r}")
    return Path(root) / job_id


def log_path(root: Path, job_id: str) -> Path:
    return job_dir(root, job_id) / LOG_FILE


def job_lock(root: Path, job_id: str) -> FileLock:
    from filelock import FileLock

    return FileLock(str(job_dir(root, job_id) / ".state.lock"))


# --- reading and writing ------------------------------------------------------------------------
def read_state(root: Path, job_id: str) -> JobState | None:
    path = job_dir(root, job_id) / STATE_FILE
    try:
        return JobState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # unreadable: show it as a failed job rather than hide it
        return JobState(id=job_id, kind=job_id.rsplit("-", 1)[0], spec={}, state=FAILED,
                        error=f"The state file {path} is unreadable; submit the job again.")


def write_state(root: Path, state: JobState) -> None:
    state.updated = time.time()
    atomic_write_json(job_dir(root, state.id) / STATE_FILE, state.to_json())


@contextmanager
def locked_state(root: Path, job_id: str) -> Iterator[JobState | None]:
    """Read the job's state under its lock; changes made to the yielded object are written back."""
    folder = job_dir(root, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with job_lock(root, job_id):
        state = read_state(root, job_id)
        before = None if state is None else state.to_json()
        yield state
        if state is not None and state.to_json() != before:
            write_state(root, state)


def update_state(root: Path, job_id: str, **changes) -> JobState | None:
    with locked_state(root, job_id) as state:
        if state is not None:
            for key, value in changes.items():
                setattr(state, key, value)
    return state


def list_job_ids(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [entry.name for entry in os.scandir(root)
            if entry.is_dir() and not entry.name.startswith(".") and entry.name != "locks"
            and os.path.isfile(os.path.join(entry.path, STATE_FILE))]


# --- cancel flag, log, metrics ------------------------------------------------------------------
def set_cancel_flag(root: Path, job_id: str) -> None:
    (job_dir(root, job_id) / CANCEL_FLAG).write_text(str(time.time()))


def clear_cancel_flag(root: Path, job_id: str) -> None:
    (job_dir(root, job_id) / CANCEL_FLAG).unlink(missing_ok=True)


def cancel_requested(root: Path, job_id: str) -> bool:
    return (job_dir(root, job_id) / CANCEL_FLAG).exists()


def append_log(root: Path, job_id: str, line: str) -> None:
    with open(log_path(root, job_id), "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")


def read_log(root: Path, job_id: str, tail: int | None = None) -> str:
    """The job's log (the last ``tail`` lines), '' when there is none yet."""
    path = log_path(root, job_id)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if tail is not None:
                handle.seek(max(0, size - max(4096, tail * 400)))  # enough bytes for the last lines
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-tail:]) if tail is not None else text


def read_metrics(root: Path, job_id: str) -> list[dict]:
    """The metric records the job logged (e.g. SAE loss, L0, ... every few steps)."""
    path = job_dir(root, job_id) / METRICS_FILE
    records = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
    except OSError:
        return []
    return records


# --- worker liveness ----------------------------------------------------------------------------
def pid_alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie (Linux: read from /proc)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:  # no /proc (macOS): trust kill(0)
        return True


def worker_alive(state: JobState) -> bool:
    """Whether the process that runs (or is starting) the job still exists."""
    if state.pid:
        return pid_alive(state.pid)
    return pid_alive(state.runner_pid)  # claimed, worker not started yet: alive while its runner is


def mark_died(root: Path, job_id: str, detail: str = "", known_dead: bool = False) -> JobState | None:
    """Record a running job whose worker is gone as failed (liveness re-checked under the lock unless
    the caller saw the process end)."""
    changed = False
    with locked_state(root, job_id) as state:
        if state is not None and state.state == RUNNING and (known_dead or not worker_alive(state)):
            state.state, state.ended, changed = FAILED, time.time(), True
            state.error = f"{WORKER_DIED}{' (' + detail + ')' if detail else ''}; Retry resumes from the last checkpoint."
            state.message = state.error
            state.throughput = state.eta_s = None
    if changed:
        try:
            append_log(root, job_id, state.error)
        except OSError:
            pass
    return state


# --- output folders -----------------------------------------------------------------------------
def output_lock(folder: str | Path, root: str | Path | None = None) -> FileLock:
    """The ``filelock.FileLock`` that guards one output folder (one lock file per absolute path).

    Anything that writes a store, an SAE, a lens or dashboards can take it, not only jobs.
    """
    from filelock import FileLock

    key = hashlib.sha256(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:24]
    locks = jobs_root(root) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{key}.lock"))


def lock_holder(folder: str | Path, root: str | Path | None = None) -> dict:
    """Who said they hold an output folder's lock: ``{"job", "pid", "folder"}`` (best effort, may be stale)."""
    lock = Path(output_lock(folder, root).lock_file)
    try:
        return json.loads(lock.with_suffix(".owner").read_text())
    except (OSError, ValueError):
        return {}


def note_holder(folder: str | Path, job_id: str, root: str | Path | None = None) -> None:
    lock = Path(output_lock(folder, root).lock_file)
    atomic_write_json(lock.with_suffix(".owner"), {"job": job_id, "pid": os.getpid(),
                                                   "folder": str(Path(folder).resolve())})
