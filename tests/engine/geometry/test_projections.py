"""Spread measures, probes and projections on synthetic data with known answers; prompt clouds on tiny models."""
from __future__ import annotations

import numpy as np
import pytest

import engine.geometry.probes as PR
import engine.geometry.projections as P
import engine.geometry.spread as S
from engine.data.corpora import PromptSet

RNG = np.random.default_rng(0)
N, D = 2000, 32


@pytest.fixture(scope="module")
def isotropic():
    return np.random.default_rng(1).normal(size=(N, D))


@pytest.fixture(scope="module")
def rank_one():
    rng = np.random.default_rng(2)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    return np.abs(rng.normal(3.0, 1.0, size=(N, 1))) * direction[None, :] * 5


@pytest.fixture(scope="module")
def clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, D)) * 10
    which = rng.integers(0, 4, size=N)
    return centres[which] + rng.normal(size=(N, D)) * 0.01, which


def test_average_cosine(isotropic, rank_one):
    assert abs(S.average_cosine(isotropic)) < 0.02
    assert S.average_cosine(rank_one) == pytest.approx(1.0, abs=1e-9)  # all points on one ray (positive scale)
    pair = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert S.average_cosine(pair) == pytest.approx(0.0)


def test_isotropy_partition(isotropic, rank_one):
    assert S.isotropy_partition(isotropic) > 0.5
    assert S.isotropy_partition(rank_one) < 1e-6
    assert S.isotropy_partition(isotropic) > 100 * S.isotropy_partition(isotropic + 5.0)  # a shared offset


def test_pca_variance_fraction(isotropic, rank_one, clusters):
    X, _ = clusters
    assert S.pca_variance_fraction(isotropic) > 0.75
    assert S.pca_components_for_variance(rank_one) == 1
    assert S.pca_components_for_variance(X) <= 3  # 4 centred clusters span at most 3 directions
    assert S.pca_components_for_variance(isotropic, 0.5) < S.pca_components_for_variance(isotropic, 0.9)


def test_effective_rank(isotropic, rank_one, clusters):
    assert S.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    assert S.effective_rank(isotropic) > 0.9 * D
    assert 1.5 < S.effective_rank(clusters[0]) < 3.5


def test_translation_similarity():
    rng = np.random.default_rng(4)
    concepts, languages = np.repeat(np.arange(20), 5).astype(str), np.tile(np.arange(5), 20).astype(str)
    base = rng.normal(size=(20, D))[concepts.astype(int)]
    aligned = base + 0.3 * rng.normal(size=base.shape)
    same, diff = S.translation_similarity(aligned, concepts, languages)
    assert same > 0.8 and abs(diff) < 0.15
    scrambled = rng.normal(size=base.shape)
    same, diff = S.translation_similarity(scrambled, concepts, languages)
    assert abs(same - diff) < 0.05


def test_probe_near_one_on_separable_and_chance_on_shuffled(clusters):
    X, which = clusters
    X = X[:600] + np.random.default_rng(5).normal(size=(600, D))
    y = which[:600].astype(str)
    acc, chance = PR.probe_accuracy(X, y)
    assert acc > 0.97
    shuffled = np.random.default_rng(6).permutation(y)
    acc, chance = PR.probe_accuracy(X, shuffled)
    assert abs(acc - chance) < 0.12 and chance < 0.4


def test_probe_one_class_is_a_user_error():
    with pytest.raises(P.ProjectionError, match="single class"):
        PR.probe_accuracy(np.zeros((10, 3)), ["a"] * 10)
    with pytest.raises(P.ProjectionError, match="two classes"):
        PR.probe_accuracy(np.zeros((3, 3)), ["a", "b", "c"])


