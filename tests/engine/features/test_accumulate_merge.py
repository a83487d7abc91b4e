"""FeatureAccumulator.merge: parts merged in any order equal one pass over all rows (no Ray, no model)."""
from __future__ import annotations

import pytest
import torch

from engine.features.accumulate import FeatureAccumulator, sample_keys
from engine.features.folder import DashboardError

EXACT = ("count", "max", "exp", "hist", "top_val", "top_row", "res_key", "res_row", "res_act", "co")


def _acts(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, d, generator=g)) * torch.rand(d, generator=g) * 8  # per-feature scales
    acts[torch.rand(n, d, generator=g) < 0.6] = 0.0                                       # sparse
    acts[10:20] = acts[0]            # repeated rows: exact ties in the top-k
    acts[:, 3] = 0.0                 # a dead feature
    acts[n // 2:, 4] *= 64           # a feature whose range grows late (bins fold)
    return acts


def _single(acts: torch.Tensor, batch: int, **kw) -> FeatureAccumulator:
    acc = FeatureAccumulator(acts.shape[1], **kw)
    for start in range(0, acts.shape[0], batch):
        acc.update(acts[start:start + batch], torch.arange(start, min(start + batch, acts.shape[0])))
    return acc


def _parts(acts: torch.Tensor, bounds: list[int], batch: int, **kw) -> list[FeatureAccumulator]:
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc = FeatureAccumulator(acts.shape[1], **kw)
        for start in range(lo, hi, batch):
            stop = min(start + batch, hi)
            acc.update(acts[start:stop], torch.arange(start, stop))
        parts.append(acc)
    return parts


def _assert_equal(a: FeatureAccumulator, b: FeatureAccumulator) -> None:
    assert a.n_rows == b.n_rows
    for name in EXACT:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        assert torch.equal(x, y), name
    torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=0)
    sa, sb = a.interval_samples(4, 3), b.interval_samples(4, 3)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


KW = dict(top_k=5, n_bins=8, reservoir=3, seed=7, cooccur=True)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_merged_parts_equal_single_pass(order):
    acts = _acts(600, 12)
    single = _single(acts, 64, **KW)
    parts = _parts(acts, [0, 150, 151, 420, 600], 37, **KW)
    if order == "reverse":
        parts = parts[::-1]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    _assert_equal(merged, single)


def test_batching_does_not_change_the_single_pass():
    acts = _acts(300, 9, seed=3)
    _assert_equal(_single(acts, 7, **KW), _single(acts, 300, **KW))


def test_top_k_ties_take_the_smaller_row():
    acts = torch.zeros(30, 2)
    acts[[4, 9, 17, 25], 0] = 2.0
    acts[[2, 28], 0] = 1.0
    acc = _single(acts, 8, top_k=3, n_bins=4, reservoir=2)
    assert acc.top_val[0].tolist() == [2.0, 2.0, 2.0] and acc.top_row[0].tolist() == [4, 9, 17]
    assert acc.top_row[1].tolist() == [-1, -1, -1]  # zeros never enter the table


def test_merge_with_an_empty_part_and_state_round_trip():
    acts = _acts(100, 6, seed=5)
    single = _single(acts, 32, **KW)
    empty = FeatureAccumulator(6, **KW)
    restored = FeatureAccumulator.from_state(_single(acts, 32, **KW).state())
    _assert_equal(empty.merge(restored), single)


def test_merge_refuses_other_settings():
    with pytest.raises(DashboardError):
        FeatureAccumulator(4, top_k=3).merge(FeatureAccumulator(4, top_k=4))


def test_sample_keys_are_uniform_and_order_free():
    keys = sample_keys(torch.zeros(20000, dtype=torch.long), torch.arange(20000), seed=0)
    assert 0.0 <= float(keys.min()) and float(keys.max()) < 1.0
    assert abs(float(keys.mean()) - 0.5) < 0.01 and keys.unique().numel() == 20000
    perm = torch.randperm(20000)
    assert torch.equal(sample_keys(torch.zeros(20000, dtype=torch.long), perm, seed=0), keys[perm])
    assert not torch.equal(sample_keys(torch.ones(20000, dtype=torch.long), torch.arange(20000), seed=0), keys)
