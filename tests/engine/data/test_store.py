"""Activation store: exact capture, padding, resume, corruption, reading, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from engine.data.store import ActivationStore, StoreError, list_stores
from engine.data.store_admin import delete_store
from engine.data.store_writer import build_store
from engine.data.windows import iter_windows, special_prefix

TEXTS = ["The cat sat on the mat.", "A much longer document that spans more than one context window for sure, "
         "because it keeps going and going.", "ok", "Zwei Wörter und ein Satz mit Umlauten: äöü."]


def _texts(n: int = 40) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(n)]


def _build(lm, out, **kwargs):
    options = dict(max_tokens=10_000, context_length=32, batch_size=3, dtype="float32", corpus_spec="")
    options.update(kwargs)
    return build_store(lm, iter(options.pop("texts", TEXTS)), out, **options)


def test_store_equals_output_hidden_states(tiny_lm, tmp_path):
    store = _build(tiny_lm, tmp_path / "s")
    windows = list(iter_windows(tiny_lm.tokenizer, TEXTS, 32, max_tokens=10_000))
    assert store.n_tokens == sum(len(w) for _, w, _ in windows) and store.layers == list(range(tiny_lm.n_layers))
    row = 0
    for _, ids, _ in windows:  # each window alone, unpadded, against the padded batched capture in the store
        with torch.inference_mode():
            hidden = tiny_lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in store.layers[:-1]:
            stored = store.read("resid_post", layer, slice(row, row + len(ids)))
            scale = hidden[layer + 1][0].abs().max()
            assert torch.allclose(stored, hidden[layer + 1][0], atol=1e-5 * scale, rtol=1e-4), layer
        row += len(ids)


def test_padding_never_leaks(tiny_llama, tmp_path):
    store = _build(tiny_llama, tmp_path / "s", batch_size=4)
    windows = list(iter_windows(tiny_llama.tokenizer, TEXTS, 32, max_tokens=10_000))
    assert store.token_ids().tolist() == [t for _, w, _ in windows for t in w]
    assert (store.token_ids() != tiny_llama.tokenizer.pad_token_id).all()
    assert store.positions().tolist() == [p for _, w, _ in windows for p in range(len(w))]
    assert store.doc_ids().tolist() == [d for d, w, _ in windows for _ in w]
    # batch size does not change what is stored
    single = _build(tiny_llama, tmp_path / "single", batch_size=1)
    a, b = store.read("resid_post", 1, slice(None)), single.read("resid_post", 1, slice(None))
    assert torch.allclose(a, b, atol=1e-4 * b.abs().max())


def test_windows_start_with_bos_and_respect_max_tokens(tiny_llama):
    prefix = special_prefix(tiny_llama.tokenizer)
    assert prefix == [tiny_llama.tokenizer.bos_token_id]
    windows = list(iter_windows(tiny_llama.tokenizer, TEXTS, 16, max_tokens=50))
    assert all(w[0] == prefix[0] and len(w) <= 16 for _, w, _ in windows)
    assert sum(len(w) for _, w, _ in windows) == 50 and windows[-1][2]


def test_interrupted_run_resumes_and_verifies(tiny_llama, tmp_path):
    texts = _texts()
    reference = _build(tiny_llama, tmp_path / "ref", texts=texts, shard_tokens=100, dtype="float16")
    assert len(reference.manifest["shards"]) >= 4

    calls = {"n": 0}

    def crash(fraction, message):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_llama, out, texts=texts, shard_tokens=100, dtype="float16", progress=crash)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(reference.manifest["shards"])
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(out)
    resumed = _build(tiny_llama, out, texts=texts, shard_tokens=100, dtype="float16")
    assert resumed.verify() == []
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]


def test_extend_and_refuse_other_settings(tiny_llama, tmp_path):
    texts = _texts()
    small = _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=150, shard_tokens=64)
    assert small.n_tokens == 150
    bigger = _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=400, shard_tokens=64)
    straight = _build(tiny_llama, tmp_path / "t", texts=texts, max_tokens=400, shard_tokens=64)
    assert bigger.n_tokens == 400 and torch.equal(bigger.token_ids(), straight.token_ids())
    assert torch.allclose(bigger.read("resid_post", 2, slice(None)), straight.read("resid_post", 2, slice(None)))
    with pytest.raises(StoreError, match="different"):
        _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=400, layers=[0])


def test_corrupted_shard_is_detected_and_rebuilt(tiny_llama, tmp_path):
    out = tmp_path / "s"
    store = _build(tiny_llama, out, texts=_texts(), shard_tokens=100)
    victim = out / store.manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = ActivationStore.open(out).verify()
    assert len(problems) == 1 and victim.name in problems[0] and "checksum" in problems[0]
    victim.write_bytes(bytes(data[:-100]))  # truncated: refused on open, naming the shard
    with pytest.raises(StoreError, match=victim.name):
        ActivationStore.open(out)
    victim.write_bytes(bytes(data))  # back to the right size, still the wrong checksum
    (out / store.manifest["shards"][2]["file"]).unlink()
    with pytest.raises(StoreError, match="shard_00002.safetensors' of the store .* is missing"):
        ActivationStore.open(out).verify()
    rebuilt = _build(tiny_llama, out, texts=_texts(), shard_tokens=100, max_tokens=10_001)
    assert rebuilt.verify() == [] and rebuilt.n_tokens == store.n_tokens


def test_reading(tiny_llama, tmp_path):
    store = _build(tiny_llama, tmp_path / "s", texts=_texts(), shard_tokens=50, sites=("resid", "mlp_hidden"),
                   layers=[0, 2])
    assert store.sites == ["resid_post", "mlp_hidden"] and store.layers == [0, 2]
    everything = store.read("resid_post", 2, slice(None))
    rows = torch.tensor([store.n_tokens - 1, 3, 77, 3])
    assert torch.equal(store.read("resid_post", 2, rows), everything[rows])
    assert store.read("mlp_hidden", 0, [1, 2]).shape == (2, 64)
    batches = list(store.iter_batches("resid_post", 2, 16))
    not_first = everything[store.positions() != 0]
    assert torch.equal(torch.cat(batches), not_first) and all(b.shape[0] == 16 for b in batches[:-1])
    shuffled = torch.cat(list(store.iter_batches("resid_post", 2, 16, shuffle=True, seed=1)))
    assert not torch.equal(shuffled, not_first)
    assert torch.allclose(shuffled.sum(0), not_first.sum(0), rtol=1e-4, atol=1e-2)
    with_bos = sum(b.shape[0] for b in store.iter_batches("resid_post", 0, 16, skip_first_position=False))
    assert with_bos == store.n_tokens
    ids, at = store.context(40, before=5, after=2)
    assert ids[at] == int(store.token_ids()[40]) and len(ids) <= 8
    assert store.context(0)[1] == 0
    with pytest.raises(StoreError, match="no layer 1"):
        store.read("resid_post", 1, [0])
    with pytest.raises(StoreError, match="no site"):
        store.read("attn_out", 0, [0])
    with pytest.raises(StoreError, match="outside"):
        store.read("resid_post", 0, [store.n_tokens])


def test_bad_settings_and_model_mismatch(tiny_llama, tmp_path):
    with pytest.raises(StoreError, match="Layer 9"):
        _build(tiny_llama, tmp_path / "a", layers=[9])
    with pytest.raises(StoreError, match="Unknown site"):
        _build(tiny_llama, tmp_path / "a", sites=("nowhere",))
    with pytest.raises(StoreError, match="dtype"):
        _build(tiny_llama, tmp_path / "a", dtype="int8")
    store = _build(tiny_llama, tmp_path / "b", max_tokens=20)
    other = type(tiny_llama)(**{**tiny_llama.__dict__, "weights_hash": "other", "name": "other"})
    with pytest.raises(StoreError, match="captured from 'tiny-llama'"):
        store.check_model(other)
    store.check_model(tiny_llama)


def test_list_and_delete(tiny_llama, tmp_path):
    _build(tiny_llama, tmp_path / "root" / "one", max_tokens=20)
    entries = list_stores(tmp_path / "root")
    assert [e["name"] for e in entries] == ["one"] and entries[0]["complete"] and entries[0]["size_bytes"] > 0
    assert list_stores(tmp_path / "root", complete=True, weights_hash=tiny_llama.weights_hash) == entries
    assert list_stores(tmp_path / "root", weights_hash="another model") == []
    (tmp_path / "root" / "notastore").mkdir()
    with pytest.raises(StoreError, match="not an activation store"):
        delete_store(tmp_path / "root" / "notastore")
    delete_store(entries[0]["path"])
    assert list_stores(tmp_path / "root") == []


def test_cli_store_info_project_geometry(tiny_llama, tmp_path, capsys):
    from engine.cli.common import main

    out = tmp_path / "s"
    _build(tiny_llama, out, texts=_texts(), shard_tokens=100)
    assert main(["store-info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"] == [] and info["n_tokens"] > 0
    assert main(["project", "--store", str(out), "--layer", "1", "--method", "pca", "--json"]) == 0
    projection = json.loads(capsys.readouterr().out)
    assert len(projection["coords"]) == len(projection["rows"]) > 0 and len(projection["coords"][0]) == 2
    assert main(["geometry", "--store", str(out), "--label", "position", "--max-points", "400", "--json"]) == 0
    geometry = json.loads(capsys.readouterr().out)
    assert len(geometry["measures"]["effective rank"]) == 3 and len(geometry["probe"]["accuracy"]) == 3
    assert main(["project", "--store", str(out), "--layer", "7", "--method", "pca"]) == 2
    assert "layer 7" in capsys.readouterr().err
    victim = out / "shard_00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["store-info", str(out)]) == 1
    assert "shard_00001.safetensors: checksum mismatch" in capsys.readouterr().out


def test_float16_overflow_is_clamped_and_counted(tokenizer, tmp_path):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama", tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e8)  # residuals far beyond fp16's 65504
    lm = from_model(model, tok, name="loud", check=False)
    store = _build(lm, tmp_path / "s", dtype="float16", max_tokens=60)
    values = store.read("resid_post", 0, slice(None))
    assert torch.isfinite(values).all() and values.abs().max() == torch.finfo(torch.float16).max
    assert store.manifest["n_clamped"] > 0
    assert store.manifest["n_clamped"] == sum(s["n_clamped"] for s in store.manifest["shards"])


def test_bfloat16_model_into_float16_store_clamps_every_value(tokenizer, tmp_path):
    """Issue 13: in bfloat16, 65504 rounds to 65536, so clamping there left 65536 (inf in float16) and the
    count missed the values that were exactly 65536. Now the clamp is done in float32."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama", tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3e6)  # residuals around fp16's limit: some beyond, some not
    lm = from_model(model.to(torch.bfloat16), tok, name="loud-bf16", check=False)
    half = _build(lm, tmp_path / "half", dtype="float16", max_tokens=200)
    exact = _build(lm, tmp_path / "exact", dtype="float32", max_tokens=200)  # bf16 values, upcast exactly
    limit = torch.finfo(torch.float16).max
    beyond, at_65536, stored = 0, 0, []
    for layer in half.layers:
        reference = exact.read("resid_post", layer, slice(None))
        values = half.read("resid_post", layer, slice(None), dtype=torch.float32)
        assert torch.isfinite(values).all(), layer
        over = reference.abs() > limit
        beyond += int(over.sum())
        at_65536 += int((reference.abs() == 65536).sum())
        assert torch.equal(values[over], reference[over].sign() * limit)
        assert torch.equal(values[~over], reference[~over].half().float())
        stored.append(values)
    assert beyond > 100 and at_65536 > 0 and beyond < sum(v.numel() for v in stored)  # the case of the issue
    assert half.manifest["n_clamped"] == beyond
    assert half.manifest["n_clamped"] == sum(s["n_clamped"] for s in half.manifest["shards"])


