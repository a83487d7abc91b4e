"""The long CLI commands run as jobs: ``cache`` -> capture, ``sae demo`` -> sae_demo (``--detach`` returns at once)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.common import main
from engine.jobs import LocalRunner, wait_idle

ROOT = Path(__file__).resolve().parents[3]
TEXT = "\n\n".join(f"Note {i}: the quick brown fox jumps over the lazy dog while {i} cats watch." for i in range(120))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    yield tmp_path / "cache"
    wait_idle(tmp_path / "cache" / "jobs", timeout=120)


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_cache_runs_as_a_capture_job_and_prints_the_store(cache, tmp_path, capsys):
    args = ["cache", "--model", "tiny:llama", "--corpus", str(_corpus(tmp_path)), "--layers", "0-1", "--sites",
            "resid,mlp_out", "--max-tokens", "300", "--context-length", "32", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # stdout holds only the command's result; the job's lines go to stderr
    assert payload["n_tokens"] >= 300 and Path(payload["path"]).is_dir() and payload["n_shards"] >= 1
    assert "capture-" in captured.err
    jobs = LocalRunner(cache / "jobs").list()
    assert [(j.kind, j.state, j.output) for j in jobs] == [("capture", "done", payload["path"])]
    assert jobs[0].spec["params"]["layers"] == [0, 1] and jobs[0].spec["params"]["sites"] == ["resid_post", "mlp_out"]
    assert main(args[:-1]) == 0  # the same command again: the finished job (nothing captured twice)
    assert "300" in capsys.readouterr().out.replace(",", "") and len(LocalRunner(cache / "jobs").list()) == 1


def test_sae_demo_runs_as_a_job_with_dashboards(cache, capsys):
    assert main(["sae", "demo", "--model", "tiny:llama", "--capture-tokens", "1500", "--train-tokens", "2048",
                 "--width", "64", "--k", "4", "--dashboards", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["path"], "cfg.json").is_file() and result["train"]["tokens"] >= 2048
    assert result["report"]["l0"] is not None and Path(result["dashboards"], "manifest.json").is_file()
    (job,) = LocalRunner(cache / "jobs").list()
    assert job.kind == "sae_demo" and job.spec["params"]["settings"]["width"] == 64


def test_detach_returns_the_running_job(cache, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        done = subprocess.run([sys.executable, "-m", "engine", "cache", "--model", "tiny:llama", "--corpus",
                               str(_corpus(tmp_path)), "--layers", "1", "--max-tokens", "2000",
                               "--context-length", "32", "--detach", "--json"],
                              cwd=ROOT, env=env, stdout=out, stderr=err, timeout=120)
    assert done.returncode == 0, (tmp_path / "err.txt").read_text()
    job = json.loads((tmp_path / "out.txt").read_text())
    assert job["kind"] == "capture" and job["state"] in ("running", "done")
    assert LocalRunner(cache / "jobs").wait(job["id"], timeout=120).state == "done"
