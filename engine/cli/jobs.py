"""CLI: ``jobs list|show|cancel|logs|run|retry|kinds``: the job runner from a shell.

``python -m engine jobs run SPEC.json`` submits a job spec (``{"kind": ..., "params": {...}}``) and
follows it with a progress bar; Ctrl-C detaches (the job keeps running in its own worker process)
unless ``--cancel-on-interrupt`` is given. Ids may be shortened to any unique prefix.
Other commands can hand their long work to the runner with :func:`submit_and_follow`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from engine.cli.common import emit, progress_bar, say
from engine.core.errors import UserError
from engine.jobs.runner import Runner
from engine.jobs.state import JobState


def _runner(start: bool = False) -> Runner:
    from engine.jobs.runner import make_runner

    return make_runner(start=start)


def _on_ray() -> bool:
    return os.environ.get("LATENT_EXPLORER_RUNNER", "local").strip().lower() == "ray"


def use_ray(address: str | None, workers: int | None) -> None:
    """``--ray ADDRESS --workers N``: this command's jobs run on Ray (``auto``: a local Ray with N CPUs)."""
    if address:
        os.environ["LATENT_EXPLORER_RUNNER"] = "ray"
        os.environ["LATENT_EXPLORER_RAY_ADDRESS"] = address
    if workers:
        if workers < 1:
            raise UserError("--workers must be at least 1.")
        os.environ["LATENT_EXPLORER_RAY_WORKERS"] = str(workers)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _rate(job: JobState) -> str:
    return f"{job.throughput:,.0f} {job.throughput_unit}" if job.throughput else ""


def describe(job: JobState) -> str:
    """One line: id, state, progress, elapsed, throughput and the last message or error."""
    text = job.error if job.state == "failed" and job.error else job.message
    return (f"{job.id:<30} {job.state:<9} {100 * job.progress:5.1f}%  {_ago(job.elapsed()):>8}  "
            f"{_rate(job):>14}  {text}")


def follow(runner: Runner, job: JobState, detach_on_ctrl_c: bool = True, poll: float = 0.5) -> JobState:
    """Show a tqdm bar until the job finishes; on Ctrl-C detach (the job keeps running) or cancel it.

    Returns the job's last state (still active when detached). A second Ctrl-C while cancelling detaches.
    """
    last = job
    with progress_bar(f"{job.kind} {job.id[-12:]}") as bar:
        try:
            for last in runner.follow(job.id, poll=poll):
                bar(last.progress, last.error if last.error else last.message)
            return last
        except KeyboardInterrupt:
            if detach_on_ctrl_c:
                say(f"\ndetached: {job.id} keeps running; 'python -m engine jobs show {job.id}' to check, "
                    f"'python -m engine jobs cancel {job.id}' to stop it")
                return runner.get(job.id)
            say(f"\ncancelling {job.id} (it stops at its next progress report; Ctrl-C again to detach)")
            runner.cancel(job.id)
            try:
                for last in runner.follow(job.id, poll=poll):
                    bar(last.progress, last.message)
            except KeyboardInterrupt:
                say(f"detached: {job.id} is stopping on its own")
                return runner.get(job.id)
            return last


