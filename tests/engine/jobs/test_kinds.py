"""The model-backed job kinds end to end on the tiny random Llama: tuned lens, and the demo chain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.jobs import LocalRunner

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog and {i} cats watch." for i in range(200))


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    runner = LocalRunner(tmp_path / "cache" / "jobs", workers=1)
    yield runner
    runner.close()


def test_train_tuned_lens_job(runner, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = {"kind": "train_tuned_lens", "params": {
        "model": "tiny:llama", "corpus": str(corpus),
        "config": {"steps": 6, "batch_size": 2, "seq_len": 32, "checkpoint_every": 3}}}
    job = runner.wait(runner.submit(spec).id, timeout=90)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert job.result["steps"] == 6 and Path(job.output).parent.name == "tuned_lens"
    assert "Choose it on the Lens page" in job.message
    curve = runner.metrics(job.id)
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6] and all(r["kl"] >= 0 for r in curve)


def test_sae_demo_job_captures_trains_and_builds_dashboards(runner):
    settings = {"capture_tokens": 1500, "train_tokens": 2048, "width": 64, "k": 4, "batch_size": 256,
                "eval_tokens": 128, "context_length": 32, "corpus": "builtin-multilingual"}
    spec = {"kind": "sae_demo", "params": {"model": "tiny:llama", "settings": settings,
                                           "dashboard_config": {"top_k": 4, "batch_size": 512}}}
    job = runner.wait(runner.submit(spec).id, timeout=120)
    assert job.state == "done", (job.error, runner.logs(job.id))
    sae, store, dashboards = (Path(job.result[k]) for k in ("path", "store", "dashboards"))
    assert (sae / "cfg.json").is_file() and (sae / "report.json").is_file()
    assert json.loads((store / "manifest.json").read_text())["n_tokens"] == 1500
    assert json.loads((dashboards / "manifest.json").read_text())["complete"]
    assert job.outputs == [str(sae), str(store), str(dashboards)] and job.progress == 1.0
    assert runner.metrics(job.id) and "loss" in runner.metrics(job.id)[0]  # the SAE's training curves
