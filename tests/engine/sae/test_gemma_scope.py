"""Gemma Scope folders built here: params.npz (Gemma 2) and config.json + params.safetensors (Gemma 3),
their metadata, bad input, and agreement with SAELens's JumpReLU classes on the same tensors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.sae.base import SAECompatibilityError, SAELoadError
from engine.sae.io import is_sae_folder, list_saes, load_sae, read_config

D_IN, WIDTH = 8, 16384  # width_16k in the folder name must match the tensors
NPZ_PATH = "gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71"


def gemma_arrays(d_in: int = D_IN, d_sae: int = WIDTH, d_out: int | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    return {"W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32),
            "W_dec": rng.standard_normal((d_sae, d_out), dtype=np.float32),
            "b_enc": rng.standard_normal(d_sae, dtype=np.float32),
            "b_dec": rng.standard_normal(d_out, dtype=np.float32),
            "threshold": rng.uniform(0.0, 2.0, d_sae).astype(np.float32)}


def write_npz(folder, arrays: dict):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)
    return folder


def reference_jumprelu(arrays: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gemma Scope tutorial's math, written out: no b_dec on the input."""
    w = {k: torch.from_numpy(v) for k, v in arrays.items()}
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = (pre > w["threshold"]) * torch.relu(pre)
    return acts, acts @ w["W_dec"] + w["b_dec"]


# --- params.npz -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lower", [False, True])
def test_npz_folder_loads_as_jumprelu_with_metadata(tmp_path, lower):
    arrays = gemma_arrays()
    stored = {("w_" + k[2:] if lower and k.startswith("W_") else k): v for k, v in arrays.items()}
    folder = write_npz(tmp_path / NPZ_PATH, stored)
    assert is_sae_folder(folder) and list_saes(tmp_path) == [folder]
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert (sae.d_in, sae.d_sae) == (D_IN, WIDTH)
    assert sae.cfg.site() == ("resid_post", 9) and sae.cfg.model_name == "gemma-2-2b"
    assert read_config(folder).d_sae == WIDTH
    x = torch.randn(20, D_IN) * 3
    acts, out = reference_jumprelu(arrays, x)
    assert torch.allclose(sae.encode(x), acts, atol=1e-5) and torch.allclose(sae(x), out, atol=1e-4)
    assert 0 < int((sae.encode(x) != 0).sum()) < acts.numel()


def test_npz_matches_saelens_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    arrays = gemma_arrays(d_sae=4096)
    folder = write_npz(tmp_path / "gemma-scope-9b-it-mlp/layer_3/width_4k/average_l0_20", arrays)
    ours = load_sae(folder)
    assert ours.cfg.site() == ("mlp_out", 3) and ours.cfg.model_name == "gemma-2-9b-it"
    lens = sae_lens.SAE.from_dict({"architecture": "jumprelu", "d_in": D_IN, "d_sae": 4096,
                                   "apply_b_dec_to_input": False})
    lens.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    x = torch.randn(3, 11, D_IN) * 3
    with torch.no_grad():
        assert float((ours.encode(x) - lens.encode(x)).abs().max()) <= 1e-5
        assert float((ours(x) - lens(x)).abs().max()) <= 1e-5


def test_npz_site_and_layer_from_the_path_only(tmp_path):
    folder = write_npz(tmp_path / "saes/layer_4/width_16k/canonical", gemma_arrays())
    sae = load_sae(folder)
    assert sae.cfg.metadata["hook_layer"] == 4 and sae.cfg.hook_name is None
    with pytest.raises(SAECompatibilityError, match="names no input hook"):
        sae.cfg.site()


def test_npz_bad_input(tmp_path):
    arrays = gemma_arrays()
    missing = {k: v for k, v in arrays.items() if k != "threshold"}
    with pytest.raises(SAELoadError, match="lacks threshold"):
        load_sae(write_npz(tmp_path / "a" / NPZ_PATH, missing))
    with pytest.raises(SAELoadError, match="pickled Python objects"):
        load_sae(write_npz(tmp_path / "b" / NPZ_PATH, {**arrays, "notes": np.array([{"x": 1}], dtype=object)}))
    with pytest.raises(SAELoadError, match="'b_enc' has shape"):
        load_sae(write_npz(tmp_path / "c" / NPZ_PATH, {**arrays, "b_enc": arrays["b_enc"][:100]}))
    with pytest.raises(SAELoadError, match="width_16k"):
        load_sae(write_npz(tmp_path / "d" / NPZ_PATH, gemma_arrays(d_sae=1000)))
    with pytest.raises(SAELoadError, match="names no layer"):
        load_sae(write_npz(tmp_path / "e" / "width_16k", arrays))
    with pytest.raises(SAELoadError, match="floating point"):
        load_sae(write_npz(tmp_path / "f" / NPZ_PATH, {**arrays, "b_dec": np.arange(D_IN)}))
    with pytest.raises(SAELoadError, match="holds 'extra'"):
        load_sae(write_npz(tmp_path / "g" / NPZ_PATH, {**arrays, "extra": np.zeros(3, dtype=np.float32)}))
    folder = tmp_path / "h" / NPZ_PATH
    folder.mkdir(parents=True)
    (folder / "params.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(SAELoadError, match="not a readable npz"):
        load_sae(folder)


# --- config.json + params.safetensors (Gemma Scope 2) ---------------------------------------------
def write_scope2(folder, config: dict, tensors: dict):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(folder / "params.safetensors"))
    return folder


