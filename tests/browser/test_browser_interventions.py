"""End to end in Debian's Chromium: the interventions page's patching heatmap on a tiny random model."""
from __future__ import annotations

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]


def test_patching_heatmap_in_a_real_browser():
    require_browser()
    with streamlit_server("tiny:llama") as url, browser_page(height=1400) as page:
        page.goto(url + "/intervene")
        wait_idle(page)
        page.get_by_role("tab", name="Patching sweep").click()
        page.wait_for_timeout(500)
        chart = page.locator(".js-plotly-plot").filter(has_text="after patching").first
        chart.wait_for(timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        texts = "els => els.map(e => e.textContent)"
        rows = chart.locator(".ytick text").evaluate_all(texts)
        assert rows == ["0", "1", "2"]  # tiny Llama: three layers
        cols = chart.locator(".xtick text").evaluate_all(texts)
        assert len(cols) == len("The capital of France is") + 1  # byte tokens + BOS
        bar = chart.locator(".colorbar text").evaluate_all(texts)
        assert any(t.startswith("target") for t in bar) and any(t.startswith("source") for t in bar)
        OUTPUT.mkdir(exist_ok=True)
        chart.scroll_into_view_if_needed()
        chart.screenshot(path=str(OUTPUT / "interventions-patching.png"))
        page.screenshot(path=str(OUTPUT / "interventions-page.png"), full_page=True)
