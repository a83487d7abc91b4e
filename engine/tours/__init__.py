"""Guided tours that reproduce the papers' findings live, on the loaded model.

Each tour is ``run_<tour>(lm, **try_this) -> TourResult`` (:mod:`engine.tours.base`); :data:`TOURS` lists them
in teaching order with their one "try this" control, and :func:`parse_params` turns strings (query
parameters) into checked keyword arguments. Nothing here imports Streamlit.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.data.prompt_sets import LANGUAGES
from engine.tours.base import Check, TourError, TourResult, TourStep
from engine.tours.concepts import HARDER, run_concept_depth, run_semantic_hub
from engine.tours.features import run_feature
from engine.tours.language import SOURCE_IN, SOURCE_OUT, run_latent_english, run_tongue_thought
from engine.tours.lenses import TEXTS, run_lens_comparison, tuned_lens_job_spec
from engine.tours.points import CLOUD_SETS
from engine.tours.shape import run_circular, run_spread

__all__ = ["Check", "TOURS", "Tour", "TourError", "TourResult", "TourStep", "default_params", "disk_inputs",
           "parse_params", "run_tour", "tuned_lens_job_spec"]


@dataclass(frozen=True)
class Param:
    """One "try this" setting: ``kind`` is ``choice``, ``bool``, ``layer`` (0..n_layers-1) or ``int``."""

    name: str
    label: str
    kind: str
    default: object = None
    choices: tuple = ()
    lo: int = 0
    hi: int = 0


@dataclass(frozen=True)
class Tour:
    key: str
    title: str
    run: Callable[..., TourResult]
    params: tuple[Param, ...] = field(default_factory=tuple)


_LANGS = tuple(LANGUAGES)
TOURS: dict[str, Tour] = {tour.key: tour for tour in (
    Tour("latent_english", "1 · Do Llamas work in English?", run_latent_english,
         (Param("source", "Source language", "choice", "fr", _LANGS),
          Param("target", "Target language", "choice", "zh", _LANGS))),
    Tour("semantic_hub", "2 · A semantic hub", run_semantic_hub,
         (Param("centre", "Centre the hidden states first", "bool", True),)),
    Tour("lens_comparison", "3 · Logit lens vs tuned lens", run_lens_comparison,
         (Param("text", "Text", "choice", "prose", tuple(TEXTS)),)),
    Tour("concept_depth", "4 · Concept depth", run_concept_depth,
         (Param("harder", "Harder concept", "choice", "continent", tuple(HARDER)),)),
    Tour("spread", "5 · Measures of spread", run_spread,
         (Param("points", "Point set", "choice", "concepts", CLOUD_SETS),)),
    Tour("circular", "6 · Circular features", run_circular,
         (Param("layer", "Layer", "layer", None),)),
    Tour("tongue_thought", "7 · Tongue vs thought", run_tongue_thought,
         (Param("target_out", "Output language of the target prompt", "choice", "zh",
                tuple(c for c in _LANGS if c not in (SOURCE_IN, SOURCE_OUT))),)),
    Tour("features", "8 · One SAE feature, end to end", run_feature,
         (Param("rank", "Feature rank by the rule", "int", 0, lo=0, hi=20),)),
)}


def default_params(key: str, n_layers: int) -> dict:
    tour = _tour(key)
    return {p.name: (n_layers // 2 if p.kind == "layer" and p.default is None else p.default) for p in tour.params}


def _tour(key: str) -> Tour:
    if key not in TOURS:
        raise TourError(f"Unknown tour '{key}'; choose from {', '.join(TOURS)}.")
    return TOURS[key]


def _coerce(param: Param, raw: object, n_layers: int) -> object:
    if param.kind == "choice":
        if str(raw) not in param.choices:
            raise TourError(f"'{raw}' is not a choice for {param.label.lower()}; choose from {', '.join(param.choices)}.")
        return str(raw)
    if param.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() not in ("true", "false", "1", "0"):
            raise TourError(f"{param.label} must be true or false, not '{raw}'.")
        return str(raw).lower() in ("true", "1")
    try:
        value = int(str(raw))
    except ValueError:
        raise TourError(f"{param.label} must be a whole number, not '{raw}'.") from None
    lo, hi = (0, n_layers - 1) if param.kind == "layer" else (param.lo, param.hi)
    if not lo <= value <= hi:
        raise TourError(f"{param.label} must be between {lo} and {hi}, not {value}.")
    return value


def parse_params(key: str, raw: Mapping[str, object], n_layers: int) -> dict:
    """The tour's keyword arguments from ``raw`` (strings from a URL are fine); missing ones take defaults."""
    tour = _tour(key)
    out = default_params(key, n_layers)
    for param in tour.params:
        if param.name in raw and raw[param.name] not in (None, ""):
            out[param.name] = _coerce(param, raw[param.name], n_layers)
    return out


def run_tour(lm, key: str, **params) -> TourResult:
    """Run one tour with checked parameters."""
    tour = _tour(key)
    return tour.run(lm, **parse_params(key, params, lm.n_layers))


def disk_inputs(lm, key: str) -> str:
    """What a tour reads from disk besides the model (tuned lenses, dashboards), as a string that changes when
    those files do: part of a UI cache key, so a lens or dashboard built later is picked up."""
    from pathlib import Path

    if key == "lens_comparison":
        from engine.lens.tuned import list_lenses

        return ";".join(f"{p}@{Path(p).stat().st_mtime_ns}" for p in list_lenses(lm))
    if key == "features":
        from engine.features.read import list_dashboards

        return ";".join(f"{e['path']}@{e['mtime']}" for e in list_dashboards(weights_hash=lm.weights_hash)[:1])
    return ""
