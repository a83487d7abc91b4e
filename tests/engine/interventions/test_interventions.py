"""Interventions on tiny random models: steering, ablation, clamping, patching, sweeps, hooks always removed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engine.interventions.ops as iv
from engine.core.capture import capture
from engine.core.errors import UserError
from engine.core.tiny import ARCHS

PROMPT = "The cat sat on the mat"
OTHER = "The dog sat on the rug"   # same token count as PROMPT (byte-level tokenizer)


def hook_count(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


@pytest.fixture(scope="module")
def lm():
    from engine.core.models import load_model

    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def sae_folder(lm, tmp_path_factory):
    from engine.sae.base import SAE, SAEConfig

    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=lm.d_model, d_sae=64, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return str(sae.save(tmp_path_factory.mktemp("sae") / "tiny-sae"))


def _ids(lm, text=PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _site(lm, specs, site, layer, text=PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, intervened) activation [T, d] at site/layer."""
    ids = _ids(lm, text)
    clean, _ = capture(lm.anatomy, ids, sites={site: [layer]}, stop_early=False)
    edits = iv.compile_interventions(lm, specs, ids.shape[1])
    with iv.applied(lm, edits):
        hit, _ = capture(lm.anatomy, ids, sites={site: [layer]}, stop_early=False)
    return clean[site][0, 0], hit[site][0, 0]


