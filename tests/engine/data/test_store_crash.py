"""Issue 12: a store extension killed with SIGKILL at random moments never loses or breaks the store."""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.data.store import ActivationStore
from engine.data.store_writer import build_store

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TRIALS = 20
TARGET = 600  # tokens after the extension (the one-shard store holds 50)


def _fork_server(monkeypatch):
    """A fork server that imports torch, transformers and the worker once; children then start in ms.

    The fork server is a fresh interpreter that does not inherit ``sys.path`` (Python 3.11), hence PYTHONPATH.
    """
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["store_crash_worker"])
    import store_crash_worker

    warm = context.Process(target=store_crash_worker.tiny_lm)
    warm.start()
    warm.join()
    return context, store_crash_worker


def test_killed_extensions_leave_a_readable_store_that_a_rerun_completes(tmp_path, monkeypatch):
    context, worker = _fork_server(monkeypatch)
    lm = worker.tiny_lm()
    base = build_store(lm, iter(worker.TEXTS), tmp_path / "base", max_tokens=50, **worker.OPTIONS)
    first = base.manifest["shards"]
    assert len(first) == 1 and first[0]["truncated"]  # its last window is cut: the case that lost the shard
    foreign = tmp_path / "base" / f".shard_00001.safetensors.{os.getpid()}.1.tmp"  # another, live writer's file
    foreign.write_bytes(b"half a shard")
    straight = build_store(lm, iter(worker.TEXTS), tmp_path / "straight", max_tokens=TARGET, **worker.OPTIONS)
    expected = straight.read("resid_post", 2, slice(None))

    rng = random.Random(0)
    killed = 0
    for trial in range(TRIALS):
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(tmp_path / "base", folder)
        # kill once the extension is a random fraction of the way (0: while it starts), a few ms later still,
        # so kills land before, during and after shard writes and manifest commits
        reached = context.Value("i", 0)
        child = context.Process(target=worker.extend, args=(str(folder), TARGET), kwargs={"reached": reached})
        child.start()
        target = int(rng.uniform(0.0, 1.0) * 1_000_000)
        while child.is_alive() and reached.value < target:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.01))
        killed += child.is_alive()
        child.kill()
        child.join()
        store = ActivationStore.open(folder)  # complete, every listed shard present with its size
        assert store.verify() == [], (trial, store.verify())
        assert store.manifest["shards"][:1] == first, trial  # the earlier shard is listed unchanged
        assert store.n_tokens >= base.n_tokens
        assert torch.equal(store.token_ids(), straight.token_ids()[:store.n_tokens]), trial
        assert torch.equal(store.read("resid_post", 2, slice(None)), expected[:store.n_tokens]), trial
        assert (folder / foreign.name).read_bytes() == b"half a shard"  # not ours: left alone
        done = build_store(lm, iter(worker.TEXTS), folder, max_tokens=TARGET, **worker.OPTIONS)  # resubmitted
        assert done.verify() == [] and done.manifest["shards"][:1] == first
        assert torch.equal(done.token_ids(), straight.token_ids()), trial
        assert torch.equal(done.read("resid_post", 2, slice(None)), expected), trial
    print(f"{TRIALS} trials, {killed} killed mid-extension", file=sys.stderr)
    assert killed >= TRIALS // 2
