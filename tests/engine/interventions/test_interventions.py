"""Interventions on tiny random models: steering, ablation, clamping, patching, sweeps, hooks always removed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.core.capture import capture
from engine.core.errors import UserError
from engine.core.sites import EDIT_SITES
from engine.core.tiny import ARCHS
from engine.interventions.demos import tongue_thought
from engine.interventions.directions import (
    feature_unit,
    load_sae_cached,
    mean_difference_direction,
    probe_direction,
)
from engine.interventions.edits import CompiledEdit, compile_interventions
from engine.interventions.generation import compare_next_token, delta_lens, dose_response, generate_compare
from engine.interventions.hooks import applied, forward_logits, run_with
from engine.interventions.specs import (
    Intervention,
    ablate_features,
    ablate_heads,
    ablate_neurons,
    clamp_feature,
    load_specs,
    patch,
    save_specs,
    steer,
    steer_sae_feature,
)
from engine.interventions.sweeps import patch_sweep

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
    edits = compile_interventions(lm, specs, ids.shape[1])
    with applied(lm, edits):
        hit, _ = capture(lm.anatomy, ids, sites={site: [layer]}, stop_early=False)
    return clean[site][0, 0], hit[site][0, 0]


# --- identities ------------------------------------------------------------------------------
def test_zero_alpha_steering_leaves_logits_unchanged(lm):
    clean = run_with(lm, PROMPT, [])
    direction = torch.randn(lm.d_model).tolist()
    assert torch.equal(run_with(lm, PROMPT, [steer(1, direction, 0.0)]), clean)
    moved = run_with(lm, PROMPT, [steer(1, direction, 4.0)])
    assert (moved - clean).abs().max() > 1e-2
    before, after = _site(lm, [steer(1, direction, 2.0, positions=[3])], "resid_post", 1)
    expected = before.clone()
    expected[3] += 2.0 * torch.tensor(direction)
    assert torch.allclose(after, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_identity_patching_leaves_logits_unchanged(arch, tokenizer):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    small = from_model(*build_tiny(arch, tokenizer), name=f"tiny-{arch}")
    clean = run_with(small, PROMPT, [])
    for site in EDIT_SITES:
        spec = patch(PROMPT, 1, [0, 3, -1], site=site)
        assert torch.allclose(run_with(small, PROMPT, [spec]), clean, atol=1e-5), site
    changed = run_with(small, PROMPT, [patch(OTHER, 1, [3, -1])])
    assert (changed - clean).abs().max() > 1e-3  # a real patch does change the output
    assert hook_count(small) == 0


def test_patching_a_prompt_into_itself_changes_nothing(lm):
    for kind in ("layer_position", "layer_layer"):
        result = patch_sweep(lm, PROMPT, PROMPT, " m", kind=kind)
        if kind == "layer_position":
            assert result.values.shape == (lm.n_layers, len(_ids(lm)[0]))
            assert abs(result.source_value - result.target_value) < 1e-7
            assert abs(result.values - result.target_value).max() < 1e-6
        else:  # same layer on the diagonal is the identity; off-diagonal (back-patching) is not
            diagonal = result.values.diagonal()
            assert abs(diagonal - result.target_value).max() < 1e-6


# --- ablations -------------------------------------------------------------------------------
def test_ablating_all_sae_features_leaves_error_plus_b_dec(lm, sae_folder):
    sae = load_sae_cached(sae_folder, lm.device)
    spec = ablate_features(sae_folder, range(sae.d_sae), layer=1)
    x, hit = _site(lm, [spec], "resid_post", 1)
    with torch.no_grad():
        expected = x - sae(x) + sae.b_dec
    assert torch.allclose(hit, expected, atol=1e-5)
    assert (hit - x).abs().max() > 1e-3
    # JSON round trip gives the same run
    again = load_specs(json.loads(json.dumps(save_specs([spec]))))
    assert torch.equal(run_with(lm, PROMPT, again), run_with(lm, PROMPT, [spec]))


def test_clamp_and_mean_ablation_through_the_sae(lm, sae_folder):
    sae = load_sae_cached(sae_folder, lm.device)
    x, _ = _site(lm, [], "resid_post", 1)
    with torch.no_grad():
        acts = sae.encode(x)
    feature = int(acts[2].argmax())
    x, hit = _site(lm, [clamp_feature(sae_folder, feature, 7.5, layer=1, positions=[2])], "resid_post", 1)
    expected = x.clone()
    expected[2] += (7.5 - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(hit, expected, atol=1e-4)
    assert torch.equal(hit[[0, 1, 3]], x[[0, 1, 3]])  # other positions bit-identical
    _, mean_hit = _site(lm, [ablate_features(sae_folder, [feature], 1, mode="mean", positions=[2])],
                        "resid_post", 1)
    expected = x.clone()
    expected[2] += (acts[1:, feature].mean() - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(mean_hit, expected, atol=1e-4)
    # a reference mean (e.g. over a corpus) instead of the prompt's own
    spec = ablate_features(sae_folder, [feature], 1, mode="mean", positions=[2], means=[0.25])
    _, ref_hit = _site(lm, [load_specs(json.loads(json.dumps(save_specs([spec]))))[0]], "resid_post", 1)
    expected = x.clone()
    expected[2] += (0.25 - acts[2, feature]) * sae.W_dec[feature].detach()
    assert torch.allclose(ref_hit, expected, atol=1e-4)
    for bad, message in (([1.0, 2.0], "one per feature"), ([float("nan")], "finite"), (["x"], "list of numbers")):
        with pytest.raises(UserError, match=message):
            run_with(lm, PROMPT, [ablate_features(sae_folder, [feature], 1, mode="mean", means=bad)])
    assert hook_count(lm) == 0


def test_neuron_ablation_zeroes_the_mlp_hidden_units(lm):
    clean, hit = _site(lm, [ablate_neurons(2, [0, 5, 63])], "mlp_hidden", 2)
    assert hit[:, [0, 5, 63]].abs().max() == 0 and clean[:, [0, 5, 63]].abs().max() > 0
    keep = [i for i in range(clean.shape[1]) if i not in (0, 5, 63)]
    assert torch.equal(hit[:, keep], clean[:, keep])
    _, mean_hit = _site(lm, [ablate_neurons(2, [5], mode="mean")], "mlp_hidden", 2)
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
    edits = compile_interventions(small, [ablate_heads(layer, [head])], z.shape[1])
    with applied(small, edits):
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
    fast = patch_sweep(lm, OTHER, PROMPT, " m", site=site, batch_size=5)
    slow = patch_sweep(lm, OTHER, PROMPT, " m", site=site, batched=False)
    spread = fast.values.std()  # tiny random models: probabilities near 1/vocab, so compare relative to it
    assert spread > 0
    assert np.abs(fast.values - slow.values).max() < 1e-3 * spread
    assert all("forward" not in layer.__dict__ for layer in lm.anatomy.layers)  # swapped back


def test_batched_sweep_equals_one_forward_per_patch(lm):
    measure = lambda logits: torch.softmax(logits, -1)[lm.tokenizer(" m", add_special_tokens=False)["input_ids"][0]]  # noqa: E731
    result = patch_sweep(lm, OTHER, PROMPT, " m", batch_size=7)  # chunks that split layers
    assert result.values.shape == (lm.n_layers, len(_ids(lm)[0]))
    for layer in range(lm.n_layers):
        for pos in (0, 4, len(_ids(lm)[0]) - 1):
            single = run_with(lm, PROMPT, [patch(OTHER, layer, [pos])])[-1]
            assert abs(float(measure(single)) - result.values[layer, pos]) < 1e-6
    assert abs(result.values - patch_sweep(lm, OTHER, PROMPT, " m", batched=False).values).max() < 1e-6
    assert result.values.std() > 0
    # patching the last layer's last position hands over the source's output entirely
    assert abs(result.values[-1, -1] - result.source_value) < 1e-6

    back = patch_sweep(lm, OTHER, PROMPT, " m", kind="layer_layer", metric="logit_diff", token_b=" r")
    ids = lm.tokenizer([" m", " r"], add_special_tokens=False)["input_ids"]
    for target_layer, source_layer in ((0, 2), (2, 0), (1, 1)):
        spec = patch(OTHER, target_layer, [-1], source_layer=source_layer)
        logits = run_with(lm, PROMPT, [spec])[-1]
        assert abs(float(logits[ids[0][0]] - logits[ids[1][0]]) - back.values[target_layer, source_layer]) < 1e-4
    assert json.loads(json.dumps(back.to_json()))["kind"] == "layer_layer"


def test_sweep_input_errors(lm):
    with pytest.raises(UserError, match="same token length"):
        patch_sweep(lm, "short", PROMPT, " m")
    with pytest.raises(UserError, match="second token"):
        patch_sweep(lm, OTHER, PROMPT, " m", metric="logit_diff")
    with pytest.raises(UserError, match="beyond the prompt"):
        patch_sweep(lm, OTHER, PROMPT, " m", kind="layer_layer", source_position=99)
    assert hook_count(lm) == 0


# --- bad input and hook hygiene ----------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (steer(1, [1.0] * 31, 1.0), "has 31 values"),
    (steer(1, [1.0] * 32, float("nan")), "finite"),
    (steer(1, [1.0] * 32, 1e39), "overflow"),
    (patch(PROMPT, 1, [40]), "beyond the prompt"),
    (patch(PROMPT, 7, [-1]), "Layer 7 does not exist"),
    (ablate_heads(1, [4]), "head"),
    (ablate_neurons(1, [64]), "Neuron"),
    (Intervention("explode", "resid_post", 0), "Unknown intervention"),
    (ablate_features("/no/such/sae", [0], 1), "does not exist"),
])
def test_bad_input_is_one_clear_user_error(lm, spec, message):
    before = hook_count(lm)
    with pytest.raises(UserError, match=message) as info:
        run_with(lm, PROMPT, [steer(0, [0.5] * 32, 1.0), spec])
    assert "\n" not in str(info.value)
    assert hook_count(lm) == before
    assert torch.equal(run_with(lm, PROMPT, []), run_with(lm, PROMPT, []))


def test_hooks_removed_after_exceptions(lm):
    ids = _ids(lm)
    clean = run_with(lm, PROMPT, [])
    before = hook_count(lm)

    def boom(h):
        raise RuntimeError("boom")
    edits = compile_interventions(lm, [steer(1, [1.0] * 32, 3.0)], ids.shape[1])
    with pytest.raises(RuntimeError, match="boom"):
        forward_logits(lm, ids, edits + [CompiledEdit("mlp_out", 2, boom)])
    assert hook_count(lm) == before
    with pytest.raises(UserError, match="NaN or infinite"):
        forward_logits(lm, ids, [CompiledEdit("resid_post", 0, lambda h: h * float("nan"))])
    assert hook_count(lm) == before
    assert torch.equal(run_with(lm, PROMPT, []), clean)


# --- views' engine side ----------------------------------------------------------------------
def test_generation_side_by_side(lm):
    same = generate_compare(lm, PROMPT, [steer(1, [1.0] * 32, 0.0)], max_new_tokens=6)
    assert same.clean_ids == same.intervened_ids and same.first_divergence is None and len(same.clean_ids) == 6
    steered = generate_compare(lm, PROMPT, [steer(1, [1.0] * 32, 8.0)], max_new_tokens=6)
    assert steered.first_divergence is not None and any(steered.differs)
    a = generate_compare(lm, PROMPT, [ablate_heads(0, [1])], max_new_tokens=6, sample=True, seed=5)
    b = generate_compare(lm, PROMPT, [ablate_heads(0, [1])], max_new_tokens=6, sample=True, seed=5)
    assert a.clean_ids == b.clean_ids and a.intervened_ids == b.intervened_ids
    assert json.loads(json.dumps(a.to_json()))["sampled"] is True


def test_dose_response_matches_single_runs(lm):
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)).tolist()
    spec = steer(1, direction, 1.0, positions=[-1])
    result = dose_response(lm, PROMPT, spec, [0.0, 1.0, 3.0], " m")
    token = lm.tokenizer(" m", add_special_tokens=False)["input_ids"][0]
    assert result.kl_to_clean[0] < 1e-6 and abs(result.target_prob[0] - result.clean_prob) < 1e-7
    for alpha, prob in zip(result.alphas, result.target_prob):
        single = torch.softmax(run_with(lm, PROMPT, [steer(1, direction, alpha, positions=[-1])])[-1], -1)
        assert abs(float(single[token]) - prob) < 1e-6
    assert result.kl_to_clean[2] > result.kl_to_clean[1] > 0


def test_next_token_kl_is_kl_from_clean_to_intervened(lm):
    spec = steer(1, [1.0] * 32, 3.0)
    result = compare_next_token(lm, PROMPT, [spec], top_k=3)
    clean, hit = run_with(lm, PROMPT, [])[-1].double(), run_with(lm, PROMPT, [spec])[-1].double()
    expected = torch.nn.functional.kl_div(hit.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                          reduction="sum")
    assert result["kl"] > 1e-3 and abs(result["kl"] - float(expected)) < 1e-5 * max(1.0, float(expected))
    assert [t["id"] for t in result["clean"]] == clean.topk(3).indices.tolist()
    assert compare_next_token(lm, PROMPT, [steer(1, [1.0] * 32, 0.0)])["kl"] == 0.0


def test_every_operation_has_a_compile_function():
    from engine.interventions.edits import _COMPILERS
    from engine.interventions.specs import OPS

    assert set(_COMPILERS) == set(OPS)


def test_delta_lens_is_zero_before_the_edited_layer(lm):
    clean, hit = delta_lens(lm, PROMPT, [steer(1, [1.0] * 32, 4.0)], track=[" m"])
    delta = hit.tracked_probs - clean.tracked_probs
    assert abs(delta[:2]).max() < 1e-6            # embed and layer 0 come before the edit
    assert abs(delta[2:]).max() > 1e-4            # layer 1 onwards see it


def test_directions_from_prompt_sets_and_sae(lm, sae_folder):
    a, b = ["The cat", "A cat sat"], ["The dog", "A dog ran"]
    diff = mean_difference_direction(lm, a, b, layer=1)
    probe = probe_direction(lm, a, b, layer=1)
    assert len(diff) == len(probe) == lm.d_model
    # alpha=1 on the difference of single prompts carries one last-token activation onto the other
    one = mean_difference_direction(lm, ["The cat"], ["The dog"], layer=1)
    dog, _ = _site(lm, [], "resid_post", 1, text="The dog")
    _, steered = _site(lm, [steer(1, one, 1.0, positions=[-1])], "resid_post", 1, text="The dog")
    cat, _ = _site(lm, [], "resid_post", 1, text="The cat")
    assert torch.allclose(steered[-1], cat[-1], atol=1e-4) and not torch.allclose(dog[-1], cat[-1], atol=1e-2)
    unit = feature_unit(lm, sae_folder, 3)
    assert unit > 0
    sae = load_sae_cached(sae_folder, lm.device)
    x, hit = _site(lm, [steer_sae_feature(sae_folder, 3, 2.0, 1, unit=unit)], "resid_post", 1)
    assert torch.allclose(hit - x, (2.0 * unit * sae.W_dec[3].detach()).expand_as(x), atol=1e-4)


def test_tongue_from_thought_demo(lm):
    result = tongue_thought(lm, "dog", "water", "de", "fr", "es", "zh")
    assert set(result.curves) == {"A in zh", "B in zh", "A in fr", "B in fr"}
    assert all(len(v) == lm.n_layers for v in result.curves.values())
    for label, curve in result.curves.items():  # the last layer's latent is the whole output: it follows the source
        assert abs(curve[-1] - result.baselines["source"][label]) < 1e-6
    assert result.source_prompt.endswith('Français: "') and result.target_prompt.endswith('中文: "')
    with pytest.raises(UserError, match="different concepts"):
        tongue_thought(lm, "dog", "dog")


def test_cli_patch_sweep_json(capsys):
    from engine.cli.common import main

    code = main(["patch-sweep", "--model", "tiny:llama", "--source", OTHER, "--target", PROMPT, "--token", " m",
                 "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and len(payload["values"]) == 3 and payload["kind"] == "layer_position"
    assert main(["patch-sweep", "--model", "tiny:llama", "--source", "x", "--target", PROMPT, "--token", " m"]) == 2
    assert "same token length" in capsys.readouterr().err


def test_an_empty_measured_token_is_named(lm):
    """Clearing the token to measure gives one sentence (before: an IndexError, or the second token taking the
    first one's place in a logit difference)."""
    with pytest.raises(UserError, match="token to measure is empty"):
        patch_sweep(lm, PROMPT, PROMPT, "")
    with pytest.raises(UserError, match="token to measure is empty"):
        patch_sweep(lm, PROMPT, PROMPT, "", metric="logit_diff", token_b=" m")
    direction = torch.ones(lm.d_model)
    with pytest.raises(UserError, match="token to measure is empty"):
        dose_response(lm, PROMPT, steer(1, direction, 1.0), [0.0, 1.0], "")
