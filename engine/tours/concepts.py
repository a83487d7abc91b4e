"""Tours on concept geometry: the semantic hub and concept depth.

Points are the last-token hidden states of bare words (a concept in seven languages, or countries and
capitals), captured once per tour with :func:`engine.geometry.projections.prompt_cloud`.
"""
from __future__ import annotations

import numpy as np

from engine.data.corpora import prompt_set
from engine.geometry.probes import probe_accuracy
from engine.geometry.spread import translation_similarity
from engine.tours.base import (
    TourError,
    TourResult,
    TourStep,
    accuracy,
    band_around,
    cosine,
    first_reaching,
    single_threaded,
    timed,
)
from engine.tours.points import cloud_of, concepts_set

HUB_PAPER = "Wu et al. (2024), The Semantic Hub Hypothesis: Language Models Share Semantic Representations " \
            "Across Languages and Modalities"
DEPTH_PAPER = "Jin et al. (2024), Exploring Concept Depth: How Large Language Models Acquire Knowledge at " \
              "Different Layers?"


# --- tour 2: the semantic hub -----------------------------------------------------------------
def _hub_verdict(layers: list[int], gap: np.ndarray, peak: int) -> tuple[bool, str]:
    n = len(layers)
    inner = 0 < peak < n - 1 and gap[peak] > gap[0] and gap[peak] > gap[-1]
    if inner:
        return True, (f"translations are closest, relative to other concepts, at layer {layers[peak]} of "
                      f"0–{layers[-1]}, above both the first ({gap[0]:.3f}) and the last layer ({gap[-1]:.3f}).")
    where = "first" if peak == 0 else "last" if peak == n - 1 else "a middle"
    return False, f"the translation gap peaks at the {where} layer ({layers[peak]}), not in a middle band."


@timed
def run_semantic_hub(lm, centre: bool = True, n_concepts: int = 40) -> TourResult:
    """Per layer, mean cosine of (same concept, other language) pairs vs (other concept, other language) pairs."""
    pset = concepts_set(n_concepts)
    cloud = cloud_of(lm, pset)
    concepts, languages = cloud.label("concept"), cloud.label("language")
    same, other = [], []
    with single_threaded():
        for layer in cloud.layers:
            s, d = translation_similarity(cloud.at(layer), concepts, languages, center=centre)
            same.append(s)
            other.append(d)
    same_a, other_a = np.asarray(same), np.asarray(other)
    gap = same_a - other_a
    peak = int(gap.argmax())
    lo, hi = band_around(gap, peak, 0.9) if gap[peak] > 0 else (peak, peak)
    layers = list(cloud.layers)
    matches, reason = _hub_verdict(layers, gap, peak)
    kind = "centred cosine" if centre else "raw (uncentred) cosine"
    steps = [
        TourStep("The experiment",
                 f"{n_concepts} concepts, each as a bare word in 7 languages ({cloud.n_points} points). At every "
                 f"layer we take the last token's hidden state and compare the {kind} of translations (same concept, "
                 "other language) with that of unrelated pairs (other concept, other language).", "hub"),
        TourStep("What this model does",
                 f"Translations are closest relative to other concepts at layer {layers[peak]}: {same_a[peak]:.3f} vs "
                 f"{other_a[peak]:.3f} (gap {gap[peak]:.3f}); the gap stays within 90 % of that over layers "
                 f"{layers[lo]}–{layers[hi]}. At layer {layers[0]} the gap is {gap[0]:.3f}, at layer {layers[-1]} "
                 f"{gap[-1]:.3f}.", "hub"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Does not match the paper: ") + reason
                 + (" Try this: switch centring off and watch every pair look alike (the shared direction "
                    "dominates raw cosines)." if centre else " Try this: switch centring back on.")),
    ]
    return TourResult(
        "semantic_hub", "A semantic hub", HUB_PAPER, lm.name, {"centre": centre, "n_concepts": n_concepts}, steps,
        figures={"hub": {"kind": "hub", "layers": layers, "same": same, "other": other, "band": [layers[lo], layers[hi]],
                         "measure": kind}},
        checks=[cosine("same concept, other language", same), cosine("other concept, other language", other)],
        matches_paper=matches, reason=reason,
        measured={"peak_layer": layers[peak], "band": [layers[lo], layers[hi]], "same_at_peak": float(same_a[peak]),
                  "other_at_peak": float(other_a[peak]), "gap_at_peak": float(gap[peak]),
                  "gap_first": float(gap[0]), "gap_last": float(gap[-1])})


