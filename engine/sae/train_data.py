"""The parts of SAE training around the loop: the activation stream, initialisation, decoder upkeep, checkpoints.

The stream is either an activation store (``engine.data.store.ActivationStore``: a site and a layer, and
for a transcoder a target site and layer; streamed shard by shard, reshuffled every epoch) or any iterable
of ``[batch, d_in]`` tensors (or ``([batch, d_in], [batch, d_out])`` pairs for a transcoder). Paired store
batches come from two ``iter_batches`` streams with the same seed: the store shuffles shards and rows with
one generator per stream, so both streams visit the same rows in the same order.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.core.errors import UserError
from engine.core.fileio import atomic_save_tensors, atomic_write_json
from engine.sae.base import SAE, SAEConfig

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (x [batch, d_in], y [batch, d_out] or None for an SAE)


class SAETrainError(UserError):
    """A training setting or data source that cannot work."""


def _check(batch) -> None:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or not batch.is_floating_point():
        raise SAETrainError("Each training batch must be a 2-D floating-point tensor [batch, d].")


def _as_pair(item) -> Batch:
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise SAETrainError("A transcoder's training batches must be (input, target) pairs of tensors.")
        x, y = item
        _check(x)
        _check(y)
        if x.shape[0] != y.shape[0]:
            raise SAETrainError(f"An (input, target) batch pair has {x.shape[0]} and {y.shape[0]} rows.")
        return x, y
    _check(item)
    return item, None


class ActivationSource:
    """Endless, resumable stream of :data:`Batch` float32 tensors from a store or an iterable."""

    def __init__(self, data, site: str | None, layer: int | None, batch_size: int, seed: int,
                 target_site: str | None = None, target_layer: int | None = None):
        self.store = data if hasattr(data, "iter_batches") else None
        self.site, self.layer, self.batch_size, self.seed = site, layer, batch_size, seed
        self.target_site = target_site
        self.target_layer = layer if target_layer is None else target_layer
        self.epoch = 0
        if self.store is not None:
            self._open_store()
            return
        if isinstance(data, torch.Tensor):
            data = data.split(batch_size)
        if not isinstance(data, Iterable):
            raise SAETrainError("Training data must be an activation store or an iterable of [batch, d] tensors.")
        self.iterable = data
        self._first_iter: Iterator | None = iter(data)
        try:
            self._first = _as_pair(next(self._first_iter))
        except StopIteration as exc:
            raise SAETrainError("The training data is empty.") from exc
        self.paired = self._first[1] is not None
        self.d_in = int(self._first[0].shape[-1])
        self.d_out = int(self._first[1].shape[-1]) if self.paired else self.d_in

    def _open_store(self) -> None:
        store = self.store
        if self.site is None or self.layer is None:
            raise SAETrainError("Training from an activation store needs a site and a layer.")
        for site, layer in ((self.site, self.layer), (self.target_site or self.site, self.target_layer)):
            if site not in store.sites:
                raise SAETrainError(f"The store has no site '{site}'; it holds {', '.join(store.sites)}.")
            if layer not in list(store.layers):
                raise SAETrainError(f"The store has no layer {layer}; it holds layers {list(store.layers)}.")
        self.paired = self.target_site is not None
        self.d_in = int(store.width(self.site)) if hasattr(store, "width") else int(store.d_model)
        self.d_out = int(store.width(self.target_site)) if self.paired else self.d_in

    def _store_epoch(self) -> Iterator[Batch]:
        def stream(site: str, layer: int) -> Iterator[torch.Tensor]:
            return iter(self.store.iter_batches(site, layer, self.batch_size, shuffle=True,
                                                seed=self.seed + self.epoch, dtype=torch.float32))
        inputs = stream(self.site, self.layer)
        if not self.paired:
            return ((x, None) for x in inputs)
        return zip(inputs, stream(self.target_site, self.target_layer))

    def _epoch_iter(self) -> Iterator[Batch]:
        if self.store is not None:
            return self._store_epoch()
        if self._first_iter is not None:  # the first pass reuses the batch already peeked at
            first, rest = self._first, self._first_iter
            self._first_iter = None

            def chain():
                yield first
                for item in rest:
                    yield _as_pair(item)
            return chain()
        iterator = iter(self.iterable)
        if iterator is self.iterable:  # a one-shot iterator (generator) cannot be replayed
            return iter(())
        return (_as_pair(item) for item in iterator)

    def batches(self, skip: int = 0) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(epoch, index, x, y)`` forever (a new epoch when one ends), skipping ``skip`` batches first.

        One-shot iterables (generators) end after their single pass.
        """
        while True:
            produced = False
            for index, (x, y) in enumerate(self._epoch_iter()):
                if index < skip:
                    continue
                if (y is None) == self.paired:
                    raise SAETrainError("Mix of plain batches and (input, target) pairs in the training data.")
                produced = True
                yield self.epoch, index + 1, x.float(), None if y is None else y.float()
            if not produced and skip == 0:
                return
            skip = 0
            self.epoch += 1


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point ``[d]`` minimising the sum of Euclidean distances to ``points [n, d]``."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=-1).clamp_min(eps)
        weights = 1.0 / distances
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            return new
        median = new
    return median


