"""The one definition of the SAE quality numbers: explained variance, active, dead and dense latents.

Used by the training log, the evaluation report card and every page that shows them.

- **Explained variance** is SAELens's (``sae_lens.evals.ExplainedVarianceCalculator``):
  ``1 - E[|x - x_hat|^2] / (E[|x|^2] - |E[x]|^2)`` over all tokens of the window (every token weighted
  equally, the mean taken over the whole window, not per batch), accumulated in float64; when the total
  variance is below 1e-10 it is 1.0 if the error is too, else 0.0. For a transcoder ``x`` is the target
  site's activation and ``x_hat`` the transcoder's output.
- A latent is **active** on a token when its activation is non-zero (``!= 0``: AbsTopK latents can be
  negative), as in SAELens's L0.
- A latent is **dead** when it never fired in the window (density ``== 0``; in training: no firing in
  the last ``dead_window_tokens``). A latent is **dense** when it fires on more than 10 % of the tokens.
"""
from __future__ import annotations

import math

import torch

DEAD_DENSITY = 0.0   # dead: firing density <= this, i.e. never fired in the window
DENSE_DENSITY = 0.1  # dense: firing density > this (10 % of tokens)
LOG_SPARSITY_EPS = 1e-10  # sparsity.safetensors holds log10(density + eps), so a dead latent reads -10


def active(acts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of firing latents, ``[..., d_sae]``."""
    return acts != 0


def is_dead(density: torch.Tensor) -> torch.Tensor:
    return density <= DEAD_DENSITY


def is_dense(density: torch.Tensor) -> torch.Tensor:
    return density > DENSE_DENSITY


def log_sparsity(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Firing counts ``[d_sae]`` -> SAELens's log10 feature sparsity ``log10(freq + 1e-10)`` ``[d_sae]``."""
    return torch.log10(counts.double() / max(n_tokens, 1) + LOG_SPARSITY_EPS).float()


def dead_in_log_sparsity(sparsity: torch.Tensor) -> torch.Tensor:
    """Dead latents of a saved log10 sparsity vector (those that never fired: exactly ``log10(eps)``)."""
    return sparsity < math.log10(2 * LOG_SPARSITY_EPS)


class ExplainedVariance:
    """Streaming explained variance over ``[n, d]`` batches (SAELens's definition, see the module doc)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_x: torch.Tensor | None = None  # [d] float64 on the CPU
        self.sum_sq = 0.0
        self.sum_err = 0.0

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor) -> None:
        """``target`` and ``recon``: ``[n, d]``."""
        x, x_hat = target.double(), recon.double()
        batch_sum = x.sum(dim=0).cpu()
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.sum_sq += float(x.pow(2).sum())
        self.sum_err += float((x - x_hat).pow(2).sum())
        self.n += x.shape[0]

    @property
    def mse_per_token(self) -> float:
        """``E[|x - x_hat|^2]`` (summed over dimensions, averaged over tokens)."""
        return self.sum_err / self.n if self.n else float("nan")

    def compute(self) -> float | None:
        """The explained variance, or None before any token was seen."""
        if self.n == 0 or self.sum_x is None:
            return None
        total = self.sum_sq / self.n - float((self.sum_x / self.n).pow(2).sum())
        mse = self.sum_err / self.n
        if total < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total
