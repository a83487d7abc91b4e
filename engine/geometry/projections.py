"""Concept space: point clouds of hidden states and their PCA/UMAP projections.

A :class:`PointCloud` holds one ``[n_points, width]`` matrix per layer plus per-point labels
and hover text. It comes from a labelled prompt set captured on the fly
(:func:`prompt_cloud`) or from a sample of an activation store (:func:`store_cloud`).

Projections: :func:`project` (PCA, or PCA to 50 dimensions then UMAP, cached on disk) and
:func:`procrustes_align` (rotate/scale one layer's projection onto the previous one so points
move smoothly while scrubbing). UMAP compiles with numba on first use (25-60 s);
:func:`warm_up_umap` does that in a background thread.

Spread and isotropy per layer: :mod:`engine.geometry.spread`; linear probes per layer ("concept depth"):
:mod:`engine.geometry.probes`.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.capture import capture, pad_batch
from engine.core.devices import to_host
from engine.core.errors import UserError
from engine.core.fileio import atomic_write
from engine.core.progress import Progress, report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.core.models import LoadedModel
    from engine.data.corpora import PromptSet
    from engine.data.store import ActivationStore

POSITION_MODES = ("last", "all", "mean")
METHODS = ("pca", "umap")
MIN_UMAP_POINTS = 10


class ProjectionError(UserError):
    pass


# --- point clouds -------------------------------------------------------------------------
@dataclass
class PointCloud:
    """Vectors per layer for the same points, with labels and hover text per point."""

    name: str
    site: str
    layers: list[int]
    vectors: dict[int, np.ndarray]  # layer -> [n_points, width] float32
    labels: dict[str, list[str]] = field(default_factory=dict)
    hover: list[str] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)  # store rows (store clouds) or point index

    @property
    def n_points(self) -> int:
        return len(self.hover)

    def at(self, layer: int) -> np.ndarray:
        if layer not in self.vectors:
            raise ProjectionError(f"Layer {layer} is not in this point cloud; choose one of {_span(self.layers)}.")
        return self.vectors[layer]

    def label(self, name: str) -> list[str]:
        if name not in self.labels:
            raise ProjectionError(f"There is no label '{name}'; choose from {', '.join(self.labels)}.")
        return self.labels[name]


def _span(layers: Sequence[int]) -> str:
    return f"{min(layers)}..{max(layers)}" if layers else "(none)"


def _token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def prompt_cloud(lm: LoadedModel, pset: PromptSet, site: str = "resid_post", positions: str = "last",
                 layers: str | Sequence[int] = "all",
                 batch_size: int = 64, progress: Progress | None = None) -> PointCloud:
    """Embed every text of a :class:`~engine.data.corpora.PromptSet` and pool its tokens per ``positions``.

    ``last``: the last token of each text; ``mean``: mean over the text's tokens (special prefix
    such as BOS excluded); ``all``: every token except the special prefix, one point each (labels
    ``token`` and ``position`` are added).
    """
    from engine.data.store import normalize_layers
    from engine.data.windows import special_prefix

    if positions not in POSITION_MODES:
        raise ProjectionError(f"Unknown position mode '{positions}'; choose from {', '.join(POSITION_MODES)}.")
    layer_list = normalize_layers(layers, lm.n_layers)
    tokenizer = lm.tokenizer
    n_prefix = len(special_prefix(tokenizer))
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in pset.texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layer_list}
    base = {**pset.labels, "text": list(pset.texts)}
    labels: dict[str, list[str]] = {name: [] for name in base}
    extra: dict[str, list[str]] = {"token": [], "position": []} if positions == "all" else {}
    hover: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        input_ids, mask = pad_batch(batch, pad)
        width = input_ids.shape[1]
        with lm.lock:
            captured, _ = capture(lm.anatomy, input_ids, mask, sites={site: layer_list})
        acts = to_host(captured[site], torch.float32)  # [L, B, T, d]
        lengths = mask.sum(1)
        first = min(n_prefix, width - 1)
        if positions == "last":
            pooled = acts[:, torch.arange(len(batch)), lengths - 1]
            counts = [1] * len(batch)
        elif positions == "mean":
            keep = mask.clone().float()
            keep[:, :first] = 0
            keep[keep.sum(1) == 0, 0] = 1  # a text that is only the prefix keeps it
            pooled = (acts * keep[None, :, :, None]).sum(2) / keep.sum(1)[None, :, None]
            counts = [1] * len(batch)
        else:
            keep = mask.bool().clone()
            keep[:, :first] = False
            pooled = acts[:, keep]
            counts = keep.sum(1).tolist()
            for row, ids in enumerate(batch):
                idx = keep[row].nonzero().flatten().tolist()
                tokens = _token_strings(tokenizer, [ids[i] for i in idx])
                extra["token"].extend(tokens)
                extra["position"].extend(str(i) for i in idx)
                text = pset.texts[start + row]
                hover.extend(f"{text} ▸ {tok!r} @{i}" for tok, i in zip(tokens, idx))
        for j, layer in enumerate(layer_list):
            per_layer[layer].append(pooled[j])
        for row in range(len(batch)):
            for name, values in base.items():
                labels[name].extend([values[start + row]] * counts[row])
            if positions != "all":
                hover.append(pset.texts[start + row])
        report(progress, (start + len(batch)) / len(encoded), f"embedded {start + len(batch)} of {len(encoded)}")
    vectors = {layer: torch.cat(parts).numpy().astype(np.float32) for layer, parts in per_layer.items()}
    labels.update(extra)
    return PointCloud(pset.name, site, layer_list, vectors, labels, hover, list(range(len(hover))))


def store_cloud(store: ActivationStore, site: str | None = None, layers: Sequence[int] | None = None,
                max_points: int = 5000, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None,
                progress: Progress | None = None) -> PointCloud:
    """A uniform sample of up to ``max_points`` tokens of a store (position 0 left out), every layer.

    Labels: ``token`` (decoded when a tokenizer is given, else the id), ``position`` and ``doc``;
    the hover shows the token in its context.
    """
    site = site or store.sites[0]
    layer_list = list(layers) if layers is not None else store.layers
    rows = store.sample_rows(max_points, seed=seed)
    if rows.numel() == 0:
        raise ProjectionError("This store has no tokens after position 0; capture a larger corpus.")
    vectors = {}
    for k, layer in enumerate(layer_list):
        vectors[layer] = store.read(site, layer, rows).numpy()
        report(progress, (k + 1) / len(layer_list), f"read layer {layer}")
    token_ids = store.token_ids()[rows].tolist()
    positions = store.positions()[rows].tolist()
    docs = store.doc_ids()[rows].tolist()
    if tokenizer is not None:
        tokens = _token_strings(tokenizer, token_ids)
        hover = []
        for row in rows.tolist():
            ids, at = store.context(row, before=12, after=3)
            pieces = _token_strings(tokenizer, ids)
            pieces[at] = f"[[{pieces[at]}]]"
            hover.append("".join(pieces).replace("\n", "⏎"))
    else:
        tokens = [str(t) for t in token_ids]
        hover = [f"token {t} @ position {p}" for t, p in zip(token_ids, positions)]
    labels = {"token": tokens, "position": [str(p) for p in positions], "doc": [str(d) for d in docs]}
    return PointCloud(store.path.name, site, layer_list, vectors, labels, hover, rows.tolist())


# --- projections --------------------------------------------------------------------------
def _prepare(X: np.ndarray, normalize: bool) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ProjectionError(f"Expected a [points, width] matrix, got shape {X.shape}.")
    bad = int((~np.isfinite(X)).any(1).sum())
    if bad:
        raise ProjectionError(f"{bad} points have infinite or NaN values (fp16 overflow?); capture in bfloat16 or "
                              "float32.")
    if normalize:
        X = unit_rows(X)
    return X - X.mean(0, keepdims=True)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its length (the projections' "normalise" option)."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def pca_estimator(X: np.ndarray, n_components: int, seed: int = 0):
    """The (unfitted) scikit-learn PCA :func:`pca` uses for ``X``: the same solver and seed, so a fit of it
    reproduces :func:`pca`'s coordinates and can ``transform`` further points into them."""
    from sklearn.decomposition import PCA

    k = max(1, min(n_components, X.shape[0], X.shape[1]))
    solver = "randomized" if min(X.shape) > 3 * k and X.shape[0] * X.shape[1] > 2_000_000 else "full"
    return PCA(n_components=k, svd_solver=solver, random_state=seed)