# --- identities ------------------------------------------------------------------------------
def test_zero_alpha_steering_leaves_logits_unchanged(lm):
    clean = iv.run_with(lm, PROMPT, [])
    direction = torch.randn(lm.d_model).tolist()
    assert torch.equal(iv.run_with(lm, PROMPT, [iv.steer(1, direction, 0.0)]), clean)
    moved = iv.run_with(lm, PROMPT, [iv.steer(1, direction, 4.0)])
    assert (moved - clean).abs().max() > 1e-2
    before, after = _site(lm, [iv.steer(1, direction, 2.0, positions=[3])], "resid_post", 1)
    expected = before.clone()
    expected[3] += 2.0 * torch.tensor(direction)
    assert torch.allclose(after, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_identity_patching_leaves_logits_unchanged(arch, tokenizer):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    small = from_model(*build_tiny(arch, tokenizer), name=f"tiny-{arch}")
    clean = iv.run_with(small, PROMPT, [])
    for site in iv.EDIT_SITES:
        spec = iv.patch(PROMPT, 1, [0, 3, -1], site=site)
        assert torch.allclose(iv.run_with(small, PROMPT, [spec]), clean, atol=1e-5), site
    changed = iv.run_with(small, PROMPT, [iv.patch(OTHER, 1, [3, -1])])
    assert (changed - clean).abs().max() > 1e-3  # a real patch does change the output
    assert hook_count(small) == 0


def test_patching_a_prompt_into_itself_changes_nothing(lm):
    for kind in ("layer_position", "layer_layer"):
        result = iv.patch_sweep(lm, PROMPT, PROMPT, " m", kind=kind)
        if kind == "layer_position":
            assert result.values.shape == (lm.n_layers, len(_ids(lm)[0]))
            assert abs(result.source_value - result.target_value) < 1e-7
            assert abs(result.values - result.target_value).max() < 1e-6
        else:  # same layer on the diagonal is the identity; off-diagonal (back-patching) is not
            diagonal = result.values.diagonal()
            assert abs(diagonal - result.target_value).max() < 1e-6


# --- ablations -------------------------------------------------------------------------------
def test_ablating_all_sae_features_leaves_error_plus_b_dec(lm, sae_folder):
    sae = iv.load_sae_cached(sae_folder, lm.device)
    spec = iv.ablate_features(sae_folder, range(sae.d_sae), layer=1)
    x, hit = _site(lm, [spec], "resid_post", 1)
    with torch.no_grad():
        expected = x - sae(x) + sae.b_dec
    assert torch.allclose(hit, expected, atol=1e-5)
    assert (hit - x).abs().max() > 1e-3
    # JSON round trip gives the same run
    again = iv.load_specs(json.loads(json.dumps(iv.save_specs([spec]))))
    assert torch.equal(iv.run_with(lm, PROMPT, again), iv.run_with(lm, PROMPT, [spec]))


def test_clamp_and_mean_ablation_through_the_sae(lm, sae_folder):
    sae = iv.load_sae_cached(sae_folder, lm.device)
    x, _ = _site(lm, [], "resid_post", 1)
    with torch.no_grad():
        acts = sae.encode(x)
    feature = int(acts[2].argmax())
    x, hit = _site(lm, [iv.clamp_feature(sae_folder, feature, 7.5, layer=1, positions=[2])], "resid_post", 1)
    expected = x.clone()
    expected[2] += (7.5 - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(hit, expected, atol=1e-4)
    assert torch.equal(hit[[0, 1, 3]], x[[0, 1, 3]])  # other positions bit-identical
    _, mean_hit = _site(lm, [iv.ablate_features(sae_folder, [feature], 1, mode="mean", positions=[2])],
                        "resid_post", 1)
    expected = x.clone()
    expected[2] += (acts[1:, feature].mean() - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(mean_hit, expected, atol=1e-4)
    # a reference mean (e.g. over a corpus) instead of the prompt's own
    spec = iv.ablate_features(sae_folder, [feature], 1, mode="mean", positions=[2], means=[0.25])
    _, ref_hit = _site(lm, [iv.load_specs(json.loads(json.dumps(iv.save_specs([spec]))))[0]], "resid_post", 1)
    expected = x.clone()
    expected[2] += (0.25 - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(ref_hit, expected, atol=1e-4)
    for bad, message in (([1.0, 2.0], "one per feature"), ([float("nan")], "finite"), (["x"], "list of numbers")):
        with pytest.raises(UserError, match=message):
            iv.run_with(lm, PROMPT, [iv.ablate_features(sae_folder, [feature], 1, mode="mean", means=bad)])
    assert hook_count(lm) == 0


def test_neuron_ablation_zeroes_the_mlp_hidden_units(lm):
    clean, hit = _site(lm, [iv.ablate_neurons(2, [0, 5, 63])], "mlp_hidden", 2)
    assert hit[:, [0, 5, 63]].abs().max() == 0 and clean[:, [0, 5, 63]].abs().max() > 0
    keep = [i for i in range(clean.shape[1]) if i not in (0, 5, 63)]
    assert torch.equal(hit[:, keep], clean[:, keep])
    _, mean_hit = _site(lm, [iv.ablate_neurons(2, [5], mode="mean")], "mlp_hidden", 2)
    assert torch.allclose(mean_hit[:, 5], clean[1:, 5].mean().expand(clean.shape[0]), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_ablation_equals_zeroing_the_heads_slice_of_o_proj_input(arch, tokenizer):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    small = from_model(*build_tiny(arch, tokenizer), name=f"tiny-{arch}")
    anatomy, layer, head = small.anatomy, 1, 2
    proj = anatomy.attn_out_proj(layer)
    seen = {}
    handle = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].detach().clone()))
    try:
        clean, _ = capture(anatomy, _ids(small), sites={"attn_out": [layer]}, stop_early=False)
    finally:
        handle.remove()
    z = seen["z"].clone()
    head_dim = z.shape[-1] // anatomy.n_heads
    z[..., head * head_dim:(head + 1) * head_dim] = 0
    with torch.no_grad():
        expected = proj(z)[0]
    edits = iv.compile_interventions(small, [iv.ablate_heads(layer, [head])], z.shape[1])
    with iv.applied(small, edits):
        hit, _ = capture(anatomy, _ids(small), sites={"attn_out": [layer]}, stop_early=False)
    assert torch.allclose(hit["attn_out"][0, 0], expected, atol=1e-5)
    assert (hit["attn_out"][0, 0] - clean["attn_out"][0, 0]).abs().max() > 1e-3


# --- sweeps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out"])
def test_replayed_prefix_changes_nothing_on_any_architecture(arch, site):
    """Batches skip the layers below their lowest patched layer by replaying the clean run: the sweep
    must equal one full forward per patch on every supported layout."""
    from engine.core.models import load_model

    lm = load_model(f"tiny:{arch}")
    fast = iv.patch_sweep(lm, OTHER, PROMPT, " m", site=site, batch_size=5)
    slow = iv.patch_sweep(lm, OTHER, PROMPT, " m", site=site, batched=False)
    spread = fast.values.std()  # tiny random models: probabilities near 1/vocab, so compare relative to it
    assert spread > 0
    assert np.abs(fast.values - slow.values).max() < 1e-3 * spread
    assert all("forward" not in layer.__dict__ for layer in lm.anatomy.layers)  # swapped back


def test_batched_sweep_equals_one_forward_per_patch(lm):
    measure = lambda logits: torch.softmax(logits, -1)[lm.tokenizer(" m", add_special_tokens=False)["input_ids"][0]]  # noqa: E731
    result = iv.patch_sweep(lm, OTHER, PROMPT, " m", batch_size=7)  # chunks that split layers
    assert result.values.shape == (lm.n_layers, len(_ids(lm)[0]))
    for layer in range(lm.n_layers):
        for pos in (0, 4, len(_ids(lm)[0]) - 1):
            single = iv.run_with(lm, PROMPT, [iv.patch(OTHER, layer, [pos])])[-1]
            assert abs(float(measure(single)) - result.values[layer, pos]) < 1e-6
    assert abs(result.values - iv.patch_sweep(lm, OTHER, PROMPT, " m", batched=False).values).max() < 1e-6
    assert result.values.std() > 0
    # patching the last layer's last position hands over the source's output entirely
    assert abs(result.values[-1, -1] - result.source_value) < 1e-6

    back = iv.patch_sweep(lm, OTHER, PROMPT, " m", kind="layer_layer", metric="logit_diff", token_b=" r")
    ids = lm.tokenizer([" m", " r"], add_special_tokens=False)["input_ids"]
    for target_layer, source_layer in ((0, 2), (2, 0), (1, 1)):
        spec = iv.patch(OTHER, target_layer, [-1], source_layer=source_layer)
        logits = iv.run_with(lm, PROMPT, [spec])[-1]
        assert abs(float(logits[ids[0][0]] - logits[ids[1][0]]) - back.values[target_layer, source_layer]) < 1e-4
    assert json.loads(json.dumps(back.to_json()))["kind"] == "layer_layer"


def test_sweep_input_errors(lm):
    with pytest.raises(UserError, match="same token length"):
        iv.patch_sweep(lm, "short", PROMPT, " m")
    with pytest.raises(UserError, match="second token"):
        iv.patch_sweep(lm, OTHER, PROMPT, " m", metric="logit_diff")
    with pytest.raises(UserError, match="beyond the prompt"):
        iv.patch_sweep(lm, OTHER, PROMPT, " m", kind="layer_layer", source_position=99)
    assert hook_count(lm) == 0


# --- bad input and hook hygiene ----------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (iv.steer(1, [1.0] * 31, 1.0), "has 31 values"),
    (iv.steer(1, [1.0] * 32, float("nan")), "finite"),
    (iv.steer(1, [1.0] * 32, 1e39), "overflow"),
    (iv.patch(PROMPT, 1, [40]), "beyond the prompt"),
    (iv.patch(PROMPT, 7, [-1]), "Layer 7 does not exist"),
    (iv.ablate_heads(1, [4]), "head"),
    (iv.ablate_neurons(1, [64]), "Neuron"),
    (iv.Intervention("explode", "resid_post", 0), "Unknown intervention"),
    (iv.ablate_features("/no/such/sae", [0], 1), "does not exist"),
])
def test_bad_input_is_one_clear_user_error(lm, spec, message):
    before = hook_count(lm)
    with pytest.raises(UserError, match=message) as info:
        iv.run_with(lm, PROMPT, [iv.steer(0, [0.5] * 32, 1.0), spec])
    assert "\n" not in str(info.value)
    assert hook_count(lm) == before
    assert torch.equal(iv.run_with(lm, PROMPT, []), iv.run_with(lm, PROMPT, []))