def test_a_writer_leaves_other_writers_temp_files_and_one_writer_at_a_time(tiny_llama, tmp_path):
    import os

    from engine.data.store_admin import remove_stale_temp_files, stale_temp_files
    from engine.data.store_writer import _one_writer

    out = tmp_path / "s"
    out.mkdir()
    alive = out / f".shard_00000.safetensors.{os.getpid() + 0}.7.tmp"  # as if another thread of ours were writing
    dead = out / ".shard_00001.safetensors.999999999.1.tmp"             # a killed capture's leftover
    alive.write_bytes(b"x" * 10)
    dead.write_bytes(b"y" * 20)
    store = _build(tiny_llama, out, texts=_texts(), shard_tokens=100, max_tokens=300)
    assert store.verify() == [] and alive.is_file() and dead.is_file()  # the writer deleted neither
    _build(tiny_llama, out, texts=_texts(), shard_tokens=100, max_tokens=500)  # nor does an extension
    assert alive.is_file() and dead.is_file()
    assert stale_temp_files(out) == [dead] and remove_stale_temp_files(out) == 20 and alive.is_file()
    with _one_writer(out), pytest.raises(StoreError, match="Another capture is writing"):
        _build(tiny_llama, out, texts=_texts(), shard_tokens=100, max_tokens=700)
    assert _build(tiny_llama, out, texts=_texts(), shard_tokens=100, max_tokens=700).n_tokens == 700