# --- tour 4: concept depth --------------------------------------------------------------------
HARDER = {
    "continent": "the continent of a country or of its capital (world knowledge, 6 classes)",
    "category": "the semantic category of a word (12 classes: animal, body, food, …), in 7 languages",
}


def _curve(cloud, label: str, group: str) -> tuple[list[float], float]:
    y, groups = cloud.label(label), cloud.label(group)
    with single_threaded():
        scores = [probe_accuracy(cloud.at(layer), y, folds=5, groups=groups) for layer in cloud.layers]
    return [acc for acc, _ in scores], scores[0][1]


def _depth_verdict(simple_at: int, harder_at: int, harder_best: float, harder_chance: float, harder: str
                   ) -> tuple[bool | None, str]:
    if harder_best < harder_chance + 0.1:
        return None, (f"the probe for {harder} never gets 10 points above chance (best {harder_best:.2f}, chance "
                      f"{harder_chance:.2f}), so its depth cannot be read.")
    if simple_at < harder_at:
        return True, (f"the simple concept (language) is readable from layer {simple_at}, the harder one ({harder}) "
                      f"only from layer {harder_at}.")
    if simple_at == harder_at:
        return False, f"both concepts reach 90 % of their best at the same layer ({simple_at})."
    return False, f"the harder concept ({harder}) reaches 90 % of its best earlier ({harder_at}) than language " \
                  f"({simple_at})."


@timed
def run_concept_depth(lm, harder: str = "continent", n_concepts: int = 48) -> TourResult:
    """Layer-wise linear-probe accuracy, folds grouped by concept, for language (simple) and ``harder``."""
    if harder not in HARDER:
        raise TourError(f"Unknown concept '{harder}'; choose from {', '.join(HARDER)}.")
    words = cloud_of(lm, concepts_set(n_concepts))
    layers = list(words.layers)
    simple, simple_chance = _curve(words, "language", "concept")
    if harder == "category":
        hard, hard_chance, hard_points = *_curve(words, "category", "concept"), words.n_points
    else:
        countries = cloud_of(lm, prompt_set("countries"))
        hard, hard_chance, hard_points = *_curve(countries, "continent", "country"), countries.n_points
    simple_at, hard_at = first_reaching(layers, simple), first_reaching(layers, hard)
    matches, reason = _depth_verdict(simple_at, hard_at, max(hard), hard_chance, harder)
    steps = [
        TourStep("The experiment",
                 f"A linear probe per layer reads two concepts from last-token hidden states: the language of a word "
                 f"(simple; {words.n_points} words of {n_concepts} concepts) and {HARDER[harder]} ({hard_points} "
                 "points). Folds are grouped: a probe is never tested on a concept (or country) it saw in training.",
                 "depth"),
        TourStep("What this model does",
                 f"Language: best accuracy {max(simple):.2f} (chance {simple_chance:.2f}), 90 % of it from layer "
                 f"{simple_at}. {harder.capitalize()}: best {max(hard):.2f} at layer {layers[int(np.argmax(hard))]} "
                 f"(chance {hard_chance:.2f}), 90 % of it from layer {hard_at}.", "depth"),
        TourStep("Verdict", {True: "Matches the paper: ", False: "Does not match the paper: ",
                             None: "Cannot tell: "}[matches] + reason
                 + " Try this: the other harder concept."),
    ]
    curves = [{"label": "language (simple)", "accuracy": simple, "chance": simple_chance, "first_at_90": simple_at},
              {"label": f"{harder} (harder)", "accuracy": hard, "chance": hard_chance, "first_at_90": hard_at}]
    return TourResult(
        "concept_depth", "Concept depth", DEPTH_PAPER, lm.name, {"harder": harder, "n_concepts": n_concepts}, steps,
        figures={"depth": {"kind": "probe_curves", "layers": layers, "curves": curves}},
        checks=[accuracy("language probe accuracy", simple), accuracy(f"{harder} probe accuracy", hard),
                accuracy("chance rates", [simple_chance, hard_chance])],
        matches_paper=matches, reason=reason,
        measured={"simple_first_at_90": simple_at, "harder_first_at_90": hard_at, "simple_best": max(simple),
                  "harder_best": max(hard), "harder_chance": hard_chance, "simple_chance": simple_chance})
