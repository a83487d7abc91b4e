"""Corpus sources: built-ins, files, folders, JSONL, the hub when offline, and the prompt sets."""
from __future__ import annotations

import itertools
import json

import pytest

from engine.data.corpora import PROMPT_SETS, CorpusError, corpus_hash, iter_texts, prompt_set
from engine.data.prompt_sets import CONCEPTS, LANGUAGES


def test_builtin_is_offline_english_and_deterministic():
    first = list(itertools.islice(iter_texts("builtin"), 5))
    again = list(itertools.islice(iter_texts("builtin"), 5))
    assert first == again and len(first) == 5
    assert all(len(text) >= 200 for text in first)
    assert sum(text.count(" the ") for text in first) > 10  # English prose, not code
    assert corpus_hash("builtin") == corpus_hash("builtin")
    assert corpus_hash("builtin") != corpus_hash("builtin-multilingual")


def test_builtin_multilingual_covers_every_language():
    texts = list(iter_texts("builtin-multilingual"))
    joined = "\n".join(texts)
    assert all(entry[code] in joined for entry in CONCEPTS[:20] for code in LANGUAGES)
    assert "Montag" in joined and "星期一" in joined


def test_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["first file"]
    assert list(iter_texts(str(tmp_path))) == ["first file", "second file"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z"])) + "\n")
    assert list(iter_texts(str(jsonl))) == ["x y", "z"]
    before = corpus_hash(str(tmp_path))
    (tmp_path / "a.txt").write_text("changed", encoding="utf-8")
    assert corpus_hash(str(tmp_path)) != before


def test_bad_corpora_give_one_clear_error(tmp_path):
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary\xff\xfe")
    with pytest.raises(CorpusError, match="not a text file"):
        list(iter_texts(str(binary)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(iter_texts(str(latin)))
    with pytest.raises(CorpusError, match="neither"):
        iter_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="not a .txt or .jsonl"):
        iter_texts(str(tmp_path / "x.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(CorpusError, match="Line 2"):
        list(iter_texts(str(bad)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        iter_texts(str(empty))


def test_hub_unreachable_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="Hugging Face"):
        iter_texts("hf:roneneldan/TinyStories")
    with pytest.raises(CorpusError, match="dataset name"):
        iter_texts("hf:")


def test_prompt_sets_are_consistent():
    for name in PROMPT_SETS:
        pset = prompt_set(name)
        assert pset.texts and all(len(values) == len(pset.texts) for values in pset.labels.values())
        assert pset.default_color in pset.labels and pset.default_probe in pset.labels
    days = prompt_set("days")
    assert len(days.texts) == 7 * len(LANGUAGES) and days.labels["day"][len(LANGUAGES) * 0 + 7] == "Monday"
    with pytest.raises(CorpusError, match="Unknown prompt set"):
        prompt_set("nope")
