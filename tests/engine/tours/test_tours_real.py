"""Every tour on Gemma 3 270M (the embedded default model): runs, and every measured figure is in range.

Loads the model once for the module. Whether each tour matches its paper is recorded, not asserted (that
is a property of the model); the latent-English tour is the exception, its effect is documented for this
model (ARCHITECTURE.md: English ahead in the upper-middle layers for fr→zh).
"""
from __future__ import annotations

import math

import pytest

from engine.tours import TOURS, run_tour

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from engine.core.models import load_model

    return load_model("gemma-3-270m")


@pytest.mark.parametrize("key", list(TOURS))
def test_tour_on_gemma(gemma, key, request):
    if key == "features":
        request.getfixturevalue("gemma_dashboard")  # the tour reads the newest Gemma dashboard; a fresh cache has none
    result = run_tour(gemma, key)
    assert result.checks_ok, result.failed_checks()
    assert all(math.isfinite(v) for check in result.checks for v in check.values)
    assert result.steps and result.reason
    assert len(result.steps) >= 3, [step.title for step in result.steps]  # a real walk, not the "nothing to show" step
    print(f"\n{key}: {result.seconds:.1f} s · matches_paper={result.matches_paper} · {result.reason}")
    if key == "latent_english":
        assert result.matches_paper is True
        assert result.measured["items"] >= 40
