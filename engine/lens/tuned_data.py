"""What tuned-lens training and evaluation read: text windows, the held-out split, residual rows, the head.

- texts: a corpus spec, a list of strings or a function returning strings (:func:`resolve_texts`), split
  deterministically into training and held-out texts by a content hash (:func:`is_heldout`);
- windows: :func:`engine.data.windows.iter_windows` with at least two body tokens per window
  (:func:`lens_windows`), shuffled through a seeded buffer (:func:`shuffled`);
- rows: the residual stream at every hidden-state index for the real tokens of a batch of windows
  (:func:`capture_rows`), captured in one pass that stops before the unembedding;
- head: the model's read-out (final norm, unembedding, scale, softcap) on all tokens or on a vocabulary
  subset (:class:`ReadoutHead`).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.core.anatomy import Anatomy
from engine.core.capture import _Stop as StopForward
from engine.core.capture import hooked, pad_batch, run_forward
from engine.core.devices import module_tensor
from engine.core.sites import normalize_sites
from engine.data.windows import iter_windows
from engine.lens.tuned import TunedLensError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.core.models import LoadedModel

Texts = str | Sequence[str] | Callable[[], Iterable[str]]


# --- texts --------------------------------------------------------------------------------------
def resolve_texts(texts: Texts) -> Callable[[], Iterable[str]]:
    """A function returning the texts afresh on every call (a corpus spec is validated now)."""
    if isinstance(texts, str):
        from engine.data.corpora import iter_texts

        iter_texts(texts)  # validate the spec now (one clear error)
        return lambda: iter_texts(texts)
    if callable(texts):
        return texts
    items = list(texts)
    return lambda: items


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same text is always on the same side."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:4], "big") / 2**32
    return bucket < fraction


def split_texts(texts: Iterable[str], heldout_fraction: float, heldout: bool) -> Iterator[str]:
    for text in texts:
        if text and text.strip() and is_heldout(text, heldout_fraction) == heldout:
            yield text


# --- windows ------------------------------------------------------------------------------------
def lens_windows(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    """Token ids of windows of ``seq_len`` tokens (prefix included), each with at least two text tokens."""
    return (window.ids for window in iter_windows(tokenizer, texts, seq_len, min_body=2))


def shuffled(windows: Iterator[list[int]], buffer: int, seed: int) -> Iterator[list[int]]:
    """Deterministic buffered shuffle, so consecutive steps mix different texts."""
    rng = random.Random(seed)
    pool: list[list[int]] = []
    for window in windows:
        pool.append(window)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


# --- residual rows ------------------------------------------------------------------------------
def _capture_resid(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embeddings and every layer's output ``[n_layers+1, B, T, d]`` in one pass that stops before the
    unembedding.

    The head would cost as much as a whole extra lens row per token on a 262k vocabulary, and
    nothing here needs the model's own logits (the last layer's output read out is the same).
    """
    anatomy = lm.anatomy
    sink: dict = {}
    sites = normalize_sites({"resid_pre": [0], "resid_post": "all"}, anatomy.n_layers)
    device = lm.device
    with lm.lock, hooked(anatomy, sites, sink, stop_early=False):
        handle = anatomy.layers[anatomy.n_layers - 1].register_forward_hook(_stop_after_last_layer)
        try:
            run_forward(anatomy.model, input_ids=ids.to(device), attention_mask=mask.to(device))
        finally:
            handle.remove()
    return torch.stack([sink[("resid_pre", 0)]] + [sink[("resid_post", i)] for i in range(anatomy.n_layers)])


def _stop_after_last_layer(module, args, output):
    raise StopForward


def capture_rows(lm: LoadedModel, windows: Sequence[list[int]], with_labels: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual stream at every hidden index for the real tokens of a batch of windows.

    Returns ``resid [n_layers+1, N, d]`` (row 0 embeddings, row i+1 layer i output, pre final norm, on the
    model's device) over the positions that are not padding and not position 0, plus next-token labels
    ``[N]`` (only positions that have a next token are kept then).
    """
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = pad_batch(windows, pad)
    keep = mask.bool().clone()
    keep[:, 0] = False
    if with_labels:
        keep[:, -1] = False
        keep[:, :-1] &= mask[:, 1:].bool()
    resid = _capture_resid(lm, ids, mask)                                    # [L+1, B, T, d]
    where = keep.to(resid.device)
    rows = resid[:, where]                                                  # [L+1, N, d]
    labels = ids[:, 1:][keep[:, :-1]] if with_labels else None
    return rows, labels


# --- the read-out head --------------------------------------------------------------------------
class ReadoutHead:
    """The model's read-out (final norm, unembedding, scale, softcap), on all tokens or on a subset."""

    def __init__(self, anatomy: Anatomy, vocab_ids: torch.Tensor | None):
        self.anatomy = anatomy
        self.ids = vocab_ids
        weight = module_tensor(anatomy.unembed).detach()
        self.dtype = weight.dtype
        if vocab_ids is not None:
            head = anatomy.head_device
            self.weight = weight.to(head).index_select(0, vocab_ids.to(head))
            bias = module_tensor(anatomy.unembed, "bias") if getattr(anatomy.unembed, "bias", None) is not None \
                else None
            self.bias = bias.detach().to(head).index_select(0, vocab_ids.to(head)) if bias is not None else None

    @property
    def size(self) -> int:
        return self.anatomy.vocab_size if self.ids is None else len(self.ids)

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` residuals -> ``[..., size]`` float32 logits."""
        resid = resid.to(self.dtype)
        if self.ids is None:
            return self.anatomy.logits(resid).float()
        normed = self.anatomy.normalize(resid).to(self.weight.device)
        logits = self.anatomy.scale_logits(nn.functional.linear(normed, self.weight, self.bias))
        return logits.to(resid.device).float()

    def check(self, resid: torch.Tensor) -> None:
        """The subset read-out must equal the full read-out restricted to the subset."""
        if self.ids is None:
            return
        with torch.no_grad():
            full = self.anatomy.logits(resid.to(self.dtype)).float()[..., self.ids.to(resid.device)]
            part = self.logits(resid)
        tol = 1e-3 if self.dtype == torch.float32 else 0.25
        if not torch.allclose(full, part, atol=tol, rtol=1e-3):
            raise TunedLensError("This model's unembedding is not a plain linear map, so training on a vocabulary "
                                 "subset is not possible; train on the full vocabulary (vocab_subset=None).")


def rows_per_chunk(vocab: int, budget_bytes: int) -> int:
    """Rows whose logits fit in ``budget_bytes``."""
    return max(1, budget_bytes // (vocab * 4 * 6))  # logits, log-probs, probs, grads and temporaries in fp32
