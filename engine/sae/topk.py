"""TopK SAEs (SAELens ``TopKSAE`` and ``AbsTopKSAE``).

``pre = x @ W_enc + b_enc``; with ``rescale_acts_by_decoder_norm`` the selection runs on
``pre * |W_dec rows|`` and decoding divides the activations by those norms again (the SAE was trained as
if its decoder rows had unit norm). ``topk`` keeps the k largest values and ReLUs them; ``abstopk`` keeps
the k values largest in magnitude with their sign (bidirectional latents, no ReLU).
"""
from __future__ import annotations

from typing import Any

import torch

from engine.sae.base import SAE, SAEConfig, SAELoadError, register_sae_class


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations per row, ReLU them, zero the rest; ``[..., d_sae]``."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def abstopk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k pre-activations largest in magnitude per row, with their sign; zero the rest."""
    indices = pre.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(pre).scatter_(-1, indices, pre.gather(-1, indices))


@register_sae_class("topk")
class TopKSAE(SAE):
    """Exactly k candidates per token (fewer fire when some of the k are negative)."""

    uses_k = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, (int, float)) or int(cfg.k) != cfg.k \
                or not 0 < int(cfg.k) <= cfg.d_sae:
            raise SAELoadError(f"A {cls.architecture_name} SAE needs k between 1 and d_sae={cfg.d_sae} "
                               f"(found {cfg.k!r}).")
        cfg.k = int(cfg.k)
        if not isinstance(cfg.rescale_acts_by_decoder_norm, bool):
            raise SAELoadError("The SAE config's rescale_acts_by_decoder_norm must be true or false.")
        if cfg.d_out is not None:
            raise SAELoadError(f"Only transcoders have 'd_out'; this config is a {cls.architecture_name} SAE.")

    @classmethod
    def config_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae]
        ranked = pre * self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else pre
        return self.select(ranked), pre

    def decode_linear(self, acts: torch.Tensor) -> torch.Tensor:
        acts = acts.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        return acts @ self.W_dec


@register_sae_class("abstopk")
class AbsTopKSAE(TopKSAE):
    """k latents per token chosen by magnitude, signs kept (activations may be negative)."""

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        return abstopk_activation(pre, self.cfg.k)
