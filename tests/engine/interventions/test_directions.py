"""Steering directions leave the model's device through engine.core.devices.to_host (issue 13: "Probe" on CUDA)."""
from __future__ import annotations

import math

import pytest
import torch

import engine.interventions.directions as directions
from engine.interventions.directions import mean_difference_direction, probe_direction

SET_A, SET_B = ["The cat", "A cat sat"], ["The dog", "A dog ran"]


class OnAccelerator(torch.Tensor):
    """A CPU tensor that acts like one on a GPU where it matters: ``.numpy()`` raises as it does for a CUDA
    tensor, until the tensor is moved to the CPU (``.cpu()`` or ``.to("cpu")``), which gives a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        targets = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))]
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and any(torch.device(t).type == "cpu"
                                                                        for t in targets)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture(scope="module")
def lm():
    from engine.core.models import load_model

    return load_model("tiny:llama", device="cpu")


def test_the_fake_accelerator_tensor_refuses_numpy_until_moved():
    x = torch.ones(2, 3).as_subclass(OnAccelerator)
    with pytest.raises(TypeError, match="cuda"):
        torch.cat([x[0] * 2, x[1]]).float().numpy()
    assert x.cpu().numpy().shape == (2, 3) and x.detach().to("cpu").numpy().shape == (2, 3)


def test_probe_and_mean_difference_work_when_activations_live_on_an_accelerator(lm, monkeypatch):
    """Captured activations stay on the model's device; the directions must move them to the host
    before numpy / scikit-learn see them (on CUDA the probe used to fail with 'can't convert cuda')."""
    expected_probe = probe_direction(lm, SET_A, SET_B, layer=1)
    expected_diff = mean_difference_direction(lm, SET_A, SET_B, layer=1)
    real_capture = directions.capture

    def capture_on_accelerator(*args, **kwargs):
        got, output = real_capture(*args, **kwargs)
        return {site: acts.as_subclass(OnAccelerator) for site, acts in got.items()}, output

    monkeypatch.setattr(directions, "capture", capture_on_accelerator)
    probe = probe_direction(lm, SET_A, SET_B, layer=1)
    diff = mean_difference_direction(lm, SET_A, SET_B, layer=1)
    assert probe == pytest.approx(expected_probe, rel=1e-6, abs=1e-7)
    assert diff == pytest.approx(expected_diff, rel=1e-6, abs=1e-7)


def test_directions_on_a_bfloat16_model_are_float_lists():
    from engine.core.models import load_model

    small = load_model("tiny:llama", device="cpu", dtype="bfloat16")
    acts = directions._last_token_acts(small, SET_A, "resid_post", 1)
    assert acts.dtype == torch.float32 and acts.device.type == "cpu" and acts.shape == (2, small.d_model)
    for direction in (probe_direction(small, SET_A, SET_B, layer=1),
                      mean_difference_direction(small, SET_A, SET_B, layer=1)):
        assert len(direction) == small.d_model
        assert all(isinstance(v, float) and math.isfinite(v) for v in direction)
        assert max(abs(v) for v in direction) > 0
