"""Tours on the shape of hidden states: measures of spread, and circular features (days, months)."""
from __future__ import annotations

import numpy as np

from engine.data.corpora import PromptSet
from engine.data.prompt_sets import DAYS, MONTHS
from engine.geometry.spread import SPREAD_MEASURES
from engine.tours.base import (
    TourError,
    TourResult,
    TourStep,
    bands_text,
    cosine,
    layer_bands,
    nonnegative,
    probability,
    single_threaded,
    timed,
    within,
)
from engine.tours.points import CLOUD_SETS, cloud_of, named_set

SPREAD_PAPER = "Marbut et al. (2023), Reliable Measures of Spread in High Dimensional Latent Spaces"
CIRCLE_PAPER = "Engels et al. (2024), Not All Language Model Features Are Linear"

# sign that makes "bigger = more spread out" for every measure
ORIENTATION = {"average cosine": -1.0, "isotropy I(V)": 1.0, "PCA: fraction of dims for 90% variance": 1.0,
               "effective rank": 1.0}
OLD = ("average cosine", "isotropy I(V)")
RECOMMENDED = ("PCA: fraction of dims for 90% variance", "effective rank")


def rank_correlation(a, b) -> float:
    """Spearman's rho (average ranks for ties); 0 when either series is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


# --- tour 5: measures of spread ---------------------------------------------------------------
def _shift_demo(X: np.ndarray) -> dict[str, list[float]]:
    """Every measure on X, on X with its mean removed (a shift) and on X scaled to unit mean norm: neither
    changes how spread out the points are relative to each other."""
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(0)
    scaled = X / max(float(np.linalg.norm(X, axis=1).mean()), 1e-30)
    return {name: [float(fn(X)), float(fn(centred)), float(fn(scaled))] for name, fn in SPREAD_MEASURES.items()}


@timed
def run_spread(lm, points: str = "concepts") -> TourResult:
    """Average cosine and I(V) against the PCA- and entropy-based measures, per layer, on one point set."""
    if points not in CLOUD_SETS:
        raise TourError(f"Unknown point set '{points}'; choose from {', '.join(CLOUD_SETS)}.")
    cloud = cloud_of(lm, named_set(points))
    layers = list(cloud.layers)
    with single_threaded():
        values = {name: [float(fn(cloud.at(layer))) for layer in layers] for name, fn in SPREAD_MEASURES.items()}
        shift = _shift_demo(cloud.at(layers[len(layers) // 2]))
    oriented = {name: ORIENTATION[name] * np.asarray(v) for name, v in values.items()}
    rho = {(a, b): rank_correlation(oriented[a], oriented[b]) for a in values for b in values if a < b}

    def r(a: str, b: str) -> float:
        return rho[(min(a, b), max(a, b))]

    agree = r(*RECOMMENDED)
    old_vs = {old: float(np.mean([r(old, rec) for rec in RECOMMENDED])) for old in OLD}
    steps_cos, steps_rank = np.diff(oriented["average cosine"]), np.diff(oriented["effective rank"])
    opposite = list(np.sign(steps_cos) * np.sign(steps_rank) < 0)
    bands = layer_bands([f"{a}→{b}" for a, b in zip(layers[:-1], layers[1:])], opposite)
    middle = layers[len(layers) // 2]
    matches = agree > max(old_vs.values())
    reason = (f"across layers the two recommended measures rank the layers alike (Spearman {agree:.2f}) while "
              f"average cosine and I(V) track them {'less' if matches else 'as well or better'} "
              f"({old_vs[OLD[0]]:.2f} and {old_vs[OLD[1]]:.2f}).")
    cos0, cos1, _ = shift["average cosine"]
    iv0, iv1, iv2 = shift["isotropy I(V)"]
    er0, er1, er2 = shift["effective rank"]
    steps = [
        TourStep("The experiment",
                 f"{cloud.n_points} points ({cloud.name}), last-token hidden states at every layer. Four measures of "
                 "how spread out they are: average cosine and the isotropy score I(V) (older), the fraction of "
                 "principal components needed for 90 % of the variance and the effective rank (recommended).",
                 "measures"),
        TourStep("Where they disagree",
                 f"Read so that up means more spread, average cosine and effective rank move in opposite directions "
                 f"in {int(sum(opposite))} of {len(opposite)} layer steps ({bands_text(bands)}). Rank correlation "
                 f"across layers: PCA vs effective rank {agree:.2f}; average cosine vs the recommended pair "
                 f"{old_vs[OLD[0]]:.2f}; I(V) vs them {old_vs[OLD[1]]:.2f}.", "measures"),
        TourStep("Why",
                 f"At layer {middle}, subtracting the points' mean (a shift that leaves their spread alone) moves "
                 f"average cosine from {cos0:.3f} to {cos1:.3f} and I(V) from {iv0:.3g} to {iv1:.3g}; scaling them "
                 f"to unit mean norm moves I(V) to {iv2:.3g}. The effective rank stays at {er0:.2f} → {er1:.2f} → "
                 f"{er2:.2f}: the older measures also measure the offset and the scale."
                 + (" (An I(V) of exactly 0 is an underflow: with long vectors one direction's exp(c·v) swamps "
                    "the others.)" if min(iv0, iv1) == 0.0 else ""), "shift"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Does not match the paper: ") + reason
                 + " Try this: another point set."),
    ]
    max_rank = float(min(cloud.n_points, cloud.at(layers[0]).shape[1]))
    return TourResult(
        "spread", "Measures of spread", SPREAD_PAPER, lm.name, {"points": points}, steps,
        figures={"measures": {"kind": "spread", "layers": layers, "measures": values, "disagree": [list(b) for b in bands]},
                 "shift": {"kind": "shift_table", "layer": middle, "rows": [
                     {"measure": name, "as captured": v[0], "mean removed": v[1], "unit mean norm": v[2]}
                     for name, v in shift.items()]}},
        checks=[cosine("average cosine", values["average cosine"] + shift["average cosine"]),
                probability("isotropy I(V)", values["isotropy I(V)"] + shift["isotropy I(V)"]),
                probability("PCA fraction", values[RECOMMENDED[0]]),
                within("effective rank", values["effective rank"], 0.0, max_rank),
                within("rank correlations", list(rho.values()), -1.0, 1.0)],
        matches_paper=matches, reason=reason,
        measured={"rho_recommended": agree, "rho_average_cosine": old_vs[OLD[0]], "rho_isotropy": old_vs[OLD[1]],
                  "opposite_steps": int(sum(opposite)), "steps": len(opposite), "shift_layer": middle,
                  "shift": shift})


# --- tour 6: circular features ----------------------------------------------------------------
DAY_TEMPLATES = ("See you on {}", "The shop is closed on {}", "It happened last {}", "My favourite day is {}",
                 "The meeting was moved to {}", "We always go swimming on {}")
MONTH_TEMPLATES = ("My birthday is in {}", "It snowed heavily in {}", "The report is due in {}",
                   "We travelled to Spain in {}", "The festival takes place every {}", "School starts again in {}")
CYCLES = {"days": (DAYS["en"], DAY_TEMPLATES), "months": (MONTHS["en"], MONTH_TEMPLATES)}


def cyclic_order_score(angles: np.ndarray) -> float:
    """Fraction of items whose two neighbours in angle order are their two cyclic neighbours (i-1, i+1 mod n)."""
    n = len(angles)
    order = np.argsort(angles)
    position = np.empty(n, dtype=int)
    position[order] = np.arange(n)
    hits = 0
    for item in range(n):
        around = {int(order[(position[item] - 1) % n]), int(order[(position[item] + 1) % n])}
        hits += around == {(item - 1) % n, (item + 1) % n}
    return hits / n


def chance_p_value(score: float, n: int, trials: int = 4000, seed: int = 0) -> float:
    """P(a random arrangement of n items scores at least ``score``), Monte Carlo with a fixed seed."""
    rng = np.random.default_rng(seed)
    scores = np.array([cyclic_order_score(rng.permutation(n).astype(float)) for _ in range(trials)])
    return float(((scores >= score - 1e-12).sum() + 1) / (trials + 1))


def p_text(p: float) -> str:
    """``= 0.012`` or ``< 0.001`` (a Monte Carlo p-value is never exactly 0)."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def project_means(X: np.ndarray, item: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-2 principal components of the per-item means: (means [n, 2], points [N, 2], variance share of the two)."""
    means = np.stack([X[item == i].mean(0) for i in range(n)])
    centre = means.mean(0)
    _, s, vt = np.linalg.svd(means - centre, full_matrices=False)
    share = float((s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-30))
    return (means - centre) @ vt[:2].T, (X - centre) @ vt[:2].T, share


