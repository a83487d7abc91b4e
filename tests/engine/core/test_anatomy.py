"""Any decoder stack: the lens needs only layers, final norm and head; sub-blocks are optional.

Runs the self-check on the architectures outside the full ``tiny_lm`` matrix (OPT with and without
``project_out``, Mamba, Granite) and on Cohere's multiplied head, and checks that a site needing a
missing sub-module is refused with one sentence.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from engine.core.anatomy import AnatomyError
from engine.core.capture import capture
from engine.core.models import from_model, load_model
from engine.core.selfcheck import self_check, tolerance
from engine.core.sites import EDIT_SITES, SITES, SiteError, available_sites, site_module, site_width
from engine.core.tiny import ARCHS, HIDDEN, LENS_ONLY_ARCHS, build_tiny

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."
HEAD_SCALED = ["granite", "cohere"]


def _lm(arch: str, tokenizer, dtype: torch.dtype = torch.float32):
    model, tok = build_tiny(arch, tokenizer)
    return from_model(model.to(dtype), tok, name=f"tiny-{arch}")


def _head_without_scaling(lm) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's logits, the read-out of its last layer with the head scaling left out)."""
    ids = torch.tensor([lm.tokenizer(TEXT)["input_ids"]])
    captured, output = capture(lm.anatomy, ids, sites={"resid_post": [lm.n_layers - 1]}, stop_early=False)
    with torch.inference_mode():
        raw = lm.anatomy.unembed(lm.anatomy.normalize(captured["resid_post"][0, 0]))
    return output.logits[0].float(), raw.float()


@pytest.mark.parametrize("arch", LENS_ONLY_ARCHS + ["cohere"])
def test_self_check_float32(arch, tokenizer):
    lm = _lm(arch, tokenizer)
    assert lm.self_check_max_abs_diff < 1e-4
    assert self_check(lm, TEXT) < 1e-4