def test_extending_appends_shards_and_never_touches_earlier_ones(tiny_llama, tmp_path):
    texts = _texts()
    small = _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=150, shard_tokens=64)
    before = {s["file"]: (tmp_path / "s" / s["file"]).stat() for s in small.manifest["shards"]}
    bigger = _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=400, shard_tokens=64)
    assert bigger.manifest["shards"][:len(before)] == small.manifest["shards"]
    for name, stat in before.items():  # same inode, same modification time: not rewritten
        now = (tmp_path / "s" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # a store extended twice equals one captured in one go, also where a window was cut at each max_tokens
    again = _build(tiny_llama, tmp_path / "s", texts=texts, max_tokens=555, shard_tokens=64)
    straight = _build(tiny_llama, tmp_path / "t", texts=texts, max_tokens=555, shard_tokens=64)
    assert torch.equal(again.token_ids(), straight.token_ids()) and torch.equal(again.positions(), straight.positions())
    assert torch.equal(again.doc_ids(), straight.doc_ids())
    assert torch.allclose(again.read("resid_post", 1, slice(None)), straight.read("resid_post", 1, slice(None)),
                          atol=1e-5)


def test_an_interrupted_capture_asked_for_fewer_tokens_is_finished_as_is(tiny_llama, tmp_path):
    calls = {"n": 0}

    def crash(fraction, message):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(tiny_llama, tmp_path / "s", texts=_texts(), shard_tokens=60, max_tokens=1000, progress=crash)
    stored = json.loads((tmp_path / "s" / "manifest.json").read_text())["n_tokens"]
    assert stored > 100
    store = _build(tiny_llama, tmp_path / "s", texts=_texts(), shard_tokens=60, max_tokens=100)
    assert store.n_tokens == stored and store.verify() == [] and store.manifest["complete"]