def test_projections_pca_and_procrustes(clusters):
    X, which = clusters
    Y = P.project(X[:300], "pca", 2)
    assert Y.shape == (300, 2)
    # PCA keeps the clusters apart: distance between centroids dwarfs spread within
    c0, c1 = Y[which[:300] == 0].mean(0), Y[which[:300] == 1].mean(0)
    assert np.linalg.norm(c0 - c1) > 10 * Y[which[:300] == 0].std(0).max()
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 3.0 * Y @ rotation + np.array([5.0, -2.0])
    assert np.allclose(P.procrustes_align(moved, Y), Y, atol=1e-3)
    assert P.project(X[:50], "pca", 3).shape == (50, 3)


def test_projection_bad_input():
    with pytest.raises(P.ProjectionError, match="at least 10 points"):
        P.project(np.random.default_rng(0).normal(size=(6, 8)), "umap")
    with pytest.raises(P.ProjectionError, match="infinite"):
        P.project(np.full((20, 4), np.inf), "pca")
    with pytest.raises(P.ProjectionError, match="pca or umap"):
        P.project(np.zeros((20, 4)), "tsne")


def test_umap_gets_pca_reduced_input(monkeypatch):
    """The real UMAP costs 25-60 s of numba compilation (see benchmarks/projections.py); here a stand-in
    records what project() hands it: PCA-50 input, clamped neighbours, explicit epochs and seed."""
    import umap

    seen = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, data):
            seen["shape"] = data.shape
            seen["centred"] = np.allclose(data.mean(0), 0, atol=1e-3)
            return data[:, : seen["n_components"]]

    monkeypatch.setattr(umap, "UMAP", FakeUMAP)
    X = np.random.default_rng(0).normal(size=(40, 80))
    Y = P.project(X, "umap", 3, seed=7)
    assert Y.shape == (40, 3) and seen["shape"] == (40, 39)  # PCA to min(50, n - 1, width) first
    assert seen["n_components"] == 3 and seen["random_state"] == 7 and seen["n_epochs"] == 500
    assert seen["centred"]
    P.project(X[:12, :20], "umap", 2, n_neighbors=15)
    assert seen["shape"] == (12, 11) and seen["n_neighbors"] == 11


def test_prompt_cloud_modes(tiny_llama):
    pset = PromptSet("toy", "", ["dog", "cat sat", "a"], {"kind": ["x", "y", "x"]})
    last = P.prompt_cloud(tiny_llama, pset, positions="last")
    assert last.layers == [0, 1, 2] and last.at(1).shape == (3, 32)
    assert last.labels["kind"] == ["x", "y", "x"] and last.labels["text"] == pset.texts
    every = P.prompt_cloud(tiny_llama, pset, positions="all")
    lengths = [len(t) for t in pset.texts]  # the tiny tokenizer has one token per byte, plus BOS (left out)
    assert every.n_points == sum(lengths)
    assert every.labels["kind"] == ["x"] * 3 + ["y"] * 7 + ["x"]
    # the last token of each text in "all" mode is the "last" point; its mean is the "mean" point
    ends = np.cumsum(lengths) - 1
    assert np.allclose(every.at(2)[ends], last.at(2), atol=1e-4)
    mean = P.prompt_cloud(tiny_llama, pset, positions="mean")
    assert np.allclose(mean.at(0)[1], every.at(0)[3:10].mean(0), atol=1e-4)
    geometry = S.geometry_by_layer(last)
    assert set(geometry["measures"]) == set(S.SPREAD_MEASURES) and len(geometry["layers"]) == 3
    with pytest.raises(P.ProjectionError, match="Layer 7"):
        last.at(7)


