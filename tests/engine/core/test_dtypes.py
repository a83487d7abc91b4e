"""The dtype matrix: the main engine paths on a tiny model loaded in float32 and in bfloat16 (on the CPU).

Every result must leave the engine as float32 CPU tensors or numpy arrays, be finite, and be near the float32
model's within the tolerances below (bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, and the
tiny model's weights are spread x10, so activations and logits reach ~10). ``rel`` tolerances are fractions
of the float32 result's largest magnitude; ``abs`` ones are absolute (probabilities, nats).

==========================  =========  ==========================================================
path                        float32    bfloat16
==========================  =========  ==========================================================
self-check (logit units)    1e-3       0.25 (``tolerance(dtype)``)
capture                     exact      rel 0.05; dtype of the model
lens top-k probabilities    1e-5       abs 0.02; top-1 within 0.02 of float32's top-1 probability
lens entropy / KL (nats)    1e-5       abs 0.1
lens tracked probability    1e-5       abs 0.005
steering / ablation logits  1e-5       rel 0.1 (the unedited run alone differs by 0.04)
next-token KL (nats)        1e-5       rel 0.05 (of a KL of ~1.7 nats)
patching sweep (prob)       1e-6       abs 1e-3
dose-response P(token)      1e-6       abs 1e-3
text activations (SAE)      1e-5       rel 0.05
SAE encode of captures      1e-5       rel 0.05
logit effects               1e-5       rel 0.01
==========================  =========  ==========================================================
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.capture import capture
from engine.core.devices import to_host
from engine.core.models import load_model
from engine.core.selfcheck import tolerance

PROMPT = "The cat sat on the mat"
OTHER = "The dog sat on the rug"
DTYPES = ["float32", "bfloat16"]
TOL = {  # path -> (float32 tolerance, bfloat16 tolerance); see the table above
    "capture": (0.0, 0.05), "top_probs": (1e-5, 0.02), "entropy": (1e-5, 0.1), "kl": (1e-5, 0.1),
    "tracked": (1e-5, 0.005), "logits": (1e-5, 0.1), "next_kl": (1e-5, 0.05), "sweep": (1e-6, 1e-3),
    "dose": (1e-6, 1e-3), "text_acts": (1e-5, 0.05), "encode": (1e-5, 0.05), "effects": (1e-5, 0.01),
}


def tol(path: str, dtype: str) -> float:
    return TOL[path][DTYPES.index(dtype)]


@pytest.fixture(scope="module")
def reference():
    return load_model("tiny:llama")


@pytest.fixture(scope="module", params=DTYPES)
def lm(request):
    return load_model("tiny:llama", dtype=request.param)


@pytest.fixture(scope="module")
def sae(reference):
    from engine.sae.base import SAE, SAEConfig

    torch.manual_seed(3)
    out = SAE(SAEConfig(d_in=reference.d_model, d_sae=64, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in out.parameters():
            param.normal_(0, 0.3)
    return out.eval()


def name(lm) -> str:
    return str(lm.dtype).removeprefix("torch.")


def host_float32(value) -> np.ndarray:
    """The result as it left the engine: float32 (or integer) on the CPU, finite."""
    if isinstance(value, torch.Tensor):
        assert value.device.type == "cpu" and value.dtype in (torch.float32, torch.int64), value.dtype
        value = value.detach().numpy()
    value = np.asarray(value)
    if value.dtype.kind == "f":
        assert value.dtype in (np.float32, np.float64) and np.isfinite(value).all()
    return value


def rel_diff(ref, got) -> float:
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))


def abs_diff(ref, got) -> float:
    return float(np.abs(np.asarray(ref, dtype=np.float64) - np.asarray(got, dtype=np.float64)).max())


def _ids(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])


def test_load_and_self_check(lm):
    assert lm.dtype == getattr(torch, name(lm)) and next(lm.model.parameters()).dtype == lm.dtype
    assert lm.describe()["dtype"] == name(lm)
    assert lm.self_check_max_abs_diff <= tolerance(lm.dtype)


def test_capture_dtype(lm, reference):
    got, _ = capture(lm.anatomy, _ids(lm), sites={"resid_post": "all", "mlp_hidden": [1]}, stop_early=False)
    ref, _ = capture(reference.anatomy, _ids(reference), sites={"resid_post": "all", "mlp_hidden": [1]},
                     stop_early=False)
    for site in ("resid_post", "mlp_hidden"):
        assert got[site].dtype == lm.dtype  # captured in the model's dtype, on the model's device
        assert rel_diff(ref[site], host_float32(to_host(got[site]))) <= tol("capture", name(lm)), site


def test_lens(lm, reference):
    from engine.lens.logit import lens_stats, run_lens

    got = run_lens(lm, PROMPT, track=["m", "a"], sublayers=True)
    ref = run_lens(reference, PROMPT, track=["m", "a"], sublayers=True)
    for field, path in (("top_probs", "top_probs"), ("entropy", "entropy"), ("kl_to_final", "kl"),
                        ("tracked_probs", "tracked")):
        values = host_float32(getattr(got, field))
        assert values.dtype == np.float32
        assert abs_diff(getattr(ref, field), values) <= tol(path, name(lm)), field
    # top-1: the same token, or one that float32 itself ranks within the tolerance of its top-1 (a near tie)
    every = run_lens(reference, PROMPT, top_k=reference.anatomy.vocab_size, sublayers=True)
    probs = np.zeros(every.top_ids.shape, dtype=np.float32)  # float32 probabilities of every token by id
    np.put_along_axis(probs, every.top_ids, every.top_probs, axis=-1)
    chosen = np.take_along_axis(probs, got.top_ids[..., :1], axis=-1)[..., 0]
    assert (probs.max(-1) - chosen).max() <= tol("top_probs", name(lm))
    resid = capture(lm.anatomy, _ids(lm), sites={"resid_post": "all"}, stop_early=False)[0]["resid_post"][:, 0]
    stats = lens_stats(lm.anatomy, resid, tracked_ids=[40])
    assert all(host_float32(v) is not None for v in stats.values())


def test_steering_and_ablation(lm, reference, sae, tmp_path):
    from engine.interventions.generation import compare_next_token, dose_response
    from engine.interventions.hooks import run_with
    from engine.interventions.specs import ablate_neurons, clamp_feature, steer

    sae_folder = str(sae.save(tmp_path / "sae"))
    torch.manual_seed(0)
    direction = torch.randn(reference.d_model).tolist()
    for specs in ([steer(1, direction, 4.0)], [steer(0, direction, 2.0, site="mlp_out", positions=[1, 2])],
                  [ablate_neurons(1, [1, 5], mode="mean")], [clamp_feature(sae_folder, 3, 5.0, layer=1)]):
        got = run_with(lm, PROMPT, specs)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert rel_diff(run_with(reference, PROMPT, specs), host_float32(got)) <= tol("logits", name(lm)), specs
    a, b = compare_next_token(reference, PROMPT, [steer(1, direction, 4.0)]), \
        compare_next_token(lm, PROMPT, [steer(1, direction, 4.0)])
    assert isinstance(b["kl"], float) and abs(a["kl"] - b["kl"]) <= tol("next_kl", name(lm)) * max(a["kl"], 1e-3)
    a = dose_response(reference, PROMPT, steer(1, direction, 1.0), [0.0, 1.0, 3.0], "m")
    b = dose_response(lm, PROMPT, steer(1, direction, 1.0), [0.0, 1.0, 3.0], "m")
    assert abs_diff(a.target_prob, b.target_prob) <= tol("dose", name(lm))


def test_patching_sweep(lm, reference):
    from engine.interventions.sweeps import patch_sweep

    got = patch_sweep(lm, OTHER, PROMPT, "m", batch_size=5)
    assert host_float32(got.values).dtype == np.float32
    assert abs_diff(patch_sweep(reference, OTHER, PROMPT, "m").values, got.values) <= tol("sweep", name(lm))


def test_dashboard_text_activations_and_logit_effects(lm, reference, sae):
    from engine.features.decoder import logit_effects
    from engine.features.text import text_activations

    words, acts = text_activations(lm, sae, "resid_post", 1, PROMPT)
    ref_words, ref_acts = text_activations(reference, sae, "resid_post", 1, PROMPT)
    assert words == ref_words and acts.shape == ref_acts.shape
    assert rel_diff(ref_acts, host_float32(acts)) <= tol("text_acts", name(lm))
    got = logit_effects(lm.anatomy, sae.W_dec, "resid_post", 1, n=5)
    ref = logit_effects(reference.anatomy, sae.W_dec, "resid_post", 1, n=5)
    for key in ("top_values", "bottom_values"):
        assert rel_diff(ref[key], host_float32(got[key])) <= tol("effects", name(lm)), key


def test_sae_encode_of_captured_activations(lm, reference, sae):
    def encode(model):
        hidden = capture(model.anatomy, _ids(model), sites={"resid_post": [1]})[0]["resid_post"][0, 0]
        with torch.no_grad():
            return to_host(sae.encode(hidden))  # the SAE (float32) takes the model's dtype as it comes

    got = encode(lm)
    assert rel_diff(encode(reference), host_float32(got)) <= tol("encode", name(lm))
