"""Small labelled prompt sets for the geometry tours, sized for a 2-core CPU, and their point clouds."""
from __future__ import annotations

from collections.abc import Sequence

from engine.data import prompt_sets as ps
from engine.data.corpora import PromptSet, prompt_set
from engine.geometry.projections import PointCloud, prompt_cloud
from engine.tours.base import TourError

CLOUD_SETS = ("concepts", "days", "months", "numbers", "countries")


def concept_subset(n: int) -> list[dict]:
    """``n`` concepts taken round-robin over the categories (so every category is represented), in a fixed order."""
    by_category: dict[str, list[dict]] = {}
    for concept in ps.CONCEPTS:
        by_category.setdefault(concept["category"], []).append(concept)
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < min(n, len(ps.CONCEPTS)):
        for members in by_category.values():
            if depth < len(members) and len(chosen) < n:
                chosen.append(members[depth])
        depth += 1
    return chosen


def concepts_set(n: int, languages: Sequence[str] | None = None) -> PromptSet:
    """The bare words of ``n`` concepts in every language (labels: language, concept, category)."""
    codes = list(languages or ps.LANGUAGES)
    texts, language, concept, category = [], [], [], []
    for entry in concept_subset(n):
        for code in codes:
            texts.append(entry[code])
            language.append(code)
            concept.append(entry["concept"])
            category.append(entry["category"])
    return PromptSet(f"concepts-{n}", f"{n} concepts in {len(codes)} languages", texts,
                     {"language": language, "concept": concept, "category": category},
                     default_color="category", default_probe="category", concept_label="concept")


def named_set(name: str, n_concepts: int = 40) -> PromptSet:
    """A prompt set by name; ``concepts`` is cut to ``n_concepts`` concepts (all seven languages)."""
    if name not in CLOUD_SETS:
        raise TourError(f"Unknown point set '{name}'; choose from {', '.join(CLOUD_SETS)}.")
    return concepts_set(n_concepts) if name == "concepts" else prompt_set(name)


def cloud_of(lm, pset: PromptSet, layers="all") -> PointCloud:
    """Last-token residual stream (``resid_post``) of every text, at every layer asked for."""
    return prompt_cloud(lm, pset, site="resid_post", positions="last", layers=layers)
