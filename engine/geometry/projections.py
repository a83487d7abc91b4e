"""Concept space: point clouds of hidden states, PCA/UMAP projections, spread measures, probes.

A :class:`PointCloud` holds one ``[n_points, width]`` matrix per layer plus per-point labels
and hover text. It comes from a labelled prompt set captured on the fly
(:func:`prompt_cloud`) or from a sample of an activation store (:func:`store_cloud`).

Projections: :func:`project` (PCA, or PCA to 50 dimensions then UMAP) and
:func:`procrustes_align` (rotate/scale one layer's projection onto the previous one so points
move smoothly while scrubbing). UMAP compiles with numba on first use (25-60 s);
:func:`warm_up_umap` does that in a background thread.

Spread and geometry per layer (Reliable Measures of Spread in High Dimensional Latent Spaces;
Mu & Viswanath's isotropy): :func:`average_cosine`, :func:`isotropy_partition`,
:func:`pca_variance_fraction`, :func:`effective_rank`, and for multilingual sets
:func:`translation_similarity`. Linear probes per layer: :func:`probe_by_layer`.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.core.capture import capture, pad_batch
from engine.core.errors import UserError
from engine.core.fileio import atomic_write

POSITION_MODES = ("last", "all", "mean")
METHODS = ("pca", "umap")
MIN_UMAP_POINTS = 10
Progress = Callable[[float, str], None]


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


def _token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def prompt_cloud(lm, pset, site: str = "resid_post", positions: str = "last", layers="all",
                 batch_size: int = 64, progress: Progress | None = None) -> PointCloud:
    """Embed every text of a :class:`~engine.data.corpora.PromptSet` and pool its tokens per ``positions``.

    ``last``: the last token of each text; ``mean``: mean over the text's tokens (special prefix
    such as BOS excluded); ``all``: every token except the special prefix, one point each (labels
    ``token`` and ``position`` are added).
    """
    from engine.data.store import normalize_layers, special_prefix

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
        acts = captured[site].float().cpu()  # [L, B, T, d]
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
        if progress:
            progress(min((start + len(batch)) / len(encoded), 1.0), f"embedded {start + len(batch)} of {len(encoded)}")
    vectors = {layer: torch.cat(parts).numpy().astype(np.float32) for layer, parts in per_layer.items()}
    labels.update(extra)
    return PointCloud(pset.name, site, layer_list, vectors, labels, hover, list(range(len(hover))))


def store_cloud(store, site: str | None = None, layers: Sequence[int] | None = None, max_points: int = 5000,
                seed: int = 0, tokenizer=None, progress: Progress | None = None) -> PointCloud:
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
        if progress:
            progress((k + 1) / len(layer_list), f"read layer {layer}")
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
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X - X.mean(0, keepdims=True)


def pca(X: np.ndarray, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centred PCA: ``(coordinates [n, k], explained variance ratio [k])`` (randomized when large)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    k = max(1, min(n_components, X.shape[0], X.shape[1]))
    solver = "randomized" if min(X.shape) > 3 * k and X.shape[0] * X.shape[1] > 2_000_000 else "full"
    model = PCA(n_components=k, svd_solver=solver, random_state=seed)
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

    settings = {"n_components": n_components, "n_neighbors": max(2, min(n_neighbors, n - 1)), "min_dist": min_dist,
                "n_epochs": n_epochs or (500 if n < 10_000 else 200), "random_state": seed,
                "init": "spectral" if n > n_components + 8 else "random"}
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


def procrustes_align(Y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate (reflections allowed), scale and shift ``Y`` to best match ``reference`` (same points)."""
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
    return (scale * Yc @ rotation + r_mean).astype(np.float32)


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
                umap.UMAP(n_components=2, n_epochs=5, random_state=0).fit_transform(data)
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


