"""AppTest: the Tours page on a tiny random model (no download): every tour renders, its settings live in the URL."""
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
