"""The one streaming pass over an activation store: statistics of ALL features of an SAE at once.

What the pass keeps, on the device (:class:`FeatureAccumulator`):

- firing count (→ density), sum of activations (→ mean when firing) and maximum;
- a histogram of the non-zero activations with ``n_bins`` equal-width bins on ``[0, R_f]``, where
  ``R_f = 2**ceil(log2(max_f))`` is the smallest power of two at or above the feature's maximum. The
  maximum is unknown until the end, so ``R_f`` grows during the pass; when it doubles ``d`` times,
  bin ``b`` folds into bin ``b >> d``. Bins are nested and ``a / R_f`` is exact in floating point, so
  the result equals a histogram computed afterwards with the final ``R_f`` (no second pass);
- the ``top_k`` largest activations with their store rows (each batch's per-feature top-k merged with
  the running table by ``torch.topk`` over the concatenation);
- interval samples. **Choice:** instead of a first pass for the maximum, each (feature, fine bin)
  keeps a bottom-``S`` reservoir (the ``S`` entries with the smallest uniform random keys, i.e. a
  uniform sample without replacement); when bins fold together the merged reservoir keeps the ``S``
  smallest keys of both, which is again a uniform sample of the merged bin. At the end the feature's
  range ``[0, max_f]`` is cut into ``n_intervals`` equal-width intervals and each interval takes the
  ``samples_per_interval`` candidates with the smallest keys among the reservoir entries inside it.
  Every sample lies in its interval; within a fine bin the sampling is exactly uniform, and a fine
  bin that straddles an interval edge contributes only its own reservoir, so sampling across a whole
  interval is close to (not exactly) uniform.

The hot path has no Python loop over features or tokens: each batch is one SAE encode, a few
reductions, one ``bincount`` and two sorts of the batch's non-zero entries.

**Co-occurrence** (optional): how many tokens each pair of features fires on together (one sparse-by-dense
product per batch, ``[d_sae, B] @ [B, d_sae]``); :meth:`FeatureAccumulator.cooccurring` ranks partners by the
Jaccard index of their firing tokens.
"""
from __future__ import annotations

import math

import torch

from engine.core.devices import to_host
from engine.features.folder import DashboardError

_NO_EXP = -1000  # exponent of a feature that has not fired yet


