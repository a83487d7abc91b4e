"""Tuned lens: identity start, training, checkpoints in the tuned-lens layout, bad files, CLI, figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.core.models import from_model
from engine.core.tiny import build_tiny
from engine.lens.compare import compare_lenses
from engine.lens.logit import run_lens
from engine.lens.tuned import CONFIG_FILE, PARAMS_FILE, TunedLens, TunedLensError
from engine.lens.tuned_data import ReadoutHead, capture_rows, is_heldout
from engine.lens.tuned_train import LensTrainConfig, train_tuned_lens

PROMPT = "The capital of France is Paris, and"
WORDS = ["cat", "dog", "red", "blue", "tree", "house", "river", "stone", "light", "music"]
TEXTS = [f"The {WORDS[i % 10]} and the {WORDS[(3 * i) % 10]} are number {i}; {WORDS[(7 * i) % 10]} again." for i in range(240)]


def _randomize(lens: TunedLens, seed: int = 0, scale: float = 0.05) -> TunedLens:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return lens


@pytest.fixture(scope="module")
def small_lm(tokenizer):
    model, tok = build_tiny("llama", tokenizer, seed=1)
    return from_model(model, tok, name="tiny-llama-tl")


def test_identity_lens_is_exactly_the_logit_lens(tiny_lm):
    lens = TunedLens.for_model(tiny_lm)
    plain = run_lens(tiny_lm, PROMPT, top_k=5, sublayers=True)
    tuned = run_lens(tiny_lm, PROMPT, top_k=5, sublayers=True, transform=lens, lens_name="tuned")
    assert np.array_equal(plain.top_ids, tuned.top_ids)
    assert np.array_equal(plain.top_probs, tuned.top_probs)
    assert np.array_equal(plain.kl_to_final, tuned.kl_to_final)
    assert np.array_equal(plain.entropy, tuned.entropy)
    assert tuned.lens == "tuned"


def test_translator_is_residual_affine_and_last_layer_is_identity(small_lm):
    lens = _randomize(TunedLens.for_model(small_lm))
    h = torch.randn(5, small_lm.d_model)
    for index in range(small_lm.n_layers):
        t = lens.translators[index]
        expected = h + h @ t.weight.T + t.bias
        torch.testing.assert_close(lens(index, h), expected)
    assert torch.equal(lens(small_lm.n_layers, h), h)  # the last layer's output needs no translator
    stacked = torch.stack([h] * small_lm.n_layers)
    torch.testing.assert_close(lens.translate_all(stacked), torch.stack([lens(i, h) for i in range(small_lm.n_layers)]))
    # and a non-identity lens really changes run_lens' read-out, except on the last row
    plain = run_lens(small_lm, PROMPT, top_k=3)
    moved = run_lens(small_lm, PROMPT, top_k=3, transform=lens)
    assert not np.allclose(plain.top_probs[:-1], moved.top_probs[:-1])
    assert np.array_equal(plain.top_probs[-1], moved.top_probs[-1])


def test_training_lowers_heldout_kl(small_lm, tmp_path):
    config = LensTrainConfig(steps=40, batch_size=4, seq_len=32, lr=0.05, heldout_fraction=0.25, checkpoint_every=100)
    assert 0 < sum(is_heldout(t, 0.25) for t in TEXTS) < len(TEXTS)
    result = train_tuned_lens(small_lm, TEXTS, tmp_path / "lens", config)
    assert result.steps_done == 40 and len(result.losses) == 40 and result.tokens_seen > 0
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    heldout = compare_lenses(small_lm, result.lens, TEXTS, max_tokens=300, seq_len=32, heldout_fraction=0.25)
    inner = slice(0, small_lm.n_layers)  # the last row is the final distribution for both lenses
    assert heldout.kl_logit[-1] == pytest.approx(0, abs=1e-5) and heldout.kl_tuned[-1] == pytest.approx(0, abs=1e-5)
    assert heldout.kl_tuned[inner].mean() < 0.8 * heldout.kl_logit[inner].mean()
    assert (heldout.kl_tuned[inner] < heldout.kl_logit[inner]).all()
    assert heldout.ce_logit[-1] == pytest.approx(heldout.ce_tuned[-1])
    # an identity lens compares equal to the logit lens
    same = compare_lenses(small_lm, TunedLens.for_model(small_lm), TEXTS, max_tokens=100, seq_len=32,
                          heldout_fraction=0.25)
    np.testing.assert_allclose(same.kl_tuned, same.kl_logit)


def test_vocab_subset_head_matches_full_head_and_trains(tokenizer, tmp_path):
    model, tok = build_tiny("gemma2", tokenizer)  # softcapped logits
    lm = from_model(model, tok, name="tiny-gemma2-tl")
    rows, labels = capture_rows(lm, [tok(t)["input_ids"] for t in TEXTS[:3]], with_labels=True)
    assert rows.shape[0] == lm.n_layers + 1 and rows.shape[1] == labels.shape[0]
    ids = torch.tensor([3, 10, 50, 99, 120])
    torch.testing.assert_close(ReadoutHead(lm.anatomy, ids).logits(rows[-1]), lm.anatomy.logits(rows[-1])[:, ids])
    config = LensTrainConfig(steps=15, batch_size=4, seq_len=32, lr=0.05, vocab_subset=120, subset_windows=8)
    result = train_tuned_lens(lm, TEXTS, None, config)
    assert 0.5 < result.subset_coverage <= 1.0
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])


def test_save_load_round_trip_is_bit_exact_in_tuned_lens_layout(small_lm, tmp_path):
    lens = _randomize(TunedLens.for_model(small_lm), seed=3)
    folder = lens.save(tmp_path / "lens")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["d_model"] == small_lm.d_model and config["num_hidden_layers"] == small_lm.n_layers
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    assert {"base_model_name_or_path", "unembed_hash", "base_model_revision"} <= set(config)
    params = torch.load(folder / PARAMS_FILE, weights_only=True)
    assert set(params) == {f"{i}.{p}" for i in range(small_lm.n_layers) for p in ("weight", "bias")}
    assert params["0.weight"].shape == (small_lm.d_model, small_lm.d_model)
    loaded = TunedLens.load(folder, small_lm)
    assert not loaded.warnings
    for (name, a), (_, b) in zip(lens.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    h = torch.randn(4, small_lm.d_model)
    assert torch.equal(lens(1, h), loaded(1, h))


def test_a_save_cut_short_is_reported_not_mixed(small_lm, tmp_path):
    """Weights of a second lens written next to the first lens's config (a save killed before its config.json)."""
    first = _randomize(TunedLens.for_model(small_lm), seed=3).save(tmp_path / "lens")
    _randomize(TunedLens.for_model(small_lm), seed=4).save(tmp_path / "other")
    config = json.loads((first / CONFIG_FILE).read_text())
    assert set(config["latent_explorer"]["files"]) == {PARAMS_FILE, "lens.safetensors"}
    TunedLens.load(first, small_lm)
    (first / PARAMS_FILE).write_bytes((tmp_path / "other" / PARAMS_FILE).read_bytes())
    with pytest.raises(TunedLensError, match="cut short"):
        TunedLens.load(first, small_lm)


