"""Corpus sources: built-ins, files, folders, JSONL, the hub when offline, and the prompt sets."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time

import pytest

from engine.core import paths
from engine.data.corpora import PROMPT_SETS, CorpusError, check_corpus, corpus_hash, iter_texts, prompt_set
from engine.data.prompt_sets import CONCEPTS, LANGUAGES

QUICK = 5.0  # seconds any refusal may take


@pytest.fixture(autouse=True)
def _cli_mode(monkeypatch):
    """Paths are free in the CLI unless LATENT_EXPLORER_DATA is set: start every test without it."""
    monkeypatch.delenv("LATENT_EXPLORER_DATA", raising=False)


def within(seconds: float, fn, *args, **kwargs):
    """Run ``fn`` in a daemon thread; fail when it has not finished in ``seconds``; re-raise what it raised."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    assert time.perf_counter() - start < seconds
    if "error" in box:
        raise box["error"]
    return box["value"]


def refused(spec: str, match: str, **kwargs) -> str:
    """The one-sentence CorpusError that reading ``spec`` gives, within QUICK seconds."""
    with pytest.raises(CorpusError, match=match) as info:
        within(QUICK, lambda: list(iter_texts(spec, **kwargs)))
    text = str(info.value)
    assert "\n" not in text and text.endswith(".") and len(text) < 600, text
    return text


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


# --- safe serving: bad paths give one sentence, quickly ----------------------------------------------
def test_device_and_system_folders_are_refused_in_the_cli(tmp_path):
    refused("/dev/zero", "lies in /dev, a system pseudo-file system")
    refused("/dev/stdin", "pseudo-file system")
    refused("/proc/self/environ", "lies in /proc")
    refused("/", "is the system folder '/'")
    refused("/etc", "is the system folder '/etc'")
    refused("/etc/", "system folder")
    with pytest.raises(CorpusError, match="system folder"):
        within(QUICK, corpus_hash, "/")


def test_the_ui_keeps_corpora_under_the_data_roots(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some text")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    for spec in ("/dev/zero", "/", "/etc", "/etc/passwd", str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")):
        refused(spec, "outside the allowed data folders", enforce_roots=True)
    with pytest.raises(CorpusError, match="outside"):
        corpus_hash(str(tmp_path / "a.txt"), enforce_roots=True)
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["some text"]  # the CLI without LATENT_EXPLORER_DATA
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "b.txt").write_text("cached text")
    assert list(iter_texts(str(tmp_path / "cache" / "b.txt"), enforce_roots=True)) == ["cached text"]
    refused(str(tmp_path / "cache" / "missing.txt"), "neither", enforce_roots=True)


def test_the_cli_keeps_corpora_under_the_roots_when_they_are_set(tmp_path, monkeypatch):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (data / "ok.txt").write_text("fine")
    monkeypatch.setenv("LATENT_EXPLORER_DATA", str(data))
    assert list(iter_texts(str(data / "ok.txt"))) == ["fine"]
    refused(str(outside / "secret.txt"), "outside the allowed data folders")
    refused(f"{data}/../outside/secret.txt", "outside the allowed data folders")
    (data / "link.txt").symlink_to(outside / "secret.txt")
    (data / "linked").symlink_to(outside)
    refused(str(data / "link.txt"), "outside the allowed data folders")
    refused(str(data / "linked"), "outside the allowed data folders")
    assert list(iter_texts(str(outside / "secret.txt"), enforce_roots=False)) == ["secret"]


