"""End to end in Chromium on Gemma 3 270M: a student walks the whole "Circular features" tour with the page's own
Previous / Next controls, changes its "try this" setting (the layer) once, and at every step the step's measured
figure is on screen as a finite number, the same number in the text, the figure and the run's download, with no
error box. One screenshot per step goes to TOUR_SHOTS (default /tmp/tour-shots); the link then reopens the same
step in a fresh browser.

The circular tour is the quickest of the eight on a 2-core CPU (14 s against 31 s for measures of spread and 37 s
for the semantic hub, measured with the model loaded).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
from browser_util import IDLE, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.real_model, pytest.mark.slow]

MODEL = "gemma-3-270m"
SHOTS = Path(os.environ.get("TOUR_SHOTS", "/tmp/tour-shots"))
NUM = r"(-?\d+(?:\.\d+)?|nan|inf)"
# where each step shows its measured figure: the days' and months' circular-order scores
STEP_FIGURES = {
    "The experiment": ("figure", rf"days · score {NUM}", rf"months · score {NUM}"),
    "What this model does": ("text", rf"Days: score {NUM}", rf"Months: score {NUM}"),
    "Verdict": ("text", rf"days scores {NUM}", rf"months {NUM}"),
}


def _settle(page, timeout_ms: int = 600_000) -> None:
    """The script has run and stays idle for a second (a rerun queued by a URL write is waited for too)."""
    deadline = time.monotonic() + timeout_ms / 1000
    wait_idle(page, timeout_ms)
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        if page.locator(IDLE).count():
            return
        page.wait_for_selector(IDLE, timeout=max(1, int((deadline - time.monotonic()) * 1000)))
    raise TimeoutError("the page kept running")


def _no_error_box(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator(
        "[data-testid='stException']").all_inner_texts()
    errors = page.locator("[data-testid='stAlertContentError']")
    assert errors.count() == 0, errors.all_inner_texts()


def _on_screen(page) -> tuple[int, int]:
    """(step, number of steps) from the page's own "step k of n" line."""
    found = re.search(r"step (\d+) of (\d+)", page.locator("[data-testid='stMain']").inner_text())
    assert found, "no 'step k of n' line"
    return int(found[1]), int(found[2])


def _step_text(page, number: int) -> tuple[str, str]:
    """(title, text) of the step on screen, from its Markdown block ("**k. title**  \\n text")."""
    blocks = page.locator("[data-testid='stMarkdownContainer']").filter(
        has=page.locator("strong", has_text=re.compile(rf"^{number}\. ")))
    assert blocks.count() == 1, f"{blocks.count()} blocks for step {number}"
    title, _, text = blocks.first.inner_text().partition("\n")
    return title.split(". ", 1)[1].strip(), text


def _measured(page, number: int) -> tuple[str, dict[str, float]]:
    """The step's title and its measured scores, read from the page (text or figure), each checked finite."""
    title, text = _step_text(page, number)
    where, *patterns = STEP_FIGURES[title]
    if where == "figure":
        plot = page.locator(".js-plotly-plot").first
        plot.locator(".annotation-text").first.wait_for(timeout=60_000)
        text = " | ".join(plot.locator(".annotation-text, .gtitle").all_text_contents())
    scores = {}
    for name, pattern in zip(("days", "months"), patterns):
        found = re.search(pattern, text)
        assert found, f"step {number} ({title}) shows no {name} score: {text[:300]!r}"
        scores[name] = float(found[1])
        assert math.isfinite(scores[name]) and 0.0 <= scores[name] <= 1.0, (title, name, scores[name])
    return title, scores


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _click(page, label: str, step: int) -> None:
    """Click Previous or Next and wait until ``step`` is on screen and the page is idle."""
    page.get_by_role("button", name=label).click()
    page.get_by_text(re.compile(rf"^step {step} of \d+$")).wait_for(timeout=120_000)
    _settle(page)
    _no_error_box(page)


def _walk(page, layer: int, tag: str) -> list[dict[str, float]]:
    """From step 1 to the last with Next; returns each step's scores. Next is disabled on the last step."""
    seen = []
    while True:
        step, n_steps = _on_screen(page)
        title, scores = _measured(page, step)
        assert f"tour_step={step}" in page.url and f"t_layer={layer}" in page.url, page.url
        _shot(page, f"{tag}-step{step}-{title.replace(' ', '_')}")
        seen.append(scores)
        if step == n_steps:
            assert page.get_by_role("button", name="Next ▶").is_disabled()
            return seen
        _click(page, "Next ▶", step + 1)
        assert _on_screen(page)[0] == step + 1


def _student(page, url: str) -> tuple[str, tuple[str, str]]:
    """The walk, try this and the download; returns the link at the end and the last step's text."""
    page.goto(f"{url}/tours?tour=circular")
    _settle(page)
    _no_error_box(page)
    assert page.get_by_text("Circular features").count() >= 1
    layer_box = page.locator("[data-testid='stNumberInput']").filter(has_text="Layer")
    first = int(layer_box.locator("input").input_value())
    assert first == 9 and f"t_layer={first}" in page.url  # the middle of Gemma 3 270M's 18 layers
    _shot(page, "0-all-steps")

    _click(page, "Next ▶", 1)  # from the overview into the walk
    before = _walk(page, first, f"1-layer{first}")
    assert len(before) == len(STEP_FIGURES)
    assert all(s == before[0] for s in before), before  # text and figure state the same measurement

    for back in range(len(before) - 1, 0, -1):  # Previous back to the first step
        _click(page, "◀ Previous", back)
        assert _on_screen(page)[0] == back
    assert page.get_by_role("button", name="◀ Previous").is_disabled()

    other = first + 6  # try this: a later layer, typed in as a student would
    layer_box.locator("input").fill(str(other))
    layer_box.locator("input").press("Enter")
    page.wait_for_url(re.compile(rf"t_layer={other}(&|$)"), timeout=60_000)
    _settle(page)
    _no_error_box(page)
    assert _on_screen(page)[0] == 1  # the walk stays where it was
    assert f"at layer {other} we average" in _step_text(page, 1)[1]
    title = page.locator(".js-plotly-plot .gtitle").first.text_content()
    assert title == f"layer {other}", title
    after = _walk(page, other, f"2-layer{other}")
    assert all(s == after[0] for s in after), after
    print(f"\ncircular-order scores: layer {first} {before[0]}, layer {other} {after[0]}")

    with page.expect_download(timeout=60_000) as info:  # the run's data says the same
        page.get_by_role("button", name="Download this run (JSON)").click()
    run = json.loads(Path(info.value.path()).read_text())
    assert run["params"] == {"layer": other}
    assert {n: float(f"{run['measured'][f'{n}_score']:.2f}") for n in ("days", "months")} == after[0]
    return page.url, _step_text(page, len(after))


def test_walk_the_circular_tour(monkeypatch):
    require_browser()
    from engine.core.models import load_model

    load_model(MODEL, check=False)  # converts the GGUF once here if needed, so the server only loads safetensors
    monkeypatch.setenv("LATENT_EXPLORER_NO_DEMO", "1")  # no background SAE demo competing for the 2 cores
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with streamlit_server(MODEL, timeout=240) as url:
        with browser_page(width=1400, height=1300) as page:
            link, last = _student(page, url)
        with browser_page(width=1400, height=1300) as fresh:  # a fresh browser opens the same view from the link
            fresh.goto(link)
            _settle(fresh)
            _no_error_box(fresh)
            steps = len(STEP_FIGURES)
            assert _on_screen(fresh) == (steps, steps)
            assert _step_text(fresh, steps) == last
