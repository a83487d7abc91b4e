"""End to end in Chromium: saved links reproduce the features page's view in a fresh browser, and the feature
page's "Download HTML" file renders offline (network refused: only file: requests go through)."""
from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import OUTPUT, browser_page, feature_dashboard, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def fixture_dashboard(tmp_path_factory):
    require_browser()
    cache = tmp_path_factory.mktemp("cache")
    out, live = feature_dashboard(cache)
    return cache, out.name, live


def _fresh(browser, width: int = 1500, height: int = 2000, **options):
    """A page in a new browser context: no cookies, no storage, no session shared with another page."""
    context = browser.new_context(viewport={"width": width, "height": height}, **options)
    return context, context.new_page()


def _open_offline(browser, path: Path):
    """Open a local HTML file with every non-file request refused; returns (context, page, requests seen)."""
    context, page = _fresh(browser, 1300, 1600, offline=True)
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                  else route.abort())
    page.goto(path.as_uri())
    return context, page, seen


def test_saved_links_and_offline_export(fixture_dashboard, monkeypatch):
    cache, dashboard, live = fixture_dashboard
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # the server inherits it
    OUTPUT.mkdir(exist_ok=True)
    with streamlit_server("tiny:llama") as url, browser_page() as first:
        browser = first.context.browser
        # a saved link to the feature list, with its filters, in a fresh browser
        context, page = _fresh(browser)
        page.goto(f"{url}/sae-features?dashboard={dashboard}&feature={live}&tab=list&q=o&sort=max_act&order=asc")
        wait_idle(page)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.get_by_role("tab", name="Feature list").get_attribute("aria-selected") == "true"
        assert page.get_by_label("Search tokens and logits").input_value() == "o"
        assert "order=asc" in page.url and "sort=max_act" in page.url and "tab=list" in page.url
        context.close()

        # a saved link to a feature page: feature N's page, then its HTML download
        context, page = _fresh(browser)
        page.goto(f"{url}/sae-features?dashboard={dashboard}&feature={live}&tab=feature")
        wait_idle(page)
        page.get_by_text(f"Feature #{live}").first.wait_for(timeout=60_000)
        assert page.get_by_role("tab", name="Feature", exact=True).get_attribute("aria-selected") == "true"
        page.locator(".le-context").first.wait_for(timeout=60_000)  # the highlighted top contexts
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="Download HTML").click()
        exported = OUTPUT / f"feature-{live}-export.html"
        download.value.save_as(exported)
        assert download.value.suggested_filename == f"feature-{live}-{dashboard}.html"
        context.close()

        context, page, seen = _open_offline(browser, exported)
        page.wait_for_selector(".plotly svg.main-svg", timeout=30_000)  # Plotly ran from the inlined bundle
        assert page.locator(".plotly .bars path").count() >= 1  # the histogram's bars were drawn
        tokens = page.locator(".le-context .le-tok")
        assert tokens.count() >= 3 and tokens.first.is_visible()
        assert page.get_by_text(f"Feature #{live}").first.is_visible()
        assert page.locator("table").count() >= 3  # logit table, top activations, neighbours, ...
        page.screenshot(path=str(OUTPUT / "feature-export-offline.png"), full_page=True)
        outside = [u for u in seen if not u.startswith(("file:", "data:", "blob:", "about:"))]
        assert not outside, outside
        context.close()
    size = exported.stat().st_size
    assert 4_000_000 < size < 8_000_000, size  # Plotly's bundle (about 4.8 MB) and the page's data
