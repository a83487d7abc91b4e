"""End to end in Debian's Chromium: a saved link opens the same lens view and the same concept projection."""
from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]
TEXTS = "els => els.map(e => e.textContent)"


def _selectbox_text(page, label: str) -> str:
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    return box.inner_text() + " " + " ".join(box.locator("input").evaluate_all("els => els.map(e => e.value)"))


def _click_cell(page, row: int, col: int, rows: int, cols: int) -> None:
    """Click the centre of heatmap cell (row from the bottom, column from the left)."""
    area = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    x = area["x"] + (col + 0.5) * area["width"] / cols
    y = area["y"] + area["height"] - (row + 0.5) * area["height"] / rows
    page.mouse.move(x - 20, y - 20)
    page.mouse.move(x, y, steps=8)
    page.wait_for_timeout(400)
    page.mouse.down()
    page.wait_for_timeout(80)
    page.mouse.up()
    page.wait_for_timeout(1000)
    wait_idle(page)


def test_a_lens_link_opens_the_same_view():
    require_browser()
    view = {"model": "tiny:llama", "lens_prompt": "Rome is the capital of", "lens_metric": "kl",
            "lens_sublayers": "true", "lens_topk": "6", "lens_track": " Italy"}
    with streamlit_server("tiny:llama") as url:
        with browser_page(height=1600) as page:
            page.goto(f"{url}/?{urlencode(view)}")  # the lens is the default page, served at /
            wait_idle(page)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
            assert page.locator("[data-testid='stException']").count() == 0
            heatmap = page.locator(".js-plotly-plot").first
            rows = heatmap.locator(".ytick text").evaluate_all(TEXTS)
            cols = len(heatmap.locator(".xtick text").evaluate_all(TEXTS))
            assert rows[:3] == ["embed", "0.attn", "0"]
            _click_cell(page, row=1, col=4, rows=len(rows), cols=cols)  # 0.attn at position 4
            saved = page.url
            link = parse_qs(urlparse(saved).query)
            assert (link["lens_cell_row"], link["lens_cell_pos"]) == (["0.attn"], ["4"]), saved
        with browser_page(height=1600) as page:  # a fresh browser opens the saved link
            page.goto(saved)
            wait_idle(page)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
            assert page.get_by_role("textbox", name="Prompt").input_value() == view["lens_prompt"]
            assert "KL to final" in _selectbox_text(page, "Colour cells by")
            assert page.locator("[data-testid='stNumberInput'] input").first.input_value() == "6"
            assert "0.attn" in _selectbox_text(page, "Layer")
            assert "4: " in _selectbox_text(page, "Position")
            assert page.locator("[data-testid='stDataFrame']").count() >= 1
            bar = page.locator(".js-plotly-plot").first.locator(".colorbar").first.text_content()
            assert "KL to final" in bar, bar
            tracked = page.locator(".js-plotly-plot").nth(1).locator(".scatterlayer .trace")
            assert tracked.count() == 1  # one connected line for ' Italy'
            page.screenshot(path=str(OUTPUT / "link-lens-tiny.png"), full_page=True)


def test_a_concept_link_opens_the_same_projection():
    require_browser()
    view = {"model": "tiny:llama", "concept_set": "concepts", "concept_layer": "1", "concept_color": "concept",
            "concept_top_n": "5", "concept_highlight": "dog"}
    with streamlit_server("tiny:llama") as url, browser_page(height=1500) as page:
        page.goto(f"{url}/concept-space?{urlencode(view)}")
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        assert "concept" in _selectbox_text(page, "Colour by")
        assert page.get_by_role("textbox", name="Highlight").input_value() == "dog"
        legend = page.locator(".js-plotly-plot .legend .legendtext").evaluate_all(TEXTS)
        assert "★ dog (7)" in legend and "other (203 categories)" in legend, legend
        assert len(legend) == 6  # the highlight (dog, one of the five, has no other point left), four concepts, other
        title = page.locator(".js-plotly-plot .gtitle").first.text_content()
        assert "layer 1" in title and "PCA" in title, title
        assert parse_qs(urlparse(page.url).query)["concept_highlight"] == ["dog"]
        page.screenshot(path=str(OUTPUT / "link-concepts-tiny.png"), full_page=True)
