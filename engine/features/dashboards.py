"""Feature dashboards for every latent of an SAE, built in one streaming pass over an activation store.

What one pass keeps, for ALL features at once, on the device (:class:`FeatureAccumulator`):

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

After the pass (all batched, in feature chunks): **logit effects** — each decoder row is mapped to
the residual stream (through the MLP's output projection for ``mlp_hidden`` SAEs), multiplied by the
final norm's gain (RMSNorm: ``norm(1) * sqrt(1 + eps)``, which also covers Gemma's ``1 + weight``;
LayerNorm: centred, times its weight) and by the unembedding. *Approximation:* the norm's per-token
scale ``1/rms(x)`` (a positive scalar), LayerNorm's bias (the same for every feature) and logit soft-capping
are left out, so values are "logits per unit of decoder direction" and rankings of tokens are exact for
the linearised head. **Neighbours**: cosine similarity of decoder rows, top ``n_neighbours`` per feature.
**Co-occurrence** (SAEs up to 16,384 features; ``n_cooccur=0`` turns it off): the pass also accumulates
how many tokens each pair of features fires on together (one sparse-by-dense product per batch,
``[d_sae, B] @ [B, d_sae]``); features are ranked by the Jaccard index of their firing tokens.

Results live in ``cache/dashboards/<key>/`` as parquet tables (``features``, ``histograms``, ``top_examples``,
``intervals``, ``logits``, ``neighbours``, ``cooccurrence``) plus ``manifest.json``, written atomically, the
manifest last.
Contexts are not stored: they are rebuilt from the store's token ids (:meth:`Dashboard.contexts`).
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import __version__
from engine.core.errors import UserError
from engine.core.fileio import atomic_write, atomic_write_json, sha256_file

Progress = Callable[[float, str], None]
DASHBOARD_FORMAT = 2
MANIFEST = "manifest.json"
TABLES = ("features", "histograms", "top_examples", "intervals", "logits", "neighbours", "cooccurrence")
MAX_COOCCUR_FEATURES = 16384  # a [d_sae, d_sae] float32 count table: 1 GiB at this width
DENSE_DENSITY = 0.01  # features firing on more than 1 % of tokens are "dense" (hidden in the list by default)
_NO_EXP = -1000  # exponent of a feature that has not fired yet


class DashboardError(UserError):
    """A dashboard cannot be built or read from the given SAE, store or folder."""


@dataclass
class DashboardConfig:
    """Settings of one dashboard build (part of the cache key)."""

    top_k: int = 20
    n_bins: int = 32  # histogram bins (and fine reservoir bins) on [0, 2**ceil(log2(max))]
    n_intervals: int = 10
    samples_per_interval: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    n_cooccur: int = 10  # most co-occurring features kept per feature; 0: not computed
    batch_size: int = 4096
    skip_first_position: bool = True  # BOS rows (position 0) are not counted, as in SAE training
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        for name in ("top_k", "n_bins", "n_intervals", "samples_per_interval", "n_logits", "n_neighbours",
                     "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DashboardError(f"The dashboard setting '{name}' must be a positive integer (found {value!r}).")
        if not isinstance(self.n_cooccur, int) or self.n_cooccur < 0:
            raise DashboardError(f"n_cooccur must be 0 (off) or a positive integer (found {self.n_cooccur!r}).")

    def key_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("device")
        fields.pop("batch_size")
        return fields


# --- the one-pass accumulator ----------------------------------------------------------------
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
                 device: torch.device | str = "cpu", seed: int = 0, cooccur: bool = False):
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
        pairs that never fire together are dropped): ``feature``, ``rank``, ``other``, ``jaccard``, ``together``."""
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
        return {k: torch.cat(v).cpu() for k, v in parts.items()}

    def hist_range(self) -> torch.Tensor:
        """Per feature the histogram's upper edge ``R_f`` (0 for dead features)."""
        return torch.where(self.exp > _NO_EXP, torch.ldexp(torch.ones_like(self.max), self.exp.clamp(min=-126).float()),
                           torch.zeros_like(self.max))

    def interval_samples(self, n_intervals: int, per_interval: int) -> dict[str, torch.Tensor]:
        """Up to ``per_interval`` samples per equal-width interval of ``[0, max_f]``, smallest keys first."""
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


