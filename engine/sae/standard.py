"""The standard SAE: ``acts = relu(x @ W_enc + b_enc)`` (SAELens ``StandardSAE``)."""
from __future__ import annotations

import torch

from engine.sae.base import SAE, register_sae_class


@register_sae_class("standard")
class StandardSAE(SAE):
    """ReLU sparse autoencoder (trained with an L1 penalty)."""

    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae]
        return pre.relu(), pre
