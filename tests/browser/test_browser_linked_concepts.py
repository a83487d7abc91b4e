"""End to end in Chromium: a concept-space link with a placed token and a selection opens the star, the selection and
its two panels (lens of the mean, features with links to their pages); a new box selection replaces it in the URL."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from browser_util import browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]
SHOTS = Path("/tmp/latent-explorer-shots")


def _selection(url: str) -> list[int] | None:
    from engine.core import shares

    sid = parse_qs(urlparse(url).query).get("s_concept_sel")
    return shares.get(sid[0]) if sid else None


def test_a_link_with_a_token_and_a_selection(tmp_path, monkeypatch):
    require_browser()
    from tests.app.test_features_page import build_feature_fixture

    cache = tmp_path / "cache"
    build_feature_fixture(cache)
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # the server (and shares.get here) use it
    view = {"model": "tiny:llama", "concept_set": "days", "concept_layer": "1", "concept_point_prompt": "Wednesday",
            "concept_point_pos": "-1", "concept_sel": json.dumps([0, 7, 14, 21])}
    SHOTS.mkdir(exist_ok=True)
    with streamlit_server("tiny:llama") as url, browser_page(height=2600) as page:
        page.goto(f"{url}/concept-space?{urlencode(view)}")
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=120_000)
        page.get_by_text("Features most active on them").first.wait_for(timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.locator("[data-testid='stAlertContentError']").count() == 0
        legend = page.locator(".js-plotly-plot .legend .legendtext").evaluate_all("els => els.map(e => e.textContent)")
        assert "★ your token 'y' (position 9)" in legend, legend
        assert page.get_by_text("4 selected points", exact=True).count() == 1
        assert _selection(page.url) == [0, 7, 14, 21]  # the link now carries the selection as a share
        feature_links = page.locator("a[href*='sae-features?']")
        assert feature_links.count() >= 1 and "dashboard=tiny-sae-dash" in feature_links.first.get_attribute("href")
        lens = page.locator(".js-plotly-plot").filter(has_text="Logit lens of the mean of 4")
        assert lens.count() == 1
        page.screenshot(path=str(SHOTS / "linked-concepts-link.png"), full_page=True)

        # a box drawn on the chart replaces the link's selection (and the URL follows)
        before = parse_qs(urlparse(page.url).query)["s_concept_sel"][0]
        area = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
        page.mouse.move(area["x"] + 100, area["y"] + 100)  # the mode bar shows on hover
        page.wait_for_timeout(500)
        page.locator(".js-plotly-plot .modebar-btn[data-val='select']").first.click()  # box select
        page.wait_for_timeout(300)
        x0, y0 = area["x"] + area["width"] * 0.05, area["y"] + area["height"] * 0.05
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + area["width"] * 0.45, y0 + area["height"] * 0.9, steps=12)
        page.mouse.up()
        page.wait_for_timeout(1500)
        wait_idle(page)
        page.wait_for_function(f"() => !location.search.includes('{before}')", timeout=60_000)
        wait_idle(page)
        chosen = _selection(page.url)
        assert chosen and chosen != [0, 7, 14, 21], chosen
        assert page.get_by_text(f"{len(chosen)} selected points", exact=True).count() == 1
        page.get_by_text("Features most active on them").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "linked-concepts-box.png"), full_page=True)
