"""End to end in Debian's Chromium: the interventions page on a tiny random model (the patching heatmap, and a
saved link that opens the same view in a fresh browser)."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]
TEXTS = "els => els.map(e => e.textContent)"


def _sweep_chart(page):
    chart = page.locator(".js-plotly-plot").filter(has_text="after patching").first
    chart.wait_for(timeout=120_000)
    return chart


def _view(page) -> dict:
    """What the open view shows: the selected tab, the sweep chart's title and axes, the intervention list."""
    chart = _sweep_chart(page)
    return {"tab": page.locator("[role='tab'][aria-selected='true']").first.text_content(),
            "title": chart.locator(".gtitle").first.text_content(),
            "xtitle": chart.locator(".xtitle").first.text_content(),
            "rows": chart.locator(".ytick text").evaluate_all(TEXTS),
            "cols": chart.locator(".xtick text").evaluate_all(TEXTS),
            "interventions": page.locator("[data-testid='stCode']").evaluate_all(TEXTS)}


def _settled(page, wanted: str) -> None:
    """Wait until the URL holds ``wanted`` (the run after a click has written its state) and the run is over."""
    page.wait_for_function("w => window.location.search.includes(w)", arg=wanted, timeout=180_000)
    wait_idle(page)


def test_patching_heatmap_in_a_real_browser():
    require_browser()
    with streamlit_server("tiny:llama") as url, browser_page(height=1400) as page:
        page.goto(url + "/intervene")
        wait_idle(page)
        page.get_by_role("tab", name="Patching sweep").click()
        page.wait_for_timeout(500)
        wait_idle(page)
        chart = _sweep_chart(page)
        assert page.locator("[data-testid='stException']").count() == 0
        rows = chart.locator(".ytick text").evaluate_all(TEXTS)
        assert rows == ["0", "1", "2"]  # tiny Llama: three layers
        cols = chart.locator(".xtick text").evaluate_all(TEXTS)
        assert len(cols) == len("The capital of France is") + 1  # byte tokens + BOS
        bar = chart.locator(".colorbar text").evaluate_all(TEXTS)
        assert any(t.startswith("target") for t in bar) and any(t.startswith("source") for t in bar)
        OUTPUT.mkdir(exist_ok=True)
        chart.scroll_into_view_if_needed()
        chart.screenshot(path=str(OUTPUT / "interventions-patching.png"))
        page.screenshot(path=str(OUTPUT / "interventions-page.png"), full_page=True)

        # tongue vs thought: the title and the legend do not overlap
        page.get_by_role("tab", name="Tongue vs thought").click()
        _settled(page, "iv_tab=Tongue+vs+thought")
        tongue = page.locator(".js-plotly-plot").filter(has_text="target prompt without patching").first
        tongue.wait_for(timeout=120_000)
        title, legend = tongue.locator(".gtitle").first.bounding_box(), tongue.locator(".legend").first.bounding_box()
        apart = (title["x"] + title["width"] <= legend["x"] or legend["x"] + legend["width"] <= title["x"]
                 or title["y"] + title["height"] <= legend["y"] or legend["y"] + legend["height"] <= title["y"])
        assert apart, (title, legend)
        tongue.scroll_into_view_if_needed()
        tongue.screenshot(path=str(OUTPUT / "interventions-tongue.png"))


def test_a_saved_link_opens_the_same_view_in_a_fresh_browser():
    require_browser()
    with streamlit_server("tiny:llama") as url:
        with browser_page(height=1600) as page:
            page.goto(url + "/intervene")
            wait_idle(page)
            page.get_by_role("tab", name="Patching sweep").click()
            _settled(page, "iv_tab=Patching+sweep")
            page.get_by_text("source layer → target layer (last token)").click()
            _settled(page, "sweep_kind=layer_layer")
            token = page.get_by_label("Token", exact=True)
            token.fill(" Rome")
            token.press("Enter")
            _settled(page, "sweep_token=+Rome")
            link = page.url
            before = _view(page)
        query = parse_qs(urlparse(link).query)
        assert query["iv_tab"] == ["Patching sweep"] and query["sweep_kind"] == ["layer_layer"], link
        assert query["sweep_token"] == [" Rome"] and len(query["s_iv_specs"][0]) == 16, link
        assert before["xtitle"] == "source layer" and "Rome" in before["title"], before

        with browser_page(height=1600) as fresh:  # a new browser: no session, no cookies, only the link
            fresh.goto(link)
            wait_idle(fresh)
            after = _view(fresh)
            assert fresh.locator("[data-testid='stException']").count() == 0
            assert after == before, (after, before)
            OUTPUT.mkdir(exist_ok=True)
            fresh.screenshot(path=str(OUTPUT / "interventions-from-link.png"), full_page=True)
