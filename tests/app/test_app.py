"""AppTest: the app and the lens page as a user drives them (tiny random model, no download)."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _figure(at, index=0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def test_lens_page_draws_a_heatmap(app):
    assert not app.error
    fig = _figure(app)
    kinds = [trace["type"] for trace in fig["data"]]
    assert kinds[0] == "heatmap" and "scatter" in kinds  # heatmap plus the clickable cell overlay
    rows = len(fig["layout"]["yaxis"]["ticktext"])
    assert rows == 4  # embeddings + 3 layers
    assert app.sidebar.caption and "self-check" in app.sidebar.caption[0].value


def test_sublayer_toggle_adds_rows(app):
    app.toggle(key="lens_sublayers").set_value(True).run()
    assert not app.exception
    assert len(_figure(app)["layout"]["yaxis"]["ticktext"]) == 7


def test_metric_and_query_params(app):
    app.selectbox(key="lens_metric").set_value("kl").run()
    assert not app.exception
    params = app.query_params  # the lens page's link keys (lens_*; the short names of older links still open)
    assert str(params.get("lens_metric", params.get("metric"))) in ("kl", "['kl']")
    app.text_area(key="lens_prompt").set_value("Bonjour tout le monde").run()
    assert "Bonjour" in str(app.query_params.get("lens_prompt", app.query_params.get("prompt")))


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ("word " * 700, "tokens long"),
    ("\x00\x01\x02\x03\x04\x05\x06 garbage", "does not look like text"),
])
def test_bad_prompts_show_an_error_and_the_app_recovers(app, prompt, message):
    app.text_area(key="lens_prompt").set_value(prompt).run()
    assert not app.exception
    assert any(message in e.value for e in app.error)
    app.text_area(key="lens_prompt").set_value("Recovered fine").run()
    assert not app.error and app.get("plotly_chart")


def test_unknown_model_shows_one_sentence(app):
    # (AppTest drops the sidebar's elements after a page calls st.stop, so drive the state directly;
    #  the Playwright test shows the real sidebar in this situation)
    app.session_state["model_other"] = "no-such-org/no-such-model"
    app.selectbox(key="model_choice").set_value("Other (Hugging Face id, folder or .gguf)…").run()
    assert not app.exception
    assert app.error and "could not be loaded" in app.error[0].value
    app.session_state["model_other"] = "tiny:gpt2"
    app.run()
    assert not app.error and app.get("plotly_chart")


def test_latent_language_section_runs(app):
    app.button[0].click().run()
    assert not app.exception
    # the byte-level tiny tokenizer has no single-token Chinese words: a clear message, not a crash
    assert any("No item survives" in e.value for e in app.error)


def test_sidebar_device_map_splits_the_model_with_the_same_lens(app):
    """A device map typed in the sidebar loads the model split by accelerate; the lens draws the same numbers,
    and a map naming a module the model does not have gives one sentence."""
    before = _figure(app)["data"][0]["z"]
    app.text_input(key="device_map").input('{"model.layers.1": "cpu", "model.layers.2": "cpu"}').run()
    assert not app.exception and not app.error
    assert _figure(app)["data"][0]["z"] == before
    app.text_input(key="device_map").input('{"model.decoder": "cpu"}').run()
    assert not app.exception
    assert any("not a module of this model" in e.value for e in app.error)