def test_published_layout_without_our_metadata_loads(small_lm, tmp_path):
    """A folder written the tuned-lens package's way (bias-free, prefixed keys) loads."""
    folder = tmp_path / "published"
    folder.mkdir()
    d, n = small_lm.d_model, small_lm.n_layers
    (folder / CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": "x", "d_model": d, "num_hidden_layers": n,
                                                  "bias": False, "unembed_hash": "not-this-model"}))
    weights = {f"layer_translators.{i}.weight": torch.full((d, d), 0.01 * i, dtype=torch.float16) for i in range(n)}
    torch.save(weights, folder / PARAMS_FILE)
    lens = TunedLens.load(folder, small_lm)
    assert lens.bias is False and lens.translators[2].weight.dtype == torch.float32
    assert torch.equal(lens.translators[2].weight, torch.full((d, d), 0.02, dtype=torch.float16).float())
    assert lens.warnings and "unembedding" in lens.warnings[0]
    with pytest.raises(TunedLensError, match="unembedding"):
        TunedLens.load(folder, small_lm, strict_hash=True)


def test_bad_checkpoints_give_one_clear_error(small_lm, tokenizer, tmp_path):
    # another width
    wide = TunedLens(small_lm.n_layers, small_lm.d_model * 2)
    wide.save(tmp_path / "wide")
    with pytest.raises(TunedLensError, match="width"):
        TunedLens.load(tmp_path / "wide", small_lm)
    # another model with the same shape (our provenance says so)
    model, tok = build_tiny("llama", tokenizer, seed=5)
    other = TunedLens.for_model(from_model(model, tok, name="another-llama"))
    other.save(tmp_path / "other")
    with pytest.raises(TunedLensError, match="other weights"):
        TunedLens.load(tmp_path / "other", small_lm)
    # a config that lies about the width of params.pt
    good = TunedLens.for_model(small_lm).save(tmp_path / "liar")
    cfg = json.loads((good / CONFIG_FILE).read_text())
    cfg["latent_explorer"].pop("files")  # no digests (as in a published lens): the shapes are checked
    torch.save({k: v[..., :8] for k, v in torch.load(good / PARAMS_FILE, weights_only=True).items()}, good / PARAMS_FILE)
    (good / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(TunedLensError, match="does not match its config"):
        TunedLens.load(good, small_lm)
    # truncated params.pt
    folder = TunedLens.for_model(small_lm).save(tmp_path / "truncated")
    data = (folder / PARAMS_FILE).read_bytes()
    (folder / PARAMS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(TunedLensError, match="truncated") as info:
        TunedLens.load(folder, small_lm)
    assert "\n" not in str(info.value)
    # no folder, no config
    with pytest.raises(TunedLensError, match="does not exist"):
        TunedLens.load(tmp_path / "missing", small_lm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunedLensError, match="config.json"):
        TunedLens.load(tmp_path / "empty", small_lm)


def test_interrupted_training_resumes_to_the_same_lens(small_lm, tmp_path):
    config = LensTrainConfig(steps=8, batch_size=2, seq_len=24, lr=0.05, checkpoint_every=4)
    straight = train_tuned_lens(small_lm, TEXTS, tmp_path / "straight", config)

    class Stop(Exception):
        pass

    def interrupt(fraction, message):
        if fraction > 0.6:
            raise Stop
    with pytest.raises(Stop):
        train_tuned_lens(small_lm, TEXTS, tmp_path / "resumed", config, progress=interrupt)
    resumed = train_tuned_lens(small_lm, TEXTS, tmp_path / "resumed", config)
    assert resumed.resumed_from == 4 and resumed.steps_done == 8
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in zip(straight.lens.parameters(), resumed.lens.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # other settings on the same folder: a clear error instead of a silent mix
    with pytest.raises(TunedLensError, match="other settings"):
        train_tuned_lens(small_lm, TEXTS, tmp_path / "resumed", LensTrainConfig(steps=8, batch_size=3, seq_len=24))


def test_cli_train_and_eval(tmp_path, capsys, monkeypatch):
    import engine.cli.common
    from engine.cli.common import main

    monkeypatch.setattr(engine.cli.common, "COMMAND_MODULES", ["engine.cli.tuned_lens"])  # only this topic's parser
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))  # train runs as a job in this cache

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    out = tmp_path / "cli_lens"
    code = main(["tuned-lens", "train", "--model", "tiny:llama", "--corpus", str(corpus), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--seq-len", "24", "--heldout", "0", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["steps"] == 3 and (out / PARAMS_FILE).is_file()
    code = main(["tuned-lens", "eval", "--model", "tiny:llama", "--corpus", str(corpus), "--lens", str(out),
                 "--tokens", "40", "--seq-len", "24", "--all-texts", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_tokens"] == 40 and len(result["kl_to_final"]["tuned"]) == len(result["layers"])
    code = main(["tuned-lens", "eval", "--model", "tiny:llama", "--lens", str(tmp_path / "nope")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_comparison_figure_and_disagreement(small_lm):
    from components.tuned_lens_ui import comparison_figure, disagreement, disagreement_heatmap, summary_line

    lens = _randomize(TunedLens.for_model(small_lm), seed=1, scale=0.2)
    comparison = compare_lenses(small_lm, lens, TEXTS[:20], max_tokens=60, seq_len=24, heldout_fraction=None)
    fig = comparison_figure(comparison)
    assert len(fig.data) == 4 and list(fig.data[0].x) == comparison.layers
    assert fig.data[1].y[0] == pytest.approx(comparison.ce_logit[0])

    plain = run_lens(small_lm, PROMPT, top_k=5)
    same = run_lens(small_lm, PROMPT, top_k=5, transform=TunedLens.for_model(small_lm))
    tuned = run_lens(small_lm, PROMPT, top_k=5, transform=lens, lens_name="tuned")
    for metric in ("top1", "overlap", "kl_gain", "top1_prob"):
        assert np.allclose(disagreement(plain, same, metric), 0)
    differs = disagreement(plain, tuned, "top1")
    assert differs.shape == (len(plain.row_names), len(plain.positions))
    assert differs[:-1].any() and not differs[-1].any()
    heat = disagreement_heatmap(plain, tuned, "kl_gain")
    assert np.allclose(np.array(heat.data[0].z), plain.kl_to_final - tuned.kl_to_final)
    assert "agree" in summary_line(plain, tuned)
    other = run_lens(small_lm, "A different prompt", top_k=5)
    with pytest.raises(ValueError):
        disagreement(plain, other)


def test_step_loss_is_the_same_under_any_memory_budget(small_lm, monkeypatch):
    """The KL step works in token x layer blocks within ``budget_bytes`` (no full [N, V] teacher); the loss and
    the gradients do not depend on the block sizes, and no head call sees more rows than the budget allows."""
    from engine.lens import tuned_train
    from engine.lens.tuned_data import rows_per_chunk

    windows = [small_lm.tokenizer(f"Sentence number {i} about cats and dogs.")["input_ids"][:12] for i in range(3)]
    rows, _ = capture_rows(small_lm, windows)
    head = ReadoutHead(small_lm.anatomy, None)
    seen: list[int] = []
    logits = head.logits
    monkeypatch.setattr(head, "logits", lambda resid: seen.append(resid.reshape(-1, resid.shape[-1]).shape[0])
                        or logits(resid))
    results = []
    for budget in (1 << 30, head.size * 4 * 6 * 5):  # everything at once; 5 rows per block
        lens = _randomize(TunedLens.for_model(small_lm), scale=0.01)
        seen.clear()
        loss, per_layer = tuned_train._step_loss(lens, head, rows, budget)
        results.append((loss, per_layer, [t.weight.grad.clone() for t in lens.translators]))
        assert max(seen) <= max(1, rows_per_chunk(head.size, budget))
    (loss_a, layers_a, grads_a), (loss_b, layers_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert np.allclose(layers_a, layers_b, rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_a, grads_b))
