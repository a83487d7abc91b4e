"""SAE modules, SAELens-format load/save, hook-name mapping, validation, splicing and evaluation."""
from __future__ import annotations

import json

import pytest
import torch

from engine.sae.attach import check_attachable
from engine.sae.base import SAE, SAECompatibilityError, SAEConfig, SAELoadError
from engine.sae.hooks import hook_name_to_site, site_to_hook_name
from engine.sae.io import load_sae, load_sparsity, save_sae
from engine.sae.topk import TopKSAE

D_IN, D_SAE = 8, 16


def random_sae(arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE, **cfg) -> SAE:
    torch.manual_seed(seed)
    k = cfg.pop("k", 3 if arch == "topk" else None)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k,
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny-llama"}, **cfg))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    return sae


# --- a reference implementation, written from the documented SAELens math ----------------------
def reference_encode(w: dict, arch: str, x: torch.Tensor, k: int | None = None, apply_b_dec: bool = True):
    x_in = x - w["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = x_in @ w["W_enc"] + w["b_gate"]
        mag = torch.relu(x_in @ (w["W_enc"] * torch.exp(w["r_mag"])) + w["b_mag"])
        return torch.where(gate > 0, mag, torch.zeros_like(mag))
    pre = x_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.clamp(pre, min=0)
    if arch == "jumprelu":
        return torch.where(pre > w["threshold"], torch.clamp(pre, min=0), torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):  # deliberately naive: sort and keep the k largest
        order = torch.argsort(pre[row], descending=True)[:k]
        out[row, order] = torch.clamp(pre[row, order], min=0)
    return out


def write_saelens_folder(folder, arch: str, cfg_extra: dict | None = None, old_style: bool = False, seed: int = 1):
    """A folder laid out exactly as SAELens documents it, written without engine code."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
               "b_dec": torch.randn(D_IN, generator=g)}
    if arch == "gated":
        weights.update(b_gate=torch.randn(D_SAE, generator=g), r_mag=torch.randn(D_SAE, generator=g) * 0.1,
                       b_mag=torch.randn(D_SAE, generator=g))
    else:
        weights["b_enc"] = torch.randn(D_SAE, generator=g)
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE, generator=g)
    if old_style:  # SAELens 2.x/3.x layout: flat fields, activation_fn_str, hook_point
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "hook_point": "blocks.2.hook_mlp_out",
               "hook_point_layer": 2, "model_name": "gpt2", "apply_b_dec_to_input": True,
               "activation_fn_str": "topk" if arch == "topk" else "relu", "context_size": 128,
               "activation_fn_kwargs": {"k": 4} if arch == "topk" else {}, "normalize_activations": "none"}
    else:
        cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none",
               "metadata": {"model_name": "gemma-3-270m", "hook_name": "blocks.1.hook_resid_post",
                            "context_size": 1024, "prepend_bos": True, "dataset_path": "monology/pile"}}
        if arch == "topk":
            cfg["k"] = 4
    cfg.update(cfg_extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights, cfg


# --- activations on hand-computed inputs ---------------------------------------------------------
def _identity_sae(arch: str, **cfg) -> SAE:
    """d_in = d_sae = 4, W_enc = W_dec = I, biases 0: pre-activations equal the input."""
    sae = SAE(SAEConfig(d_in=4, d_sae=4, architecture=arch, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


def test_standard_activation_is_relu():
    acts = _identity_sae("standard").encode(torch.tensor([[1.0, -2.0, 3.0, 0.0]]))
    assert acts.tolist() == [[1.0, 0.0, 3.0, 0.0]]


def test_topk_keeps_k_largest_then_relu():
    sae = _identity_sae("topk", k=2)
    assert sae.encode(torch.tensor([[1.0, -2.0, 3.0, 0.5]])).tolist() == [[1.0, 0.0, 3.0, 0.0]]
    # the two largest include a negative value: ReLU zeroes it, so L0 can be below k
    assert sae.encode(torch.tensor([[-1.0, -2.0, 3.0, -0.5]])).tolist() == [[0.0, 0.0, 3.0, 0.0]]


def test_jumprelu_zeroes_below_threshold():
    sae = _identity_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 0.5, 2.0, 0.1]))
    assert sae.encode(torch.tensor([[1.0, 0.4, 1.9, 0.25]])).tolist() == [[1.0, 0.0, 0.0, 0.25]]


def test_gated_uses_gate_sign_and_magnitude_path():
    sae = _identity_sae("gated")
    with torch.no_grad():
        sae.b_gate.copy_(torch.tensor([0.0, -5.0, 0.0, 0.0]))
        sae.r_mag.copy_(torch.log(torch.tensor([2.0, 1.0, 1.0, 1.0])))
        sae.b_mag.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    acts = sae.encode(torch.tensor([[1.0, 1.0, 1.0, -1.0]]))
    assert acts.tolist() == [[2.0, 0.0, 2.0, 0.0]]


def test_b_dec_is_subtracted_from_input_only_when_configured():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    for apply, expected in ((True, [[0.0, 0.0, 0.0, 0.0]]), (False, [[1.0, 1.0, 1.0, 1.0]])):
        sae = _identity_sae("standard", apply_b_dec_to_input=apply)
        with torch.no_grad():
            sae.b_dec.fill_(1.0)
        assert sae.encode(x).tolist() == expected
        assert torch.equal(sae.decode(sae.encode(x)), torch.tensor(expected) + 1.0)


def test_expected_average_norm_scaling_factor():
    sae = _identity_sae("standard", normalize_activations="expected_average_only_in", norm_scaling_factor=2.0)
    x = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    assert sae.encode(x).tolist() == [[2.0, 0.0, 1.0, 0.0]]
    assert torch.allclose(sae(x), torch.tensor([[1.0, 0.0, 0.5, 0.0]]))


def test_folding_the_input_scale_keeps_activations():
    sae = random_sae("topk")
    x = torch.randn(5, D_IN)
    before_acts, before_out = sae.encode(x * 3.0), sae(x * 3.0) / 3.0
    sae.fold_input_scale(3.0)
    assert torch.allclose(sae.encode(x), before_acts, atol=1e-5)
    assert torch.allclose(sae(x), before_out, atol=1e-5)


# --- format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_round_trip_is_bit_exact(tmp_path, arch):
    sae = random_sae(arch)
    sparsity = torch.randn(D_SAE)
    save_sae(sae, tmp_path / "sae", sparsity=sparsity)
    loaded = load_sae(tmp_path / "sae")
    for name, param in sae.named_parameters():
        assert torch.equal(getattr(loaded, name), param), name
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert torch.equal(load_sparsity(tmp_path / "sae"), sparsity)
    assert not list((tmp_path / "sae").glob(".*.tmp"))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_hand_built_saelens_folder_matches_reference(tmp_path, arch):
    weights, cfg = write_saelens_folder(tmp_path / "sae", arch)
    sae = load_sae(tmp_path / "sae")
    x = torch.randn(6, D_IN)
    expected = reference_encode(weights, arch, x, k=cfg.get("k"))
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
    assert torch.allclose(sae(x), expected @ weights["W_dec"] + weights["b_dec"], atol=1e-5)
    assert sae.cfg.site() == ("resid_post", 1)
    assert sae.cfg.model_name == "gemma-3-270m"


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_older_config_layout_loads(tmp_path, arch):
    weights, _ = write_saelens_folder(tmp_path / "old", arch, old_style=True)
    sae = load_sae(tmp_path / "old")
    assert sae.architecture == arch
    assert sae.cfg.site() == ("mlp_out", 2)
    assert sae.cfg.model_name == "gpt2"
    x = torch.randn(3, D_IN)
    assert torch.allclose(sae.encode(x), reference_encode(weights, arch, x, k=4), atol=1e-5)


def test_saved_config_is_readable_by_saelens_field_names(tmp_path):
    save_sae(random_sae("topk"), tmp_path / "s", extra_cfg={"site": "resid_post"})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["latent_explorer"]["site"] == "resid_post"
    assert set(cfg["metadata"]) <= {"model_name", "hook_name", "context_size", "prepend_bos", "dataset_path",
                                    "hook_layer", "sae_lens_version"}
    assert cfg["metadata"]["sae_lens_version"] >= "6"  # SAELens >= 6 reads nested metadata only then


# --- hook names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("blocks.6.hook_resid_post", ("resid_post", 6)), ("blocks.0.hook_resid_pre", ("resid_pre", 0)),
    ("blocks.3.hook_mlp_out", ("mlp_out", 3)), ("blocks.3.hook_attn_out", ("attn_out", 3)),
    ("blocks.11.mlp.hook_post", ("mlp_hidden", 11)), ("model.layers.5", ("resid_post", 5)),
    ("layers.7.mlp", ("mlp_out", 7)), ("transformer.h.2", ("resid_post", 2)),
])
def test_hook_names_map_to_sites(name, expected):
    assert hook_name_to_site(name) == expected


def test_site_hook_round_trip_and_unsupported():
    for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden"):
        assert hook_name_to_site(site_to_hook_name(site, 4)) == (site, 4)
    with pytest.raises(SAECompatibilityError, match="not supported"):
        hook_name_to_site("blocks.3.attn.hook_z")


# --- bad input ----------------------------------------------------------------------------------
def _expect_load_error(folder, match):
    with pytest.raises(SAELoadError, match=match):
        load_sae(folder)


def test_missing_folder_and_files(tmp_path):
    _expect_load_error(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    _expect_load_error(tmp_path / "empty", "no cfg.json")
    write_saelens_folder(tmp_path / "noweights", "standard")
    (tmp_path / "noweights" / "sae_weights.safetensors").unlink()
    _expect_load_error(tmp_path / "noweights", "no sae_weights")


def test_malformed_files(tmp_path):
    write_saelens_folder(tmp_path / "badjson", "standard")
    (tmp_path / "badjson" / "cfg.json").write_text("{not json")
    _expect_load_error(tmp_path / "badjson", "not valid JSON")
    write_saelens_folder(tmp_path / "badweights", "standard")
    (tmp_path / "badweights" / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    _expect_load_error(tmp_path / "badweights", "not a readable safetensors")
    write_saelens_folder(tmp_path / "pickle", "standard")
    torch.save({"W_enc": torch.zeros(1)}, tmp_path / "pickle" / "sae_weights.safetensors")  # a pickle in disguise
    _expect_load_error(tmp_path / "pickle", "not a readable safetensors")


def test_bad_config_values(tmp_path):
    write_saelens_folder(tmp_path / "a", "topk", cfg_extra={"k": 0})
    _expect_load_error(tmp_path / "a", "needs k")
    write_saelens_folder(tmp_path / "b", "standard", cfg_extra={"architecture": "matryoshka"})
    _expect_load_error(tmp_path / "b", "Unknown SAE architecture")
    write_saelens_folder(tmp_path / "c", "standard", cfg_extra={"d_sae": "many"})
    _expect_load_error(tmp_path / "c", "d_sae")
    write_saelens_folder(tmp_path / "d", "standard", cfg_extra={"dtype": "int8"})
    _expect_load_error(tmp_path / "d", "dtype")


def test_wrong_shapes_dtypes_and_missing_tensors(tmp_path):
    from safetensors.torch import save_file

    weights, _ = write_saelens_folder(tmp_path / "shape", "standard", cfg_extra={"d_sae": D_SAE * 2})
    _expect_load_error(tmp_path / "shape", "has shape")
    weights, _ = write_saelens_folder(tmp_path / "dtype", "standard")
    save_file({**weights, "b_enc": torch.zeros(D_SAE, dtype=torch.int32)},
              str(tmp_path / "dtype" / "sae_weights.safetensors"))
    _expect_load_error(tmp_path / "dtype", "floating point")
    weights, _ = write_saelens_folder(tmp_path / "jump", "standard", cfg_extra={"architecture": "jumprelu"})
    _expect_load_error(tmp_path / "jump", "lacks threshold")
    weights, _ = write_saelens_folder(tmp_path / "nan", "standard")
    save_file({**weights, "b_dec": torch.full((D_IN,), float("nan"))},
              str(tmp_path / "nan" / "sae_weights.safetensors"))
    _expect_load_error(tmp_path / "nan", "NaN")


def test_attach_checks_width_and_layer(tiny_llama, tmp_path):
    anatomy = tiny_llama.anatomy
    good = random_sae("topk", d_in=anatomy.d_model)
    assert check_attachable(good, anatomy) == ("resid_post", 1)
    with pytest.raises(SAECompatibilityError, match="d_in=8"):
        check_attachable(random_sae("topk"), anatomy)
    far = random_sae("topk", d_in=anatomy.d_model)
    far.cfg.metadata["hook_name"] = "blocks.40.hook_resid_post"
    with pytest.raises(SAECompatibilityError, match="layers 0..2"):
        check_attachable(far, anatomy)
    hidden = random_sae("standard", d_in=64)
    assert check_attachable(hidden, anatomy, "mlp_hidden", 0) == ("mlp_hidden", 0)


# --- splicing and evaluation ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "phi"])
def test_replace_site_edits_the_right_activation_and_removes_hooks(arch, tokenizer):
    from engine.core.capture import capture
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny
    from engine.sae.splice import replace_site

    tiny_lm = from_model(*build_tiny(arch, tokenizer), name=f"tiny-{arch}", check=False)
    anatomy = tiny_lm.anatomy
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    sites = ("resid_post", "attn_out", "mlp_out", "resid_pre", "mlp_hidden")
    clean, clean_out = capture(anatomy, ids, sites={site: [1] for site in sites}, stop_early=False)
    for site in sites:
        with replace_site(anatomy, site, 1, torch.zeros_like):
            edited, _ = capture(anatomy, ids, sites={site: [1]}, stop_early=False)
        assert torch.equal(edited[site][0, :, 0], clean[site][0, :, 0]), site  # position 0 is kept
        assert edited[site][0, :, 1:].abs().max() == 0, site
        assert clean[site][0, :, 1:].abs().max() > 0, site
    with replace_site(anatomy, "resid_post", 1, torch.zeros_like):
        _, hooked_out = capture(anatomy, ids, sites={"resid_post": [1]}, stop_early=False)
    assert not torch.allclose(hooked_out.logits[0, 1:], clean_out.logits[0, 1:])
    assert torch.allclose(hooked_out.logits[0, 0], clean_out.logits[0, 0], atol=1e-5)
    for module in tiny_lm.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    _, again = capture(anatomy, ids, sites={"resid_post": [1]}, stop_early=False)
    assert torch.equal(again.logits, clean_out.logits)


def test_hooks_removed_when_forward_raises(tiny_llama):
    from engine.sae.splice import replace_site

    def boom(hidden):
        raise RuntimeError("boom")

    def hook_count():  # transformers keeps output-recording hooks of its own once hidden states were asked for
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_llama.model.modules())

    before = hook_count()
    with pytest.raises(RuntimeError, match="boom"):
        with replace_site(tiny_llama.anatomy, "resid_post", 0, boom):
            tiny_llama.model(torch.tensor([[1, 40, 41]]))
    assert hook_count() == before


class _IdentitySAE(TopKSAE):
    """Exact reconstruction: splicing it in must not change the loss."""

    def forward(self, x):
        return x

    def reconstruct(self, x):
        return x, self.encode(x)


def test_evaluate_with_model_report(tiny_llama):
    from engine.sae.evaluation import evaluate_with_model, report_to_json

    d = tiny_llama.d_model
    texts = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders find features in models.",
             "def f(x): return x + 1", "Another short sentence for testing."] * 2
    sae = random_sae("topk", d_in=d, d_sae=4 * d, k=4)
    report = evaluate_with_model(sae, tiny_llama, texts, batch_size=3, max_tokens=10_000)
    assert report["n_tokens"] == sum(len(tiny_llama.tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert 0 < report["l0"] <= 4
    ce = report["ce"]
    assert ce["zero_ablated"] != ce["clean"] and ce["spliced"] != ce["clean"]
    assert 0 <= report["dead_fraction"] <= 1 and sum(report["density_histogram"]["counts"]) == round(
        (1 - report["dead_fraction"]) * sae.d_sae)
    json.dumps(report_to_json(report))

    exact = _identity_sae_like(sae)
    perfect = evaluate_with_model(exact, tiny_llama, texts, batch_size=3)
    assert perfect["ce"]["spliced"] == pytest.approx(perfect["ce"]["clean"], abs=1e-5)
    assert perfect["ce"]["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6)


def _identity_sae_like(sae: SAE) -> SAE:
    exact = _IdentitySAE(sae.cfg)
    exact.load_state_dict(sae.state_dict())
    return exact
