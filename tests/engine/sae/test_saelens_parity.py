"""Every architecture SAELens 6 can load, checked against the real ``sae_lens`` package in both directions.

SAELens -> engine: an SAE built by ``sae_lens`` with random weights, saved with ``save_model``, loaded by
:func:`engine.sae.io.load_sae`; engine -> SAELens: an engine SAE saved with :func:`save_sae`, loaded by
``sae_lens.SAE.load_from_disk``. Encodings and outputs must agree to 1e-5 on the same inputs.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.sae.base import SAE, SAEConfig, SAELoadError
from engine.sae.io import load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE, D_OUT, K = 16, 48, 12, 6
TOL = 1e-5
TRANSCODER = {"d_out": D_OUT, "apply_b_dec_to_input": False}
# (id, architecture, extra config); the topk variants cover rescale_acts_by_decoder_norm both ways
CASES = [
    ("standard", "standard", {}),
    ("gated", "gated", {}),
    ("topk", "topk", {"k": K}),
    ("topk_rescaled", "topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("abstopk", "abstopk", {"k": K}),
    ("abstopk_rescaled", "abstopk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", "jumprelu", {}),
    ("transcoder", "transcoder", TRANSCODER),
    ("skip_transcoder", "skip_transcoder", TRANSCODER),
    ("jumprelu_transcoder", "jumprelu_transcoder", TRANSCODER),
    ("jumprelu_skip_transcoder", "jumprelu_skip_transcoder", TRANSCODER),
]
NORMALIZED = [  # per-token input normalisations, undone on the output except for transcoders
    ("standard_cnr", "standard", {"normalize_activations": "constant_norm_rescale"}),
    ("topk_layer_norm", "topk", {"k": K, "normalize_activations": "layer_norm"}),
    ("jumprelu_layer_norm", "jumprelu", {"normalize_activations": "layer_norm"}),
    ("transcoder_cnr", "transcoder", {**TRANSCODER, "normalize_activations": "constant_norm_rescale"}),
]
METADATA = {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_mid"}
TC_METADATA = {**METADATA, "hook_name_out": "blocks.1.hook_mlp_out"}


def _randomize(named_parameters, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_parameters:
            values = torch.randn(param.shape, generator=g)
            if name == "threshold":
                values = torch.rand(param.shape, generator=g) * 3.0  # some latents above, some below
            elif name == "r_mag":
                values = values * 0.1
            param.copy_(values)


def _cfg_dict(arch: str, extra: dict) -> dict:
    transcoder = "transcoder" in arch
    return {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", **extra,
            "metadata": dict(TC_METADATA if transcoder else METADATA)}


def _inputs(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 40, D_IN, generator=g) * 2.0 + 0.5  # [batch, seq, d_in]


def _saelens_outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sae.encode(x), sae(x)


def _engine_outputs(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sae.encode(x), sae(x)


def max_diffs(engine_sae: SAE, lens_sae, x: torch.Tensor) -> tuple[float, float, float]:
    """``(max |encode diff|, max |output diff|, max |decode diff|)`` on the same input; decode compares
    both decoders on SAELens's activations (with our saved normalisation for per-token modes)."""
    ours_acts, ours_out = _engine_outputs(engine_sae, x)
    their_acts, their_out = _saelens_outputs(lens_sae, x)
    with torch.no_grad():
        enc = engine_sae.encode_full(x)
        their_dec = lens_sae.decode(lens_sae.encode(x))  # SAELens keeps the per-token norm from its encode
        ours_dec = engine_sae.decode(their_acts, enc.scale, enc.shift)
    return (float((ours_acts - their_acts).abs().max()), float((ours_out - their_out).abs().max()),
            float((ours_dec - their_dec).abs().max()))


def saelens_to_engine(tmp_path, arch: str, extra: dict, seed: int = 0):
    lens = sae_lens.SAE.from_dict(_cfg_dict(arch, extra))
    _randomize(lens.named_parameters(), seed)
    lens.save_model(tmp_path / "from_saelens")
    return load_sae(tmp_path / "from_saelens"), lens


def engine_to_saelens(tmp_path, arch: str, extra: dict, seed: int = 0):
    raw = _cfg_dict(arch, extra)
    ours = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=extra.get("k"),
                         rescale_acts_by_decoder_norm=extra.get("rescale_acts_by_decoder_norm", False),
                         d_out=extra.get("d_out"), apply_b_dec_to_input=extra.get("apply_b_dec_to_input", True),
                         normalize_activations=extra.get("normalize_activations", "none"), metadata=raw["metadata"]))
    _randomize(ours.named_parameters(), seed)
    save_sae(ours, tmp_path / "from_engine")
    return ours, sae_lens.SAE.load_from_disk(str(tmp_path / "from_engine"))


