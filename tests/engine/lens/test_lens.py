"""Lens numerics on tiny random models of every supported architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.anatomy import AnatomyError, find_anatomy
from engine.core.capture import capture
from engine.core.models import from_model
from engine.core.sites import SiteError as CaptureError
from engine.core.tiny import build_tiny
from engine.lens.logit import PromptError, check_prompt, lens_stats, run_lens

PROMPT = "The capital of France is"


def test_last_layer_lens_equals_logits(tiny_lm):
    result = run_lens(tiny_lm, PROMPT, top_k=5)
    assert result.self_check_max_abs_diff < 1e-4
    # the last row's distribution is the model's: KL to final is zero there and positive earlier
    assert np.allclose(result.kl_to_final[-1], 0, atol=1e-5)
    assert result.kl_to_final[:-1].max() > 1e-3
    # and its top-1 is the model's argmax
    ids = torch.tensor([tiny_lm.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        logits = tiny_lm.model(ids).logits[0]
    assert (result.top_ids[-1, :, 0] == logits.argmax(-1).numpy()).all()


def test_captured_layers_match_output_hidden_states(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer(PROMPT)["input_ids"]])
    n = tiny_lm.n_layers
    captured, output = capture(tiny_lm.anatomy, ids, sites={"resid_pre": [0], "resid_post": "all"}, stop_early=False)
    with torch.inference_mode():
        hidden = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(captured["resid_pre"][0], hidden[0])
    for i in range(n - 1):  # hidden_states[-1] is after the final norm; ours is before it
        assert torch.equal(captured["resid_post"][i], hidden[i + 1])
    assert torch.allclose(tiny_lm.anatomy.normalize(captured["resid_post"][-1]), hidden[-1], atol=1e-5)


def test_branches_sum_to_the_residual(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer(PROMPT)["input_ids"]])
    captured, _ = capture(tiny_lm.anatomy, ids, sites={s: "all" for s in ("resid_pre", "attn_out", "mlp_out",
                                                                          "resid_post", "resid_mid")})
    total = captured["resid_pre"] + captured["attn_out"] + captured["mlp_out"]
    assert torch.allclose(total, captured["resid_post"], atol=1e-4)
    assert torch.allclose(captured["resid_mid"], captured["resid_pre"] + captured["attn_out"])


def test_sublayer_rows_and_shapes(tiny_llama):
    result = run_lens(tiny_llama, PROMPT, top_k=3, sublayers=True)
    n, t = tiny_llama.n_layers, len(result.tokens)
    assert result.row_names == ["embed"] + [name for i in range(n) for name in (f"{i}.attn", str(i))]
    assert result.top_ids.shape == (2 * n + 1, t, 3)
    assert result.entropy.shape == result.kl_to_final.shape == (2 * n + 1, t)
    plain = run_lens(tiny_llama, PROMPT, top_k=3)
    post_rows = [result.row_names.index(name) for name in plain.row_names]
    np.testing.assert_allclose(result.top_probs[post_rows], plain.top_probs, atol=1e-6)


def test_tracked_ranks_and_probs_agree_with_sorting(tiny_llama):
    tok = tiny_llama.tokenizer
    track = ["a", " ", "Z"]
    result = run_lens(tiny_llama, PROMPT, top_k=4, track=track)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    captured, _ = capture(tiny_llama.anatomy, ids, sites={"resid_pre": [0], "resid_post": "all"})
    resid = torch.cat([captured["resid_pre"], captured["resid_post"]])[:, 0]
    with torch.inference_mode():
        logits = tiny_llama.anatomy.logits(resid).float()
    probs = logits.softmax(-1)
    order = logits.argsort(-1, descending=True)
    for t, word in enumerate(track):
        tid = tok(word, add_special_tokens=False)["input_ids"][0]
        brute_rank = (order == tid).float().argmax(-1).numpy()
        assert (result.tracked_ranks[..., t] == brute_rank).all()
        np.testing.assert_allclose(result.tracked_probs[..., t], probs[..., tid].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.top_probs, probs.topk(4, -1).values.numpy(), rtol=1e-5, atol=1e-7)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    np.testing.assert_allclose(result.entropy, entropy.numpy(), rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_results(tiny_llama):
    small = run_lens(tiny_llama, PROMPT, top_k=3, track=["e"], budget_bytes=1)  # one position per chunk
    large = run_lens(tiny_llama, PROMPT, top_k=3, track=["e"])
    np.testing.assert_allclose(small.top_probs, large.top_probs, atol=1e-6)
    np.testing.assert_allclose(small.kl_to_final, large.kl_to_final, rtol=1e-5, atol=1e-6)  # fp32 sums in another order
    assert (small.tracked_ranks == large.tracked_ranks).all()


def test_position_subset(tiny_llama):
    full = run_lens(tiny_llama, PROMPT, top_k=3)
    part = run_lens(tiny_llama, PROMPT, top_k=3, positions=[2, 5, 999])
    assert part.positions == [2, 5]
    np.testing.assert_allclose(part.top_probs, full.top_probs[:, [2, 5]], atol=1e-6)


def test_softcapping_is_applied(tokenizer):
    model, tok = build_tiny("gemma2", tokenizer, scale_head=50.0)
    lm = from_model(model, tok)
    assert lm.anatomy.softcap == 5.0
    result = run_lens(lm, PROMPT)
    assert result.self_check_max_abs_diff < 1e-4
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    captured, out = capture(lm.anatomy, ids, sites={"resid_post": [lm.n_layers - 1]}, stop_early=False)
    uncapped = lm.anatomy.unembed(lm.anatomy.normalize(captured["resid_post"][0, 0]))
    assert out.logits.abs().max() <= 5.0 + 1e-4
    assert (uncapped - out.logits[0]).abs().max() > 1.0  # the cap really bites here


def test_double_norm_would_be_caught(tiny_llama):
    """A lens that normalises HF's hidden_states[-1] again must fail the self-check."""
    ids = torch.tensor([tiny_llama.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = tiny_llama.model(ids, output_hidden_states=True)
        twice = tiny_llama.anatomy.logits(out.hidden_states[-1])
    assert (twice - out.logits).abs().max() > 1e-3


def test_stop_early_skips_later_layers(tiny_llama):
    ids = torch.tensor([tiny_llama.tokenizer(PROMPT)["input_ids"]])
    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_llama.model.modules())

    before = hook_count()
    calls = []
    handle = tiny_llama.anatomy.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        captured, output = capture(tiny_llama.anatomy, ids, sites={"resid_post": [0]})
    finally:
        handle.remove()
    assert output is None and not calls
    assert captured["resid_post"].shape[0] == 1
    assert hook_count() == before  # our hooks are gone afterwards


def test_capture_validates_layers_and_sites(tiny_llama):
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(CaptureError, match="layer 7 does not exist"):
        capture(tiny_llama.anatomy, ids, sites={"resid_post": [7]})
    with pytest.raises(CaptureError, match="unknown site"):
        capture(tiny_llama.anatomy, ids, sites={"resid_banana": [0]})


def test_padding_does_not_change_real_positions(tiny_lm):
    tok = tiny_lm.tokenizer
    a, b = tok("short")["input_ids"], tok("a much longer prompt")["input_ids"]
    width = max(len(a), len(b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((a, b)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    batched, _ = capture(tiny_lm.anatomy, ids, mask, sites={"resid_post": "all"})
    single, _ = capture(tiny_lm.anatomy, torch.tensor([a]), sites={"resid_post": "all"})
    assert torch.allclose(batched["resid_post"][:, 0, :len(a)], single["resid_post"][:, 0], atol=1e-4)


def test_prompt_validation(tokenizer):
    with pytest.raises(PromptError, match="empty"):
        check_prompt("   ", tokenizer, 128)
    with pytest.raises(PromptError, match="tokens long"):
        check_prompt("x" * 600, tokenizer, 512)
    with pytest.raises(PromptError, match="does not look like text"):
        check_prompt("\x00\x01\x02\x03binary\x04\x05", tokenizer, 128)
    assert check_prompt("Ünïcödé and 中文 are fine", tokenizer, 128)


def test_unknown_layout_is_named():
    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def get_output_embeddings(self):
            return None

    with pytest.raises(AnatomyError, match="no list of decoder layers"):
        find_anatomy(NotAnLM())


def test_lens_stats_kl_matches_direct_computation(tiny_llama):
    torch.manual_seed(0)
    resid = torch.randn(3, 4, tiny_llama.d_model)
    stats = lens_stats(tiny_llama.anatomy, resid, top_k=2)
    with torch.inference_mode():
        logp = tiny_llama.anatomy.logits(resid).float().log_softmax(-1)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    np.testing.assert_allclose(stats["kl"].numpy(), kl.numpy(), atol=1e-5)


def test_sub_modules_are_the_real_attention_and_mlp(tiny_lm):
    anatomy = tiny_lm.anatomy
    for i in range(anatomy.n_layers):
        for module in (anatomy.attn_module(i), anatomy.mlp_module(i)):
            assert not isinstance(module, torch.nn.Dropout) and sum(p.numel() for p in module.parameters()) > 0
        assert anatomy.mlp_out_proj(i).weight.ndim == 2
        assert anatomy.attn_out_proj(i).weight.ndim == 2


def test_mlp_hidden_feeds_the_output_projection(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer(PROMPT)["input_ids"]])
    captured, _ = capture(tiny_lm.anatomy, ids, sites={"mlp_hidden": [0], "mlp_out": [0]})
    proj = tiny_lm.anatomy.mlp_out_proj(0)
    with torch.inference_mode():
        out = proj(captured["mlp_hidden"][0])
    if not tiny_lm.anatomy.sandwich:  # with a post-MLP norm the branch output is normed afterwards
        assert torch.allclose(out, captured["mlp_out"][0], atol=1e-4)