# --- logit effects and neighbours -------------------------------------------------------------
def residual_directions(anatomy, W_dec: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """Decoder rows as residual-stream directions ``[d_sae, d_model]`` (MLP-hidden SAEs go through W_out)."""
    dirs = W_dec.detach().float()
    if site == "mlp_hidden":
        proj = anatomy.mlp_out_proj(layer)
        weight = proj.weight.detach().float().to(dirs.device)
        dirs = dirs @ weight if type(proj).__name__ == "Conv1D" else dirs @ weight.T
    return dirs


def norm_gain(anatomy, d_model: int, device) -> tuple[torch.Tensor, bool]:
    """``(gain [d_model], centre)``: the final norm's per-dimension gain and whether it centres (LayerNorm)."""
    norm = anatomy.final_norm
    if norm is None:
        return torch.ones(d_model, device=device), False
    name = type(norm).__name__.lower()
    if isinstance(norm, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name):
        weight = getattr(norm, "weight", None)
        gain = weight.detach().float() if weight is not None else torch.ones(d_model)
        return gain.to(device), True
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
    param = next(norm.parameters(), None)
    ones = torch.ones(1, d_model, device=param.device if param is not None else "cpu",
                      dtype=param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        gain = norm(ones)[0].float() * math.sqrt(1.0 + eps)  # RMSNorm(1) = gain / sqrt(1 + eps)
    return gain.to(device), False


@torch.no_grad()
def logit_effects(anatomy, W_dec: torch.Tensor, site: str, layer: int, n: int = 10,
                  progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Top and bottom ``n`` tokens of every feature's direct logit effect, batched over feature chunks.

    Returns ``top_ids``, ``top_values``, ``bottom_ids``, ``bottom_values`` (each ``[d_sae, n]``, CPU).
    """
    W_U = anatomy.unembed.weight.detach()
    device = W_U.device
    dirs = residual_directions(anatomy, W_dec.to(device), site, layer)
    gain, centre = norm_gain(anatomy, dirs.shape[1], device)
    if centre:
        dirs = dirs - dirs.mean(dim=1, keepdim=True)
    dirs = dirs * gain
    W_U = W_U.float()
    vocab = W_U.shape[0]
    n = min(n, vocab)
    chunk = max(1, min(dirs.shape[0], 2**25 // max(vocab, 1)))
    out = {name: [] for name in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in range(0, dirs.shape[0], chunk):
        logits = dirs[start:start + chunk] @ W_U.T
        if anatomy.logit_scale is not None:
            logits = logits * anatomy.logit_scale
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        out["top_ids"].append(top.indices.cpu())
        out["top_values"].append(top.values.cpu())
        out["bottom_ids"].append(bottom.indices.cpu())
        out["bottom_values"].append(bottom.values.cpu())
        if progress:
            progress(min(1.0, (start + chunk) / dirs.shape[0]), "logit effects")
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, n: int = 10, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, cosines)`` ``[d_sae, n]``: nearest features by cosine of decoder rows (self excluded)."""
    unit = F.normalize(W_dec.detach().float(), dim=1)
    d_sae = unit.shape[0]
    n = min(n, max(d_sae - 1, 1))
    ids, sims = [], []
    for start in range(0, d_sae, chunk):
        block = unit[start:start + chunk] @ unit.T
        local = torch.arange(block.shape[0], device=block.device)
        if d_sae > 1:
            block[local, local + start] = -math.inf
        top = block.topk(n, dim=1)
        ids.append(top.indices.cpu())
        sims.append(top.values.cpu())
    return torch.cat(ids), torch.cat(sims)


# --- checks, keys, files ----------------------------------------------------------------------
_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def sae_digest(sae_dir: str | Path) -> str:
    """sha256 of the SAE's weights file (memoised by path, size and mtime)."""
    from engine.sae.base import WEIGHTS_FILE

    path = Path(sae_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise DashboardError(f"'{sae_dir}' holds no {WEIGHTS_FILE}, so it is not an SAE folder.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key not in _HASHES:
            _HASHES[key] = sha256_file(path)
        return _HASHES[key]


def check_sae_store(sae, store) -> tuple[str, int]:
    """Raise :class:`DashboardError` unless the SAE reads a site/layer of the store's model; returns it."""
    site, layer = sae.cfg.site()
    if site not in store.sites or layer not in store.layers:
        raise DashboardError(f"The SAE reads {site} at layer {layer}, but the store holds {', '.join(store.sites)} "
                             f"at layers {', '.join(map(str, store.layers))}; choose a store captured at that site.")
    if store.width(site) != sae.d_in:
        raise DashboardError(f"The SAE expects d_in={sae.d_in}, but the store's {site} has width "
                             f"{store.width(site)}: they come from different models.")
    trained_on = (sae.cfg.extra.get("latent_explorer") or {}).get("weights_hash")
    if trained_on and trained_on != store.weights_hash:
        raise DashboardError(f"The SAE was trained on activations of another model than the store's "
                             f"'{store.model_name}'; choose a store of the SAE's model.")
    if not trained_on and sae.cfg.model_name and store.model_name and \
            sae.cfg.model_name.split("/")[-1].lower() != store.model_name.split("/")[-1].lower():
        raise DashboardError(f"The SAE was trained on '{sae.cfg.model_name}' but the store holds activations of "
                             f"'{store.model_name}'; choose a store of the SAE's model.")
    return site, layer


def dashboards_root() -> Path:
    from engine.core.models import cache_root

    return cache_root() / "dashboards"


def dashboard_key(sae_dir: str | Path, store, config: DashboardConfig) -> str:
    """``<sae folder name>-<hash of (SAE weights, store content, settings, code format)>``."""
    payload = json.dumps({"sae": sae_digest(sae_dir), "store": store.weights_hash,
                          "corpus": store.manifest.get("corpus_hash"), "n_tokens": store.n_tokens,
                          "config": config.key_fields(), "format": DASHBOARD_FORMAT}, sort_keys=True)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(sae_dir).resolve().name)[-60:]
    return f"{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _write_parquet(columns: dict[str, Sequence], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: (values.numpy() if isinstance(values, torch.Tensor) else values)
                      for name, values in columns.items()})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def _decode_many(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    unique = sorted({int(i) for i in ids})
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]))) if unique else {}


