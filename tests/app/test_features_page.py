"""AppTest: the SAE feature browser on a tiny random Llama with a tiny SAE and store (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
TEXTS = [f"Note {i}: the quick brown fox jumps over the lazy dog while {i * 3} cats watch." for i in range(24)]


def build_feature_fixture(cache: Path, d_sae: int = 256) -> tuple[Path, Path]:
    """Store + SAE + dashboard for the model the app builds for ``tiny:llama``, under ``cache``."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny
    from engine.data.store_writer import build_store
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.sae.base import SAE, SAEConfig
    from engine.sae.io import save_sae

    model, tok = build_tiny("llama")
    lm = from_model(model, tok, name="tiny:llama")  # same name -> same weights hash as the app's tiny:llama
    store = build_store(lm, iter(TEXTS), cache / "activations" / "tiny", layers=[1], max_tokens=2000,
                        context_length=32, dtype="float32")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=d_sae, architecture="topk", k=2,
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    sae_dir = save_sae(sae, cache / "saes" / "tiny-sae")
    out = build_dashboards(sae_dir, store.path, lm, cache / "dashboards" / "tiny-sae-dash",
                           config=DashboardConfig(top_k=6, batch_size=256, device="cpu"))
    return sae_dir, out


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, feature_cache):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(feature_cache))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _open(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    at.switch_page("pages/features.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _html(at) -> str:
    return "".join(m.value for m in at.markdown)


def _live_feature(cache: Path) -> int:
    from engine.features.read import Dashboard

    dash = Dashboard.open(cache / "dashboards" / "tiny-sae-dash")
    return int(dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY count DESC LIMIT 1").iloc[0, 0])


def test_feature_page_opens_from_link(feature_cache):
    live = _live_feature(feature_cache)
    at = _open({"sae": "tiny-sae", "feature": str(live)})
    assert not at.error, [e.value for e in at.error]
    assert at.number_input(key="feature_id").value == live
    assert any(s.value.startswith(f"Feature #{live}") for s in at.subheader)
    assert "le-context" in _html(at)  # highlighted top contexts
    assert any(json.loads(c.proto.spec)["data"][0]["type"] == "bar" for c in at.get("plotly_chart"))
    assert str(live) in str(at.query_params["feature"])
    # a neighbour button opens that feature
    button = at.button(key="neighbour_0")
    target = int(button.label.split("·")[0].strip().lstrip("#"))
    button.click().run()
    assert at.number_input(key="feature_id").value == target
    assert any(s.value.startswith(f"Feature #{target}") for s in at.subheader)
    # the feature's activation on the user's text
    at.text_input(key="feature_test_text").input("the lazy dog").run()
    assert not at.exception and "max " in _html(at)


def test_out_of_range_feature_is_one_clear_error():
    at = _open({"sae": "tiny-sae", "feature": "400"})
    assert [e.value for e in at.error] == ["Feature 400 does not exist: this SAE has features 0..255."]
    assert not at.exception and len(at.tabs) == 4  # the rest of the page still works


def test_list_filters_and_search():
    at = _open()
    assert not at.error
    table = at.dataframe(key="features_table").value
    assert len(table) > 0 and "feature" in table.columns
    assert list(table["density"]) == sorted(table["density"], reverse=True)
    # a word that is not a number: a number also matches the feature of that id (tested below)
    word = next(w for w in " | ".join(table["act_tokens"]).split(" | ") if w.strip() and not w.strip().isdigit())
    at.text_input(key="features_search").input(word).run()
    found = at.dataframe(key="features_table").value
    assert 0 < len(found) <= len(table)
    assert all(word.lower() in (a + t + b).lower()
               for a, t, b in found[["act_tokens", "top_logits", "bottom_logits"]].itertuples(index=False))
    feature = int(table["feature"].iloc[0])
    at.text_input(key="features_search").input(str(feature)).run()
    assert feature in set(at.dataframe(key="features_table").value["feature"])
    at.text_input(key="features_search").input("zzzz-no-such-token").run()
    assert not at.exception and "0 features shown" in " ".join(c.value for c in at.caption)


def test_what_fires_on_my_text():
    at = _open()
    at.text_area(key="fires_text").input("the quick brown fox").run()
    assert not at.exception and not at.error
    tokens = next(d.value for d in at.dataframe if "token" in d.value.columns)
    assert list(tokens["token"])[:3] == ["t", "h", "e"] and len(tokens) == len("the quick brown fox")
    ranked = at.dataframe(key="fires_ranked").value
    assert len(ranked) > 0 and list(ranked["activation"]) == sorted(ranked["activation"], reverse=True)
    at.selectbox(key="fires_position").set_value(0).run()
    assert not at.exception


def test_feature_map_tab(feature_cache):
    """PCA map of the decoder directions, coloured by density, then by cosine to the open feature."""
    live = _live_feature(feature_cache)
    at = _open({"sae": "tiny-sae", "feature": str(live)})
    at.radio(key="map_method").set_value("pca").run()
    at.button(key="map_compute").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert spec["data"][0]["type"] == "scattergl" and len(spec["data"][0]["x"]) == 256  # one point per feature
    at.radio(key="map_color").set_value("cosine to the current feature").run()
    assert not at.exception and not at.error
    assert (feature_cache / "dashboards" / "tiny-sae-dash" / "map_pca.parquet").is_file()


def test_jobs_section_builds_dashboards(feature_cache):
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception, at.exception
    at.checkbox(key="dash_force").check()
    at.button(key="dash_build").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    from engine.jobs import wait_idle

    jobs = wait_idle(feature_cache / "jobs", timeout=90)  # the build runs as a job in a worker process
    assert [j.state for j in jobs] == ["done"], [j.error for j in jobs]
    at.run()
    assert any("Dashboards saved" in s.value for s in at.success)
