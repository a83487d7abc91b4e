"""The JumpReLU SAE (SAELens ``JumpReLUSAE``, Gemma Scope): ``acts = relu(pre) * (pre > threshold)``."""
from __future__ import annotations

import torch

from engine.sae.base import SAE, SAEConfig, register_sae_class


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``relu(pre)`` where ``pre > threshold``, else 0; ``pre [..., d_sae]``, ``threshold [d_sae]``."""
    return pre.relu() * (pre > threshold).to(pre.dtype)


class JumpReLUActivation:
    """The JumpReLU encoder half (a per-latent ``threshold`` parameter), shared by the SAE and the transcoders."""

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(cfg), "threshold": (cfg.d_sae,)}

    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ self.W_enc + self.b_enc
        return jumprelu(pre, self.threshold), pre


@register_sae_class("jumprelu")
class JumpReLUSAE(JumpReLUActivation, SAE):
    """ReLU with a learned per-latent threshold."""
