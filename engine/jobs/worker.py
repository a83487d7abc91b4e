"""The worker side of a job: runs in its own process (started by a runner), never in the caller's thread.

:func:`run_worker` is the process's entry point: it sends the process's output to the job's
``log.txt``, imports the kind's run function and calls it with a :class:`JobContext`, then records
the outcome (done with a result, failed with a one-line error, or cancelled). Anything raised is
caught here, so a failing job never takes a server down; a worker that dies outright (SIGKILL, the
out-of-memory killer) is noticed by the runner or by the next reader of the state (see
:func:`engine.jobs.state.mark_died`).
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import UserError
from engine.jobs import state as st

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

WRITE_EVERY = 0.5  # seconds between state.json writes from the progress callback
LOG_EVERY = 10.0  # seconds between progress lines in log.txt
CANCEL_CHECK_EVERY = 0.1
RATE_WINDOW = 30.0  # seconds of progress that the throughput is measured over


class JobCancelled(BaseException):
    """Raised by the progress callback once the job's cancel flag is set (BaseException: engine code that
    catches ``Exception`` does not swallow it)."""


class JobInterrupted(BaseException):
    """The worker received SIGTERM (its runner or the machine is shutting down)."""


class JobContext:
    """What a kind's run function gets besides its parameters: progress, output claims, log, metrics."""

    def __init__(self, root: Path, job: st.JobState, lock_timeout: float | None = None):
        self.root, self.id, self.kind = Path(root), job.id, job.kind
        self.lock_timeout = lock_timeout
        self.fraction, self.message = job.progress, job.message
        self.total: float | None = None
        self.unit = ""
        self._samples: deque[tuple[float, float]] = deque()
        self._last_write = self._last_log = self._last_check = 0.0
        self._claims: list = []

    # --- progress -------------------------------------------------------------------------------
    def units(self, total: float, unit: str) -> None:
        """Declare that progress 1.0 means ``total`` ``unit`` (e.g. tokens), for the throughput."""
        self.total, self.unit = float(total), unit

    def check_cancel(self) -> None:
        now = time.monotonic()
        if now - self._last_check >= CANCEL_CHECK_EVERY:
            self._last_check = now
            if st.cancel_requested(self.root, self.id):
                raise JobCancelled()

    def progress(self, fraction: float, message: str = "") -> None:
        """The engine's ``progress(fraction, message)``: throttled state writes, throughput, cancel checks."""
        now = time.monotonic()
        self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), message or self.message
        self._samples.append((now, self.fraction))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        self.check_cancel()
        if now - self._last_write >= WRITE_EVERY:
            self._write(now)
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            print(f"[{100 * self.fraction:5.1f}%] {self.message}", file=sys.stderr, flush=True)

    def _rates(self, now: float) -> tuple[float | None, str, float | None]:
        t0, f0 = self._samples[0] if self._samples else (now, self.fraction)
        if now - t0 < 0.2 or self.fraction <= f0:
            return None, "", None
        per_second = (self.fraction - f0) / (now - t0)
        eta = (1.0 - self.fraction) / per_second
        if self.total:
            return per_second * self.total, f"{self.unit}/s", eta
        return 100 * per_second, "%/s", eta

    def _write(self, now: float) -> None:
        self._last_write = now
        rate, unit, eta = self._rates(now)
        st.update_state(self.root, self.id, progress=self.fraction, message=self.message, throughput=rate,
                        throughput_unit=unit, eta_s=eta)

    def say(self, message: str) -> None:
        """A status line now: into the state's message (unthrottled) and the log."""
        self.message = message
        print(message, file=sys.stderr, flush=True)
        self._write(time.monotonic())

    def metrics(self, record: dict) -> None:
        """Append one record (e.g. loss, L0 every few steps) to the job's metrics.jsonl for live curves."""
        with open(st.job_dir(self.root, self.id) / st.METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    # --- output folders -------------------------------------------------------------------------
    def claim(self, folder: str | Path) -> Path:
        """Lock an output folder for this job (waiting while another job holds it); the first claim is the
        job's output. Returns the folder as an absolute path."""
        from filelock import Timeout

        folder = Path(folder).expanduser().resolve()
        lock = st.output_lock(folder, self.root)
        started = time.monotonic()
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = st.lock_holder(folder, self.root).get("job", "another process")
            self.say(f"waiting: the output folder {folder} is in use by {holder}")
            while True:
                self.check_cancel()
                if self.lock_timeout is not None and time.monotonic() - started > self.lock_timeout:
                    raise UserError(f"The output folder {folder} is in use by {holder}; submit this job again "
                                    "when that one has finished.") from None
                try:
                    lock.acquire(timeout=0.5)
                    break
                except Timeout:
                    continue
        self._claims.append(lock)
        st.note_holder(folder, self.id, self.root)
        with st.locked_state(self.root, self.id) as job:
            if job is not None:
                job.output = job.output or str(folder)
                job.outputs = [*job.outputs, str(folder)] if str(folder) not in job.outputs else job.outputs
        return folder

    def release(self) -> None:
        while self._claims:
            try:
                self._claims.pop().release()
            except Exception:  # noqa: BLE001 - releasing never hides the job's own outcome
                pass

    # --- models ---------------------------------------------------------------------------------
    def load_model(self, params: dict) -> LoadedModel:
        from engine.core.models import load_model

        self.say(f"loading {params['model']}")
        extra = {"device_map": params["device_map"]} if params.get("device_map") else {}
        return load_model(params["model"], device=params.get("device", "auto"), dtype=params.get("dtype", "auto"),
                          trust_remote_code=bool(params.get("trust_remote_code", False)), progress=self.say, **extra)


# --- the process entry point --------------------------------------------------------------------
def _redirect_output(log: Path) -> None:
    """Send fd 1 and 2 (Python prints, C libraries, tracebacks, faults) into the job's log."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    faulthandler.enable(file=sys.stderr)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        force=True)


def _on_sigterm(signum, frame) -> None:
    raise JobInterrupted()


def _resolve(entry: str) -> Callable[[dict, JobContext], dict | None]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _failure(exc: BaseException) -> str:
    """One line for the state's error field (the traceback goes to the log)."""
    if isinstance(exc, UserError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"Out of memory ({first or type(exc).__name__}); try a smaller batch size or model, or another device."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _finish(root: Path, job_id: str, **changes) -> None:
    st.update_state(root, job_id, ended=time.time(), throughput=None, eta_s=None, **changes)


def run_worker(root: str, job_id: str, env: dict[str, str] | None = None, lock_timeout: float | None = None) -> None:
    """Run one claimed job in this (fresh, spawned) process and record its outcome."""
    os.environ.update(env or {})
    try:
        os.setsid()  # Ctrl-C in the terminal that started the app or CLI does not reach the job
    except OSError:
        pass
    root_path = Path(root)
    _redirect_output(st.log_path(root_path, job_id))
    signal.signal(signal.SIGTERM, _on_sigterm)
    with st.locked_state(root_path, job_id) as job:
        mine = job is not None and job.state == st.RUNNING and job.pid in (None, os.getpid())
        if mine:
            job.pid = os.getpid()
    if not mine:  # cancelled before it started, or claimed by another worker
        return
    print(f"=== attempt {job.attempts}: worker pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
          file=sys.stderr, flush=True)
    context = JobContext(root_path, job, lock_timeout=lock_timeout)
    try:
        context.check_cancel()
        result = _resolve(job.entry)(dict(job.spec.get("params", {})), context) or {}
    except JobCancelled:
        message = f"cancelled at {100 * context.fraction:.0f}%; submit it again to resume"
        print(message, file=sys.stderr, flush=True)
        _finish(root_path, job_id, state=st.CANCELLED, message=message, progress=context.fraction)
    except (JobInterrupted, KeyboardInterrupt):
        error = "interrupted: the app or command that ran this job stopped it; Retry resumes from the last checkpoint."
        print(error, file=sys.stderr, flush=True)
        _finish(root_path, job_id, state=st.FAILED, error=error, message=error, progress=context.fraction)
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, never raised into a server
        if not isinstance(exc, UserError):
            traceback.print_exc()
        error = _failure(exc)
        print(f"failed: {error}", file=sys.stderr, flush=True)
        _finish(root_path, job_id, state=st.FAILED, error=error, message=error, progress=context.fraction)
    else:
        message = str(result.get("message") or "done")
        print(f"done: {message}", file=sys.stderr, flush=True)
        _finish(root_path, job_id, state=st.DONE, progress=1.0, message=message, result=result, error=None)
        st.clear_cancel_flag(root_path, job_id)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the outcome is recorded: a late SIGTERM just ends the process
        context.release()
        sys.stdout.flush()
        sys.stderr.flush()
