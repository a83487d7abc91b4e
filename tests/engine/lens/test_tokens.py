"""Tokens as the model produces them in context, with a SentencePiece-style tokenizer built here.

Like Llama-2's and Mistral v0.1's (built the way their tokenizer.json is), it prepends a dummy space (``▁``) to every text it encodes, so a word
encoded on its own is not the token the model writes mid-text: ``" Paris"`` alone is ``["▁", "▁Paris"]``.
"""
from __future__ import annotations

import pytest

from engine.core.models import from_model
from engine.core.tiny import build_tiny
from engine.lens.latent_language import build_items
from engine.lens.logit import run_lens, tracked_token_ids, tracked_tokens
from engine.lens.tokens import continuation, continuation_ids

PROMPT = "The capital of France is"
WORDS = ["▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "Paris", "▁Lon", "don", "▁flower", "flower",
         "▁Flower", "Flower", "▁cat", "cat", "▁Cat", "Cat", "花", "猫", '"', ":", "-", "▁-", "▁Français:", "▁中文:",
         "fleur", "chat"]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A Unigram model normalised as Llama-2's tokenizer.json does it: prepend '▁', then every space -> '▁'."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({ch for word in WORDS for ch in word.replace("▁", "")} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -3.0)]
    vocab += [(word, -1.0) for word in WORDS] + [(ch, -6.0) for ch in chars if ch not in WORDS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _id(tokenizer, piece: str) -> int:
    return tokenizer.convert_tokens_to_ids(piece)


def test_the_old_way_reads_a_lone_dummy_space(sp_tokenizer):
    alone = sp_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert sp_tokenizer.convert_ids_to_tokens(alone) == ["▁", "▁Paris"]  # the first id is the lone '▁'
    assert tracked_token_ids(sp_tokenizer, [" Paris"]) == [_id(sp_tokenizer, "▁")]  # no context: as before


def test_continuation_is_the_word_the_model_writes_after_the_text(sp_tokenizer):
    paris, lone = _id(sp_tokenizer, "▁Paris"), _id(sp_tokenizer, "▁")
    assert continuation_ids(sp_tokenizer, PROMPT, " Paris") == [paris] != [lone]
    assert continuation_ids(sp_tokenizer, PROMPT, "Paris") == [_id(sp_tokenizer, "Paris")]  # glued: no '▁'
    assert tracked_token_ids(sp_tokenizer, [" Paris", "Paris"], context=PROMPT) == [paris, _id(sp_tokenizer, "Paris")]
    london = continuation(sp_tokenizer, PROMPT, " London")  # two tokens: the first is followed, and said so
    assert london.ids == (_id(sp_tokenizer, "▁Lon"), _id(sp_tokenizer, "don")) and london.id == london.ids[0]
    assert london.describe() == "' London' → '▁Lon' (first of 2 tokens: '▁Lon' 'don')"
    assert continuation(sp_tokenizer, PROMPT, " Paris").describe() == "' Paris' → '▁Paris'"
    print("old:", sp_tokenizer.convert_ids_to_tokens(sp_tokenizer(" Paris", add_special_tokens=False)["input_ids"])[0],
          "new:", continuation(sp_tokenizer, PROMPT, " Paris").pieces[0])


def test_run_lens_follows_the_in_context_token(sp_tokenizer):
    model, tokenizer = build_tiny("llama", sp_tokenizer)
    lm = from_model(model, tokenizer, name="tiny-llama-sp")
    result = run_lens(lm, PROMPT, top_k=2, track=[" Paris", " London"])
    assert result.tracked_ids == [_id(tokenizer, "▁Paris"), _id(tokenizer, "▁Lon")]
    assert result.tracked_tokens == ["▁Paris", "▁Lon"]
    assert result.tracked_notes[1].startswith("' London' → '▁Lon' (first of 2 tokens")
    assert result.to_json()["tracked"][0] == {"label": " Paris", "id": _id(tokenizer, "▁Paris"), "token": "▁Paris",
                                             "note": "' Paris' → '▁Paris'"}
    from_ids = run_lens(lm, tokenizer(PROMPT)["input_ids"], top_k=2, track=[" Paris"])  # ids: decoded context
    assert from_ids.tracked_ids == [_id(tokenizer, "▁Paris")]
    assert [t.id for t in tracked_tokens(tokenizer, ["", " Paris"], PROMPT)] == [_id(tokenizer, "▁Paris")]


def test_latent_language_answers_are_in_context_tokens(sp_tokenizer):
    concepts = [{"concept": "flower", "en": "flower", "fr": "fleur", "zh": "花"},
                {"concept": "cat", "en": "cat", "fr": "chat", "zh": "猫"}]
    lone = _id(sp_tokenizer, "▁")
    # the old way: the answer alone is '▁' + '花' (two tokens, so the item was dropped) and ' flower' starts with '▁'
    assert sp_tokenizer.convert_ids_to_tokens(sp_tokenizer("花", add_special_tokens=False)["input_ids"]) == ["▁", "花"]
    assert sp_tokenizer(" flower", add_special_tokens=False)["input_ids"][0] == lone
    items, report = build_items(sp_tokenizer, "fr", "zh", n_shots=1, concepts=concepts)
    assert report.kept == 2 and report.answer_not_single_token == 0
    flower = items[0]
    assert flower.answer_id == _id(sp_tokenizer, "花")
    assert lone not in flower.english_ids
    assert set(flower.english_ids) == {_id(sp_tokenizer, p) for p in ("flower", "▁flower", "Flower", "▁Flower")}
