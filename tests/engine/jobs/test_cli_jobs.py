"""``python -m engine jobs ...``: run, list, show, logs, cancel, kinds, and follow's Ctrl-C behaviour."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine.cli.common as cli
from engine.cli.common import main
from engine.cli.jobs import follow
from engine.jobs import LocalRunner, wait_idle

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["engine.cli.jobs"])  # only this topic's parser
    yield tmp_path / "cache"
    wait_idle(tmp_path / "cache" / "jobs", timeout=30)


def _spec(tmp_path: Path, **params) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"kind": "selftest", "params": {"steps": 5, "seconds_per_step": 0.01, **params}}))
    return path


def test_run_list_show_logs(cache, tmp_path, capsys):
    assert main(["jobs", "run", str(_spec(tmp_path)), "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "done" and job["message"].startswith("Counted to 5")
    assert main(["jobs", "list", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [job["id"]]
    assert main(["jobs", "show", job["id"][:14]]) == 0  # a unique prefix is enough
    out = capsys.readouterr().out
    assert job["id"] in out and "done" in out and '"steps": 5' in out
    assert main(["jobs", "logs", job["id"], "--tail", "3"]) == 0
    assert "done: Counted to 5" in capsys.readouterr().out
    assert main(["jobs", "run", str(_spec(tmp_path))]) == 0  # the same spec: the finished job, not a new one
    assert main(["jobs", "list"]) == 0 and capsys.readouterr().out.count("selftest-") == 2  # run's line + list's


def test_bad_spec_and_unknown_id_are_one_line(cache, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "selftest", "params": {"stepz": 1}}))
    assert main(["jobs", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: A selftest job has no parameter 'stepz'") and "\n" not in err
    assert main(["jobs", "show", "nope"]) == 2
    assert "There is no job 'nope'" in capsys.readouterr().err
    assert main(["jobs", "run", str(tmp_path / "missing.json")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_a_failing_job_exits_1(cache, tmp_path, capsys):
    assert main(["jobs", "run", str(_spec(tmp_path, fail_at_step=2))]) == 1
    assert "selftest failed at step 2 on purpose" in capsys.readouterr().err


def test_kinds_lists_parameters(cache, capsys):
    assert main(["jobs", "kinds", "--json"]) == 0
    kinds = json.loads(capsys.readouterr().out)
    assert {"capture", "train_sae", "train_tuned_lens", "dashboards", "sae_demo", "selftest"} <= set(kinds)
    assert kinds["capture"]["params"]["model"]["required"] and kinds["capture"]["params"]["max_tokens"]["default"]


def test_cancel_a_running_job(cache, tmp_path, capsys):
    runner = LocalRunner(cache / "jobs", workers=1)
    job = runner.submit({"kind": "selftest", "params": {"steps": 500, "seconds_per_step": 0.02}})
    while runner.get(job.id).progress == 0:
        time.sleep(0.05)
    assert main(["jobs", "cancel", job.id, "--wait", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    runner.close()


def _interrupted_once(runner):
    """Make ``runner.follow`` raise KeyboardInterrupt once (as Ctrl-C would), then behave normally."""
    real, calls = runner.follow, []

    def fake(job_id, **kwargs):
        if not calls:
            calls.append(1)
            yield runner.get(job_id)
            raise KeyboardInterrupt
        yield from real(job_id, **kwargs)
    runner.follow = fake


@pytest.mark.parametrize("detach", [True, False])
def test_ctrl_c_detaches_or_cancels(cache, detach):
    runner = LocalRunner(cache / "jobs", workers=1)
    job = runner.submit({"kind": "selftest", "params": {"steps": 300, "seconds_per_step": 0.02}})
    _interrupted_once(runner)
    last = follow(runner, job, detach_on_ctrl_c=detach, poll=0.1)
    if detach:
        assert last.active and runner.get(job.id).active  # still running
        runner.cancel(job.id)
    else:
        assert last.state == "cancelled"
    assert runner.wait(job.id, timeout=30).state == "cancelled"
    runner.close()


def test_detach_leaves_the_worker_running_after_the_cli_exits(cache, tmp_path):
    spec = _spec(tmp_path, steps=1500, seconds_per_step=0.02)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    # files, not pipes: multiprocessing's resource tracker keeps the caller's stderr open while a worker lives
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        done = subprocess.run([sys.executable, "-m", "engine", "jobs", "run", str(spec), "--detach", "--json"],
                              cwd=ROOT, env=env, stdout=out, stderr=err, timeout=60)
    assert done.returncode == 0, (tmp_path / "err.txt").read_text()
    job = json.loads((tmp_path / "out.txt").read_text())
    assert job["state"] == "running" and time.monotonic() - started < 30
    runner = LocalRunner(cache / "jobs")
    try:
        deadline = time.monotonic() + 30
        while runner.get(job["id"]).progress == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = runner.get(job["id"])
        assert alive.state == "running" and alive.progress > 0  # the CLI has exited, its worker goes on
    finally:
        runner.cancel(job["id"])
    assert runner.wait(job["id"], timeout=30).state == "cancelled"
