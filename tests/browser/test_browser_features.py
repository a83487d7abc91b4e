"""End to end in Chromium: open an SAE feature page by link (?sae=...&feature=N), follow a co-occurring feature
(the URL follows), and save a screenshot."""
from __future__ import annotations

import re

import pytest
from browser_util import OUTPUT, browser_page, feature_dashboard, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]


def test_feature_page_by_link(tmp_path, monkeypatch):
    require_browser()
    from engine.features.read import Dashboard

    cache = tmp_path / "cache"
    out, live = feature_dashboard(cache)
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # the server inherits it
    with streamlit_server("tiny:llama") as url, browser_page() as page:
        # a deep link is the very first request of a fresh server: no "Page not found" flash
        page.goto(f"{url}/sae-features?sae=tiny-sae&feature={live}")
        wait_idle(page)
        assert page.get_by_text("Page not found").count() == 0
        page.get_by_text(f"Feature #{live}").first.wait_for(timeout=60_000)
        contexts = page.locator(".le-context")
        assert contexts.count() >= 1
        token = page.locator(".le-tok").first
        assert ":" in (token.get_attribute("title") or "")  # hover shows the activation value
        assert page.locator("[data-testid='stException']").count() == 0
        partners = Dashboard.open(out).feature(live)["cooccurring"]
        assert len(partners)  # the co-occurring features are buttons that open their pages
        page.get_by_text("Fires together with").first.wait_for(timeout=30_000)
        other = int(partners["other"].iloc[0])
        page.get_by_role("button", name=f"#{other} ·").first.click()
        page.get_by_text(f"Feature #{other}").first.wait_for(timeout=60_000)
        page.wait_for_url(re.compile(rf"[?&]feature={other}(&|$)"), timeout=30_000)  # the link follows the view
        assert "dashboard=tiny-sae-dash" in page.url
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "features-tiny-feature-page.png"), full_page=True)
