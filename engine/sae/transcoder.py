"""Transcoders (SAELens ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``).

A transcoder reads one site (``metadata.hook_name``, width ``d_in``) and predicts another
(``metadata.hook_name_out``, width ``d_out``): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``. As in SAELens, ``b_dec`` is never subtracted from the input
(``apply_b_dec_to_input`` must be false), input normalisation is not undone on the output, and the skip
variants add ``x @ W_skip.T`` (``W_skip [d_out, d_in]``, applied to the raw input) in the forward pass
only: ``decode`` is the sparse part alone.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.sae.base import SAE, Encoded, SAEConfig, SAELoadError, register_sae_class
from engine.sae.jumprelu import JumpReLUActivation


@register_sae_class("transcoder")
class Transcoder(SAE):
    """ReLU transcoder."""

    is_transcoder = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        name = cls.architecture_name
        if isinstance(cfg.d_out, bool) or not isinstance(cfg.d_out, (int, float)) or int(cfg.d_out) != cfg.d_out \
                or cfg.d_out <= 0:
            raise SAELoadError(f"A {name} needs 'd_out' as a positive integer (found {cfg.d_out!r}).")
        cfg.d_out = int(cfg.d_out)
        if cfg.apply_b_dec_to_input:
            raise SAELoadError(f"A {name} cannot subtract b_dec from its input: set apply_b_dec_to_input to false.")
        if cfg.norm_scaling_factor is not None:
            raise SAELoadError(f"A {name} cannot use norm_scaling_factor, since its output is not rescaled back.")
        if cfg.k is not None or cfg.rescale_acts_by_decoder_norm:
            raise SAELoadError(f"A {name} has no 'k' or 'rescale_acts_by_decoder_norm' setting.")

    @classmethod
    def config_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        return {"d_out": cfg.d_out}

    def normalize_out(self, out: torch.Tensor, scale: torch.Tensor | float, shift: torch.Tensor | float) -> torch.Tensor:
        return out  # SAELens does not undo the input normalisation on a transcoder's output

    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae]
        return pre.relu(), pre


class _Skip:
    """Mixin: a learned linear skip path from the raw input, ``W_skip [d_out, d_in]``."""

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(cfg), "W_skip": (cfg.width_out, cfg.d_in)}  # type: ignore[misc]

    def output(self, x: torch.Tensor, enc: Encoded) -> torch.Tensor:
        return super().output(x, enc) + x.to(self.W_skip.dtype) @ self.W_skip.T  # type: ignore[misc]


@register_sae_class("skip_transcoder")
class SkipTranscoder(_Skip, Transcoder):
    """ReLU transcoder with a linear skip connection."""


@register_sae_class("jumprelu_transcoder")
class JumpReLUTranscoder(JumpReLUActivation, Transcoder):
    """JumpReLU transcoder (Gemma Scope 2)."""


@register_sae_class("jumprelu_skip_transcoder")
class JumpReLUSkipTranscoder(_Skip, JumpReLUTranscoder):
    """JumpReLU transcoder with a linear skip connection (Gemma Scope 2 'affine' transcoders)."""
