"""Linked views from concept space: one token of any prompt placed in a fitted projection, and what a selection of
points means to the model.

- :func:`fit_projector` fits the same projection :func:`engine.geometry.projections.project` draws (same
  normalisation, centring, PCA solver and seed; UMAP after the same PCA reduction) and keeps the fitted parts, so
  :meth:`Projector.transform` places further points where the cloud's own points would be.
- :func:`token_point` runs the model on a prompt and returns the hidden state of one position at a site and layer.
- :func:`selection_lens` reads the mean hidden state of selected points at every layer of the cloud through the logit
  lens (the model's final norm and unembedding, :func:`engine.lens.logit.lens_stats`).
- :func:`selection_features` encodes the selected points with an SAE (batched) and ranks features by their mean
  activation over the selection.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.core.capture import capture
from engine.core.devices import to_host
from engine.core.errors import UserError
from engine.geometry.projections import (
    METHODS,
    MIN_UMAP_POINTS,
    _prepare,
    pca_estimator,
    umap_settings,
    unit_rows,
)

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.geometry.projections import PointCloud
    from engine.sae.base import SAE

LENS_SITES = ("resid_pre", "resid_mid", "resid_post")  # the residual stream: what the logit lens reads


class SelectionError(UserError):
    pass


# --- placing points in a fitted projection -------------------------------------------------------
@dataclass
class Projector:
    """A fitted projection: ``coords`` are the cloud's own coordinates, :meth:`transform` places more points."""

    method: str
    n_components: int
    normalize: bool
    mean: np.ndarray             # the cloud's mean (after normalising), subtracted before the PCA
    pca: Any                     # fitted sklearn PCA: the projection itself, or the reduction before UMAP (or None)
    umap: Any = None             # fitted umap.UMAP
    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``[m, width]`` (or one ``[width]`` vector) -> ``[m, n_components]`` in the cloud's coordinates."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        if X.shape[1] != self.mean.shape[0]:
            raise SelectionError(f"The point has width {X.shape[1]} and the projected cloud {self.mean.shape[0]}: "
                                 "they come from different sites or models.")
        if not np.isfinite(X).all():
            raise SelectionError("The point has infinite or NaN values (fp16 overflow?); use bfloat16 or float32.")
        if self.normalize:
            X = unit_rows(X)
        Y = X - self.mean
        if self.pca is not None:
            Y = self.pca.transform(Y).astype(np.float32)
        if self.umap is not None:
            with self._lock, warnings.catch_warnings():  # one transform at a time on the shared model
                warnings.simplefilter("ignore")
                Y = np.asarray(self.umap.transform(Y), dtype=np.float32)
        if Y.shape[1] < self.n_components:  # fewer points than dimensions: padded like the cloud's coordinates
            Y = np.pad(Y, ((0, 0), (0, self.n_components - Y.shape[1])))
        return Y.astype(np.float32)