@pytest.mark.parametrize("arch", LENS_ONLY_ARCHS + ["cohere"])
def test_self_check_bfloat16(arch, tokenizer):
    lm = _lm(arch, tokenizer, torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    assert self_check(lm, TEXT) <= tolerance(torch.bfloat16)


@pytest.mark.parametrize("arch", HEAD_SCALED)
def test_head_scaling_is_needed_and_applied_once(arch, tokenizer):
    lm = _lm(arch, tokenizer)
    anatomy = lm.anatomy
    logits, raw = _head_without_scaling(lm)
    ignored = float((raw - logits).abs().max())  # a lens that ignored the scaling would fail the self-check
    assert ignored > 0.5 * float(raw.abs().max()) and ignored > 100 * tolerance(torch.float32)
    once = anatomy.scale_logits(raw)
    assert (once - logits).abs().max() < 1e-4
    assert (anatomy.scale_logits(once) - logits).abs().max() > 1e-2  # twice is wrong too
    assert anatomy.logit_scale is not None and (raw * anatomy.logit_scale - logits).abs().max() < 1e-4


def test_granite_divides_by_logits_scaling(tokenizer):
    lm = _lm("granite", tokenizer)
    logits, raw = _head_without_scaling(lm)
    assert (raw - logits).abs().max() > 1.0  # ignoring logits_scaling is far outside the self-check tolerance
    anatomy = lm.anatomy
    assert anatomy.logit_divisor == 8.0 and anatomy.logit_multiplier is None and anatomy.logit_scale == 1 / 8
    assert _lm("cohere", tokenizer).anatomy.logit_multiplier == 0.25


def test_opt_final_norm_before_the_layers(tokenizer):
    anatomy = _lm("opt", tokenizer).anatomy
    assert anatomy.final_norm_path == "model.decoder.final_layer_norm"
    assert anatomy.project_out is None and anatomy.d_model == HIDDEN


def test_opt_project_out_after_the_final_norm(tokenizer):
    lm = _lm("opt_proj", tokenizer)
    anatomy = lm.anatomy
    assert anatomy.project_out_path == "model.decoder.project_out"
    assert anatomy.final_norm is None  # OPT-350m normalises inside each layer (post-norm): no final norm
    assert anatomy.d_model == HIDDEN and anatomy.unembed.weight.shape[1] == HIDDEN // 2
    ids = torch.tensor([lm.tokenizer(TEXT)["input_ids"]])
    captured, _ = capture(anatomy, ids, sites={"resid_post": "all"})
    assert captured["resid_post"].shape[-1] == HIDDEN  # sites live in the residual width, not the head's


def test_lens_runs_on_lens_only_architectures(tokenizer):
    from engine.lens.logit import run_lens

    for arch in LENS_ONLY_ARCHS:
        lm = _lm(arch, tokenizer)
        result = run_lens(lm, TEXT, top_k=3)
        assert result.self_check_max_abs_diff < 1e-4
        assert len(result.row_names) == lm.n_layers + 1
        if not lm.anatomy.has_sublayers:
            with pytest.raises(SiteError, match="not available"):
                run_lens(lm, TEXT, top_k=3, sublayers=True)


def test_mamba_has_only_residual_sites(tokenizer):
    anatomy = _lm("mamba", tokenizer).anatomy
    assert not anatomy.has_attention and not anatomy.has_mlp and not anatomy.has_sublayers
    assert available_sites(anatomy) == ("resid_pre", "resid_post")
    assert available_sites(anatomy, EDIT_SITES) == ("resid_pre", "resid_post")
    with pytest.raises(SiteError) as info:
        site_module(anatomy, "mlp_out", 0)
    text = str(info.value)
    assert "\n" not in text and text.count(". ") == 0 and text.endswith(".")
    assert "'mlp_out'" in text and "MambaForCausalLM" in text and "no MLP sub-module" in text
    for site in ("attn_out", "attn_heads", "mlp_hidden"):
        with pytest.raises(SiteError, match=f"'{site}' is not available"):
            site_module(anatomy, site, 0)
    with pytest.raises(SiteError, match="not available"):
        site_width(anatomy, "mlp_hidden", 0)
    with pytest.raises(AnatomyError, match="no attention sub-module"):
        anatomy.attn_module(0)


def test_opt_keeps_attention_sites_only(tokenizer):
    lm = _lm("opt", tokenizer)
    anatomy = lm.anatomy
    assert anatomy.has_attention and not anatomy.has_mlp and anatomy.has_sublayers
    assert available_sites(anatomy) == ("resid_pre", "resid_mid", "resid_post", "attn_out")
    with pytest.raises(SiteError, match="fc1, fc2"):  # the note names the layer's children
        site_module(anatomy, "mlp_hidden", 0)
    ids = torch.tensor([lm.tokenizer(TEXT)["input_ids"]])
    captured, _ = capture(anatomy, ids, sites={"resid_pre": "all", "resid_mid": "all", "attn_out": "all"})
    assert torch.allclose(captured["resid_mid"], captured["resid_pre"] + captured["attn_out"])


def test_granite_branch_sites_are_refused(tokenizer):
    anatomy = _lm("granite", tokenizer).anatomy
    assert anatomy.has_attention and anatomy.has_mlp and not anatomy.has_sublayers
    assert set(available_sites(anatomy)) == {"resid_pre", "resid_post", "mlp_hidden"}
    with pytest.raises(SiteError, match="residual_multiplier=0.22"):
        site_module(anatomy, "attn_out", 0)
    assert site_width(anatomy, "mlp_hidden", 0) == 64


def test_full_matrix_archs_have_every_site(tokenizer):
    for arch in ARCHS:
        anatomy = _lm(arch, tokenizer).anatomy
        assert not anatomy.missing and available_sites(anatomy) == SITES, arch


def test_tiny_spec_loads_lens_only_archs():
    lm = load_model("tiny:mamba")
    assert lm.self_check_max_abs_diff < 1e-4
    assert lm.describe()["unavailable"]


def test_core_imports_nothing_from_higher_packages():
    core = Path(__file__).resolve().parents[3] / "engine" / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith("engine.") or name.startswith("engine.core"), (
                    f"engine/core/{path.name} imports {name}: core must not import higher packages "
                    "(pass what it needs in, or move the code up)")
