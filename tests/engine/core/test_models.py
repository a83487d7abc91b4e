"""Model loading: bad input gives one sentence; converted-weight cache; the real embedded models."""
from __future__ import annotations

import json

import pytest
import torch

from engine.cli.common import main
from engine.core.models import ModelLoadError, load_model, resolve
from engine.core.sources import _is_complete
from engine.lens.logit import run_lens


@pytest.mark.parametrize("spec, message", [
    ("", "No model was given"),
    ("./no/such/folder", "does not exist"),
    ("/tmp/definitely-missing.gguf", "does not exist"),
    ("tiny:transformer-xl", "Unknown tiny architecture"),
])
def test_bad_specs_fail_with_one_sentence(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve(spec)


def test_unknown_hub_id_is_one_sentence():
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model-xyz")
    text = str(info.value)
    assert "could not be loaded" in text and "\n" not in text


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="could not be read as a GGUF model"):
        load_model(str(fake))


def test_bad_device_and_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny:llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no usable GPU"):
            load_model("tiny:llama", device="cuda")


def test_local_folder_roundtrip(tmp_path):
    lm = load_model("tiny:qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.source.kind == "local" and again.self_check_max_abs_diff < 1e-4
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)


def test_incomplete_converted_folder_is_not_used(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "latent_explorer.json").write_text(json.dumps({"format": 1, "bytes": 5000}))
    assert not _is_complete(tmp_path)  # truncated: the size does not match the manifest
    (tmp_path / "latent_explorer.json").write_text("{not json")
    assert not _is_complete(tmp_path)


def test_cli_lens_json(capsys):
    assert main(["lens", "--model", "tiny:gpt2", "--prompt", "Hello world", "--top-k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["self_check_max_abs_diff"] < 1e-4
    assert len(payload["layers"]) == 4 and len(payload["layers"][0]["positions"][0]["top"]) == 3


def test_cli_bad_input_exits_2_without_traceback(capsys):
    assert main(["lens", "--model", "no-such-org/nothing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert main(["lens", "--model", "tiny:llama", "--prompt", "   "]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_says_paris():
    lm = load_model("smollm2-135m")
    assert lm.self_check_max_abs_diff <= 1e-3
    result = run_lens(lm, "The capital of France is", top_k=5, track=[" Paris"])
    assert result.top_tokens[-1][-1][0] == " Paris"
    assert result.tracked_ranks[-1, -1, 0] == 0
    assert result.self_check_max_abs_diff <= 1e-3
    assert len(result.row_names) == 31  # embeddings + 30 layers


@pytest.mark.real_model
def test_gemma_self_check_and_cache():
    lm = load_model("gemma-3-270m")
    assert lm.n_layers == 18 and lm.anatomy.vocab_size == 262144
    assert lm.self_check_max_abs_diff <= 1e-3
    result = run_lens(lm, "The capital of France is", top_k=5, track=[" Paris"], sublayers=True)
    assert result.self_check_max_abs_diff <= 1e-3
    assert len(result.row_names) == 1 + 2 * 18
    assert result.tracked_ranks[-1, -1, 0] < 10  # Paris is among the top candidates at the last layer


def test_unknown_hub_id_offline_fails_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model-offline")
    assert time.perf_counter() - start < 1.0
    text = str(info.value)
    assert "could not be loaded" in text and "offline" in text and "\n" not in text


def test_unknown_hub_id_without_network_fails_at_once(monkeypatch):
    import time

    import engine.core.sources as sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=1.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model("no-such-org/no-such-model-unreachable")
    assert time.perf_counter() - start < 1.0
