"""The gated SAE (SAELens ``GatedSAE``): a gate decides which latents fire, a magnitude path how much.

``gate = x @ W_enc + b_gate``; ``magnitude = relu(x @ (W_enc * exp(r_mag)) + b_mag)``;
``acts = magnitude * (gate > 0)``. There is no ``b_enc``.
"""
from __future__ import annotations

import torch

from engine.sae.base import SAE, SAEConfig, register_sae_class


@register_sae_class("gated")
class GatedSAE(SAE):
    """Gated sparse autoencoder; ``pre`` is the magnitude path's pre-activation, as in SAELens."""

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().parameter_shapes(cfg)
        del shapes["b_enc"]
        shapes.update(b_gate=(cfg.d_sae,), r_mag=(cfg.d_sae,), b_mag=(cfg.d_sae,))
        return shapes

    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = x @ self.W_enc + self.b_gate                          # [..., d_sae]
        pre = x @ (self.W_enc * self.r_mag.exp()) + self.b_mag       # [..., d_sae]
        return pre.relu() * (gate > 0).to(pre.dtype), pre
