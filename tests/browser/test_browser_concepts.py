"""End to end in Debian's Chromium: the concept-space view draws a UMAP of a prompt set."""
from __future__ import annotations

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]


def test_concept_view_draws_a_umap(tmp_path, monkeypatch):
    require_browser()
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path))  # a fresh projection cache: UMAP really runs
    with streamlit_server("tiny:llama") as url, browser_page(height=1400) as page:
        page.goto(url + "/concept-space")
        wait_idle(page)
        assert page.get_by_text("Page not found").count() == 0  # a deep link as the first request
        page.wait_for_selector(".js-plotly-plot .scatterlayer", timeout=120_000)
        page.locator("[data-testid='stSelectbox']").filter(has_text="Prompt set").first.click()
        page.get_by_role("option").filter(has_text="months").first.click()  # 84 points: a quick UMAP
        page.wait_for_timeout(500)
        wait_idle(page)
        page.get_by_text("UMAP", exact=True).click()
        page.wait_for_timeout(500)
        wait_idle(page, timeout_ms=480_000)  # the first UMAP in a process compiles (numba), 25-60 s idle
        page.wait_for_function(  # on a busy machine the rerun may start after wait_idle has looked
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(e => e.textContent.includes('UMAP'))",
            timeout=480_000)
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        title = page.locator(".js-plotly-plot .gtitle").first.text_content()
        assert "UMAP" in title, title
        assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 84
        assert "concept_method=umap" in page.url and "concept_set=months" in page.url  # the view is in the link
        page.screenshot(path=str(OUTPUT / "concepts-umap-tiny.png"), full_page=True)
    assert len(list((tmp_path / "projections").glob("umap-*.npy"))) == 1  # kept for the next server
