"""Spread and geometry of a point cloud per layer.

Reliable Measures of Spread in High Dimensional Latent Spaces and Mu & Viswanath's isotropy:
:func:`average_cosine`, :func:`isotropy_partition`, :func:`pca_variance_fraction`, :func:`effective_rank`;
for multilingual prompt sets :func:`translation_similarity`. :func:`geometry_by_layer` computes them all.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.core.progress import Progress, report
from engine.geometry.projections import PointCloud, ProjectionError


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
        report(progress, (k + 1) / len(cloud.layers), f"layer {layer}")
    return {"layers": list(cloud.layers), "n_points": cloud.n_points, "measures": measures}