def ceil_log2(values: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(v))`` for positive floats (via frexp; no rounding error at powers of two)."""
    mantissa, exponent = torch.frexp(values)
    return exponent.long() - (mantissa == 0.5).long()


def _group_ranks(groups: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order entries by (group, key) and return ``(order, rank of each ordered entry inside its group)``."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    index = torch.arange(order.numel(), device=groups.device)
    is_start = torch.ones_like(sorted_groups, dtype=torch.bool)
    if order.numel() > 1:
        is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.where(is_start, index, torch.zeros_like(index))
    return order, index - torch.cummax(starts, dim=0).values


class FeatureAccumulator:
    """Streaming per-feature statistics for all ``d_sae`` features (see the module docstring)."""

    def __init__(self, d_sae: int, *, top_k: int = 20, n_bins: int = 32, reservoir: int = 5,
                 device: torch.device | str = "cpu", seed: int = 0, cooccur: bool = False) -> None:
        if n_bins & (n_bins - 1):
            raise DashboardError(f"The number of histogram bins must be a power of two (found {n_bins}).")
        self.d_sae, self.top_k, self.n_bins, self.reservoir = d_sae, top_k, n_bins, reservoir
        self.device = torch.device(device)
        dev = self.device
        self.n_rows = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, device=dev)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=dev)
        self.exp = torch.full((d_sae,), _NO_EXP, dtype=torch.long, device=dev)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.long, device=dev)
        self.top_val = torch.zeros(d_sae, top_k, dtype=torch.float32, device=dev)
        self.top_row = torch.full((d_sae, top_k), -1, dtype=torch.long, device=dev)
        slots = d_sae * n_bins
        self.res_key = torch.full((slots, reservoir), math.inf, dtype=torch.float32, device=dev)
        self.res_row = torch.full((slots, reservoir), -1, dtype=torch.long, device=dev)
        self.res_act = torch.zeros(slots, reservoir, dtype=torch.float32, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        # tokens on which features i and j both fire (float32: exact up to 2**24 tokens per pair)
        self.co = torch.zeros(d_sae, d_sae, dtype=torch.float32, device=dev) if cooccur else None

    # -- reservoirs
    def _merge(self, slots: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, acts: torch.Tensor) -> None:
        """Put entries into reservoir slots, keeping per slot the ``reservoir`` smallest keys of old and new.

        One sort of the new entries by ``slot + key`` (keys lie in [0, 1), so this orders by slot, then
        key); each touched slot's first ``reservoir`` new entries are then merged with its stored row
        (already sorted by key) by a sort along a ``[slots, 2 * reservoir]`` table.
        """
        S = self.reservoir
        order = torch.argsort(slots.double() + keys.double())
        slots, keys, rows, acts = slots[order], keys[order], rows[order], acts[order]
        is_start = torch.ones_like(slots, dtype=torch.bool)
        is_start[1:] = slots[1:] != slots[:-1]
        group = torch.cumsum(is_start, 0) - 1
        index = torch.arange(slots.numel(), device=slots.device)
        rank = index - index[is_start][group]
        touched = slots[is_start]
        keep = rank < S
        g, r = group[keep], rank[keep]
        new_key = torch.full((touched.numel(), S), math.inf, dtype=keys.dtype, device=slots.device)
        new_row = torch.full((touched.numel(), S), -1, dtype=torch.long, device=slots.device)
        new_act = torch.zeros((touched.numel(), S), dtype=acts.dtype, device=slots.device)
        new_key[g, r], new_row[g, r], new_act[g, r] = keys[keep], rows[keep], acts[keep]
        cand_key = torch.cat([self.res_key[touched], new_key], dim=1)
        cand_row = torch.cat([self.res_row[touched], new_row], dim=1)
        cand_act = torch.cat([self.res_act[touched], new_act], dim=1)
        best, pick = cand_key.sort(dim=1)
        pick = pick[:, :S]
        self.res_key[touched] = best[:, :S]
        self.res_row[touched] = cand_row.gather(1, pick)
        self.res_act[touched] = cand_act.gather(1, pick)

    def _fold(self, features: torch.Tensor, shift: torch.Tensor) -> None:
        """Features whose range doubled ``shift`` times: bin ``b`` folds into ``b >> shift``."""
        nb = self.n_bins
        bins = torch.arange(nb, device=self.device)
        target = bins[None, :] >> shift[:, None].clamp(max=62)
        folded = torch.zeros_like(self.hist[features]).scatter_add_(1, target, self.hist[features])
        self.hist[features] = folded
        old_slots = (features[:, None] * nb + bins[None, :]).reshape(-1)
        key, row, act = self.res_key[old_slots], self.res_row[old_slots], self.res_act[old_slots]
        live = torch.isfinite(key)
        new_slot = (features[:, None] * nb + target).reshape(-1, 1).expand_as(key)[live]
        self.res_key[old_slots] = math.inf
        self.res_row[old_slots] = -1
        self.res_act[old_slots] = 0.0
        if bool(live.any()):
            self._merge(new_slot, key[live], row[live], act[live])

    # -- one batch
    @torch.no_grad()
    def update(self, acts: torch.Tensor, rows: torch.Tensor) -> None:
        """Add a batch: ``acts [B, d_sae]`` (non-negative) of store rows ``rows [B]``.

        Per-feature statistics come from the batch's non-zero entries (bincount / scatter), the top-k
        from a dense ``topk`` over the batch merged with the running table.
        """
        if acts.shape[0] == 0:
            return
        acts = acts.float()
        rows = rows.to(self.device)
        self.n_rows += acts.shape[0]
        r_idx, f_idx = (acts > 0).nonzero(as_tuple=True)
        values = acts[r_idx, f_idx]
        if not bool(torch.isfinite(values).all()):
            raise DashboardError("The SAE gives infinite activations on this store (overflowing inputs?); "
                                 "check that the SAE and the store belong together.")
        # top-k: this batch's per-feature top-k merged with the running table
        k = min(self.top_k, acts.shape[0])
        top_values, index = acts.topk(k, dim=0)
        cand_val = torch.cat([self.top_val, top_values.T], dim=1)
        cand_row = torch.cat([self.top_row, rows[index].T], dim=1)
        self.top_val, pick = cand_val.topk(self.top_k, dim=1)
        self.top_row = cand_row.gather(1, pick)
        if r_idx.numel() == 0:
            return
        if self.co is not None:
            pattern = torch.sparse_coo_tensor(torch.stack([f_idx, r_idx]), torch.ones_like(values),
                                              (self.d_sae, acts.shape[0]), check_invariants=False)
            self.co += torch.sparse.mm(pattern, (acts > 0).float())
        self.count += torch.bincount(f_idx, minlength=self.d_sae)
        self.total += torch.bincount(f_idx, weights=values.double(), minlength=self.d_sae)
        batch_max = torch.zeros_like(self.max).scatter_reduce_(0, f_idx, values, "amax")
        new_max = torch.maximum(self.max, batch_max)
        fired = new_max > 0
        new_exp = torch.where(fired, ceil_log2(torch.where(fired, new_max, torch.ones_like(new_max))), self.exp)
        grow = (self.exp > _NO_EXP) & (new_exp > self.exp)
        if bool(grow.any()):
            features = grow.nonzero().squeeze(1)
            self._fold(features, (new_exp - self.exp)[features])
        self.max, self.exp = new_max, new_exp
        # histogram and reservoirs over the non-zero entries only
        scaled = torch.ldexp(values, -self.exp[f_idx].float()) * self.n_bins  # exact: power-of-two scaling
        bins = scaled.long().clamp_(max=self.n_bins - 1)
        slots = f_idx * self.n_bins + bins
        self.hist.view(-1).add_(torch.bincount(slots, minlength=self.d_sae * self.n_bins))
        keys = torch.rand(slots.numel(), generator=self.generator, device=self.device)
        self._merge(slots, keys, rows[r_idx], values)

    # -- results
    def cooccurring(self, n: int, chunk: int = 1024) -> dict[str, torch.Tensor]:
        """Per feature the ``n`` features with the highest Jaccard index of firing tokens (self excluded;
        pairs that never fire together are dropped): ``feature``, ``rank``, ``other``, ``jaccard``, ``together``,
        flat ``[n_pairs]`` tensors on the host."""
        if self.co is None:
            raise DashboardError("Co-occurrence was not accumulated (cooccur=False).")
        n = min(n, max(self.d_sae - 1, 1))
        count = self.co.diagonal().clone()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("feature", "rank", "other", "jaccard", "together")}
        for start in range(0, self.d_sae, chunk):
            block = self.co[start:start + chunk]
            rows = torch.arange(start, start + block.shape[0], device=self.device)
            union = count[rows, None] + count[None, :] - block
            jaccard = torch.where(block > 0, block / union.clamp(min=1), torch.zeros_like(block))
            jaccard[torch.arange(block.shape[0], device=self.device), rows] = -1.0
            values, others = jaccard.topk(n, dim=1)
            keep = values > 0
            parts["feature"].append(rows[:, None].expand_as(others)[keep])
            parts["rank"].append(torch.arange(n, device=self.device)[None, :].expand_as(others)[keep])
            parts["other"].append(others[keep])
            parts["jaccard"].append(values[keep])
            parts["together"].append(block.gather(1, others)[keep].long())
        return {k: to_host(torch.cat(v)) for k, v in parts.items()}

    def hist_range(self) -> torch.Tensor:
        """Per feature the histogram's upper edge ``R_f`` (0 for dead features): ``[d_sae]`` on the device."""
        return torch.where(self.exp > _NO_EXP, torch.ldexp(torch.ones_like(self.max), self.exp.clamp(min=-126).float()),
                           torch.zeros_like(self.max))

    def interval_samples(self, n_intervals: int, per_interval: int) -> dict[str, torch.Tensor]:
        """Up to ``per_interval`` samples per equal-width interval of ``[0, max_f]``, smallest keys first.

        Returns flat ``[n_samples]`` tensors on the device: ``feature``, ``interval``, ``rank``, ``row``, ``act``.
        """
        live = torch.isfinite(self.res_key)
        slot = torch.arange(self.res_key.shape[0], device=self.device)[:, None].expand_as(self.res_key)[live]
        feature = slot // self.n_bins
        acts, rows, keys = self.res_act[live], self.res_row[live], self.res_key[live]
        top = self.max[feature]
        interval = (acts / top * n_intervals).long().clamp_(0, n_intervals - 1)
        order, rank = _group_ranks(feature * n_intervals + interval, keys)
        keep = rank < per_interval
        chosen = order[keep]
        return {"feature": feature[chosen], "interval": interval[chosen], "rank": rank[keep], "row": rows[chosen],
                "act": acts[chosen]}
