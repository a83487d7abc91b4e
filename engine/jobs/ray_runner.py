"""The Ray runner: the same :class:`~engine.jobs.runner.Runner` interface, jobs run as Ray tasks.

Job state lives in the same files as the local runner's (:mod:`engine.jobs.state`), so ``jobs list`` and
the Jobs page show Ray jobs too. Each job runs in a *coordinator* task (:func:`execute`: the same
:class:`~engine.jobs.worker.JobContext`, progress, cancel flag and log as a local worker). Two kinds fan
out over the cluster:

- ``capture`` (:func:`run_capture_ray`): the corpus is cut into contiguous window ranges
  (:mod:`engine.data.store_parts`), one part task per range writes its own subfolder of ONE store, and the
  manifest is merged after every finished part; a resubmission captures only the missing parts;
- ``dashboards`` (:func:`run_dashboards_ray`): contiguous row ranges are accumulated in part tasks and
  merged (:meth:`~engine.features.accumulate.FeatureAccumulator.merge`) before the tables are written.

Every other kind runs whole in its coordinator task. ``address``: ``auto`` (or ``local``) starts a local
Ray with ``workers`` CPUs; anything else joins that cluster (checked first with a short TCP connect, so
a wrong address gives one sentence instead of a hang). Output folders must be on storage every node sees.
Ray tasks belong to the process that holds the runner: when it exits, its jobs stop (they are recorded
as failed and resume from their last part or shard when submitted again).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import UserError
from engine.jobs import state as st
from engine.jobs.runner import JobNotFound, Runner
from engine.jobs.spec import JobSpec, get_kind, validate
from engine.jobs.state import JobState

if TYPE_CHECKING:
    from engine.jobs.worker import JobContext

RAY_ADDRESS_ENV = "LATENT_EXPLORER_RAY_ADDRESS"
CONNECT_TIMEOUT = 5.0
FAN_OUT = {"capture": "engine.jobs.ray_runner:run_capture_ray",
           "dashboards": "engine.jobs.ray_runner:run_dashboards_ray"}
_ENV_PREFIXES = ("LATENT_EXPLORER_", "HF_", "TRANSFORMERS_")
_WORKERS: int | None = None  # in a coordinator task: how many part tasks to plan for


# --- connecting ---------------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"The Ray address '{address}' is not HOST:PORT (such as 10.0.0.5:6379 or ray://head:10001); "
                        "use --ray auto for a local Ray.")
    return host, int(port)


def connect(address: str | None = None, workers: int | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Start (``auto``/``local``) or join (``HOST:PORT``) Ray unless this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    address = (address or os.environ.get(RAY_ADDRESS_ENV) or "auto").strip()
    repo = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    if address.lower() in ("auto", "local"):
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"No Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); start one "
                        "with 'ray start --head' there, check the address, or use --ray auto for a local Ray.") \
            from None
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - a wrong kind of server, version mismatch ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"Could not join the Ray cluster at {address} ({first}).") from None


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _part_resources(device: str) -> dict:
    """One CPU per part task, and one GPU where the cluster has GPUs and the job may use them."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if device in ("auto", "cuda") else 0
    return {"num_cpus": 1, "num_gpus": 1} if gpus else {"num_cpus": 1}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