def _cycle(lm, name: str, layer: int) -> dict:
    words, templates = CYCLES[name]
    texts = [t.format(w) for w in words for t in templates]
    item = np.repeat(np.arange(len(words)), len(templates))
    cloud = cloud_of(lm, PromptSet(name, name, texts, {"item": [str(i) for i in item]}))
    scores = []
    with single_threaded():
        for at in cloud.layers:
            means, _, _ = project_means(cloud.at(at).astype(np.float64), item, len(words))
            scores.append(cyclic_order_score(np.arctan2(means[:, 1], means[:, 0])))
        means, pts, share = project_means(cloud.at(layer).astype(np.float64), item, len(words))
    score = scores[cloud.layers.index(layer)]
    return {"items": list(words), "means": means.tolist(), "points": pts.tolist(), "point_item": item.tolist(),
            "share": share, "score": score, "p": chance_p_value(score, len(words)), "scores": scores,
            "layers": list(cloud.layers), "chance": 2 / ((len(words) - 1) * (len(words) - 2))}


@timed
def run_circular(lm, layer: int | None = None) -> TourResult:
    """Days and months on the top-2 principal components of their (context-averaged) hidden states at ``layer``."""
    layer = lm.n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < lm.n_layers:
        raise TourError(f"Layer {layer} does not exist; this model has layers 0–{lm.n_layers - 1}.")
    found = {name: _cycle(lm, name, layer) for name in CYCLES}
    days, months = found["days"], found["months"]
    circular = {name: f["p"] < 0.05 for name, f in found.items()}
    matches = all(circular.values())
    best = {name: f["layers"][int(np.argmax(f["scores"]))] for name, f in found.items()}
    reason = (f"at layer {layer} the angle order of days scores {days['score']:.2f} (p {p_text(days['p'])}) and of "
              f"months {months['score']:.2f} (p {p_text(months['p'])}) against random arrangements"
              + ("; both run around the circle more than chance." if matches else
                 f"; {' and '.join(n for n, c in circular.items() if not c) or 'neither'} not beyond chance."))
    steps = [
        TourStep("The experiment",
                 f"Each day and month in {len(DAY_TEMPLATES)} sentences; at layer {layer} we average its hidden states "
                 "over the sentences and project the averages on their top two principal components. Score: the "
                 "share of items whose two neighbours around the origin are the day or month before and after it.",
                 "cycles"),
        TourStep("What this model does",
                 f"Days: score {days['score']:.2f} (a random arrangement averages {days['chance']:.3f}; p "
                 f"{p_text(days['p'])}), the two components hold {100 * days['share']:.0f} % of the variance of the "
                 f"averages. Months: score {months['score']:.2f} (random {months['chance']:.3f}; p "
                 f"{p_text(months['p'])}), {100 * months['share']:.0f} %. Highest score: days "
                 f"{max(days['scores']):.2f} (first at layer {best['days']}), months {max(months['scores']):.2f} (first "
                 f"at layer {best['months']}); a perfect "
                 f"circle at {sum(v == 1.0 for v in days['scores'])} (days) and "
                 f"{sum(v == 1.0 for v in months['scores'])} (months) of the {len(days['scores'])} layers.", "scores"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Not clearly like the paper: ") + reason
                 + " Try this: another layer."),
    ]
    return TourResult(
        "circular", "Circular features", CIRCLE_PAPER, lm.name, {"layer": layer}, steps,
        figures={"cycles": {"kind": "cycles", "layer": layer, "sets": {n: {k: f[k] for k in (
                    "items", "means", "points", "point_item", "score")} for n, f in found.items()}},
                 "scores": {"kind": "cycle_scores", "layers": days["layers"], "chosen": layer,
                            "curves": {n: f["scores"] for n, f in found.items()},
                            "chance": {n: f["chance"] for n, f in found.items()}}},
        checks=[probability("order score per layer, days", days["scores"]),
                probability("order score per layer, months", months["scores"]),
                probability("p-values", [days["p"], months["p"]]),
                probability("variance share of the 2 components", [days["share"], months["share"]]),
                nonnegative("chance scores", [days["chance"], months["chance"]], 1.0)],
        matches_paper=matches, reason=reason,
        measured={"layer": layer, **{f"{n}_score": f["score"] for n, f in found.items()},
                  **{f"{n}_p": f["p"] for n, f in found.items()}, **{f"{n}_best_layer": best[n] for n in found},
                  **{f"{n}_best_score": max(f["scores"]) for n, f in found.items()}})
