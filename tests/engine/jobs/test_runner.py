"""The local job runner: worker processes, state on disk, dedupe, cancel/resume, locks, crashes.

Most tests use the ``selftest`` kind (counts with a checkpoint per step, no model) so that timing is
under the test's control; the capture tests run the real engine on the tiny random Llama.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.jobs import JobSpecError, LocalRunner, output_lock
from engine.jobs import state as st

TEXT = "The quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    return tmp_path / "cache"


@pytest.fixture
def runner(cache):
    runner = LocalRunner(cache / "jobs", workers=1)
    yield runner
    runner.close()


def selftest(out: Path | None = None, **params) -> dict:
    return {"kind": "selftest", "params": {**params, **({"out": str(out)} if out else {})}}


def wait_for(check, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def corpus_folder(tmp_path: Path, text: str = TEXT) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text(text, encoding="utf-8")
    return folder


# --- submit, dedupe, validation ----------------------------------------------------------------
def test_capture_job_runs_in_a_worker_process(runner, tmp_path):
    spec = {"kind": "capture", "params": {"model": "tiny:llama", "corpus": str(corpus_folder(tmp_path)),
                                          "layers": [1], "max_tokens": 600, "context_length": 32}}
    started = time.monotonic()
    job = runner.submit(spec)
    assert time.monotonic() - started < 2.0 and job.state == "queued"  # returns at once
    job = runner.wait(job.id, timeout=60)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert job.pid != os.getpid() and job.attempts == 1
    assert job.result["n_tokens"] == 600 and "Stored 600 tokens" in job.message
    manifest = json.loads((Path(job.output) / "manifest.json").read_text())
    assert manifest["n_tokens"] == 600 and manifest["complete"] and manifest["model"] == "tiny:llama"
    assert Path(job.output).parent.name == "activations"  # the default store folder under the cache
    assert "done: Stored 600 tokens" in runner.logs(job.id)


def test_same_spec_is_the_same_job(runner, tmp_path):
    first = runner.submit(selftest(steps=30, seconds_per_step=0.02))
    again = runner.submit({"kind": "selftest", "params": {"seconds_per_step": 0.02, "steps": 30}})
    assert again.id == first.id and again.state in ("queued", "running")
    defaults = runner.submit(selftest())
    assert runner.submit({"kind": "selftest", "params": {"steps": 20, "seconds_per_step": 0.05}}).id == defaults.id
    done = runner.wait(first.id, timeout=30)
    assert done.state == "done"
    assert runner.submit(selftest(steps=30, seconds_per_step=0.02)).attempts == 1  # done: returned, not rerun
    runner.wait_all(timeout=30)
    assert len(runner.list()) == 2


def test_a_changed_input_file_is_a_new_job(runner, tmp_path):
    folder = corpus_folder(tmp_path)
    spec = {"kind": "capture", "params": {"model": "tiny:llama", "corpus": str(folder), "max_tokens": 100}}
    first = runner.submit(spec)
    runner.cancel(first.id)
    (folder / "b.txt").write_text("more text", encoding="utf-8")
    assert runner.submit(spec).id != first.id
    runner.cancel(runner.submit(spec).id)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "nope", "params": {}}, "Unknown job kind 'nope'; choose from capture,"),
    ({"kind": "selftest", "params": {"step": 3}}, "has no parameter 'step'; its parameters are steps,"),
    ({"kind": "capture", "params": {}}, "A capture job needs the parameter 'model'"),
    ({"kind": "selftest", "params": {"steps": "ten"}}, "must be an integer, not \"ten\""),
    ({"kind": "train_sae", "params": {"store": "/no/such/store"}}, "The store '/no/such/store' of this train_sae "
                                                                   "job does not exist."),
    ({"kind": "capture", "params": {"model": "tiny:llama", "corpus": "/no/such.txt"}}, "is neither"),
    ({"kind": "train_sae", "params": {"store": "/tmp", "config": {"widht": 3}}}, "settings have no 'widht'"),
    ({"kind": "selftest", "params": {}, "extra": 1}, "remove 'extra'"),
])
def test_bad_specs_fail_at_submit_in_one_sentence(runner, spec, message):
    with pytest.raises(JobSpecError) as info:
        runner.submit(spec)
    text = str(info.value)
    assert message in text and text.count(". ") == 0 and "\n" not in text, text
    assert runner.list() == []


# --- cancel and resume ---------------------------------------------------------------------------
def test_cancel_stops_at_the_next_checkpoint_and_a_resubmit_resumes(runner, tmp_path):
    out = tmp_path / "count"
    spec = selftest(out, steps=150, seconds_per_step=0.02)
    job = runner.submit(spec)
    wait_for(lambda: (out / "selftest.json").is_file() and json.loads((out / "selftest.json").read_text())["step"] >= 5)
    runner.cancel(job.id)
    job = runner.wait(job.id, timeout=30)
    stopped_at = json.loads((out / "selftest.json").read_text())["step"]
    assert job.state == "cancelled" and "cancelled at" in job.message
    assert 5 <= stopped_at < 150 and job.progress == pytest.approx(stopped_at / 150, abs=0.01)
    again = runner.submit(spec)
    assert again.id == job.id and again.state == "queued"
    done = runner.wait(job.id, timeout=60)
    assert done.state == "done" and done.attempts == 2
    assert done.result["resumed_from"] == stopped_at
    log = runner.logs(job.id)
    assert "=== attempt 1" in log and "=== attempt 2" in log and "cancelled at" in log


def test_a_cancelled_capture_resumes_after_its_last_shard(runner, tmp_path):
    corpus = corpus_folder(tmp_path, " ".join(f"word{i} of the long text" for i in range(6000)))
    spec = {"kind": "capture", "params": {"model": "tiny:llama", "corpus": str(corpus), "layers": [1],
                                          "max_tokens": 90_000, "context_length": 64, "shard_tokens": 3000,
                                          "out": str(tmp_path / "store")}}
    manifest = tmp_path / "store" / "manifest.json"
    job = runner.submit(spec)
    wait_for(lambda: manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2, timeout=60,
             every=0.01)
    runner.cancel(job.id)
    job = runner.wait(job.id, timeout=30)
    assert job.state == "cancelled", job.message
    kept = json.loads(manifest.read_text())["shards"]
    assert not json.loads(manifest.read_text())["complete"] and len(kept) < 30
    first = tmp_path / "store" / kept[0]["file"]
    stamp = first.stat().st_mtime_ns
    job = runner.wait(runner.submit(spec).id, timeout=90)
    assert job.state == "done" and job.result["n_tokens"] == 90_000, job.error
    final = json.loads(manifest.read_text())
    assert final["complete"] and final["shards"][: len(kept)] == kept  # earlier shards kept, not rewritten
    assert first.stat().st_mtime_ns == stamp


def test_cancel_a_queued_job(cache):
    runner = LocalRunner(cache / "jobs", workers=1)
    try:
        busy = runner.submit(selftest(steps=200, seconds_per_step=0.02))
        waiting = runner.submit(selftest(steps=3))
        assert runner.cancel(waiting.id).state == "cancelled"
        runner.cancel(busy.id)
        assert runner.wait(busy.id, timeout=30).state == "cancelled"
        assert runner.get(waiting.id).state == "cancelled" and runner.get(waiting.id).attempts == 0
    finally:
        runner.close()


# --- restart, locks, crashes ---------------------------------------------------------------------
def test_a_new_runner_sees_the_jobs_of_an_old_one(cache, tmp_path):
    old = LocalRunner(cache / "jobs", workers=1)
    done = old.wait(old.submit(selftest(steps=2)).id, timeout=30)
    running = old.submit(selftest(tmp_path / "slow", steps=300, seconds_per_step=0.02))
    wait_for(lambda: old.get(running.id).progress > 0)
    restarted = LocalRunner(cache / "jobs")  # e.g. the server after a restart; it does not dispatch
    seen = {job.id: job for job in restarted.list()}
    assert seen[done.id].state == "done" and seen[done.id].result == done.result
    assert seen[running.id].state == "running" and st.pid_alive(seen[running.id].pid)
    assert restarted.cancel(running.id).message.startswith("cancelling")  # another process can cancel it
    assert old.wait(running.id, timeout=30).state == "cancelled"
    old.close()


def test_two_jobs_on_one_output_folder_take_turns(cache, tmp_path):
    out = tmp_path / "shared"
    runner = LocalRunner(cache / "jobs", workers=2)
    try:
        first = runner.submit(selftest(out, steps=40, seconds_per_step=0.03))
        wait_for(lambda: runner.get(first.id).output)
        second = runner.submit(selftest(out, steps=45, seconds_per_step=0.01))
        waiting = wait_for(lambda: "in use by" in runner.get(second.id).message and runner.get(second.id))
        assert f"in use by {first.id}" in waiting.message and waiting.state == "running"
        first, second = runner.wait(first.id, timeout=30), runner.wait(second.id, timeout=30)
        assert first.state == second.state == "done"
        assert second.result["resumed_from"] == 40  # it started once the first had finished
    finally:
        runner.close()


def test_a_folder_held_by_another_process_is_refused_after_the_lock_timeout(cache, tmp_path):
    out = tmp_path / "held"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from engine.jobs import output_lock\n"
            "lock = output_lock(sys.argv[2], sys.argv[3]); lock.acquire(); print('held', flush=True); time.sleep(60)")
    root = Path(__file__).resolve().parents[3]
    holder = subprocess.Popen([sys.executable, "-c", code, str(root), str(out), str(cache / "jobs")],
                              stdout=subprocess.PIPE, text=True)
    runner = LocalRunner(cache / "jobs", workers=1, lock_timeout=1.0)
    try:
        assert holder.stdout.readline().strip() == "held"
        job = runner.wait(runner.submit(selftest(out, steps=2)).id, timeout=30)
        assert job.state == "failed" and f"The output folder {out.resolve()} is in use by" in job.error
        holder.kill()
        holder.wait()
        assert runner.wait(runner.submit(selftest(out, steps=2)).id, timeout=30).state == "done"
        with output_lock(out, cache / "jobs").acquire(timeout=1):  # released by the finished job
            pass
    finally:
        holder.kill()
        runner.close()


def test_a_raising_worker_fails_the_job_with_its_message_and_keeps_the_log(runner):
    job = runner.wait(runner.submit(selftest(steps=10, fail_at_step=3, seconds_per_step=0.01)).id, timeout=30)
    assert job.state == "failed" and job.error == "RuntimeError: selftest failed at step 3 on purpose"
    log = runner.logs(job.id)
    assert "Traceback" in log and "selftest failed at step 3" in log and "failed: RuntimeError" in log
    assert runner.wait(runner.submit(selftest(steps=2)).id, timeout=30).state == "done"  # the runner goes on


def test_a_user_error_in_the_worker_is_one_sentence(runner, tmp_path):
    (tmp_path / "not-a-store").mkdir()  # exists (so the spec is valid) but holds no store
    job = runner.wait(runner.submit({"kind": "train_sae", "params": {"store": str(tmp_path / "not-a-store")}}).id,
                      timeout=60)
    assert job.state == "failed" and job.error.endswith("is not an activation store (no manifest.json); capture one "
                                                        "first.")
    assert "Traceback" not in runner.logs(job.id) and job.error in runner.logs(job.id)


def test_a_killed_worker_is_reported_as_died_and_can_be_resubmitted(runner, tmp_path):
    spec = selftest(tmp_path / "k", steps=1000, seconds_per_step=0.02)
    job = runner.submit(spec)
    job = wait_for(lambda: (j := runner.get(job.id)).progress > 0 and j.pid and j)
    os.kill(job.pid, signal.SIGKILL)
    job = runner.wait(job.id, timeout=30)
    assert job.state == "failed" and job.error.startswith("worker died (killed by SIGKILL")
    assert "worker died" in runner.logs(job.id)
    again = runner.submit(spec)
    assert again.id == job.id and again.state == "queued"
    restarted = wait_for(lambda: (j := runner.get(job.id)).pid not in (None, job.pid) and j)
    assert restarted.state == "running" and restarted.attempts == 2
    runner.cancel(job.id)
    assert runner.wait(job.id, timeout=30).state == "cancelled"


def test_a_running_job_whose_worker_is_gone_is_failed_after_a_restart(cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = cache / "jobs"
    job = st.JobState(id="selftest-000000000000", kind="selftest", spec={"kind": "selftest", "params": {}},
                      entry="engine.jobs.kinds:run_selftest", state="running", pid=dead.pid, started=time.time())
    st.job_dir(root, job.id).mkdir(parents=True)
    st.write_state(root, job)
    seen = LocalRunner(root).get(job.id)
    assert seen.state == "failed" and seen.error.startswith("worker died")
    assert st.read_state(root, job.id).state == "failed"  # recorded, not only shown


def test_progress_writes_are_throttled_and_measure_throughput(runner):
    job = runner.submit(selftest(steps=60, seconds_per_step=0.03))
    path = st.job_dir(runner.root, job.id) / "state.json"
    writes, rates = [], []
    while not runner.get(job.id).finished:
        data = json.loads(path.read_text())
        if data["state"] == "running" and data["progress"] > 0 and (not writes or data["updated"] != writes[-1]):
            writes.append(data["updated"])
            if data["throughput"]:
                rates.append((data["throughput"], data["throughput_unit"]))
        time.sleep(0.02)
    gaps = [b - a for a, b in zip(writes, writes[1:])]
    assert len(writes) >= 2 and min(gaps) >= 0.45, gaps
    assert rates and rates[-1][1] == "steps/s" and 5 < rates[-1][0] < 40, rates
    assert len(runner.metrics(job.id)) == 60
