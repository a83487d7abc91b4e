"""The one streaming pass over an activation store: statistics of ALL features of an SAE at once.

What the pass keeps, on the device (:class:`FeatureAccumulator`):

- firing count (→ density), sum of activations (→ mean when firing) and maximum;
- a histogram of the non-zero activations with ``n_bins`` equal-width bins on ``[0, R_f]``, where
  ``R_f = 2**ceil(log2(max_f))`` is the smallest power of two at or above the feature's maximum. The
  maximum is unknown until the end, so ``R_f`` grows during the pass; when it doubles ``d`` times,
  bin ``b`` folds into bin ``b >> d``. Bins are nested and ``a / R_f`` is exact in floating point, so
  the result equals a histogram computed afterwards with the final ``R_f`` (no second pass);
- the ``top_k`` largest activations with their store rows, ordered by (activation descending, row
  ascending): equal activations (e.g. repeated contexts) are broken by the smaller row, so the table is
  the same whatever the batching or the order of parts (each batch's per-feature top-k merged with the
  running table);
- interval samples. **Choice:** instead of a first pass for the maximum, each (feature, fine bin)
  keeps a bottom-``S`` reservoir (the ``S`` entries with the smallest keys, i.e. a uniform sample
  without replacement). A key is a 53-bit hash of ``(seed, feature, row)`` (:func:`sample_keys`), not a
  draw from a random stream, so the sample does not depend on the order rows arrive in: a pass split
  into parts and merged (:meth:`FeatureAccumulator.merge`) keeps exactly the single pass's samples; when bins fold together the merged reservoir keeps the ``S``
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

**Map-reduce**: :meth:`FeatureAccumulator.merge` adds another accumulator of the same shape (built on other
rows) into this one. Counts, maxima, histograms (bins aligned by folding), reservoirs, top-k and
co-occurrence come out exactly equal to one pass over all rows; ``total`` (float64 sum of activations) is
equal up to the order of float64 additions.
"""
from __future__ import annotations

import math

import torch

from engine.core.devices import to_host
from engine.features.folder import DashboardError

_NO_EXP = -1000  # exponent of a feature that has not fired yet
_EMPTY_ROW = -1
# splitmix64 constants as signed int64 (torch integer arithmetic wraps modulo 2**64)
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15
_MIX1 = -4658895280553007687    # 0xbf58476d1ce4e5b9
_MIX2 = -7723592293110705685    # 0x94d049bb133111eb
_TIE_BITS = 29  # spare low mantissa bits of a float32 value held as float64


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of 64-bit integers that scrambles every bit."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_keys(features: torch.Tensor, rows: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform-looking keys in ``[0, 1)`` (float64, 53 bits) that depend only on ``(seed, feature, row)``."""
    salt = (int(seed) * 0x94D049BB133111EB + 1) % 2**64
    base = _mix64(features.long() * _GOLDEN + (salt - 2**64 if salt >= 2**63 else salt))
    return _shr(_mix64(base ^ rows.long()), 11).double() * 2.0 ** -53