# --- the coordinator task -----------------------------------------------------------------------
@contextlib.contextmanager
def _job_log(root: Path, job_id: str):
    """Python's stdout/stderr into the job's log while the job runs (the Ray worker process lives on)."""
    with open(st.log_path(root, job_id), "a", encoding="utf-8", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def execute(root: str, job_id: str, entry: str, env: dict[str, str], workers: int,
            lock_timeout: float | None = None) -> str:
    """Run one claimed job in this (Ray worker) process and record its outcome; returns the final state."""
    from engine.jobs import worker as w

    global _WORKERS
    os.environ.update(env)
    root_path = Path(root)
    with st.locked_state(root_path, job_id) as job:
        mine = job is not None and job.state == st.RUNNING and job.pid is None
        if mine:
            job.pid = os.getpid()
    if not mine:
        return "skipped"
    _WORKERS = workers
    with _job_log(root_path, job_id):
        print(f"=== attempt {job.attempts}: Ray task pid {os.getpid()} on {socket.gethostname()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}", file=sys.stderr, flush=True)
        context = w.JobContext(root_path, job, lock_timeout=lock_timeout)
        try:
            context.check_cancel()
            result = w._resolve(entry)(dict(job.spec.get("params", {})), context) or {}
        except w.JobCancelled:
            message = f"cancelled at {100 * context.fraction:.0f}%; submit it again to resume"
            w._finish(root_path, job_id, state=st.CANCELLED, message=message, progress=context.fraction)
            return st.CANCELLED
        except BaseException as exc:  # noqa: BLE001 - recorded, never raised into the runner
            if not isinstance(exc, UserError):
                traceback.print_exc()
            error = w._failure(exc)
            print(f"failed: {error}", file=sys.stderr, flush=True)
            w._finish(root_path, job_id, state=st.FAILED, error=error, message=error, progress=context.fraction)
            return st.FAILED
        finally:
            context.release()
            _WORKERS = None
        message = str(result.get("message") or "done")
        print(f"done: {message}", file=sys.stderr, flush=True)
        w._finish(root_path, job_id, state=st.DONE, progress=1.0, message=message, result=result, error=None)
        st.clear_cancel_flag(root_path, job_id)
        return st.DONE


def _wait_parts(job: JobContext, refs: dict[Any, Any], poll, on_done) -> list[str]:
    """Wait for part tasks, reporting progress with ``poll()`` and each finished part with ``on_done(part,
    value)``; a failed part does not stop the others. Cancels them all if the job is cancelled."""
    import ray

    pending, errors = list(refs), []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    on_done(refs[ref], ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - e.g. the part's worker was killed
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                    errors.append(f"part {refs[ref]}: {type(exc).__name__}: {first}")
            poll()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return errors


# --- capture on Ray -----------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}


def _model_key(params: dict) -> str:
    import json

    return json.dumps({k: params.get(k) for k in ("model", "device", "dtype", "trust_remote_code", "device_map")},
                      sort_keys=True)


def _model(params: dict):
    """The part task's model, loaded once per Ray worker process."""
    from engine.core.models import load_model

    key = _model_key(params)
    if key not in _MODELS:
        extra = {"device_map": params["device_map"]} if params.get("device_map") else {}
        _MODELS.clear()
        _MODELS[key] = load_model(params["model"], device=params.get("device", "auto"),
                                  dtype=params.get("dtype", "auto"),
                                  trust_remote_code=bool(params.get("trust_remote_code", False)), **extra)
    return _MODELS[key]


def capture_part(params: dict, out: str, part: dict, env: dict[str, str], pid_file: str | None = None,
                 progress=None) -> int:
    """A part task: capture windows ``[window_start, window_stop)`` into ``out/parts/pNNNNN``; its rows."""
    from engine.data.corpora import iter_texts
    from engine.data.store_parts import Part, part_dir, part_texts
    from engine.data.store_writer import build_store

    os.environ.update(env)
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    delay = float(env.get("LATENT_EXPLORER_TEST_PART_DELAY", "0") or 0)  # tests: seconds per batch
    p, spec = params, Part(**part)
    texts = part_texts(iter_texts(p["corpus"]), spec)
    store = build_store(_model(p), texts, part_dir(out, spec.index), layers=p["layers"],
                        sites=p["sites"], max_tokens=spec.rows, context_length=p["context_length"],
                        batch_size=p["batch_size"], dtype=p["store_dtype"], corpus_spec=p["corpus"],
                        shard_tokens=p["shard_tokens"], window_range=spec.local_range(),
                        progress=(lambda f, m: time.sleep(delay)) if delay else progress)
    return store.n_tokens


def run_capture_ray(p: dict, job: JobContext) -> dict:
    import ray

    from engine.data import store_parts as sp
    from engine.data.corpora import corpus_hash, iter_texts
    from engine.data.store import MANIFEST, ActivationStore
    from engine.data.store_writer import default_store_dir

    lm = job.load_model(p)
    out = job.claim(p["out"] or default_store_dir(lm, p["corpus"], p["sites"], p["layers"], p["context_length"],
                                                  p["store_dtype"]))
    out.mkdir(parents=True, exist_ok=True)
    old = sp._read(out / MANIFEST)
    if old and old.get("shards") and "parts" not in old:
        if old.get("complete") and (old.get("n_tokens", 0) >= p["max_tokens"] or old.get("exhausted")):
            return _capture_result(ActivationStore.open(out))
        raise UserError(f"The folder '{out}' holds a store captured in one process; finish it with the local "
                        "runner or choose another output folder.")
    key = {k: p[k] for k in ("sites", "layers", "context_length", "store_dtype", "max_tokens", "batch_size",
                             "shard_tokens")}
    key.update(weights_hash=lm.weights_hash, corpus_hash=corpus_hash(p["corpus"]))
    plan = sp.load_or_write_plan(out, [], key) if (out / sp.PLAN).is_file() else []
    n_parts = _WORKERS or _cluster_cpus()
    if not plan and n_parts == 1:  # one part: no need to count windows first
        plan = sp.load_or_write_plan(out, [sp.Part(0, 0, None, 0, p["max_tokens"])], key)
    elif not plan:
        job.say("planning parts: cutting the corpus into windows")
        rows, docs = sp.window_rows(lm.tokenizer, iter_texts(p["corpus"]), p["context_length"], p["max_tokens"])
        plan = sp.load_or_write_plan(out, sp.plan_parts(rows, p["batch_size"], n_parts, docs), key)
    total = sum(part.rows for part in plan)
    job.units(total, "tokens")
    sp.merge_manifests(out, plan, p["max_tokens"])
    todo = [part for part in plan if not sp.part_done(out, part)]
    job.say(f"capturing {len(todo)} of {len(plan)} parts on Ray")
    if len(plan) == 1 and todo:  # one part: capture here, with the model loaded already (no second process)
        _MODELS.clear()
        _MODELS[_model_key(p)] = lm
        capture_part(p, str(out), vars(todo[0]), _env(), None, job.progress)
        sp.merge_manifests(out, plan, p["max_tokens"])
        return _capture_result(ActivationStore.open(out), parts=1)
    task = ray.remote(capture_part).options(max_retries=0, **_part_resources(p["device"]))
    env = _env()
    refs = {task.remote(p, str(out), vars(part), env, str(st.job_dir(job.root, job.id) / f"part-{part.index}.pid")):
            part.index for part in todo}

    def poll() -> None:
        done = sum(min(sp.part_tokens(out, part), part.rows) for part in plan)
        job.progress(done / max(total, 1), f"{done:,} of {total:,} tokens in {len(plan)} parts")

    errors = _wait_parts(job, refs, poll, lambda index, rows: sp.merge_manifests(out, plan, p["max_tokens"]))
    merged = sp.merge_manifests(out, plan, p["max_tokens"])
    if errors:
        done = len(merged.get("parts", {}).get("done", []))
        raise UserError(f"{len(errors)} of {len(plan)} parts failed ({errors[0]}); the store holds the {done} finished "
                        "parts, and submitting the job again captures only the missing ones.")
    return _capture_result(ActivationStore.open(out), parts=len(plan))


def _capture_result(store, parts: int | None = None) -> dict:
    size = sum(int(shard["bytes"]) for shard in store.manifest["shards"])  # shards live in part subfolders
    where = f" in {parts} parts" if parts else ""
    return {"message": f"Stored {store.n_tokens:,} tokens ({size / 2**20:,.1f} MiB) in {store.path}{where}.",
            "path": str(store.path), "n_tokens": store.n_tokens, "size_bytes": size, "parts": parts}


# --- dashboards on Ray --------------------------------------------------------------------------
def dashboard_part(sae: str, store: str, settings: dict, first: int, end: int, env: dict[str, str]) -> dict:
    """A part task: the accumulator state of store rows ``first`` to ``end``."""
    from engine.features.build import DashboardConfig, accumulate_rows

    os.environ.update(env)
    return accumulate_rows(sae, store, DashboardConfig(**settings), first, end).state()


def row_ranges(n_rows: int, n_parts: int, align: int) -> list[tuple[int, int]]:
    """``n_parts`` contiguous ranges of ``[0, n_rows)`` with inner bounds at multiples of ``align``."""
    blocks = max(1, -(-n_rows // align))
    n_parts = max(1, min(n_parts, blocks))
    bounds = [min(n_rows, (blocks * i // n_parts) * align) for i in range(n_parts + 1)]
    bounds[-1] = n_rows
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_dashboards_ray(p: dict, job: JobContext) -> dict:
    import ray

    from engine.data.store import ActivationStore
    from engine.features.accumulate import FeatureAccumulator
    from engine.features.build import DashboardConfig, _up_to_date, build_dashboards, dashboard_key
    from engine.features.folder import dashboards_root

    lm = job.load_model(p)
    config = DashboardConfig(**p["config"])
    config.check()
    store = ActivationStore.open(p["store"])
    key = dashboard_key(p["sae"], store, config)
    out = job.claim(p["out"] or dashboards_root() / key)
    if not p["force"] and _up_to_date(out, key):
        return {"message": f"Dashboards saved in `{out}`.", "path": str(out)}
    resources = _part_resources(config.device)
    settings = {**p["config"], "device": "cuda" if "num_gpus" in resources else
                "cpu" if config.device == "auto" else config.device}
    ranges = row_ranges(store.n_tokens, _WORKERS or _cluster_cpus(), config.batch_size)
    task = ray.remote(dashboard_part).options(max_retries=0, **resources)
    env = _env()
    states: dict[int, dict] = {}
    if len(ranges) == 1:  # one part: accumulate here (no second process)
        states[0] = dashboard_part(p["sae"], p["store"], settings, *ranges[0], env)
    refs = {task.remote(p["sae"], p["store"], settings, lo, hi, env): i for i, (lo, hi) in enumerate(ranges)
            if i not in states}
    errors = _wait_parts(job, refs, lambda: job.progress(0.85 * len(states) / len(ranges),
                                                         f"{len(states)} of {len(ranges)} parts accumulated"),
                         states.__setitem__)
    if errors:
        raise UserError(f"{len(errors)} of {len(ranges)} dashboard parts failed ({errors[0]}); submit the job again.")
    job.say(f"merging {len(ranges)} parts")
    acc = FeatureAccumulator.from_state(states[0])
    for i in range(1, len(ranges)):
        acc.merge(FeatureAccumulator.from_state(states.pop(i)))
    path = build_dashboards(p["sae"], p["store"], lm, out, config=config, force=True, accumulator=acc,
                            progress=lambda f, m: job.progress(max(f, 0.86), m))
    return {"message": f"Dashboards saved in `{path}` ({len(ranges)} parts on Ray).", "path": str(path)}


# --- the runner ---------------------------------------------------------------------------------
class RayRunner(Runner):
    """Jobs as Ray tasks (see the module docstring); state on disk like :class:`LocalRunner`'s."""

    def __init__(self, root: str | Path | None = None, address: str | None = None, workers: int | None = None, *,
                 lock_timeout: float | None = None, start: bool = False, **_ignored):
        self.root = st.jobs_root(root)
        self.address, self.lock_timeout = address, lock_timeout
        self._workers = workers
        self._refs: dict[str, Any] = {}
        self._lock = threading.RLock()
        if start:
            self.start()

    def start(self) -> None:
        connect(self.address, self._workers)

    @property
    def workers(self) -> int:
        self.start()
        return self._workers or _cluster_cpus()

    def submit(self, spec: JobSpec | dict, rerun: bool = False) -> JobState:
        spec = validate(spec)
        kind = get_kind(spec.kind)
        self.start()
        job_id = spec.id
        st.job_dir(self.root, job_id).mkdir(parents=True, exist_ok=True)
        entry = FAN_OUT.get(kind.name, kind.run)
        with st.job_lock(self.root, job_id):
            job = st.read_state(self.root, job_id)
            if job is not None and job.state == st.RUNNING and not self._alive(job):
                job.state = st.FAILED
            if job is not None and (job.active or (job.state == st.DONE and not rerun
                                                   and all(Path(f).exists() for f in job.outputs))):
                return job
            st.clear_cancel_flag(self.root, job_id)
            fresh = JobState(id=job_id, kind=kind.name, spec=spec.to_json(), entry=entry,
                             message="starting on Ray" if job is None else "started again on Ray: resumes")
            if job is not None:
                fresh.created, fresh.attempts, fresh.outputs = job.created, job.attempts, job.outputs
                fresh.output = job.output
            fresh.state, fresh.started, fresh.runner_pid = st.RUNNING, time.time(), os.getpid()
            fresh.attempts += 1
            st.write_state(self.root, fresh)
        st.append_log(self.root, job_id, f"submitted to Ray by pid {os.getpid()}")
        self._launch(job_id, entry, fan_out=kind.name in FAN_OUT)
        return fresh

    def _launch(self, job_id: str, entry: str, fan_out: bool) -> None:
        import ray

        task = ray.remote(execute).options(num_cpus=0 if fan_out else 1, max_retries=0)
        ref = task.remote(str(self.root), job_id, entry, _env(), self.workers, self.lock_timeout)
        with self._lock:
            self._refs[job_id] = ref

    def _alive(self, job: JobState) -> bool:
        with self._lock:
            ref = self._refs.get(job.id)
        if ref is not None:
            import ray

            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return True
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - the coordinator task died: the state says running
                return False
            return st.read_state(self.root, job.id).state != st.RUNNING  # type: ignore[union-attr]
        return st.worker_alive(job)

    def get(self, job_id: str) -> JobState:
        job = st.read_state(self.root, job_id)
        if job is None:
            raise JobNotFound(f"There is no job '{job_id}'; 'python -m engine jobs list' shows them.")
        if job.state == st.RUNNING and not self._alive(job):
            job = st.mark_died(self.root, job_id, "its Ray task ended", known_dead=True) or job
        return job

    def list(self, states: Iterable[str] | None = None) -> list[JobState]:
        wanted = set(states) if states is not None else None
        jobs = []
        for job_id in st.list_job_ids(self.root):
            try:
                job = self.get(job_id)
            except JobNotFound:
                continue
            if wanted is None or job.state in wanted:
                jobs.append(job)
        return sorted(jobs, key=lambda job: job.created, reverse=True)

    def close(self, stop_jobs: bool = True) -> None:
        """With ``stop_jobs``, cancel this runner's Ray tasks still running (recorded as failed: resumable)."""
        if not stop_jobs:
            return
        import ray

        with self._lock:
            refs = dict(self._refs)
        for job_id, ref in refs.items():
            if ray.is_initialized() and not ray.wait([ref], timeout=0)[0]:
                ray.cancel(ref, force=True, recursive=True)
                st.mark_died(self.root, job_id, "its Ray runner closed", known_dead=True)