def test_pipes_and_huge_files_are_never_read(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    refused(str(fifo), "is a named pipe, not a regular file")
    os.mkfifo(tmp_path / "pipe.jsonl")
    refused(str(tmp_path / "pipe.jsonl"), "named pipe")
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:  # sparse: no disk space, never read
        handle.truncate(paths.MAX_FILE_BYTES * 2)
    refused(str(huge), "is 128.0 MiB, over the limit of 64.0 MiB per file")
    with pytest.raises(CorpusError, match="over the limit"):
        within(QUICK, corpus_hash, str(huge))
    huge_jsonl = tmp_path / "huge.jsonl"
    with huge_jsonl.open("wb") as handle:
        handle.truncate(paths.MAX_TOTAL_BYTES * 2)
    refused(str(huge_jsonl), "is 2.0 GiB, over the limit of 1.0 GiB per file; .* LATENT_EXPLORER_MAX_TOTAL_BYTES")


def test_a_folder_skips_what_it_cannot_read_and_says_so(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    os.mkfifo(tmp_path / "b.txt")
    with (tmp_path / "c.txt").open("wb") as handle:
        handle.truncate(paths.MAX_FILE_BYTES + 1)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "s.txt").write_text("secret")
    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "corpus" / name).symlink_to(tmp_path / name)
    (tmp_path / "corpus" / "d.txt").symlink_to(tmp_path / "secret" / "s.txt")
    (tmp_path / "corpus" / "real.txt").write_text("second")
    notes: list[str] = []
    spec = str(tmp_path / "corpus")
    assert within(QUICK, lambda: list(iter_texts(spec, notes=notes))) == ["second"]
    assert any("outside the folder" in n for n in notes) and len(notes) == 4
    check = check_corpus(spec)
    assert check.kind == "folder" and [f.name for f in check.files] == ["real.txt"] and check.total_bytes == 6
    assert "Skipped in" in check.note() and check.note().endswith(".")

    (tmp_path / "corpus" / "real.txt").unlink()
    message = refused(spec, "holds no .txt files that can be read")
    assert "symbolic link to outside the folder" in message

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("first")
    os.mkfifo(plain / "b.txt")
    with (plain / "c.txt").open("wb") as handle:
        handle.truncate(paths.MAX_FILE_BYTES + 1)
    notes = []
    assert list(iter_texts(str(plain), notes=notes)) == ["first"]
    assert notes == ["b.txt (a named pipe)", "c.txt (67,108,865 bytes, over the limit of 67,108,864 bytes per file)"]
    assert check_corpus(str(plain)).note().startswith("Skipped in")


def test_a_folder_walk_stops_at_the_file_limit(tmp_path, monkeypatch):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")
    monkeypatch.setattr(paths, "MAX_FILES", 4)
    notes: list[str] = []
    assert list(iter_texts(str(tmp_path), notes=notes)) == [f"text {i}" for i in range(4)]
    assert notes == ["stopped at the limit of 4 files"]
    monkeypatch.setattr(paths, "MAX_TOTAL_BYTES", 13)
    assert list(iter_texts(str(tmp_path))) == ["text 0", "text 1"]


def test_a_corpus_without_text_says_so(tmp_path, monkeypatch):
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n")
    (blank / "b.txt").write_text("")
    refused(str(blank), "The corpus '.*blank' holds no text")
    empty_lines = tmp_path / "empty.jsonl"
    empty_lines.write_text(json.dumps({"text": "  "}) + "\n\n")
    refused(str(empty_lines), "holds no text")
    (tmp_path / "blank.txt").write_text(" \n")
    refused(str(tmp_path / "blank.txt"), "is empty")
    long_line = tmp_path / "long.jsonl"
    long_line.write_text(json.dumps({"text": "x" * 100}) + "\n")
    monkeypatch.setattr(paths, "MAX_FILE_BYTES", 50)
    refused(str(long_line), "Line 1 of .* is longer than 50 bytes")


def test_hashes_are_unchanged_and_stay_bounded(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.txt").write_text("first")
    expected = hashlib.sha256()
    for rel in ("b.txt", "sub/a.txt"):  # the layout stores were keyed by before these checks
        expected.update(rel.encode())
        expected.update((tmp_path / rel).read_bytes())
    assert corpus_hash(str(tmp_path)) == expected.hexdigest()
    assert corpus_hash(str(tmp_path / "b.txt")) == hashlib.sha256(b"second").hexdigest()
    os.mkfifo(tmp_path / "pipe.txt")
    assert within(QUICK, corpus_hash, str(tmp_path)) == expected.hexdigest()  # the pipe is skipped
