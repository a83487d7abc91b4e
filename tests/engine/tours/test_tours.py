"""Every tour on tiny random models: it runs, every measured figure is finite and in its range, and the
texts carry the measured numbers. (Random weights show none of the papers' effects; that is fine.)"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from engine.core.models import from_model, load_model
from engine.core.tiny import build_tiny, make_tokenizer
from engine.data.prompt_sets import CONCEPTS
from engine.tours import TOURS, TourError, default_params, parse_params, run_tour, tuned_lens_job_spec
from engine.tours.base import band_around, bands_text, first_reaching, layer_bands
from engine.tours.shape import chance_p_value, cyclic_order_score


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))  # no lens or dashboard from elsewhere


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama")


def _assert_sound(result) -> None:
    assert result.steps and all(step.text for step in result.steps)
    assert result.checks_ok, result.failed_checks()
    for check in result.checks:
        assert check.values and all(math.isfinite(v) for v in check.values), check.name
    assert result.matches_paper in (True, False, None) and result.reason
    assert "nan" not in " ".join(step.text for step in result.steps).lower().split()
    for step in result.steps:
        assert step.figure is None or step.figure in result.figures
    pickle.dumps(result.to_json())  # what st.cache_data stores


@pytest.mark.parametrize("key", list(TOURS))
def test_every_tour_runs_on_a_tiny_model(lm, key):
    result = run_tour(lm, key)
    _assert_sound(result)
    assert result.tour == key and result.model == "tiny:llama" and result.seconds >= 0


def test_latent_english_on_single_token_answers():
    tokenizer = make_tokenizer(extra_tokens=[c["zh"] for c in CONCEPTS[:12]])
    model, tokenizer = build_tiny("llama", tokenizer)
    lm = from_model(model, tokenizer, name="tiny-zh")
    result = run_tour(lm, "latent_english", source="fr", target="zh")
    _assert_sound(result)
    assert result.figures["latent"]["kind"] == "latent_language"
    measured = result.measured
    assert measured["items"] == 12
    assert f"{measured['peak_english']:.3f}" in result.steps[1].text
    assert f"{measured['final_target']:.3f}" in result.steps[1].text


def test_latent_english_without_single_token_answers_says_so(lm):
    result = run_tour(lm, "latent_english")
    assert result.matches_paper is None and not result.figures
    assert "single token" in result.steps[0].text


def test_lens_tour_uses_a_tuned_lens_when_there_is_one(lm):
    from engine.lens.tuned import TunedLens, default_lens_dir

    lens = TunedLens.for_model(lm)
    with torch.no_grad():
        for param in lens.parameters():
            param.normal_(0, 0.05)
    lens.save(default_lens_dir(lm.name))
    result = run_tour(lm, "lens_comparison", text="code")
    _assert_sound(result)
    assert set(result.figures["kl"]["curves"]) == {"logit lens", "tuned lens"}
    assert result.matches_paper in (True, False)
    assert len(result.measured["tuned_kl"]) == lm.n_layers + 1 and result.measured["tuned_kl"][-1] == 0


def test_lens_tour_without_a_tuned_lens_points_to_the_job(lm):
    result = run_tour(lm, "lens_comparison")
    assert result.matches_paper is None and list(result.figures["kl"]["curves"]) == ["logit lens"]
    assert "Jobs page" in result.steps[-1].text
    spec = tuned_lens_job_spec(lm.name, steps=20)
    from engine.jobs.spec import validate

    assert validate(spec).params["config"]["steps"] == 20


class _FakeDashboard:
    """Just the three tables the rule reads."""

    def __init__(self, features, examples, logits):
        import pandas as pd

        self.tables = [pd.DataFrame(t) for t in (features, examples, logits)]

    def query(self, sql, params=None):
        return self.tables[0 if "FROM features" in sql else 1 if "top_examples" in sql else 2]


class _Words:
    words = ["<s>", " Album", "album", "álbum", " the", "'", "x", "than", " cat", "dog"]

    def batch_decode(self, ids):
        return [self.words[i[0]] for i in ids]


def test_the_feature_rule():
    from engine.tours.features import ranked_features

    features = {"feature": [0, 1, 2, 3], "density": [0.01, 0.001, 0.01, 0.01], "max_act": [2.0, 5.0, 3.0, 9.0]}
    examples = {"feature": [], "token_id": []}
    for feature, tokens in ((0, [7] * 10 + [8] * 2), (1, [5] * 12), (2, [4] * 6 + [8] * 6), (3, [8] * 11)):
        examples["feature"] += [feature] * len(tokens)
        examples["token_id"] += tokens
    promoted = {0: ["than", "Than", "THAN", "x", "y"], 1: ["album"] * 5, 2: ["Album", "album", "álbum", "a", "b"],
                3: ["dog", "cat", "bird", "fish", "cow"]}
    logits = {"feature": [f for f in promoted for _ in range(5)], "token": [t for ts in promoted.values() for t in ts]}
    ranked = ranked_features(_FakeDashboard(features, examples, logits), _Words())
    # 1 reads "'" (not a word); 3 promotes five unrelated words; 0 and 2 pass, 2 has the larger max activation
    assert [r["feature"] for r in ranked] == [2, 0]
    assert ranked[0]["token"] == "the" and ranked[0]["stem"] == "albu" and ranked[0]["write_coherence"] == 0.6
    assert ranked[1]["coherence"] == 10 / 12 and ranked[1]["write_coherence"] == 0.6


def test_feature_tour_end_to_end(lm, monkeypatch):
    from engine.core.models import cache_root
    from engine.data.store_writer import build_store
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.read import Dashboard
    from engine.sae.base import SAE, SAEConfig
    from engine.sae.io import save_sae
    from engine.tours import features

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
    out = build_dashboards(sae_dir, store.path, lm, cache_root() / "dashboards" / "tiny-dash",
                           config=DashboardConfig(top_k=6, batch_size=256, device="cpu"))
    strict = run_tour(lm, "features")  # one-byte tokens are no words: nothing passes the rule
    assert strict.matches_paper is None and "fewer than rank 0 + 1" in strict.steps[0].text
    # loosened so a random SAE over a byte-level tokenizer has candidates
    monkeypatch.setattr(features, "MIN_WORD_CHARS", 1)
    monkeypatch.setattr(features, "WRITE_COHERENCE", 0.0)
    monkeypatch.setattr(features, "MIN_EXAMPLES", 4)
    ranked = features.ranked_features(Dashboard.open(out), lm.tokenizer)
    assert ranked and [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    result = run_tour(lm, "features")
    _assert_sound(result)
    assert result.measured["feature"] == ranked[0]["feature"]
    assert set(result.figures) == {"contexts", "logits", "dose"}
    assert len(result.measured["steer_probs"]) == 5


def test_parse_params_from_url_strings(lm):
    assert parse_params("semantic_hub", {"centre": "false"}, 18) == {"centre": False}
    assert parse_params("circular", {"layer": "4"}, 18) == {"layer": 4}
    assert default_params("circular", 18) == {"layer": 9}
    assert parse_params("latent_english", {"target": "ja", "other": "x"}, 18) == {"source": "fr", "target": "ja"}
    for key, raw in (("circular", {"layer": "18"}), ("circular", {"layer": "x"}), ("spread", {"points": "nope"}),
                     ("semantic_hub", {"centre": "maybe"}), ("features", {"rank": "-1"})):
        with pytest.raises(TourError):
            parse_params(key, raw, 18)
    with pytest.raises(TourError, match="Unknown tour"):
        run_tour(lm, "nope")
    with pytest.raises(TourError, match="different"):
        run_tour(lm, "latent_english", source="fr", target="fr")


def test_cyclic_order_score():
    n = 7
    circle = np.arange(n) * 2 * np.pi / n
    assert cyclic_order_score(circle) == 1.0
    assert cyclic_order_score(-circle) == 1.0  # either direction around the circle
    swapped = circle.copy()
    swapped[[0, 3]] = swapped[[3, 0]]
    assert cyclic_order_score(swapped) < 1.0
    assert chance_p_value(1.0, n, trials=500) < 0.05
    assert chance_p_value(0.0, n, trials=100) == 1.0


def test_layer_helpers():
    layers = list(range(6))
    assert layer_bands(layers, [False, True, True, False, True, False]) == [(1, 2), (4, 4)]
    assert bands_text([(1, 2), (4, 4)]) == "1–2 and 4" and bands_text([]) == "no layer"
    assert band_around([0.1, 0.5, 0.95, 1.0, 0.2], 3, 0.9) == (2, 3)
    assert first_reaching(layers, [0.1, 0.5, 0.95, 1.0, 0.9, 0.2]) == 2