def fit_projector(X: np.ndarray, method: str = "pca", n_components: int = 2, *, normalize: bool = False,
                  seed: int = 0, pca_dims: int = 50, n_neighbors: int = 15, min_dist: float = 0.1,
                  n_epochs: int | None = None) -> Projector:
    """Fit the projection :func:`~engine.geometry.projections.project` makes of ``X`` with these settings and keep
    its parts (PCA: the same coordinates; UMAP: the same embedding when UMAP is deterministic for the seed)."""
    if method not in METHODS:
        raise SelectionError(f"Unknown projection '{method}'; choose pca or umap.")
    prepared = _prepare(X, normalize)  # validates, normalises and centres exactly as project() does
    n = prepared.shape[0]
    if n < 3 or (method == "umap" and n < MIN_UMAP_POINTS):
        raise SelectionError(f"Only {n} points: too few to project with {method.upper()}.")
    raw = np.asarray(X, dtype=np.float32)
    mean = (unit_rows(raw) if normalize else raw).mean(0)
    if method == "pca":
        model = pca_estimator(prepared, n_components, seed)
        coords = model.fit_transform(prepared).astype(np.float32)
        projector = Projector(method, n_components, normalize, mean, model)
        projector.coords = np.pad(coords, ((0, 0), (0, n_components - coords.shape[1])))
        return projector
    import umap

    dims = min(pca_dims, n - 1)
    reducer = pca_estimator(prepared, dims, seed) if prepared.shape[1] > dims else None
    reduced = reducer.fit_transform(prepared).astype(np.float32) if reducer is not None else prepared
    model = umap.UMAP(**umap_settings(n, n_components, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist,
                                      n_epochs=n_epochs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = np.asarray(model.fit_transform(reduced), dtype=np.float32)
    return Projector(method, n_components, normalize, mean, reducer, model, coords)


# --- one token of a prompt -----------------------------------------------------------------------
@dataclass
class TokenPoint:
    prompt: str
    position: int        # 0-based, counted with the tokenizer's special prefix (e.g. BOS at 0)
    token: str
    n_tokens: int
    site: str
    layer: int
    vector: np.ndarray   # [width] float32

    @property
    def label(self) -> str:
        return f"your token {self.token!r} (position {self.position})"


def token_point(lm: LoadedModel, prompt: str, position: int, site: str, layer: int) -> TokenPoint:
    """The hidden state at ``position`` of ``prompt`` (negative: from the end, -1 = the last token) at ``site`` and
    ``layer``, from one forward pass (as :func:`~engine.geometry.projections.prompt_cloud` captures the cloud)."""
    from engine.core.sites import check_site
    from engine.lens.logit import check_prompt, decode_table

    ids = check_prompt(prompt, lm.tokenizer, lm.context_length)
    n = len(ids)
    at = int(position) + n if int(position) < 0 else int(position)
    if not 0 <= at < n:
        raise SelectionError(f"Position {position} is not in the prompt: it has {n} tokens (positions 0..{n - 1}).")
    check_site(lm.anatomy, site)
    if not 0 <= int(layer) < lm.anatomy.n_layers:
        raise SelectionError(f"Layer {layer} does not exist: the model has layers 0..{lm.anatomy.n_layers - 1}.")
    with lm.lock:
        captured, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [int(layer)]})
    vector = to_host(captured[site][0, 0, at], torch.float32).numpy()
    token = str(decode_table(lm.tokenizer, np.array([ids[at]]))[0])
    return TokenPoint(prompt, at, token, n, site, int(layer), vector)


# --- what a selection means ----------------------------------------------------------------------
def check_points(points: Sequence[int], n_points: int) -> np.ndarray:
    """Selected point indices as a sorted unique int array; a sentence when empty or out of range."""
    try:
        idx = np.unique(np.asarray([int(p) for p in points], dtype=np.int64))
    except (TypeError, ValueError):
        raise SelectionError("The selection must be a list of point numbers.") from None
    if idx.size == 0:
        raise SelectionError("Nothing is selected: select points with the box or lasso.")
    if idx[0] < 0 or idx[-1] >= n_points:
        bad = int(idx[-1] if idx[-1] >= n_points else idx[0])
        raise SelectionError(f"The selection names point {bad}, but this cloud has points 0..{n_points - 1}; "
                             "select again.")
    return idx


@dataclass
class MeanLens:
    site: str
    layers: list[int]
    n_points: int
    top_ids: np.ndarray            # [layers, k]
    top_probs: np.ndarray          # [layers, k]
    top_tokens: list[list[str]]    # [layers][k]
    entropy: np.ndarray            # [layers] nats

    def records(self) -> list[dict]:
        """One row per layer and rank (for tables and CSV)."""
        return [{"layer": layer, "rank": r + 1, "token": self.top_tokens[i][r], "id": int(self.top_ids[i, r]),
                 "prob": float(self.top_probs[i, r])}
                for i, layer in enumerate(self.layers) for r in range(self.top_ids.shape[1])]