@pytest.mark.parametrize("case, arch, extra", CASES + NORMALIZED, ids=[c[0] for c in CASES + NORMALIZED])
def test_saelens_saved_sae_loads_and_matches(tmp_path, case, arch, extra):
    ours, lens = saelens_to_engine(tmp_path, arch, extra)
    assert type(ours).architecture_name == arch and ours.is_transcoder == ("transcoder" in arch)
    encode, output, decode = max_diffs(ours, lens, _inputs())
    assert encode <= TOL and output <= TOL and decode <= TOL, (encode, output, decode)
    acts = ours.encode(_inputs())
    assert 0 < int((acts != 0).sum()) < acts.numel()  # the comparison is not trivially about zeros
    assert ours.cfg.site() == ("resid_mid", 1)
    if ours.is_transcoder:
        assert ours.d_out == D_OUT and ours.output_site() == ("mlp_out", 1)
    else:
        assert ours.output_site() == ours.input_site()


@pytest.mark.parametrize("case, arch, extra", CASES + NORMALIZED, ids=[c[0] for c in CASES + NORMALIZED])
def test_engine_saved_sae_loads_in_saelens_and_matches(tmp_path, case, arch, extra):
    ours, lens = engine_to_saelens(tmp_path, arch, extra)
    assert lens.cfg.architecture() == arch
    assert lens.cfg.metadata.hook_name == "blocks.1.hook_resid_mid"
    if "transcoder" in arch:
        assert lens.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out" and lens.cfg.d_out == D_OUT
    if "k" in extra:
        assert lens.cfg.k == K and lens.cfg.rescale_acts_by_decoder_norm == extra.get("rescale_acts_by_decoder_norm",
                                                                                      False)
    encode, output, decode = max_diffs(ours, lens, _inputs())
    assert encode <= TOL and output <= TOL and decode <= TOL, (encode, output, decode)


def test_rescale_acts_by_decoder_norm_changes_the_encoding(tmp_path):
    """Ignoring the flag (what happened before) gives other latents: the flag is honoured, not dropped."""
    rescaled, _ = saelens_to_engine(tmp_path, "topk", {"k": K, "rescale_acts_by_decoder_norm": True})
    plain = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K))
    plain.load_state_dict(rescaled.state_dict())
    x = _inputs().reshape(-1, D_IN)
    assert not torch.equal(rescaled.encode(x) != 0, plain.encode(x) != 0)


def test_norm_scaling_factor_is_folded_when_saved(tmp_path):
    """SAELens ignores ``norm_scaling_factor`` in cfg.json, so the engine folds it into the saved weights."""
    ours = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="standard", normalize_activations="expected_average_only_in",
                         norm_scaling_factor=2.5, metadata=dict(METADATA)))
    _randomize(ours.named_parameters(), 3)
    save_sae(ours, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and "norm_scaling_factor" not in cfg
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    encode, output, _ = max_diffs(ours, lens, _inputs())
    assert encode <= 1e-4 and output <= 1e-4


@pytest.mark.parametrize("arch, reason", [("temporal", "tokens before it"), ("matching_pursuit", "not implemented")])
def test_refused_architectures_say_why(tmp_path, arch, reason):
    folder = tmp_path / arch
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE}))
    (folder / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(SAELoadError, match=f"'{arch}' is not supported: .*{reason}"):
        load_sae(folder)


@pytest.mark.parametrize("field, value, match", [
    ("hook_z_heads", 8, "field 'hook_z_heads' is not understood"),
    ("d_out", 4, "Only transcoders have 'd_out'"),
    ("rescale_acts_by_decoder_norm", True, "no 'rescale_acts_by_decoder_norm'"),
    ("normalize_activations", "covariance_whitening", "whitening statistics"),
    ("finetuning_scaling_factor", True, "finetuning scaling factor"),
])
def test_unknown_or_misplaced_fields_are_errors(tmp_path, field, value, match):
    lens = sae_lens.SAE.from_dict(_cfg_dict("standard", {}))
    lens.save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg[field] = value
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match=match):
        load_sae(tmp_path / "s")


def test_transcoder_must_not_subtract_b_dec(tmp_path):
    lens = sae_lens.SAE.from_dict(_cfg_dict("transcoder", TRANSCODER))
    lens.save_model(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = True
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match="apply_b_dec_to_input"):
        load_sae(tmp_path / "t")