def _lower(arrays: dict) -> dict:
    return {("w_" + k[2:] if k.startswith("W_") else k): torch.from_numpy(v) for k, v in arrays.items()}


def test_scope2_resid_post_sae(tmp_path):
    arrays = gemma_arrays(d_sae=64)
    folder = write_scope2(tmp_path / "resid_post/layer_3_width_16k_l0_medium",
                          {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                           "hf_hook_point_in": "model.layers.3.output"}, _lower(arrays))
    assert is_sae_folder(folder)
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.site() == ("resid_post", 3)
    assert sae.cfg.model_name == "gemma-3-270m" and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(9, D_IN) * 3
    acts, out = reference_jumprelu(arrays, x)
    assert torch.allclose(sae.encode(x), acts, atol=1e-5) and torch.allclose(sae(x), out, atol=1e-4)


def test_scope2_affine_transcoder_matches_saelens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    arrays = gemma_arrays(d_sae=64, d_out=6)
    skip = torch.randn(D_IN, 6)
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "affine_connection": True,
              "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output"}
    folder = write_scope2(tmp_path / "transcoder/layer_2_width_16k_l0_big_affine", config,
                          {**_lower(arrays), "affine_skip_connection": skip})
    ours = load_sae(folder)
    assert ours.architecture == "jumprelu_skip_transcoder" and ours.d_out == 6
    assert ours.output_site() == ("mlp_out", 2) and ours.cfg.hook_name_out == "blocks.2.hook_mlp_out"
    with pytest.raises(SAECompatibilityError, match="pre_feedforward_layernorm"):
        ours.input_site()  # the normalised MLP input is no site of this engine: loads, but is not spliced
    lens = sae_lens.SAE.from_dict({"architecture": "jumprelu_skip_transcoder", "d_in": D_IN, "d_sae": 64, "d_out": 6,
                                   "apply_b_dec_to_input": False})
    lens.load_state_dict({**{k: torch.from_numpy(v) for k, v in arrays.items()}, "W_skip": skip.T.contiguous()})
    x = torch.randn(4, 7, D_IN) * 3
    with torch.no_grad():
        assert float((ours.encode(x) - lens.encode(x)).abs().max()) <= 1e-5
        assert float((ours(x) - lens(x)).abs().max()) <= 1e-5

    plain = write_scope2(tmp_path / "transcoder/layer_2_width_16k_l0_big", {**config, "affine_connection": False},
                         _lower(arrays))
    assert load_sae(plain).architecture == "jumprelu_transcoder"


def test_scope2_bad_input(tmp_path):
    tensors = _lower(gemma_arrays(d_sae=64))
    base = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": "model.layers.1.output"}
    with pytest.raises(SAELoadError, match="field 'sparsity_penalty' is not understood"):
        load_sae(write_scope2(tmp_path / "a/resid_post/layer_1", {**base, "sparsity_penalty": 3}, tensors))
    with pytest.raises(SAELoadError, match="only 'jump_relu'"):
        load_sae(write_scope2(tmp_path / "b/resid_post/layer_1", {**base, "architecture": "topk"}, tensors))
    with pytest.raises(SAELoadError, match="cross-layer"):
        load_sae(write_scope2(tmp_path / "c/resid_post/layer_1", base,
                              {**tensors, "w_dec": torch.zeros(64, 2, D_IN)}))
    with pytest.raises(SAELoadError, match="lacks threshold"):
        load_sae(write_scope2(tmp_path / "d/resid_post/layer_1", base,
                              {k: v for k, v in tensors.items() if k != "threshold"}))
    with pytest.raises(SAELoadError, match="lacks W_skip"):
        load_sae(write_scope2(tmp_path / "e/transcoder/layer_1", {**base, "affine_connection": True,
                                                                  "hf_hook_point_out": "model.layers.1.mlp"}, tensors))
