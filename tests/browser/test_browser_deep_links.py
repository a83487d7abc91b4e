"""Every page's URL path (app.PAGES) opened in a fresh browser: the page itself, no "Page not found", no error.
The first page is the default one, served at /; its own path (/lens-view) forwards there with the link's state."""
from __future__ import annotations

import importlib.util
from urllib.parse import parse_qs, urlparse

import pytest
from browser_util import IDLE, ROOT, browser_page, require_browser, streamlit_server

pytestmark = [pytest.mark.browser]


def _pages() -> list[tuple[str, str, str, str]]:
    spec = importlib.util.spec_from_file_location("latent_explorer_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines PAGES; main() runs only under Streamlit
    return module.PAGES


def _open_fresh(page, url: str):
    """A new browser context (no cookies, no session) on ``url``, once its script has run."""
    fresh = page.context.browser.new_context(viewport={"width": 1400, "height": 1200}).new_page()
    fresh.goto(url)
    fresh.wait_for_selector("h1", timeout=180_000)
    fresh.wait_for_timeout(500)
    fresh.wait_for_selector(IDLE, timeout=180_000)
    return fresh


def test_every_page_path_opens_its_page_in_a_fresh_browser():
    require_browser()
    pages = _pages()
    with streamlit_server("tiny:llama") as url, browser_page() as page:
        for _, title, _, path in pages:  # the first one is the fresh server's first request
            fresh = _open_fresh(page, f"{url}/{path}")
            heading = fresh.locator("h1").first.inner_text()
            assert heading.startswith(title), (path, heading)
            assert fresh.get_by_text("Page not found").count() == 0, path
            assert fresh.locator("[data-testid='stException']").count() == 0, path
            fresh.context.close()

        lens_path = pages[0][3]
        fresh = _open_fresh(page, f"{url}/{lens_path}?lens_prompt=Rome+is+the+capital+of&lens_topk=5")
        fresh.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
        assert fresh.get_by_text("Page not found").count() == 0
        assert urlparse(fresh.url).path == "/", fresh.url  # forwarded to the default page's address
        query = parse_qs(urlparse(fresh.url).query)
        assert query["lens_prompt"] == ["Rome is the capital of"] and query["lens_topk"] == ["5"], fresh.url
        assert fresh.get_by_role("textbox", name="Prompt").input_value() == "Rome is the capital of"
        active = fresh.locator("[data-testid='stSidebarNav'] a[aria-current='page']").all_inner_texts()
        assert len(active) == 1 and active[0].strip().endswith(pages[0][1]), active
        fresh.context.close()
