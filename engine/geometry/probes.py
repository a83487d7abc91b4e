"""Linear probes per layer ("concept depth"): from which layer on can a label be read out linearly?

Cross-validation is grouped when the points come in groups that share more than the label, e.g. the
same concept in seven languages: all translations of a concept fall in the same fold
(scikit-learn's ``GroupKFold``), so a probe is never tested on a translation of a concept it was
trained on. Otherwise a probe for "category" could simply recognise the concept from its other
translations and look deep where it is not. The ungrouped (stratified) figure is kept in
:attr:`ProbeCurve.ungrouped_accuracy` for comparison only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.core.progress import Progress, report
from engine.geometry.projections import PointCloud, ProjectionError


@dataclass
class ProbeCurve:
    label: str
    layers: list[int]
    accuracy: list[float]                # per layer; grouped by ``grouped_by`` when that is set
    chance: float
    n_classes: int
    n_points: int
    folds: int
    first_layer_at_90: int | None        # first layer reaching 90% of the best accuracy
    grouped_by: str | None = None        # label whose groups never straddle a train/test split
    ungrouped_accuracy: list[float] | None = None  # comparison only: stratified folds that ignore the groups

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _probe_data(y: Sequence[str], folds: int, groups: Sequence[str] | None = None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep classes with ≥ 2 members; returns (kept mask, integer labels, number of folds)."""
    values, inverse, counts = np.unique(np.asarray(y, dtype=str), return_inverse=True, return_counts=True)
    if len(values) < 2:
        raise ProjectionError(f"The label has a single class ('{values[0] if len(values) else ''}'); a probe needs "
                              "at least two classes.")
    keep = counts[inverse] >= 2
    kept_classes = int((counts >= 2).sum())
    if kept_classes < 2:
        raise ProjectionError("No two classes of this label have at least two points each; choose another label.")
    if groups is None:
        n_splits = int(max(2, min(folds, counts[counts >= 2].min())))
    else:
        n_groups = len(np.unique(np.asarray(groups, dtype=str)[keep]))
        if n_groups < 2:
            raise ProjectionError("Grouped cross-validation needs at least two groups; every point is in one.")
        n_splits = int(max(2, min(folds, n_groups)))
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


def probe_accuracy(X, y: Sequence[str], folds: int = 5, seed: int = 0, max_dims: int = 64, l2: float | None = None,
                   groups: Sequence[str] | None = None) -> tuple[float, float]:
    """Cross-validated accuracy of a logistic-regression probe on ``X [points, width]``, and the chance
    (majority-class) rate.

    Inside each fold the features are standardised and, when wider than ``max_dims``, reduced by
    PCA fitted on the training part; the probe is a multinomial logistic regression with an L2
    penalty (``l2``, default 1/(2·n_train), like scikit-learn's C=1) fitted by L-BFGS. Classes
    with a single point are left out. Without ``groups`` the folds are stratified (and shrink to the
    size of the smallest remaining class); with ``groups`` (one group name per point) they are
    ``GroupKFold`` folds: no group is ever split between training and testing.
    """
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    X = np.asarray(X, dtype=np.float32)
    keep, labels, n_splits = _probe_data(y, folds, groups)
    X = X[keep]
    _, labels = np.unique(labels, return_inverse=True)
    n_classes = int(labels.max() + 1)
    if groups is None:
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, labels)
    else:
        splits = GroupKFold(n_splits).split(X, labels, np.asarray(groups, dtype=str)[keep])
    correct = 0
    with torch.no_grad():
        data, target = torch.from_numpy(X), torch.from_numpy(labels).long()
    for train, test in splits:
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


def probe_by_layer(cloud: PointCloud, label: str, folds: int = 5, seed: int = 0, progress: Progress | None = None,
                   group_label: str | None = None) -> ProbeCurve:
    """Probe accuracy per layer for one label ("concept depth").

    With ``group_label`` (e.g. ``"concept"`` for a multilingual prompt set) the folds are grouped by it and
    the ungrouped accuracy is added for comparison; a group label equal to ``label`` is ignored (a probe
    cannot name a class it never saw).
    """
    y = cloud.label(label)
    grouped_by = group_label if group_label and group_label != label else None
    groups = cloud.label(grouped_by) if grouped_by else None
    keep, labels, n_splits = _probe_data(y, folds, groups)
    accuracy, ungrouped, chance = [], [], 0.0
    for k, layer in enumerate(cloud.layers):
        acc, chance = probe_accuracy(cloud.at(layer), y, folds=folds, seed=seed, groups=groups)
        accuracy.append(acc)
        if groups is not None:
            ungrouped.append(probe_accuracy(cloud.at(layer), y, folds=folds, seed=seed)[0])
        report(progress, (k + 1) / len(cloud.layers), f"probe at layer {layer}: {acc:.2f}")
    best = max(accuracy)
    first = next((layer for layer, acc in zip(cloud.layers, accuracy) if acc >= 0.9 * best), None)
    return ProbeCurve(label, list(cloud.layers), accuracy, chance, len(np.unique(labels)), int(keep.sum()),
                      n_splits, first, grouped_by, ungrouped if groups is not None else None)
