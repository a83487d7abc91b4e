"""AppTest: the interventions page on a tiny random Llama (no download)."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_interventions_page_views_and_bad_input():
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/interventions.py")
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.session_state["iv_specs"]) == 1 and at.session_state["iv_specs"][0]["op"] == "steer"
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(figures) == 4  # Δ-lens, dose-response, sweep, tongue vs thought
    sweep = next(f for f in figures if "after patching" in f["layout"].get("title", {}).get("text", ""))
    heat = sweep["data"][0]
    assert heat["type"] == "heatmap" and len(heat["colorbar"]["ticktext"]) == 2
    assert heat["colorbar"]["ticktext"][0].startswith("target")
    tongue = figures[-1]
    assert sum(1 for trace in tongue["data"] if trace.get("showlegend") is not False) == 4
    assert any("clean" in md.value for md in at.markdown)  # the generation diff

    # an ablation on top of the steering, then the sweep switched to layer -> layer
    at.selectbox(key="iv_op").set_value("ablate_heads").run()
    at.multiselect(key="iv_heads").set_value([1, 3]).run()
    at.button(key="iv_add").click().run()
    assert not at.exception and [s["op"] for s in at.session_state["iv_specs"]] == ["steer", "ablate_heads"]
    at.radio(key="sweep_kind").set_value("layer_layer").run()
    sweep = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                 if "after patching" in json.loads(c.proto.spec)["layout"].get("title", {}).get("text", ""))
    assert sweep["layout"]["xaxis"]["title"]["text"] == "source layer"

    # bad input: one clear message, the page keeps working
    at.selectbox(key="iv_op").set_value("patch").run()
    at.text_input(key="iv_positions").set_value("99").run()
    at.button(key="iv_add").click().run()
    assert not at.exception
    assert any("beyond the prompt" in e.value for e in at.error)
    assert len(at.session_state["iv_specs"]) == 2
    at.radio(key="sweep_kind").set_value("layer_position").run()
    at.text_input(key="sweep_target").set_value("short").run()
    assert any("same token length" in e.value for e in at.error)
    assert not at.exception


def test_mean_ablation_uses_the_dashboards_corpus_means(tmp_path):
    """With dashboards of the chosen SAE built, 'mean' ablation takes each feature's corpus mean."""
    from engine.core.models import load_model
    from engine.data.store_writer import build_store
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.read import corpus_means
    from engine.sae.io import save_sae
    from tests.engine.features.test_dashboards import TEXTS, make_sae

    lm = load_model("tiny:llama")
    cache = tmp_path / "cache"
    store = build_store(lm, iter(TEXTS), cache / "activations" / "s", layers=[1], max_tokens=800, context_length=32)
    sae_dir = save_sae(make_sae(), cache / "saes" / "tiny-sae")
    build_dashboards(sae_dir, store.path, lm, None, config=DashboardConfig(batch_size=128, device="cpu"))
    expected = corpus_means(sae_dir, [3])

    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/interventions.py")
    at.run()
    at.selectbox(key="iv_op").set_value("ablate_features").run()
    at.selectbox(key="iv_sae").set_value(str(sae_dir)).run()
    at.text_input(key="iv_features").set_value("3").run()
    at.radio(key="iv_mode").set_value("mean").run()
    assert any("corpus tokens" in c.value for c in at.caption), [c.value for c in at.caption]
    at.button(key="iv_add").click().run()
    assert not at.exception, at.exception
    added = at.session_state["iv_specs"][-1]
    assert added["op"] == "ablate_features" and added["params"]["means"] == expected["means"]
