"""The autointerp job kinds (explain, score, labels) through a LocalRunner, against the fake OpenAI-compatible server."""
from __future__ import annotations

import pandas as pd
import pytest

from engine.autointerp.tables import EXPLANATIONS, LABELS, SCORES
from engine.jobs import JobSpecError, LocalRunner, output_lock, validate
from tests.engine.autointerp.conftest import plain_dashboard, server  # noqa: F401  (fixtures)
from tests.engine.autointerp.fakes import KEY_ENV


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    runner = LocalRunner(tmp_path / "cache" / "jobs", workers=1)
    yield runner
    runner.close()


def backend(server) -> dict:  # noqa: F811
    return {"kind": "openai", "base_url": server.url, "model": "rule-model", "api_key_env": KEY_ENV,
            "backoff": 0.01, "concurrency": 3, "batch_size": 4}


def test_explain_score_and_labels_jobs(runner, plain_dashboard, server, tmp_path):  # noqa: F811
    out = tmp_path / "words"
    params = {"dashboard": str(plain_dashboard), "backend": backend(server), "features": [2, 0, 1, 1],
              "out_dir": str(out)}
    job = runner.wait(runner.submit({"kind": "explain", "params": params}).id, timeout=120)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert job.output == str(out) and job.result["explained"] == 3 and job.result["failed"] == 0
    assert job.spec["params"]["features"] == [0, 1, 2]  # canonical: sorted, no repeats
    assert "3 explained" in job.message
    table = pd.read_parquet(out / EXPLANATIONS)
    assert sorted(table["feature"].tolist()) == [0, 1, 2] and table["explanation"].str.startswith("the word").all()

    job = runner.wait(runner.submit({"kind": "score", "params": {**params, "n_activating": 3,
                                                                  "n_non_activating": 3}}).id, timeout=120)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert set(pd.read_parquet(out / SCORES)["feature"]) == {0, 1, 2}

    job = runner.wait(runner.submit({"kind": "labels", "params": {"dashboard": str(plain_dashboard),
                                                                   "out_dir": str(out)}}).id, timeout=120)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert (out / LABELS).is_file() and job.result["path"] == str(out / LABELS)


def test_explain_job_waits_for_the_dashboard_folder_and_cancels(runner, plain_dashboard, server):  # noqa: F811
    lock = output_lock(plain_dashboard, runner.root)  # e.g. a dashboard rebuild holds the folder
    lock.acquire()
    try:
        job = runner.submit({"kind": "explain", "params": {"dashboard": str(plain_dashboard),
                                                           "backend": backend(server)}})
        for state in runner.follow(job.id, poll=0.2):
            if state.message.startswith("waiting"):
                break
        assert "in use" in runner.get(job.id).message
        runner.cancel(job.id)
        job = runner.wait(job.id, timeout=60)
    finally:
        lock.release()
    assert job.state == "cancelled" and not (plain_dashboard / EXPLANATIONS).exists()


def test_autointerp_specs_are_checked_at_submit(plain_dashboard, tmp_path):  # noqa: F811
    with pytest.raises(JobSpecError, match="backend"):
        validate({"kind": "explain", "params": {"dashboard": str(plain_dashboard), "backend": {"kind": "nope"}}})
    with pytest.raises(JobSpecError, match="does not exist"):
        validate({"kind": "score", "params": {"dashboard": str(tmp_path / "none"), "backend": {"kind": "local"}}})
    with pytest.raises(JobSpecError, match="features"):
        validate({"kind": "explain", "params": {"dashboard": str(plain_dashboard), "backend": {"kind": "local"},
                                                "features": ["a"]}})
    assert validate({"kind": "explain", "params": {"dashboard": str(plain_dashboard), "backend": {"kind": "local"},
                                                   "features": "all"}}).params["features"] is None