def test_umap_results_are_cached_on_disk(monkeypatch, tmp_path):
    """A second identical UMAP request is read from disk; other settings or points, or a damaged file,
    run UMAP again (the stand-in counts runs)."""
    import umap

    runs = []

    class FakeUMAP:
        def __init__(self, **kwargs):
            self.k = kwargs["n_components"]

        def fit_transform(self, data):
            runs.append(data.shape)
            return data[:, : self.k] * 2.0

    monkeypatch.setattr(umap, "UMAP", FakeUMAP)
    X = np.random.default_rng(1).normal(size=(30, 12))
    first = P.project(X, "umap", 2, cache_dir=tmp_path)
    again = P.project(X, "umap", 2, cache_dir=tmp_path)
    assert len(runs) == 1 and np.array_equal(first, again)
    P.project(X, "umap", 2, seed=1, cache_dir=tmp_path)          # another seed
    P.project(X + 1e-3, "umap", 2, cache_dir=tmp_path)           # other points
    P.project(X, "umap", 2, normalize=True, cache_dir=tmp_path)  # other preparation
    assert len(runs) == 4
    files = sorted(tmp_path.glob("umap-*.npy"))
    assert len(files) == 4 and not list(tmp_path.glob(".*.tmp"))
    target = next(f for f in files if np.array_equal(np.load(f), first))
    target.write_bytes(target.read_bytes()[:40])                  # truncated
    assert np.array_equal(P.project(X, "umap", 2, cache_dir=tmp_path), first) and len(runs) == 5
    assert np.array_equal(P.project(X, "umap", 2, cache_dir=tmp_path), first) and len(runs) == 5  # rewritten
    P.project(X, "pca", 2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 4                 # PCA is not cached


def _translations(seed: int = 7, concepts: int = 40, languages: int = 5, categories: int = 4, encoded: float = 0.0):
    """Points = concept vector + language offset + noise; the category is random per concept, so it is
    readable only through the concept's identity, unless ``encoded`` adds a category direction."""
    rng = np.random.default_rng(seed)
    concept_vectors = rng.normal(size=(concepts, D)) * 3
    language_vectors = rng.normal(size=(languages, D))
    category_of = rng.permutation(np.arange(concepts) % categories)
    category_vectors = rng.normal(size=(categories, D))
    X, concept, category = [], [], []
    for k in range(concepts):
        for j in range(languages):
            X.append(concept_vectors[k] + language_vectors[j] + encoded * category_vectors[category_of[k]]
                     + 0.3 * rng.normal(size=D))
            concept.append(f"c{k}")
            category.append(f"cat{category_of[k]}")
    return np.array(X), concept, category


def test_probe_folds_grouped_by_concept_stop_the_leak():
    """Issue 14: with translations of the same concept in training and test, a probe for 'category' scores
    high by recognising the concept; grouped by concept it is at chance, and where the category really is
    encoded, grouping does not hurt."""
    X, concept, category = _translations()
    ungrouped, chance = PR.probe_accuracy(X, category)
    grouped, _ = PR.probe_accuracy(X, category, groups=concept)
    print(f"leaky data: ungrouped {ungrouped:.3f}, grouped {grouped:.3f}, chance {chance:.3f}")
    assert chance == pytest.approx(0.25) and ungrouped > 0.9 and grouped < chance + 0.15
    encoded, _, _ = _translations(encoded=6.0)
    grouped_encoded, _ = PR.probe_accuracy(encoded, category, groups=concept)
    print(f"encoded category: grouped {grouped_encoded:.3f}")
    assert grouped_encoded > 0.9

    cloud = P.PointCloud("toy", "resid_post", [0, 1], {0: X.astype(np.float32), 1: encoded.astype(np.float32)},
                         {"concept": concept, "category": category}, hover=[""] * len(concept))
    curve = PR.probe_by_layer(cloud, "category", group_label="concept")
    assert curve.grouped_by == "concept" and curve.folds == 5
    assert curve.accuracy[0] < 0.4 < 0.9 < curve.ungrouped_accuracy[0] and curve.accuracy[1] > 0.9
    assert curve.first_layer_at_90 == 1
    assert curve.to_json()["ungrouped_accuracy"] == curve.ungrouped_accuracy
    itself = PR.probe_by_layer(cloud, "concept", group_label="concept")  # a label cannot be grouped by itself
    assert itself.grouped_by is None and itself.ungrouped_accuracy is None and itself.accuracy[1] > 0.9
    plain = PR.probe_by_layer(cloud, "category")
    assert plain.grouped_by is None and plain.accuracy == curve.ungrouped_accuracy
    with pytest.raises(P.ProjectionError, match="two groups"):
        PR.probe_accuracy(X, category, groups=["one"] * len(category))