def pca(X: np.ndarray, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centred PCA: ``(coordinates [n, k], explained variance ratio [k])`` (randomized when large)."""
    X = np.asarray(X, dtype=np.float32)
    model = pca_estimator(X, n_components, seed)
    Y = model.fit_transform(X).astype(np.float32)
    if Y.shape[1] < n_components:  # fewer points than dimensions: pad with zeros so the plot still works
        Y = np.pad(Y, ((0, 0), (0, n_components - Y.shape[1])))
    return Y, model.explained_variance_ratio_


def project(X: np.ndarray, method: str = "pca", n_components: int = 2, *, seed: int = 0, pca_dims: int = 50,
            n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = None,
            normalize: bool = False, cache_dir: Path | str | None = None) -> np.ndarray:
    """Project points to ``n_components`` dimensions with PCA, or PCA to ``pca_dims`` then UMAP.

    With ``cache_dir``, UMAP results are kept on disk keyed by the points' bytes and every setting, so a
    restarted server redraws a projection it has made before without recomputing it (PCA is fast
    enough not to need this). A cache file that cannot be read back whole is recomputed and replaced.
    """
    if method not in METHODS:
        raise ProjectionError(f"Unknown projection '{method}'; choose pca or umap.")
    if n_components not in (2, 3):
        raise ProjectionError("Projections are 2-D or 3-D.")
    X = _prepare(X, normalize)
    n = X.shape[0]
    if n < 3:
        raise ProjectionError(f"Only {n} points: a projection needs at least 3.")
    if method == "pca":
        return pca(X, n_components, seed)[0]
    if n < MIN_UMAP_POINTS:
        raise ProjectionError(f"UMAP needs at least {MIN_UMAP_POINTS} points and there are only {n}; use PCA or "
                              "more points.")
    import umap

    settings = umap_settings(n, n_components, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"umap-{_umap_key(X, settings, pca_dims)}.npy"
        cached = _read_cached(path, (n, n_components))
        if cached is not None:
            return cached
    dims = min(pca_dims, n - 1)
    reduced = pca(X, dims, seed)[0] if X.shape[1] > dims else X
    model = umap.UMAP(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Y = np.asarray(model.fit_transform(reduced), dtype=np.float32)
    if path is not None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.save(handle, Y, allow_pickle=False)
        atomic_write(path, write)
    return Y


def umap_settings(n: int, n_components: int, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
                  n_epochs: int | None = None) -> dict:
    """The ``umap.UMAP`` arguments :func:`project` uses for ``n`` points."""
    return {"n_components": n_components, "n_neighbors": max(2, min(n_neighbors, n - 1)), "min_dist": min_dist,
            "n_epochs": n_epochs or (500 if n < 10_000 else 200), "random_state": seed,
            "init": "spectral" if n > n_components + 8 else "random"}


def _umap_key(X: np.ndarray, settings: dict, pca_dims: int) -> str:
    """Content key of a UMAP run: the prepared points (bytes and shape), the settings, the UMAP version."""
    import umap

    digest = hashlib.sha256(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    digest.update(json.dumps({**settings, "pca_dims": pca_dims, "shape": list(X.shape),
                              "umap": getattr(umap, "__version__", "?"), "format": 1}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _read_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        Y = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # truncated or not an .npy file: recompute and replace it
        return None
    if Y.shape != shape or Y.dtype != np.float32 or not np.isfinite(Y).all():
        return None
    return Y


def procrustes_fit(Y: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rotation (reflections allowed), scale and shift that best map ``Y`` onto ``reference`` (same points),
    as ``(y_mean, matrix, r_mean)``: aligned = ``(Y - y_mean) @ matrix + r_mean`` (matrix = scale x rotation)."""
    Y = np.asarray(Y, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if Y.shape != ref.shape:
        raise ProjectionError(f"Cannot align {Y.shape} onto {ref.shape}: the point sets differ.")
    y_mean, r_mean = Y.mean(0), ref.mean(0)
    Yc, Rc = Y - y_mean, ref - r_mean
    U, S, Vt = np.linalg.svd(Yc.T @ Rc)
    rotation = U @ Vt
    norm = (Yc ** 2).sum()
    scale = S.sum() / norm if norm > 0 else 1.0
    return y_mean, scale * rotation, r_mean


def procrustes_align(Y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate (reflections allowed), scale and shift ``Y`` to best match ``reference`` (same points)."""
    y_mean, matrix, r_mean = procrustes_fit(Y, reference)
    return ((np.asarray(Y, dtype=np.float64) - y_mean) @ matrix + r_mean).astype(np.float32)


_warm = {"thread": None, "done": threading.Event(), "error": None}
_warm_lock = threading.Lock()


def warm_up_umap(background: bool = True, n_points: int = 4096) -> threading.Thread | None:
    """Compile UMAP's numba code once per process (idempotent); ``n_points`` ≥ 4096 also compiles the
    approximate-neighbour path. Returns the thread (or None when run in the foreground)."""
    def work() -> None:
        try:
            import umap

            data = np.random.default_rng(0).normal(size=(n_points, 10)).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = umap.UMAP(n_components=2, n_epochs=5, random_state=0)
                model.fit_transform(data)
                model.transform(data[:2])  # placing a token in a projection (engine.geometry.selection) compiles this
        except Exception as exc:  # warm-up is best effort; a real projection will report the problem
            _warm["error"] = exc
        finally:
            _warm["done"].set()

    with _warm_lock:
        if _warm["thread"] is not None or _warm["done"].is_set():
            return _warm["thread"]
        if not background:
            _warm["thread"] = threading.current_thread()
        else:
            _warm["thread"] = threading.Thread(target=work, name="umap-warm-up", daemon=True)
            _warm["thread"].start()
            return _warm["thread"]
    work()
    return None


def umap_ready() -> bool:
    return _warm["done"].is_set()
