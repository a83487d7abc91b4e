"""End to end in Debian's Chromium against `streamlit run app.py`: type a prompt, see the heatmap, click a cell."""
from __future__ import annotations

from urllib.parse import urlencode

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser]


def _enter_prompt(page, text: str) -> None:
    box = page.get_by_role("textbox", name="Prompt")
    box.fill(text)
    box.press("Control+Enter")
    page.wait_for_timeout(300)
    wait_idle(page)


def _click_cell(page, row: int, col: int, rows: int, cols: int) -> None:
    """Click the centre of heatmap cell (row from the bottom, column from the left)."""
    area = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    x = area["x"] + (col + 0.5) * area["width"] / cols
    y = area["y"] + area["height"] - (row + 0.5) * area["height"] / rows
    page.mouse.move(x - 20, y - 20)
    page.mouse.move(x, y, steps=8)  # hover first, as a hand does; plotly picks the hovered point
    page.wait_for_timeout(400)
    page.mouse.down()
    page.wait_for_timeout(80)
    page.mouse.up()
    page.wait_for_timeout(800)
    wait_idle(page)


@pytest.mark.real_model
@pytest.mark.parametrize("model, layers", [("smollm2-135m", 30), ("gemma-3-270m", 18)])
def test_lens_page_in_a_real_browser(model, layers):
    require_browser()
    from engine.core.models import load_model

    load_model(model, check=False)  # converts the GGUF once here, so the server only loads safetensors
    with streamlit_server(model, timeout=240, streamlit_run=True) as url, browser_page() as page:
        page.goto(url)
        wait_idle(page)
        _enter_prompt(page, "The Eiffel Tower is in the city of")
        page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        texts = "els => els.map(e => e.textContent)"
        heatmap = page.locator(".js-plotly-plot").first
        ticks = heatmap.locator(".ytick text").evaluate_all(texts)
        assert set(ticks) == {"embed", *map(str, range(layers))}
        positions = len(heatmap.locator(".xtick text").evaluate_all(texts))
        _click_cell(page, row=0, col=0, rows=layers + 1, cols=positions)
        page.screenshot(path=str(OUTPUT / f"lens-{model}.png"), full_page=True)
        layer_box = page.locator("[data-testid='stSelectbox']").filter(has_text="Layer").first
        shown = layer_box.inner_text() + " " + " ".join(layer_box.locator("input").evaluate_all(
            "els => els.map(e => e.value)"))
        assert "embed" in shown  # the clicked cell's layer is now the one whose top-k is listed

        # KL with sub-blocks from a link: the embedding row (~1,000 nats) must not set the top of the colour bar
        page.goto(url + "/?" + urlencode({"lens_prompt": "The Eiffel Tower is in the city of", "lens_metric": "kl",
                                          "lens_sublayers": "true", "lens_track": " Paris"}))
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=120_000)
        bar = page.locator(".js-plotly-plot").first.locator(".colorbar").first.text_content()
        assert "true value on hover" in bar, bar
        lines = page.locator(".js-plotly-plot").nth(1)
        assert lines.locator(".scatterlayer .trace").count() == 1  # one connected line over every row
        assert lines.locator(".xtick text").evaluate_all(texts)[0] == "embed"
        page.screenshot(path=str(OUTPUT / f"lens-kl-{model}.png"), full_page=True)


def test_bad_input_in_a_real_browser():
    require_browser()
    with streamlit_server("tiny:llama") as url, browser_page(height=900) as page:
        page.goto(url + "/?model=no-such-org/no-such-model")
        wait_idle(page)
        alert = page.locator("[data-testid='stAlert']").first.inner_text()
        assert "could not be loaded" in alert
        assert page.locator("[data-testid='stSidebar'] input").count() >= 1  # the picker is still there
        page.screenshot(path=str(OUTPUT / "bad-model.png"))
