"""Logit lens vs tuned lens on held-out text: per layer, KL to the final distribution and cross-entropy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.devices import to_host
from engine.core.numerics import kl_from_logprobs
from engine.core.progress import Progress, report
from engine.lens.tuned import TunedLens, TunedLensError
from engine.lens.tuned_data import (
    ReadoutHead,
    Texts,
    capture_rows,
    lens_windows,
    resolve_texts,
    rows_per_chunk,
    split_texts,
)

if TYPE_CHECKING:
    from engine.core.models import LoadedModel


@dataclass
class LensComparison:
    """Per-layer KL to the final distribution and next-token cross-entropy, logit vs tuned lens."""

    layers: list[str]                    # "embed", "0", ..., str(n_layers-1)
    kl_logit: np.ndarray                 # [n_layers+1] nats; the last is 0
    kl_tuned: np.ndarray
    ce_logit: np.ndarray                 # [n_layers+1] nats; the last is the model's own loss
    ce_tuned: np.ndarray
    n_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def model_ce(self) -> float:
        return float(self.ce_logit[-1])

    def to_json(self) -> dict:
        return {"layers": self.layers, "n_tokens": self.n_tokens, "model_cross_entropy": self.model_ce,
                "kl_to_final": {"logit": self.kl_logit.tolist(), "tuned": self.kl_tuned.tolist()},
                "cross_entropy": {"logit": self.ce_logit.tolist(), "tuned": self.ce_tuned.tolist()},
                **({"meta": self.meta} if self.meta else {})}

    def to_records(self) -> list[dict]:
        return [{"layer": name, "kl_logit": float(self.kl_logit[i]), "kl_tuned": float(self.kl_tuned[i]),
                 "ce_logit": float(self.ce_logit[i]), "ce_tuned": float(self.ce_tuned[i])}
                for i, name in enumerate(self.layers)]


def _score_chunk(head: ReadoutHead, rows: torch.Tensor, tuned: torch.Tensor, labels: torch.Tensor,
                 sums: torch.Tensor) -> None:
    """Add KL to final and cross-entropy of one chunk to ``sums [4, L+1]`` (kl_logit, kl_tuned, ce_logit,
    ce_tuned); ``rows [L+1, c, d]`` (the last row is the final one), ``tuned [L, c, d]``, ``labels [c]``."""
    n_layers = tuned.shape[0]
    stacked = torch.cat([rows, tuned])                                        # [2L+1, c, d]
    logp = torch.log_softmax(head.logits(stacked), -1)                       # [2L+1, c, V]
    kl = kl_from_logprobs(logp[n_layers], logp)                              # [2L+1, c]
    ce = -logp.gather(-1, labels.expand(logp.shape[0], -1)[..., None])[..., 0]
    for which, values in ((0, kl), (2, ce)):
        values = to_host(values.double().sum(-1))
        sums[which] += values[:n_layers + 1]
        sums[which + 1, :n_layers] += values[n_layers + 1:]
        sums[which + 1, n_layers] += values[n_layers]


@torch.inference_mode()
def compare_lenses(lm: LoadedModel, lens: TunedLens, texts: Texts, *, max_tokens: int = 512, seq_len: int = 128,
                   batch_size: int = 4, heldout_fraction: float | None = 0.1, budget_bytes: int = 512 * 2**20,
                   progress: Progress | None = None) -> LensComparison:
    """Logit lens vs tuned lens over (the held-out part of) ``texts``, full vocabulary.

    ``heldout_fraction`` picks the texts :func:`engine.lens.tuned_train.train_tuned_lens` left out with the
    same fraction; ``None`` uses every text. At most ``max_tokens`` positions are scored (position 0, padding
    and positions without a next token are skipped).
    """
    if max_tokens < 1:
        raise TunedLensError("max_tokens must be at least 1.")
    anatomy = lm.anatomy
    if lens.n_layers != anatomy.n_layers or lens.d_model != anatomy.d_model:
        raise TunedLensError(f"The lens has {lens.n_layers} layers of width {lens.d_model}, the model "
                             f"{anatomy.n_layers} of width {anatomy.d_model}; use a lens trained for this model.")
    source = resolve_texts(texts)
    items = source() if heldout_fraction is None else split_texts(source(), heldout_fraction, heldout=True)
    n_layers = anatomy.n_layers
    head = ReadoutHead(anatomy, None)
    sums = torch.zeros(4, n_layers + 1, dtype=torch.float64)
    scored = 0
    chunk = max(1, rows_per_chunk(anatomy.vocab_size, budget_bytes) // (2 * n_layers + 1))
    windows = lens_windows(lm.tokenizer, items, seq_len)
    while scored < max_tokens:
        batch = [w for _, w in zip(range(batch_size), windows)]
        if not batch:
            break
        rows, labels = capture_rows(lm, batch, with_labels=True)                # [L+1, N, d], [N]
        keep = min(rows.shape[1], max_tokens - scored)
        rows, labels = rows[:, :keep], labels[:keep].to(rows.device)
        tuned = lens.translate_all(rows[:-1].to(lens.device).float()).to(rows.device, rows.dtype)  # [L, N, d]
        for start in range(0, keep, chunk):
            sl = slice(start, start + chunk)
            _score_chunk(head, rows[:, sl], tuned[:, sl], labels[sl], sums)
        scored += keep
        report(progress, scored / max_tokens, f"{scored}/{max_tokens} tokens scored")
    if scored == 0:
        raise TunedLensError("No held-out text to evaluate on: give a bigger corpus or use every text.")
    means = (sums / scored).numpy()
    return LensComparison(layers=["embed"] + [str(i) for i in range(n_layers)], kl_logit=means[0], kl_tuned=means[1],
                          ce_logit=means[2], ce_tuned=means[3], n_tokens=scored, meta=dict(lens.meta))