def selection_lens(lm: LoadedModel, cloud: PointCloud, points: Sequence[int], top_k: int = 5) -> MeanLens:
    """The mean of the selected points at every layer of ``cloud`` read through the logit lens: the model's own final
    norm and unembedding (:func:`engine.lens.logit.lens_stats`), the mean cast to the model's dtype as the residual
    stream is. For a single point at the last layer's ``resid_post`` this is the model's own next-token distribution."""
    from engine.lens.logit import decode_table, lens_stats

    if cloud.site not in LENS_SITES:
        raise SelectionError(f"The logit lens reads the residual stream and these points are at '{cloud.site}'; "
                             f"choose one of {', '.join(LENS_SITES)}.")
    idx = check_points(points, cloud.n_points)
    anatomy = lm.anatomy
    width = cloud.at(cloud.layers[0]).shape[1]
    if width != anatomy.d_model:
        raise SelectionError(f"These points have width {width} but the model's residual stream has "
                             f"{anatomy.d_model}: they were captured from another model.")
    means = np.stack([cloud.at(layer)[idx].astype(np.float64).mean(0) for layer in cloud.layers])  # [L, d]
    resid = torch.from_numpy(means).to(device=anatomy.head_device, dtype=lm.dtype)[:, None, :]   # [L, 1, d]
    with lm.lock:
        stats = lens_stats(anatomy, resid, top_k=top_k)
    top_ids = stats["top_ids"][:, 0].numpy()
    return MeanLens(cloud.site, list(cloud.layers), int(idx.size), top_ids, stats["top_probs"][:, 0].numpy(),
                    decode_table(lm.tokenizer, top_ids).tolist(), stats["entropy"][:, 0].numpy())


@dataclass
class SelectionFeatures:
    n_points: int
    features: list[int]       # ranked by mean activation over the selected points
    mean_act: list[float]     # mean over the selected points (zeros included)
    fires_on: list[int]       # on how many of the selected points the feature is active (> 0)
    max_act: list[float]
    on_mean: list[float]      # the feature's activation on the selection's mean vector

    def records(self) -> list[dict]:
        return [{"feature": f, "mean_act": m, "fires_on": c, "max_act": x, "on_mean": o} for f, m, c, x, o in
                zip(self.features, self.mean_act, self.fires_on, self.max_act, self.on_mean)]


@torch.inference_mode()
def selection_features(sae: SAE, vectors: np.ndarray, top_n: int = 20, batch_size: int = 4096) -> SelectionFeatures:
    """Encode ``vectors [n, d_in]`` (the selected points) with ``sae`` in batches and rank its features by mean
    activation over them; features that never fire on the selection are left out."""
    X = np.asarray(vectors, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise SelectionError("Nothing is selected: select points with the box or lasso.")
    if X.shape[1] != sae.d_in:
        raise SelectionError(f"The SAE reads vectors of width {sae.d_in} and these points have width {X.shape[1]}: "
                             "it was trained at another site or on another model.")
    param = next(sae.parameters())
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=param.device)
    fires = torch.zeros(sae.d_sae, dtype=torch.long, device=param.device)
    peak = torch.full((sae.d_sae,), -torch.inf, dtype=torch.float32, device=param.device)
    for start in range(0, X.shape[0], batch_size):
        acts = sae.encode(torch.from_numpy(X[start:start + batch_size]).to(param.device, param.dtype)).float()
        total += acts.sum(0, dtype=torch.float64)
        fires += (acts > 0).sum(0)
        peak = torch.maximum(peak, acts.max(0).values)
    mean = total / X.shape[0]
    on_mean = sae.encode(torch.from_numpy(X.astype(np.float64).mean(0, keepdims=True)).to(param.device,
                                                                                          param.dtype))[0].float()
    k = min(int(top_n), int((fires > 0).sum()))
    order = torch.argsort(mean, descending=True, stable=True)[:k]
    pick = {name: to_host(t[order]) for name, t in
            (("mean", mean), ("fires", fires), ("peak", peak), ("on_mean", on_mean))}
    return SelectionFeatures(int(X.shape[0]), to_host(order).tolist(), pick["mean"].tolist(),
                             pick["fires"].tolist(), pick["peak"].tolist(), pick["on_mean"].tolist())