# --- initialisation and decoder upkeep -----------------------------------------------------
def unit_norm_rows_(weight: torch.Tensor) -> None:
    """Rescale the rows of a decoder to unit norm, in place."""
    with torch.no_grad():
        weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (``[batch, d_out]``) without ``[batch, d_sae]``."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum") + b_dec


def remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit) decoder row, so a step does not change its norm."""
    if W_dec.grad is not None:
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=-1, keepdim=True) * W_dec


def init_sae(cfg: SAEConfig, x: torch.Tensor, y: torch.Tensor, b_dec_init: str, seed: int,
             device: torch.device | str) -> SAE:
    """A fresh SAE: random unit decoder rows, encoder = decoder transpose, b_dec at the centre of ``y``.

    ``x [n, d_in]`` and ``y [n, d_out]`` are samples of the (scaled) input and target.
    """
    generator = torch.Generator().manual_seed(seed)
    sae = SAE(cfg, device=device, dtype=torch.float32)
    with torch.no_grad():
        W_dec = torch.randn(cfg.d_sae, cfg.width_out, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(W_dec)
        if cfg.d_in == cfg.width_out:
            sae.W_enc.copy_(W_dec.T)
        else:
            W_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator)
            sae.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True))
        if b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(y.to(device)))
        elif b_dec_init == "mean":
            sae.b_dec.copy_(y.mean(dim=0))
    return sae


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(folder: Path, sae: SAE, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Weights, Adam state and ``state`` (``_last_fired``/``_fire_counts`` tensors are popped into the file)."""
    tensors = {f"sae.{name}": value for name, value in sae.state_tensors().items()}
    opt_state = optimizer.state_dict()
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["last_fired"] = state.pop("_last_fired")
    tensors["fire_counts"] = state.pop("_fire_counts")
    atomic_save_tensors(folder / "state.safetensors", tensors)
    state["param_groups"] = opt_state["param_groups"]
    atomic_write_json(folder / "state.json", state)  # written last: marks the checkpoint complete


def load_checkpoint(folder: Path, sae: SAE, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore weights and Adam state in place; the saved ``state`` dict (with the two tensors) or None."""
    from safetensors.torch import load_file

    meta, weights = folder / "state.json", folder / "state.safetensors"
    if not meta.is_file() or not weights.is_file():
        return None
    try:
        state = json.loads(meta.read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # a damaged checkpoint must not be half-used
        raise SAETrainError(f"The checkpoint in '{folder}' is damaged ({exc}); delete it to start over.") from exc
    with torch.no_grad():
        for name, param in sae.named_parameters():
            key = f"sae.{name}"
            if key not in tensors or tensors[key].shape != param.shape:
                raise SAETrainError(f"The checkpoint in '{folder}' does not match these settings; "
                                    "delete it or use the same width and data.")
            param.copy_(tensors[key])
    opt_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    state["_last_fired"] = tensors["last_fired"]
    state["_fire_counts"] = tensors["fire_counts"]
    return state
