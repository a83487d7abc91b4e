"""Latent-language prompts, filtering and per-layer probabilities on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from engine.core.models import from_model
from engine.core.tiny import build_tiny, make_tokenizer
from engine.data.prompt_sets import CONCEPTS, LANGUAGES, validate
from engine.lens.latent_language import LatentLanguageError, build_items, run_latent_language
from engine.lens.logit import run_lens

SINGLE = [c["zh"] for c in CONCEPTS[:12]]  # these Chinese words become single tokens


@pytest.fixture(scope="module")
def lm():
    tokenizer = make_tokenizer(extra_tokens=SINGLE)
    model, tokenizer = build_tiny("llama", tokenizer)
    return from_model(model, tokenizer)


def test_prompt_set_is_complete():
    validate()
    assert len(CONCEPTS) >= 100
    assert all(all(c[code] for code in LANGUAGES) for c in CONCEPTS)


def test_only_single_token_answers_survive(lm):
    items, report = build_items(lm.tokenizer, "fr", "zh", n_shots=3)
    assert report.total == len(CONCEPTS)
    assert report.kept == len(items) == len({c for c in SINGLE})
    assert report.answer_not_single_token == len(CONCEPTS) - report.kept
    item = items[0]
    assert item.prompt.endswith(f'Français: "{CONCEPTS[0]["fr"]}" - 中文: "')
    assert item.prompt.count("\n") == 3  # three demonstrations, then the query
    assert lm.tokenizer.convert_ids_to_tokens(item.answer_id) == CONCEPTS[0]["zh"]


def test_english_overlap_is_dropped():
    tokenizer = make_tokenizer(extra_tokens=["dog"])
    concepts = [{"concept": "dog", "en": "dog", "fr": "chien", "zh": "dog"},
                {"concept": "cat", "en": "cat", "fr": "chat", "zh": "猫"}]
    items, report = build_items(tokenizer, "fr", "zh", concepts=concepts)
    assert report.english_overlaps_answer == 1 and not items


def test_probabilities_match_a_direct_lens_readout(lm):
    result = run_latent_language(lm, "fr", "zh", n_shots=3, batch_size=5)
    items, _ = build_items(lm.tokenizer, "fr", "zh", n_shots=3)
    assert result.target_probs.shape == (len(items), lm.n_layers + 1)
    assert ((0 <= result.english_probs) & (result.english_probs <= 1)).all()
    for index in (0, len(items) - 1):  # first and last item come from different batches
        item = items[index]
        english = [lm.tokenizer.decode([i]) for i in item.english_ids]
        lens = run_lens(lm, item.prompt, track=[item.answer] + english, top_k=1)
        np.testing.assert_allclose(result.target_probs[index], lens.tracked_probs[:, -1, 0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result.english_probs[index], lens.tracked_probs[:, -1, 1:].sum(-1),
                                   rtol=1e-4, atol=1e-7)
    summary = result.summary()
    for key in ("target_language", "english"):
        band = summary[key]
        assert all(lo <= m <= hi for lo, m, hi in zip(band["lo"], band["mean"], band["hi"]))


def test_bad_language_pairs(lm):
    with pytest.raises(LatentLanguageError, match="Unknown language"):
        build_items(lm.tokenizer, "fr", "klingon")
    with pytest.raises(LatentLanguageError, match="same"):
        build_items(lm.tokenizer, "fr", "fr")
    with pytest.raises(LatentLanguageError, match="No item survives"):
        run_latent_language(lm, "zh", "ru")