def _exit_leaving_workers(code: int) -> None:
    """Leave this process without waiting for the worker it started (multiprocessing would join it at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def submit_and_follow(spec: dict, *, detach: bool = False, cancel_on_interrupt: bool = False, as_json: bool = False
                      ) -> int:
    """Submit ``spec`` and follow it (what long CLI commands can call); exit code 0 done, 1 failed or cancelled."""
    if detach and _on_ray():
        raise UserError("--detach is not available with --ray: Ray jobs stop when this command ends; follow the "
                        "job (or run the command in tmux/screen).")
    runner = _runner(start=True)
    job = runner.submit(spec)
    say(f"job {job.id}: {job.message or job.state}")
    if detach:
        deadline = time.monotonic() + 60
        while job.active and not job.pid and time.monotonic() < deadline:  # until its worker process exists
            time.sleep(0.1)
            job = runner.get(job.id)
    elif not job.finished:
        job = follow(runner, job, detach_on_ctrl_c=not cancel_on_interrupt and not _on_ray())
    emit(job.to_json(), as_json, describe(job))
    if job.state == "failed":
        say(f"failed: {job.error}; the log: python -m engine jobs logs {job.id}")
    code = 0 if job.state in ("done", "running", "queued") else 1
    if job.active:
        runner.close(stop_jobs=False)
        _exit_leaving_workers(code)
    runner.close()
    return code


# --- handlers -----------------------------------------------------------------------------------
def _list(args) -> int:
    runner = _runner()
    jobs = runner.list(states=args.state or None)
    if not args.all and not args.state:
        jobs = jobs[: args.limit]
    emit([job.to_json() for job in jobs], args.json,
         "\n".join(describe(job) for job in jobs) if jobs else "no jobs yet")
    return 0


def _show(args) -> int:
    runner = _runner()
    job = runner.get(runner.resolve(args.id))
    lines = [describe(job), f"spec: {json.dumps(job.spec['params'], ensure_ascii=False)}",
             f"output: {job.output or '-'}", f"attempts: {job.attempts}, pid: {job.pid or '-'}"]
    if job.result:
        lines.append(f"result: {json.dumps(job.result, ensure_ascii=False, default=str)}")
    emit(job.to_json(), args.json, "\n".join(lines))
    return 0


def _cancel(args) -> int:
    runner = _runner()
    job = runner.cancel(runner.resolve(args.id))
    if args.wait and job.active:
        job = runner.wait(job.id)
    emit(job.to_json(), args.json, describe(job))
    return 0


def _logs(args) -> int:
    runner = _runner()
    print(runner.logs(runner.resolve(args.id), tail=args.tail), end="")
    return 0


def _read_spec(path: str) -> dict:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"The job spec '{path}' cannot be read ({exc.strerror or type(exc).__name__}).") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"The job spec '{path}' is not valid JSON ({exc}).") from None


def _run(args) -> int:
    use_ray(args.ray, args.workers)
    return submit_and_follow(_read_spec(args.spec), detach=args.detach, cancel_on_interrupt=args.cancel_on_interrupt,
                             as_json=args.json)


def _retry(args) -> int:
    use_ray(args.ray, args.workers)
    runner = _runner()
    spec = runner.get(runner.resolve(args.id)).spec
    return submit_and_follow({"kind": spec["kind"], "params": spec["params"]}, detach=args.detach,
                             cancel_on_interrupt=args.cancel_on_interrupt, as_json=args.json)


def _kinds(args) -> int:
    from engine.jobs.spec import REQUIRED, kinds

    payload, lines = {}, []
    for name, kind in sorted(kinds().items()):
        payload[name] = {"summary": kind.summary, "params": {
            p.name: {"type": p.type, "required": p.default is REQUIRED, "help": p.help,
                     **({} if p.default is REQUIRED else {"default": p.default})} for p in kind.params}}
        lines.append(f"{name}: {kind.summary}")
        lines += [f"    {p.name} ({p.type}{', required' if p.default is REQUIRED else f', default {p.default!r}'})"
                  f"{'  ' + p.help if p.help else ''}" for p in kind.params]
    emit(payload, args.json, "\n".join(lines))
    return 0


def _follow_args(p) -> None:
    p.add_argument("--detach", action="store_true", help="return once the job has started")
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="Ctrl-C cancels the job (default: Ctrl-C detaches and the job keeps running)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray: 'auto' starts a local Ray, HOST:PORT joins a cluster (env: "
                        "LATENT_EXPLORER_RUNNER=ray, LATENT_EXPLORER_RAY_ADDRESS)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --ray: CPUs of a local Ray and parts per capture/dashboard job (default: the CPUs)")


def register(sub) -> None:
    jobs = sub.add_parser("jobs", help="long jobs run by worker processes: list, show, cancel, logs, run")
    inner = jobs.add_subparsers(dest="jobs_command", required=True)

    p = inner.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", action="append", choices=["queued", "running", "done", "failed", "cancelled"])
    p.add_argument("--all", action="store_true", help="every job (default: the newest --limit)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_list)

    p = inner.add_parser("show", help="one job's state, spec and result")
    p.add_argument("id", help="a job id or a unique prefix of one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_show)

    p = inner.add_parser("cancel", help="cancel a job (a running one stops at its next progress report)")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cancel)

    p = inner.add_parser("logs", help="a job's log")
    p.add_argument("id")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p.set_defaults(handler=_logs)

    p = inner.add_parser("run", help="submit a job spec (JSON file, or - for stdin) and follow it")
    p.add_argument("spec")
    _follow_args(p)
    p.set_defaults(handler=_run)

    p = inner.add_parser("retry", help="submit a failed or cancelled job again (it resumes) and follow it")
    p.add_argument("id")
    _follow_args(p)
    p.set_defaults(handler=_retry)

    p = inner.add_parser("kinds", help="the job kinds and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_kinds)
