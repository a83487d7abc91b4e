"""Jobs on Ray (one local Ray with 2 CPUs for the module): a sharded capture equals the single-process store,
merged dashboards equal the single pass, a killed part leaves a readable store that a resubmission completes,
and a bad address fails fast with one sentence."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from engine.core.errors import UserError
from engine.data.store import ActivationStore

ray = pytest.importorskip("ray")

DOCS = [" ".join(f"Line {i}.{j}: the quick brown fox jumps over the lazy dog while {i * 7 + j} cats watch."
                 for j in range(1 + i % 4)) for i in range(80)]  # documents of 1 to 4 windows
CAPTURE = {"model": "tiny:llama", "layers": "all", "max_tokens": 1500, "context_length": 32, "batch_size": 4,
           "shard_tokens": 200}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    patch = pytest.MonkeyPatch()
    patch.setenv("LATENT_EXPLORER_CACHE", str(root / "cache"))
    patch.setenv("LATENT_EXPLORER_TEST_PART_DELAY", "0")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": doc}) for doc in DOCS), encoding="utf-8")
    from engine.jobs.ray_runner import RayRunner

    runner = RayRunner(root / "cache" / "jobs", address="auto", workers=2, start=True)
    yield {"root": root, "corpus": str(corpus), "runner": runner}
    runner.close()
    ray.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def lm():
    from engine.core.models import load_model

    return load_model("tiny:llama", device="cpu")


@pytest.fixture(scope="module")
def single_store(env, lm):
    from engine.data.corpora import iter_texts
    from engine.data.store_writer import build_store

    p = CAPTURE
    return build_store(lm, iter_texts(env["corpus"]), env["root"] / "single", layers=p["layers"],
                       max_tokens=p["max_tokens"], context_length=p["context_length"], batch_size=p["batch_size"],
                       corpus_spec=env["corpus"], shard_tokens=300)


def _random_sae(d_in: int, d_sae: int = 48):
    from engine.sae.base import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.05)
        sae.b_enc.sub_(0.5)  # sparse-ish: most features off most of the time
    return sae


def _capture(env, out: Path) -> dict:
    return {"kind": "capture", "params": {**CAPTURE, "corpus": env["corpus"], "out": str(out)}}


def assert_same_store(a: ActivationStore, b: ActivationStore, rows: int | None = None) -> None:
    n = a.n_tokens if rows is None else rows
    for meta in ("token_ids", "doc_ids", "positions"):
        assert torch.equal(getattr(a, meta)()[:n], getattr(b, meta)()[:n]), meta
    assert a.sites == b.sites and a.layers == b.layers and a.dtype == b.dtype
    for site in a.sites:
        for layer in a.layers:
            assert torch.equal(a.read(site, layer, slice(0, n)), b.read(site, layer, slice(0, n))), (site, layer)


@pytest.fixture(scope="module")
def ray_store(env):
    runner = env["runner"]
    job = runner.wait(runner.submit(_capture(env, env["root"] / "sharded")).id, timeout=180)
    assert job.state == "done", (job.error, runner.logs(job.id))
    return ActivationStore.open(job.result["path"]), job


def test_sharded_capture_equals_the_single_process_store(ray_store, single_store):
    store, job = ray_store
    assert job.result["parts"] == 2 and store.n_tokens == single_store.n_tokens == 1500
    assert store.manifest["parts"] == {"total": 2, "done": [0, 1]}
    assert {Path(s["file"]).parts[:2] for s in store.manifest["shards"]} == {("parts", "p00000"), ("parts", "p00001")}
    assert_same_store(store, single_store)
    assert store.verify() == []
    assert store.manifest["n_windows"] == single_store.manifest["n_windows"]  # corpus window indices, not per part
    plan = json.loads((store.path / "parts.json").read_text())["parts"]
    assert plan[1]["first_doc"] > 0 and plan[1]["window_start"] % CAPTURE["batch_size"] == 0


def test_ray_jobs_show_in_the_local_runner(ray_store, env):
    from engine.jobs import LocalRunner

    _, job = ray_store
    seen = {j.id: j for j in LocalRunner(env["runner"].root).list()}
    assert seen[job.id].state == "done" and seen[job.id].entry.endswith("run_capture_ray")


def test_merged_dashboards_equal_the_single_pass(ray_store, lm, env):
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.folder import TABLES
    from engine.sae.io import save_sae

    store, _ = ray_store
    sae_dir = save_sae(_random_sae(lm.d_model), env["root"] / "sae")
    settings = {"top_k": 5, "n_bins": 16, "n_intervals": 4, "samples_per_interval": 3, "batch_size": 128,
                "n_logits": 4, "n_neighbours": 3, "device": "cpu"}
    single = build_dashboards(sae_dir, store.path, lm, env["root"] / "dash-single",
                              config=DashboardConfig(**settings))
    runner = env["runner"]
    spec = {"kind": "dashboards", "params": {"model": "tiny:llama", "sae": str(sae_dir), "store": str(store.path),
                                             "config": settings, "out": str(env["root"] / "dash-ray")}}
    job = runner.wait(runner.submit(spec).id, timeout=180)
    assert job.state == "done", (job.error, runner.logs(job.id))
    assert "2 parts on Ray" in job.message
    for table in TABLES:
        a = pd.read_parquet(single / f"{table}.parquet")
        b = pd.read_parquet(Path(job.result["path"]) / f"{table}.parquet")
        if table == "features":  # mean_act: float64 sums in another order, then float32
            pd.testing.assert_series_equal(a.pop("mean_act"), b.pop("mean_act"), rtol=1e-6)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(pd.read_parquet(single / "intervals.parquet")) > 0


def _wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_part_leaves_a_readable_store_that_a_resubmission_completes(env, single_store, monkeypatch):
    from engine.data.store_parts import part_dir

    runner, out = env["runner"], env["root"] / "killed"
    monkeypatch.setenv("LATENT_EXPLORER_TEST_PART_DELAY", "0.25")  # seconds per batch: time to kill part 1
    job = runner.submit(_capture(env, out))
    pid_file = Path(runner.root) / job.id / "part-1.pid"

    def part1_has_a_shard() -> bool:
        try:
            return len(json.loads((part_dir(out, 1) / "manifest.json").read_text())["shards"]) >= 1
        except (OSError, ValueError, KeyError):
            return False

    _wait_for(lambda: pid_file.is_file() and part1_has_a_shard())
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    failed = runner.wait(job.id, timeout=120)
    assert failed.state == "failed" and "1 of 2 parts failed" in failed.error, failed.error
    partial = ActivationStore.open(out, allow_incomplete=True)
    assert not partial.manifest["complete"] and partial.manifest["parts"]["done"] == [0]
    assert 0 < partial.n_tokens < 1500
    assert_same_store(partial, single_store, rows=partial.n_tokens)
    part0 = {f.name: f.stat().st_mtime_ns for f in part_dir(out, 0).glob("*.safetensors")}

    monkeypatch.setenv("LATENT_EXPLORER_TEST_PART_DELAY", "0")
    done = runner.wait(runner.submit(_capture(env, out)).id, timeout=180)
    assert done.state == "done", (done.error, runner.logs(done.id))
    assert "capturing 1 of 2 parts" in runner.logs(done.id)
    assert {f.name: f.stat().st_mtime_ns for f in part_dir(out, 0).glob("*.safetensors")} == part0
    assert_same_store(ActivationStore.open(out), single_store)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "10.255.255.1:6379", "not-an-address"])
def test_a_bad_ray_address_fails_fast_with_one_sentence(env, monkeypatch, address):
    from engine.jobs.ray_runner import connect

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        connect(address, timeout=2.0)
    assert time.monotonic() - started < 5.0
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert address in message


def test_make_runner_picks_ray_from_the_environment(env, monkeypatch):
    from engine.jobs.ray_runner import RayRunner
    from engine.jobs.runner import make_runner

    monkeypatch.setenv("LATENT_EXPLORER_RUNNER", "ray")
    monkeypatch.setenv("LATENT_EXPLORER_RAY_ADDRESS", "auto")
    runner = make_runner(root=env["runner"].root)
    assert isinstance(runner, RayRunner) and runner.address == "auto"
    assert {j.id for j in runner.list()} >= {j.id for j in env["runner"].list(states=["done"])}
