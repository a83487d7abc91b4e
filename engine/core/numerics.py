"""Numerics shared by the lens, the tuned lens, SAE evaluation and interventions."""
from __future__ import annotations

import torch


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` in nats over the last axis, computed in float32; ``[..., V] -> [...]``, never negative."""
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


def kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` from log-probabilities already normalised over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


def lr_factor(step: int, total_steps: int, warmup: int, decay_start: int) -> float:
    """Learning-rate multiplier: linear warm-up over the first ``warmup`` steps, constant, then a linear
    decay to 0 from ``decay_start`` to ``total_steps`` (``decay_start >= total_steps``: no decay)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0
