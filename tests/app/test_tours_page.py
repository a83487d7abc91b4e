"""AppTest: the Tours page on a tiny random model (no download): every tour renders, its settings live in the URL;
walking a tour one step at a time: Previous / Next, the step in the URL, a bad step in a link, another tour
restarting the walk."""
from __future__ import annotations

import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

PAGE = "../../pages/tours.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _open(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_every_tour_renders_without_exception():
    at = _open()
    assert at.selectbox(key="tour_choice").value == "latent_english"
    assert at.query_params["tour"] == ["latent_english"] or at.query_params["tour"] == "latent_english"
    for key in at.selectbox(key="tour_choice").options:
        at.selectbox(key="tour_choice").set_value(key).run()
        assert not at.exception, (key, at.exception)
        assert any(m.value.startswith("**1.") for m in at.markdown), key
    # the last tour (features) has no dashboards here: it says how to build them
    assert any("demo job" in m.value for m in at.markdown)


def test_settings_come_from_and_go_to_the_url():
    at = _open({"tour": "circular", "t_layer": "1"})
    assert at.selectbox(key="tour_choice").value == "circular"
    assert at.number_input(key="tour_circular_layer").value == 1
    assert not at.error
    figures = _figures(at)
    assert any(f["layout"].get("title", {}).get("text") == "layer 1" for f in figures)
    at.number_input(key="tour_circular_layer").set_value(2).run()
    assert not at.exception
    assert at.query_params["t_layer"] in ("2", ["2"])

    at.selectbox(key="tour_choice").set_value("semantic_hub").run()
    assert not at.exception
    assert "t_layer" not in at.query_params  # the other tour's setting leaves the URL
    at.toggle(key="tour_semantic_hub_centre").set_value(False).run()
    assert not at.exception and at.query_params["t_centre"] in ("false", ["false"])
    assert any("raw (uncentred) cosine" in m.value for m in at.markdown)


def test_a_bad_setting_in_the_url_falls_back_to_the_default():
    at = _open({"tour": "circular", "t_layer": "99"})
    assert at.error and "between 0 and 2" in at.error[0].value
    assert at.number_input(key="tour_circular_layer").value == 1  # the default: the middle layer
    assert _figures(at)


def test_feature_tour_shows_contexts_logits_and_steering(monkeypatch):
    from engine.core.models import cache_root, load_model
    from engine.tours import features

    # loosened so a random SAE over a byte-level tokenizer has candidates (see tests/engine/tours)
    monkeypatch.setattr(features, "MIN_WORD_CHARS", 1)
    monkeypatch.setattr(features, "WRITE_COHERENCE", 0.0)
    monkeypatch.setattr(features, "MIN_EXAMPLES", 4)
    from engine.data.store_writer import build_store
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.sae.base import SAE, SAEConfig
    from engine.sae.io import save_sae

    lm = load_model("tiny:llama")  # the same weights (and hash) as the page's model
    texts = [f"Note {i}: the quick brown fox jumps over the lazy dog while {i * 3} cats watch." for i in range(24)]
    store = build_store(lm, iter(texts), cache_root() / "activations" / "tiny", layers=[1], max_tokens=1500,
                        context_length=32, dtype="float32")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=2,
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    sae_dir = save_sae(sae, cache_root() / "saes" / "tiny-sae")
    build_dashboards(sae_dir, store.path, lm, cache_root() / "dashboards" / "tiny-dash",
                     config=DashboardConfig(top_k=6, batch_size=256, device="cpu"))

    at = _open({"tour": "features", "t_rank": "1"})
    assert not at.error
    assert any("le-context" in m.value for m in at.markdown)  # highlighted contexts
    assert at.dataframe  # logit effects
    assert any("KL to clean" in json.dumps(f) for f in _figures(at))  # the steering sweep
    assert any("Rank 1: feature" in m.value for m in at.markdown)


# --- walking a tour step by step ------------------------------------------------------------------
def _steps_shown(at) -> list[int]:
    return [int(m.value[2:].split(".")[0]) for m in at.markdown if m.value[:2] == "**" and m.value[2:3].isdigit()]


def _url_step(at) -> str | None:
    value = at.query_params.get("tour_step")
    return value[0] if isinstance(value, list) else value


def test_walk_with_previous_and_next():
    at = _open({"tour": "circular"})
    assert _steps_shown(at) == [1, 2, 3]  # the overview: every step at once
    assert at.button(key="tour_prev").disabled and not at.button(key="tour_next").disabled
    seen = []
    for expected in (1, 2, 3):
        at.button(key="tour_next").click().run()
        assert not at.exception, at.exception
        assert _steps_shown(at) == [expected]
        assert at.radio(key="tour_step").value == expected and _url_step(at) == str(expected)
        assert any(f"step {expected} of 3" in m.value for m in at.markdown)
        seen.append(len(at.get("plotly_chart")))
    assert seen == [1, 1, 0]  # the step's own figure only; the verdict has none
    assert at.button(key="tour_next").disabled
    at.button(key="tour_prev").click().run()
    assert _steps_shown(at) == [2] and _url_step(at) == "2"
    at.radio(key="tour_step").set_value(0).run()  # back to the overview: the URL drops the default
    assert _steps_shown(at) == [1, 2, 3] and _url_step(at) is None


def test_step_from_the_link_and_another_tour():
    at = _open({"tour": "spread", "tour_step": "4", "t_points": "days"})
    assert _steps_shown(at) == [4] and at.radio(key="tour_step").value == 4
    at.selectbox(key="tour_choice").set_value("circular").run()  # three steps: the walk starts again
    assert not at.exception, at.exception
    assert _steps_shown(at) == [1] and _url_step(at) == "1"

    at = _open({"tour": "circular", "tour_step": "9"})  # past the last step: the last one
    assert _steps_shown(at) == [3] and _url_step(at) == "3"


def test_a_bad_step_in_the_link_says_so():
    at = _open({"tour": "circular", "tour_step": "two"})
    assert at.warning and "tour_step" in at.warning[0].value
    assert _steps_shown(at) == [1, 2, 3]
