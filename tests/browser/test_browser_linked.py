"""End to end in Chromium: a lens link with ``lens_feature`` (what "Show on my prompt" makes) draws the feature's
activation strip above the heatmap and its decoder reading per layer; the screenshot is saved for a look."""
from __future__ import annotations

from urllib.parse import urlencode

import pytest
from browser_util import OUTPUT, browser_page, feature_dashboard, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]
TEXTS = "els => els.map(e => e.textContent)"


def test_a_lens_link_draws_the_feature_over_the_lens(tmp_path, monkeypatch):
    require_browser()
    cache = tmp_path / "cache"
    out, live = feature_dashboard(cache)
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # the server inherits it
    view = {"model": "tiny:llama", "lens_prompt": "the quick brown fox", "lens_feature": f"{out.name}:{live}"}
    with streamlit_server("tiny:llama") as url, browser_page(height=1900) as page:
        page.goto(f"{url}/?{urlencode(view)}")
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
        page.get_by_text("Its decoder direction through the lens").first.wait_for(timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.locator("[data-testid='stAlertContentError']").count() == 0
        heatmap = page.locator(".js-plotly-plot").first
        assert heatmap.locator(".y2tick text").evaluate_all(TEXTS) == [f"#{live}"]  # the strip's row label
        strip = heatmap.locator(".heatmaplayer .hm").nth(1)  # the second heatmap trace: the strip
        box, grid = strip.bounding_box(), heatmap.locator(".heatmaplayer .hm").first.bounding_box()
        assert box["height"] > 10 and box["y"] + box["height"] <= grid["y"]  # drawn, and above the grid
        assert abs(box["x"] - grid["x"]) < 2 and abs(box["width"] - grid["width"]) < 2  # the same columns
        assert f"lens_feature={out.name}%3A{live}" in page.url  # still in the link
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "linked-lens-feature.png"), full_page=True)
        page.screenshot(path="/tmp/linked-lens-feature.png", full_page=True)