# --- building ---------------------------------------------------------------------------------
def _row_batches(store, site: str, layer: int, batch_size: int, skip_first: bool):
    """``(x, rows)`` over the store in order: activations and global row ids (position 0 dropped)."""
    positions = store.positions()
    for start in range(0, store.n_tokens, batch_size):
        stop = min(start + batch_size, store.n_tokens)
        x = store.read(site, layer, slice(start, stop))
        rows = torch.arange(start, stop)
        if skip_first:
            keep = positions[start:stop] != 0
            x, rows = x[keep], rows[keep]
        yield x, rows, stop


def build_dashboards(sae_dir: str | Path, store_dir: str | Path, lm, out: str | Path | None = None, *,
                     config: DashboardConfig | None = None, force: bool = False,
                     progress: Progress | None = None) -> Path:
    """Build every feature's dashboard; returns the folder (an up-to-date one is returned as is).

    ``lm`` is the store's model (for the unembedding, final norm and token strings).
    """
    from engine.core.models import pick_device
    from engine.data.store import ActivationStore
    from engine.sae.base import load_sae

    config = config or DashboardConfig()
    config.check()
    say = progress or (lambda fraction, message: None)
    store = ActivationStore.open(store_dir)
    sae = load_sae(sae_dir)
    site, layer = check_sae_store(sae, store)
    store.check_model(lm)
    positions = store.positions()
    n_rows = int((positions != 0).sum()) if config.skip_first_position else store.n_tokens
    if n_rows == 0:
        raise DashboardError(f"The store '{store_dir}' holds no tokens to encode; capture more text first.")
    key = dashboard_key(sae_dir, store, config)
    out = Path(out) if out is not None else dashboards_root() / key
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key and old.get("complete") and all((out / f"{t}.parquet").is_file() for t in TABLES):
            say(1.0, "dashboards already built")
            return out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)  # a folder without a manifest is incomplete

    device = pick_device(config.device)
    sae = sae.to(device=device, dtype=torch.float32)
    cooccur = 0 < config.n_cooccur and sae.d_sae <= MAX_COOCCUR_FEATURES
    acc = FeatureAccumulator(sae.d_sae, top_k=config.top_k, n_bins=config.n_bins,
                             reservoir=config.samples_per_interval, device=device, seed=config.seed,
                             cooccur=cooccur)
    started = time.time()
    with torch.no_grad():
        for x, rows, stop in _row_batches(store, site, layer, config.batch_size, config.skip_first_position):
            if x.shape[0]:
                acc.update(sae.encode(x.to(device)), rows)
            say(0.85 * stop / store.n_tokens, f"{stop:,}/{store.n_tokens:,} rows")
    pass_seconds = time.time() - started

    say(0.86, "logit effects")
    logits = logit_effects(lm.anatomy, sae.W_dec, site, layer, n=config.n_logits)
    say(0.92, "decoder neighbours")
    neighbour_ids, neighbour_cos = decoder_neighbours(sae.W_dec, n=config.n_neighbours)
    say(0.95, "writing tables")
    _write_tables(out, acc, store, lm.tokenizer, config, logits, neighbour_ids, neighbour_cos)
    manifest = {"format": DASHBOARD_FORMAT, "key": key, "complete": True, "code_version": __version__,
                "sae_path": str(Path(sae_dir).resolve()), "sae_name": Path(sae_dir).resolve().name,
                "sae_sha256": sae_digest(sae_dir), "d_sae": sae.d_sae, "d_in": sae.d_in,
                "architecture": sae.architecture, "site": site, "layer": layer,
                "store_path": str(Path(store_dir).resolve()), "model": store.model_name,
                "weights_hash": store.weights_hash, "corpus_hash": store.manifest.get("corpus_hash"),
                "n_rows": acc.n_rows, "config": asdict(config), "pass_seconds": round(pass_seconds, 3),
                "cooccurrence": cooccur,
                "tables": [f"{t}.parquet" for t in TABLES], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(manifest_path, manifest)
    say(1.0, f"{acc.n_rows:,} tokens × {sae.d_sae:,} features in {pass_seconds:.1f} s")
    return out


def _write_tables(out: Path, acc: FeatureAccumulator, store, tokenizer, config: DashboardConfig,
                  logits: dict, neighbour_ids: torch.Tensor, neighbour_cos: torch.Tensor) -> None:
    d_sae = acc.d_sae
    count = acc.count.cpu()
    density = count.double() / max(acc.n_rows, 1)
    mean = torch.where(count > 0, acc.total.cpu() / count.clamp(min=1), torch.zeros_like(acc.total.cpu()))
    maxes = acc.max.cpu()
    token_ids, doc_ids, positions = store.token_ids(), store.doc_ids(), store.positions()

    # top examples (only positive activations)
    top_val, top_row = acc.top_val.cpu(), acc.top_row.cpu()
    live = (top_val > 0) & (top_row >= 0)
    feat = torch.arange(d_sae)[:, None].expand_as(top_val)[live]
    rank = torch.arange(config.top_k)[None, :].expand_as(top_val)[live]
    rows = top_row[live]
    _write_parquet({"feature": feat, "rank": rank, "row": rows, "act": top_val[live], "token_id": token_ids[rows],
                    "doc": doc_ids[rows], "pos": positions[rows]}, out / "top_examples.parquet")

    # histograms (non-empty bins)
    hist = acc.hist.cpu()
    upper = acc.hist_range().cpu()
    nz = hist > 0
    f_h = torch.arange(d_sae)[:, None].expand_as(hist)[nz]
    b_h = torch.arange(config.n_bins)[None, :].expand_as(hist)[nz]
    width = upper[f_h] / config.n_bins
    _write_parquet({"feature": f_h, "bin": b_h, "lo": b_h * width, "hi": (b_h + 1) * width, "count": hist[nz]},
                   out / "histograms.parquet")

    # interval samples
    samples = {k: v.cpu() for k, v in acc.interval_samples(config.n_intervals, config.samples_per_interval).items()}
    step = maxes[samples["feature"]] / config.n_intervals
    srows = samples["row"]
    _write_parquet({"feature": samples["feature"], "interval": samples["interval"], "rank": samples["rank"],
                    "lo": samples["interval"] * step, "hi": (samples["interval"] + 1) * step, "row": srows,
                    "act": samples["act"], "token_id": token_ids[srows], "doc": doc_ids[srows],
                    "pos": positions[srows]}, out / "intervals.parquet")

    # logit effects
    n = logits["top_ids"].shape[1]
    words = _decode_many(tokenizer, torch.cat([logits["top_ids"].reshape(-1), logits["bottom_ids"].reshape(-1),
                                               token_ids[rows]]).tolist())
    f_l = torch.arange(d_sae).repeat_interleave(n)
    r_l = torch.arange(n).repeat(d_sae)
    ids = torch.cat([logits["top_ids"].reshape(-1), logits["bottom_ids"].reshape(-1)])
    _write_parquet({"feature": torch.cat([f_l, f_l]), "sign": ["+"] * (d_sae * n) + ["-"] * (d_sae * n),
                    "rank": torch.cat([r_l, r_l]), "token_id": ids, "token": [words[int(i)] for i in ids],
                    "value": torch.cat([logits["top_values"].reshape(-1), logits["bottom_values"].reshape(-1)])},
                   out / "logits.parquet")

    # neighbours
    k = neighbour_ids.shape[1]
    _write_parquet({"feature": torch.arange(d_sae).repeat_interleave(k), "rank": torch.arange(k).repeat(d_sae),
                    "neighbour": neighbour_ids.reshape(-1), "cosine": neighbour_cos.reshape(-1)},
                   out / "neighbours.parquet")

    # co-occurrence (an empty table when it was not accumulated)
    co = acc.cooccurring(config.n_cooccur) if acc.co is not None else {
        "feature": torch.zeros(0, dtype=torch.long), "rank": torch.zeros(0, dtype=torch.long),
        "other": torch.zeros(0, dtype=torch.long), "jaccard": torch.zeros(0), "together": torch.zeros(0, dtype=torch.long)}
    _write_parquet(co, out / "cooccurrence.parquet")

    # the feature list: statistics plus searchable labels
    act_tokens: list[list[str]] = [[] for _ in range(d_sae)]
    for f, row in zip(feat.tolist(), rows.tolist()):  # ≤ top_k entries per feature, once per build (not per batch)
        word = words[int(token_ids[row])].strip()
        if word and word not in act_tokens[f] and len(act_tokens[f]) < 8:
            act_tokens[f].append(word)
    top_words = [[words[int(i)].strip() for i in row] for row in logits["top_ids"][:, :5].tolist()]
    bottom_words = [[words[int(i)].strip() for i in row] for row in logits["bottom_ids"][:, :5].tolist()]
    _write_parquet({"feature": torch.arange(d_sae), "count": count, "density": density, "max_act": maxes,
                    "mean_act": mean.float(), "dead": (count == 0).numpy(),
                    "dense": (density > DENSE_DENSITY).numpy(),
                    "act_tokens": [" | ".join(t) for t in act_tokens],
                    "top_logits": [" | ".join(t) for t in top_words],
                    "bottom_logits": [" | ".join(t) for t in bottom_words]}, out / "features.parquet")


# --- reading ----------------------------------------------------------------------------------
def list_dashboards(root: str | Path | None = None, weights_hash: str | None = None) -> list[dict]:
    """Complete dashboards under ``root`` (default ``cache/dashboards``), newest first; optionally one model's."""
    root = Path(root) if root is not None else dashboards_root()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        path = folder / MANIFEST
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            continue
        if not manifest.get("complete") or (weights_hash and manifest.get("weights_hash") != weights_hash):
            continue
        found.append({"path": str(folder), "name": folder.name, "manifest": manifest, "mtime": path.stat().st_mtime})
    return sorted(found, key=lambda entry: -entry["mtime"])


def find_dashboard(sae_dir: str | Path, root: str | Path | None = None) -> dict | None:
    """The newest complete dashboard built for this exact SAE (matched by its weights' sha256), or None."""
    digest = sae_digest(sae_dir)
    return next((entry for entry in list_dashboards(root) if entry["manifest"].get("sae_sha256") == digest), None)


def corpus_means(sae_dir: str | Path, features: Sequence[int], root: str | Path | None = None) -> dict | None:
    """Each feature's mean activation over every token of the newest dashboard built for this exact SAE
    (zeros included: density x mean when firing), for mean-ablation against a corpus rather than one prompt.

    Returns ``{"means": [...], "tokens": n, "dashboard": name}``, or None when no dashboard of this SAE exists.
    """
    features = [int(f) for f in features]
    entry = find_dashboard(sae_dir, root) if features else None
    if entry is None:
        return None
    dash = Dashboard.open(entry["path"])
    table = dash.query("SELECT feature, density * mean_act AS m FROM features WHERE feature IN "
                       f"({', '.join('?' * len(features))})", features)
    found = dict(zip(table["feature"].astype(int), table["m"].astype(float)))
    missing = [f for f in features if f not in found]
    if missing:
        raise DashboardError(f"Feature {missing[0]} is not in the dashboard '{entry['name']}' "
                             f"({dash.manifest.get('d_sae')} features).")
    return {"means": [found[f] for f in features], "tokens": int(dash.manifest.get("n_rows", 0)),
            "dashboard": entry["name"]}


class Dashboard:
    """A built dashboard folder, queried with duckdb; contexts are rebuilt from its store."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._store = None
        self._sae = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, sae_dir: str | Path | None = None) -> Dashboard:
        """Open a dashboard folder; with ``sae_dir``, refuse one built for another SAE."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise DashboardError(f"'{path}' holds no built dashboard (no {MANIFEST}); build the dashboards first.")
        try:
            manifest = json.loads(file.read_text())
        except ValueError as exc:
            raise DashboardError(f"The manifest of '{path}' is corrupt; build the dashboards again.") from exc
        if manifest.get("format") != DASHBOARD_FORMAT or not manifest.get("complete"):
            raise DashboardError(f"The dashboard '{path}' is incomplete or from another version; build it again.")
        missing = [t for t in TABLES if not (path / f"{t}.parquet").is_file()]
        if missing:
            raise DashboardError(f"The dashboard '{path}' lacks {missing[0]}.parquet; build the dashboards again.")
        if sae_dir is not None and sae_digest(sae_dir) != manifest.get("sae_sha256"):
            raise DashboardError(f"The dashboard '{path.name}' was built for another SAE than '{Path(sae_dir).name}'; "
                                 "build dashboards for this SAE.")
        return cls(path, manifest)

    # -- basics
    @property
    def d_sae(self) -> int:
        return int(self.manifest["d_sae"])

    @property
    def site(self) -> str:
        return str(self.manifest["site"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    def check_feature(self, feature: int) -> int:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < self.d_sae:
            raise DashboardError(f"Feature {feature} does not exist: this SAE has features 0..{self.d_sae - 1}.")
        return int(feature)

    def store(self):
        from engine.data.store import ActivationStore

        with self._lock:
            if self._store is None:
                self._store = ActivationStore.open(self.manifest["store_path"])
                if self._store.weights_hash != self.manifest["weights_hash"]:
                    raise DashboardError("The dashboard's activation store was replaced by one of another model; "
                                         "build the dashboards again.")
            return self._store

    def sae(self):
        from engine.sae.base import load_sae

        with self._lock:
            if self._sae is None:
                path = self.manifest["sae_path"]
                if sae_digest(path) != self.manifest["sae_sha256"]:
                    raise DashboardError(f"The SAE at '{path}' changed since this dashboard was built; build the "
                                         "dashboards again.")
                self._sae = load_sae(path, dtype=torch.float32)
            return self._sae

    def query(self, sql: str, params: Sequence | None = None):
        """Run SQL over the tables (named ``features``, ``histograms``, ...); returns a pandas DataFrame."""
        import duckdb

        con = duckdb.connect()
        try:
            for table in TABLES:  # views cannot take prepared parameters: quote the path as a literal
                literal = str(self.path / f"{table}.parquet").replace("'", "''")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{literal}')")
            return con.execute(sql, list(params or [])).df()
        finally:
            con.close()

    # -- the list
    def feature_table(self, *, sort: str = "density", descending: bool = True, hide_dense: bool = True,
                      dead: bool = False, min_density: float = 0.0, min_max_act: float = 0.0,
                      search: str = "", limit: int = 1000):
        """Live (or, with ``dead``, dead) features filtered and sorted; ``search`` matches tokens and logits."""
        columns = ("feature", "density", "max_act", "mean_act", "count", "act_tokens", "top_logits")
        if sort not in columns:
            raise DashboardError(f"Cannot sort by '{sort}'; choose one of {', '.join(columns)}.")
        where = ["dead" if dead else "NOT dead"]
        params: list = []
        if hide_dense and not dead:
            where.append("NOT dense")
        if min_density > 0:
            where.append("density >= ?")
            params.append(float(min_density))
        if min_max_act > 0:
            where.append("max_act >= ?")
            params.append(float(min_max_act))
        if search.strip():
            where.append("(act_tokens ILIKE ? OR top_logits ILIKE ? OR bottom_logits ILIKE ? "
                         "OR CAST(feature AS VARCHAR) = ?)")
            pattern = f"%{search.strip()}%"
            params += [pattern, pattern, pattern, search.strip()]
        order = f"{sort} {'DESC' if descending else 'ASC'}, feature"
        sql = (f"SELECT feature, density, max_act, mean_act, count, act_tokens, top_logits, bottom_logits "
               f"FROM features WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {int(limit)}")
        return self.query(sql, params)

    def summary(self) -> dict:
        row = self.query("SELECT count(*) AS n, sum(CAST(dead AS INT)) AS dead, sum(CAST(dense AS INT)) AS dense "
                         "FROM features").iloc[0]
        return {"features": int(row["n"]), "dead": int(row["dead"] or 0), "dense": int(row["dense"] or 0),
                "tokens": int(self.manifest["n_rows"])}

    def labels(self, features: Sequence[int]) -> dict[int, str]:
        """Short labels (top activating tokens) for a few features."""
        ids = [int(f) for f in features]
        if not ids:
            return {}
        frame = self.query(f"SELECT feature, act_tokens FROM features WHERE feature IN "
                           f"({', '.join('?' * len(ids))})", ids)
        return {int(f): " | ".join(str(t).split(" | ")[:3]) for f, t in zip(frame["feature"], frame["act_tokens"])}

    # -- one feature
    def feature(self, feature: int) -> dict:
        """Everything the feature page shows (tables as DataFrames)."""
        f = self.check_feature(feature)
        stats = self.query("SELECT * FROM features WHERE feature = ?", [f]).iloc[0].to_dict()
        return {"stats": stats,
                "histogram": self.query("SELECT bin, lo, hi, count FROM histograms WHERE feature = ? ORDER BY bin",
                                        [f]),
                "top": self.query("SELECT rank, row, act, doc, pos FROM top_examples WHERE feature = ? "
                                  "ORDER BY rank", [f]),
                "intervals": self.query("SELECT interval, rank, lo, hi, row, act, doc, pos FROM intervals "
                                        "WHERE feature = ? ORDER BY interval DESC, rank", [f]),
                "logits": self.query("SELECT sign, rank, token_id, token, value FROM logits WHERE feature = ? "
                                     "ORDER BY sign, rank", [f]),
                "neighbours": self.query("SELECT n.rank, n.neighbour, n.cosine, f.act_tokens FROM neighbours n "
                                         "JOIN features f ON f.feature = n.neighbour WHERE n.feature = ? "
                                         "ORDER BY n.rank", [f]),
                "cooccurring": self.query("SELECT c.rank, c.other, c.jaccard, c.together, f.act_tokens "
                                          "FROM cooccurrence c JOIN features f ON f.feature = c.other "
                                          "WHERE c.feature = ? ORDER BY c.rank", [f])}

    def contexts(self, feature: int, rows: Sequence[int], tokenizer, before: int = 10,
                 after: int = 4) -> list[dict]:
        """Token windows around store rows with this feature's activation on every token (one SAE encode)."""
        f = self.check_feature(feature)
        store = self.store()
        rows_t = torch.as_tensor([int(r) for r in rows], dtype=torch.long)
        if rows_t.numel() == 0:
            return []
        positions = store.positions()
        starts_of_windows = torch.nonzero(positions == 0).squeeze(1)
        next_start = torch.searchsorted(starts_of_windows, rows_t, right=True)
        bound = torch.cat([starts_of_windows, torch.tensor([store.n_tokens])])[next_start]
        lo = rows_t - torch.minimum(positions[rows_t], torch.full_like(rows_t, before))
        hi = torch.minimum(rows_t + after + 1, bound)
        lengths = hi - lo
        flat = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(lo, hi)])  # ≤ (before+after+1)·len(rows)
        sae = self.sae()
        with torch.no_grad():
            acts = sae.encode(store.read(self.site, self.layer, flat))[:, f]
        acts = torch.where(positions[flat] == 0, torch.zeros_like(acts), acts)
        ids = store.token_ids()[flat]
        words = _decode_many(tokenizer, ids.tolist())
        out, offset = [], 0
        for row, start, length in zip(rows_t.tolist(), lo.tolist(), lengths.tolist()):
            part = slice(offset, offset + length)
            out.append({"row": row, "tokens": [words[int(i)] for i in ids[part]], "acts": acts[part].tolist(),
                        "focus": row - start})
            offset += length
        return out

    # -- the feature map
    def feature_map(self, method: str = "umap", seed: int = 0):
        """2-D projection of the decoder directions (cached as ``map_<method>.parquet``)."""
        import pandas as pd

        from engine.geometry.projections import project

        path = self.path / f"map_{method}.parquet"
        if path.is_file():
            return pd.read_parquet(path)
        W = self.sae().W_dec.detach().float().numpy()
        coords = project(W, method=method, n_components=2, seed=seed, normalize=True)
        _write_parquet({"feature": torch.arange(self.d_sae), "x": coords[:, 0].astype(np.float32),
                        "y": coords[:, 1].astype(np.float32)}, path)
        return pd.read_parquet(path)


# --- activations on the user's text -----------------------------------------------------------
@torch.no_grad()
def text_activations(lm, sae, site: str, layer: int, text: str, max_tokens: int = 256
                     ) -> tuple[list[str], torch.Tensor]:
    """``(tokens, acts [T, d_sae])`` of the SAE on ``text``; the tokenizer's leading special tokens are dropped."""
    from engine.core.capture import capture

    if not text or not text.strip():
        raise DashboardError("Enter some text to see which features fire on it.")
    ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
    special = set(lm.tokenizer.all_special_ids or [])
    skip = 0
    while skip < ids.shape[1] and int(ids[0, skip]) in special:
        skip += 1
    if skip >= ids.shape[1]:
        raise DashboardError("The text has no ordinary tokens; enter some words.")
    with lm.lock:
        captured, _ = capture(lm.anatomy, ids, sites={site: [layer]})
    hidden = captured[site][0, 0, skip:].float()
    acts = sae.to(hidden.device).encode(hidden).cpu()
    words = lm.tokenizer.batch_decode([[int(i)] for i in ids[0, skip:]])
    return words, acts