# --- spread and geometry ------------------------------------------------------------------
def _as64(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ProjectionError("A spread measure needs a [points, width] matrix with at least 2 points.")
    return X


def average_cosine(X) -> float:
    """Mean cosine similarity over all pairs of distinct points (1 = all parallel, ~0 = isotropic)."""
    X = _as64(X)
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    total = unit.sum(0)
    n = X.shape[0]
    return float((total @ total - n) / (n * (n - 1)))


def isotropy_partition(X) -> float:
    """Mu & Viswanath's I(V) = min_c Z(c) / max_c Z(c), Z(c) = Σ exp(c·v), c over the eigenvectors
    of VᵀV and their negatives (an eigenvector's sign is arbitrary), so 1 = isotropic and → 0 = one
    dominant direction; computed in log space."""
    from scipy.special import logsumexp

    X = _as64(X)
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    scores = X @ Vt.T
    log_z = logsumexp(np.concatenate([scores, -scores], axis=1), axis=0)
    return float(np.exp(log_z.min() - log_z.max()))


def _centered_singular_values(X) -> np.ndarray:
    X = _as64(X)
    return np.linalg.svd(X - X.mean(0), compute_uv=False)


def pca_components_for_variance(X, fraction: float = 0.9) -> int:
    """How many principal components explain ``fraction`` of the (centred) variance."""
    var = _centered_singular_values(X) ** 2
    if var.sum() <= 0:
        return 0
    cumulative = np.cumsum(var) / var.sum()
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def pca_variance_fraction(X, fraction: float = 0.9) -> float:
    """Components needed for ``fraction`` of the variance, divided by the most there can be
    (min(n - 1, width)): ~``fraction`` for isotropic data, ~0 for low-rank data."""
    X = _as64(X)
    return pca_components_for_variance(X, fraction) / max(1, min(X.shape[0] - 1, X.shape[1]))


def effective_rank(X) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values
    (centred data); 1 for rank-1 data, ≈ width for isotropic data."""
    s = _centered_singular_values(X)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def translation_similarity(X, concepts: Sequence[str], languages: Sequence[str], center: bool = True,
                           max_points: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Mean cosine similarity of (same concept, different language) pairs and of (different concept,
    different language) pairs. Centring first removes the direction all hidden states share."""
    X = _as64(X)
    concepts, languages = np.asarray(concepts), np.asarray(languages)
    if len(concepts) != X.shape[0] or len(languages) != X.shape[0]:
        raise ProjectionError("Concept and language labels must have one entry per point.")
    if X.shape[0] > max_points:
        pick = np.random.default_rng(seed).choice(X.shape[0], max_points, replace=False)
        X, concepts, languages = X[pick], concepts[pick], languages[pick]
    if center:
        X = X - X.mean(0)
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    other_language = languages[:, None] != languages[None, :]
    same = (concepts[:, None] == concepts[None, :]) & other_language
    diff = (concepts[:, None] != concepts[None, :]) & other_language
    if not same.any() or not diff.any():
        raise ProjectionError("Translation similarity needs the same concepts in at least two languages.")
    return float(sims[same].mean()), float(sims[diff].mean())


SPREAD_MEASURES = {
    "average cosine": average_cosine,
    "isotropy I(V)": isotropy_partition,
    "PCA: fraction of dims for 90% variance": pca_variance_fraction,
    "effective rank": effective_rank,
}


def geometry_by_layer(cloud: PointCloud, concept_label: str | None = None, language_label: str | None = None,
                      progress: Progress | None = None) -> dict:
    """Every spread measure per layer, plus translation similarity when both labels are given.

    Returns ``{"layers": [...], "measures": {name: [value per layer]}}``.
    """
    measures: dict[str, list[float]] = {name: [] for name in SPREAD_MEASURES}
    both = concept_label and language_label
    if both:
        measures["cosine: same concept, other language"] = []
        measures["cosine: other concept, other language"] = []
    for k, layer in enumerate(cloud.layers):
        X = cloud.at(layer)
        for name, fn in SPREAD_MEASURES.items():
            measures[name].append(fn(X))
        if both:
            same, diff = translation_similarity(X, cloud.label(concept_label), cloud.label(language_label))
            measures["cosine: same concept, other language"].append(same)
            measures["cosine: other concept, other language"].append(diff)
        if progress:
            progress((k + 1) / len(cloud.layers), f"layer {layer}")
    return {"layers": list(cloud.layers), "n_points": cloud.n_points, "measures": measures}


# --- probes -------------------------------------------------------------------------------
@dataclass
class ProbeCurve:
    label: str
    layers: list[int]
    accuracy: list[float]
    chance: float
    n_classes: int
    n_points: int
    folds: int
    first_layer_at_90: int | None  # first layer reaching 90% of the best accuracy

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _probe_data(y: Sequence[str], folds: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep classes with ≥ 2 members; returns (kept mask, integer labels, number of folds)."""
    values, inverse, counts = np.unique(np.asarray(y, dtype=str), return_inverse=True, return_counts=True)
    if len(values) < 2:
        raise ProjectionError(f"The label has a single class ('{values[0] if len(values) else ''}'); a probe needs "
                              "at least two classes.")
    keep = counts[inverse] >= 2
    kept_classes = int((counts >= 2).sum())
    if kept_classes < 2:
        raise ProjectionError("No two classes of this label have at least two points each; choose another label.")
    n_splits = int(max(2, min(folds, counts[counts >= 2].min())))
    return keep, inverse[keep], n_splits


def _fit_softmax(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 100):
    """Multinomial logistic regression (mean cross-entropy + ``l2``·‖W‖²), full-batch L-BFGS."""
    weight = torch.zeros(X.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_accuracy(X, y: Sequence[str], folds: int = 5, seed: int = 0, max_dims: int = 64, l2: float | None = None
                   ) -> tuple[float, float]:
    """Cross-validated accuracy of a logistic-regression probe, and the chance (majority-class) rate.

    Inside each fold the features are standardised and, when wider than ``max_dims``, reduced by
    PCA fitted on the training part; the probe is a multinomial logistic regression with an L2
    penalty (``l2``, default 1/(2·n_train), like scikit-learn's C=1) fitted by L-BFGS. Classes
    with a single point are left out; folds shrink to the size of the smallest remaining class.
    """
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X, dtype=np.float32)
    keep, labels, n_splits = _probe_data(y, folds)
    X = X[keep]
    _, labels = np.unique(labels, return_inverse=True)
    n_classes = int(labels.max() + 1)
    correct = 0
    splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    with torch.no_grad():
        data, target = torch.from_numpy(X), torch.from_numpy(labels).long()
    for train, test in splitter.split(X, labels):
        train_x, test_x = data[train], data[test]
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        if train_x.shape[1] > max_dims:
            _, _, basis = torch.linalg.svd(train_x, full_matrices=False)
            basis = basis[:max_dims].T
            train_x, test_x = train_x @ basis, test_x @ basis
        weight, bias = _fit_softmax(train_x, target[train], n_classes, l2 if l2 is not None else 1 / (2 * len(train)))
        correct += int(((test_x @ weight + bias).argmax(1) == target[test]).sum())
    chance = float(np.bincount(labels).max() / len(labels))
    return correct / len(labels), chance


def probe_by_layer(cloud: PointCloud, label: str, folds: int = 5, seed: int = 0,
                   progress: Progress | None = None) -> ProbeCurve:
    """Probe accuracy per layer for one label ("concept depth")."""
    y = cloud.label(label)
    keep, labels, n_splits = _probe_data(y, folds)
    accuracy, chance = [], 0.0
    for k, layer in enumerate(cloud.layers):
        acc, chance = probe_accuracy(cloud.at(layer), y, folds=folds, seed=seed)
        accuracy.append(acc)
        if progress:
            progress((k + 1) / len(cloud.layers), f"probe at layer {layer}: {acc:.2f}")
    best = max(accuracy)
    first = next((layer for layer, acc in zip(cloud.layers, accuracy) if acc >= 0.9 * best), None)
    return ProbeCurve(label, list(cloud.layers), accuracy, chance, len(np.unique(labels)), int(keep.sum()),
                      n_splits, first)
