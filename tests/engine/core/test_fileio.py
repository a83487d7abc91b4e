"""Crash-safe writes: a failing writer leaves the old file whole and no temporary file behind."""
from __future__ import annotations

import hashlib

import pytest
import torch

from engine.core.fileio import atomic_save_tensors, atomic_write, atomic_write_json, sha256_file


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"a": 1, "word": "花"})
    before = target.read_bytes()

    def broken(tmp):
        tmp.write_text('{"half": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json"]
    assert "花" in target.read_text(encoding="utf-8")


def test_tensors_round_trip_and_hash(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    weights = torch.randn(3, 4, requires_grad=True)
    atomic_save_tensors(path, {"w": weights.t()}, metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["w"], weights.detach().t())
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
