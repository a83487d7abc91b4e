"""AppTest: walking a tour one step at a time on a tiny random model: Previous / Next, the step in the URL, a bad
step in a link, another tour restarting the walk."""
from __future__ import annotations

import pytest
import torch
from streamlit.testing.v1 import AppTest

PAGE = "../../pages/tours.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _open(query: dict) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def _steps_shown(at) -> list[int]:
    return [int(m.value[2:].split(".")[0]) for m in at.markdown if m.value[:2] == "**" and m.value[2:3].isdigit()]


def _url_step(at) -> str | None:
    value = at.query_params.get("tour_step")
    return value[0] if isinstance(value, list) else value


def test_walk_with_previous_and_next():
    at = _open({"tour": "circular"})
    assert _steps_shown(at) == [1, 2, 3]  # the overview: every step at once
    assert at.button(key="tour_prev").disabled and not at.button(key="tour_next").disabled
    seen = []
    for expected in (1, 2, 3):
        at.button(key="tour_next").click().run()
        assert not at.exception, at.exception
        assert _steps_shown(at) == [expected]
        assert at.radio(key="tour_step").value == expected and _url_step(at) == str(expected)
        assert any(f"step {expected} of 3" in m.value for m in at.markdown)
        seen.append(len(at.get("plotly_chart")))
    assert seen == [1, 1, 0]  # the step's own figure only; the verdict has none
    assert at.button(key="tour_next").disabled
    at.button(key="tour_prev").click().run()
    assert _steps_shown(at) == [2] and _url_step(at) == "2"
    at.radio(key="tour_step").set_value(0).run()  # back to the overview: the URL drops the default
    assert _steps_shown(at) == [1, 2, 3] and _url_step(at) is None


def test_step_from_the_link_and_another_tour():
    at = _open({"tour": "spread", "tour_step": "4", "t_points": "days"})
    assert _steps_shown(at) == [4] and at.radio(key="tour_step").value == 4
    at.selectbox(key="tour_choice").set_value("circular").run()  # three steps: the walk starts again
    assert not at.exception, at.exception
    assert _steps_shown(at) == [1] and _url_step(at) == "1"

    at = _open({"tour": "circular", "tour_step": "9"})  # past the last step: the last one
    assert _steps_shown(at) == [3] and _url_step(at) == "3"


def test_a_bad_step_in_the_link_says_so():
    at = _open({"tour": "circular", "tour_step": "two"})
    assert at.warning and "tour_step" in at.warning[0].value
    assert _steps_shown(at) == [1, 2, 3]