def _ordered_top(values: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``[d, n]`` candidates the ``k`` best by (value descending, row ascending)."""
    by_row = rows.argsort(dim=1, stable=True)
    values, rows = values.gather(1, by_row), rows.gather(1, by_row)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), rows.gather(1, by_value)


def _batch_top(acts: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[d_sae, k]`` values and rows of each feature's ``k`` best entries of a batch (ties: smaller row).

    ``topk`` picks arbitrarily among equal values at the cut; only features whose ``k``-th value is positive
    and tied with an entry left out are redone with a full sort (zeros never enter the table: its empty
    entries ``(0, -1)`` come first).
    """
    values, index = acts.topk(k, dim=0)                                   # [k, d_sae]
    kth = values[-1]
    unsure = (kth > 0) & ((acts == kth).sum(0) > (values == kth).sum(0))
    top_val, top_row = values.T.contiguous(), rows[index].T.contiguous()
    if bool(unsure.any()):
        cols = unsure.nonzero().squeeze(1)
        sub = acts[:, cols].T                                             # [n, B]
        sub_val, sub_row = _ordered_top(sub, rows[None, :].expand_as(sub), k)
        top_val[cols], top_row[cols] = sub_val, sub_row
    return top_val, top_row


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
        self.res_key = torch.full((slots, reservoir), math.inf, dtype=torch.float64, device=dev)
        self.res_row = torch.full((slots, reservoir), -1, dtype=torch.long, device=dev)
        self.res_act = torch.zeros(slots, reservoir, dtype=torch.float32, device=dev)
        self.seed = seed
        # tokens on which features i and j both fire (float32: exact up to 2**24 tokens per pair)
        self.co = torch.zeros(d_sae, d_sae, dtype=torch.float32, device=dev) if cooccur else None

    # -- reservoirs
    def _merge(self, slots: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, acts: torch.Tensor) -> None:
        """Put entries into reservoir slots, keeping per slot the ``reservoir`` smallest keys of old and new.

        The new entries are ordered by slot, then key (two stable sorts); each touched slot's first
        ``reservoir`` new entries are then merged with its stored row (already sorted by key) by a sort
        along a ``[slots, 2 * reservoir]`` table.
        """
        S = self.reservoir
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(slots[order], stable=True)]
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

    def _merge_top(self, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge ``[d_sae, n]`` candidates into the top-k table (value descending, then row ascending)."""
        self.top_val, self.top_row = _ordered_top(torch.cat([self.top_val, values], dim=1),
                                                  torch.cat([self.top_row, rows], dim=1), self.top_k)

    # -- map-reduce
    def _check_compatible(self, other: FeatureAccumulator) -> None:
        mine = (self.d_sae, self.top_k, self.n_bins, self.reservoir, self.seed, self.co is not None)
        theirs = (other.d_sae, other.top_k, other.n_bins, other.reservoir, other.seed, other.co is not None)
        if mine != theirs:
            raise DashboardError(f"Cannot merge accumulators with different settings (d_sae, top_k, n_bins, "
                                 f"reservoir, seed, co-occurrence): {mine} and {theirs}.")

    def _align(self, exp: torch.Tensor) -> None:
        """Fold histograms and reservoirs of features whose range is below ``2**exp`` up to it."""
        grow = (self.exp > _NO_EXP) & (exp > self.exp)
        if bool(grow.any()):
            features = grow.nonzero().squeeze(1)
            self._fold(features, (exp - self.exp)[features])
        self.exp = torch.where(self.exp > _NO_EXP, torch.maximum(self.exp, exp), exp)

    @torch.no_grad()
    def merge(self, other: FeatureAccumulator) -> FeatureAccumulator:
        """Add ``other`` (same settings, other rows) into this accumulator; returns ``self``.

        The result equals one pass over the rows of both (see the module docstring); ``other`` is left
        as it was (a copy of it is folded).
        """
        self._check_compatible(other)
        theirs = FeatureAccumulator.__new__(FeatureAccumulator)
        theirs.__dict__.update({k: (v.to(self.device, copy=True) if isinstance(v, torch.Tensor) else v)
                                for k, v in other.__dict__.items()})
        theirs.device = self.device
        exp = torch.maximum(self.exp, theirs.exp)
        self._align(exp)
        theirs._align(exp)
        self.n_rows += theirs.n_rows
        self.count += theirs.count
        self.total += theirs.total
        self.max = torch.maximum(self.max, theirs.max)
        self.hist += theirs.hist
        if self.co is not None and theirs.co is not None:
            self.co += theirs.co
        self._merge_top(theirs.top_val, theirs.top_row)
        live = torch.isfinite(theirs.res_key)
        if bool(live.any()):
            slots = torch.arange(theirs.res_key.shape[0], device=self.device)[:, None].expand_as(live)[live]
            self._merge(slots, theirs.res_key[live], theirs.res_row[live], theirs.res_act[live])
        return self

    def state(self) -> dict:
        """The accumulator as a dict of host tensors and numbers (to send between processes)."""
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
                if k != "device"}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> FeatureAccumulator:
        acc = cls.__new__(cls)
        acc.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
        acc.device = torch.device(device)
        return acc

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
        batch_val, batch_row = _batch_top(acts, rows, min(self.top_k, acts.shape[0]))
        self._merge_top(batch_val, batch_row)
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
        sample_rows = rows[r_idx]
        self._merge(slots, sample_keys(f_idx, sample_rows, self.seed), sample_rows, values)

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