def test_hooks_removed_after_exceptions(lm):
    ids = _ids(lm)
    clean = iv.run_with(lm, PROMPT, [])
    before = hook_count(lm)

    def boom(h):
        raise RuntimeError("boom")
    edits = iv.compile_interventions(lm, [iv.steer(1, [1.0] * 32, 3.0)], ids.shape[1])
    with pytest.raises(RuntimeError, match="boom"):
        iv._forward_logits(lm, ids, edits + [iv.CompiledEdit("mlp_out", 2, boom)])
    assert hook_count(lm) == before
    with pytest.raises(UserError, match="NaN or infinite"):
        iv._forward_logits(lm, ids, [iv.CompiledEdit("resid_post", 0, lambda h: h * float("nan"))])
    assert hook_count(lm) == before
    assert torch.equal(iv.run_with(lm, PROMPT, []), clean)


# --- views' engine side ----------------------------------------------------------------------
def test_generation_side_by_side(lm):
    same = iv.generate_compare(lm, PROMPT, [iv.steer(1, [1.0] * 32, 0.0)], max_new_tokens=6)
    assert same.clean_ids == same.intervened_ids and same.first_divergence is None and len(same.clean_ids) == 6
    steered = iv.generate_compare(lm, PROMPT, [iv.steer(1, [1.0] * 32, 8.0)], max_new_tokens=6)
    assert steered.first_divergence is not None and any(steered.differs)
    a = iv.generate_compare(lm, PROMPT, [iv.ablate_heads(0, [1])], max_new_tokens=6, sample=True, seed=5)
    b = iv.generate_compare(lm, PROMPT, [iv.ablate_heads(0, [1])], max_new_tokens=6, sample=True, seed=5)
    assert a.clean_ids == b.clean_ids and a.intervened_ids == b.intervened_ids
    assert json.loads(json.dumps(a.to_json()))["sampled"] is True


