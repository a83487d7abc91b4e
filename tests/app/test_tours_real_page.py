"""AppTest: every tour on the Tours page, on Gemma 3 270M (the embedded default model), as a student opens it.

Each tour runs through the page with its default setting: no exception or error, every step's text shown, and
every measured figure in the page's checks table finite and inside its valid range. Whether a tour matches its
paper is a property of the model and is not asserted, except for the latent-English tour, whose effect is
documented for this model (ARCHITECTURE.md: English ahead in the upper-middle layers for fr→zh).
"""
from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

from engine.tours import TOURS

pytestmark = pytest.mark.real_model
PAGE = "../../pages/tours.py"
CHECK_COLUMNS = {"measured", "n", "min", "max", "valid range", "ok"}


@pytest.fixture(autouse=True)
def _gemma(monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "gemma-3-270m")


@pytest.mark.parametrize("key", list(TOURS))
def test_every_step_of_the_tour_runs_on_gemma(key, request):
    if key == "features":
        request.getfixturevalue("gemma_dashboard")  # the tour reads the newest Gemma dashboard; a fresh cache has none
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.query_params["tour"] = key
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="tour_choice").value == key
    steps = [m.value for m in at.markdown if m.value.startswith("**") and ". " in m.value[:6]]
    assert len(steps) >= 3 and all(len(s) > 40 for s in steps), steps  # every step, with its measured text
    checks = [d.value for d in at.dataframe if CHECK_COLUMNS <= set(d.value.columns)]
    assert len(checks) == 1 and len(checks[0]) > 0, "the page shows no checks table"
    table = checks[0]
    assert table["n"].min() > 0
    assert all(math.isfinite(float(v)) for v in list(table["min"]) + list(table["max"]))
    assert table["ok"].all(), table[~table["ok"]].to_dict("records")
    badge = next(m.value for m in at.markdown if m.value.startswith("### "))
    print(f"\n{key}: {badge}")
    if key == "latent_english":
        assert "matches the paper" in badge