def test_dose_response_matches_single_runs(lm):
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)).tolist()
    spec = iv.steer(1, direction, 1.0, positions=[-1])
    result = iv.dose_response(lm, PROMPT, spec, [0.0, 1.0, 3.0], " m")
    token = lm.tokenizer(" m", add_special_tokens=False)["input_ids"][0]
    assert result.kl_to_clean[0] < 1e-6 and abs(result.target_prob[0] - result.clean_prob) < 1e-7
    for alpha, prob in zip(result.alphas, result.target_prob):
        single = torch.softmax(iv.run_with(lm, PROMPT, [iv.steer(1, direction, alpha, positions=[-1])])[-1], -1)
        assert abs(float(single[token]) - prob) < 1e-6
    assert result.kl_to_clean[2] > result.kl_to_clean[1] > 0


def test_delta_lens_is_zero_before_the_edited_layer(lm):
    clean, hit = iv.delta_lens(lm, PROMPT, [iv.steer(1, [1.0] * 32, 4.0)], track=[" m"])
    delta = hit.tracked_probs - clean.tracked_probs
    assert abs(delta[:2]).max() < 1e-6            # embed and layer 0 come before the edit
    assert abs(delta[2:]).max() > 1e-4            # layer 1 onwards see it


def test_directions_from_prompt_sets_and_sae(lm, sae_folder):
    a, b = ["The cat", "A cat sat"], ["The dog", "A dog ran"]
    diff = iv.mean_difference_direction(lm, a, b, layer=1)
    probe = iv.probe_direction(lm, a, b, layer=1)
    assert len(diff) == len(probe) == lm.d_model
    # alpha=1 on the difference of single prompts carries one last-token activation onto the other
    one = iv.mean_difference_direction(lm, ["The cat"], ["The dog"], layer=1)
    dog, _ = _site(lm, [], "resid_post", 1, text="The dog")
    _, steered = _site(lm, [iv.steer(1, one, 1.0, positions=[-1])], "resid_post", 1, text="The dog")
    cat, _ = _site(lm, [], "resid_post", 1, text="The cat")
    assert torch.allclose(steered[-1], cat[-1], atol=1e-4) and not torch.allclose(dog[-1], cat[-1], atol=1e-2)
    unit = iv.feature_unit(lm, sae_folder, 3)
    assert unit > 0
    sae = iv.load_sae_cached(sae_folder, lm.device)
    x, hit = _site(lm, [iv.steer_sae_feature(sae_folder, 3, 2.0, 1, unit=unit)], "resid_post", 1)
    assert torch.allclose(hit - x, (2.0 * unit * sae.W_dec[3].detach()).expand_as(x), atol=1e-4)


def test_tongue_from_thought_demo(lm):
    result = iv.tongue_thought(lm, "dog", "water", "de", "fr", "es", "zh")
    assert set(result.curves) == {"A in zh", "B in zh", "A in fr", "B in fr"}
    assert all(len(v) == lm.n_layers for v in result.curves.values())
    for label, curve in result.curves.items():  # the last layer's latent is the whole output: it follows the source
        assert abs(curve[-1] - result.baselines["source"][label]) < 1e-6
    assert result.source_prompt.endswith('Français: "') and result.target_prompt.endswith('中文: "')
    with pytest.raises(UserError, match="different concepts"):
        iv.tongue_thought(lm, "dog", "dog")


def test_cli_patch_sweep_json(capsys):
    from engine.cli.common import main

    code = main(["patch-sweep", "--model", "tiny:llama", "--source", OTHER, "--target", PROMPT, "--token", " m",
                 "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and len(payload["values"]) == 3 and payload["kind"] == "layer_position"
    assert main(["patch-sweep", "--model", "tiny:llama", "--source", "x", "--target", PROMPT, "--token", " m"]) == 2
    assert "same token length" in capsys.readouterr().err
