"""Evaluate an SAE or transcoder: reconstruction quality, sparsity, and the model's loss with it spliced in.

Metrics (the report card; definitions in :mod:`engine.sae.metrics`):

- ``l0``: mean number of active latents per token;
- ``explained_variance``: SAELens's ``1 - E|x - x_hat|^2 / (E|x|^2 - |E x|^2)`` over all evaluated tokens
  (for a transcoder ``x`` is the activation of the site it predicts);
- ``mse``: mean squared error per element; ``cosine``: mean cosine of ``x`` and ``x_hat``;
- ``dead_fraction``: latents that never fire on the evaluated tokens; ``dense_fraction``: latents firing on
  more than :data:`~engine.sae.metrics.DENSE_DENSITY` of them; ``density_histogram``: counts of log10
  firing density of the live latents;
- ``ce``: next-token cross-entropy of the model clean, with the output site's activation replaced by the
  SAE's output, and with it replaced by zeros; ``recovered = (zero - spliced) / (zero - clean)``.

Position 0 is neither counted nor replaced (see :mod:`engine.sae.splice`). A transcoder is spliced as a
hook pair: its input site is read, its output site replaced by its output.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from engine.core.capture import hooked, pad_batch, run_forward
from engine.core.devices import module_device, oom_guard
from engine.core.errors import UserError
from engine.core.progress import Progress, report
from engine.sae.attach import Splice, pick_site, resolve_splice
from engine.sae.base import SAE
from engine.sae.hooks import SAECompatibilityError
from engine.sae.io import describe
from engine.sae.metrics import ExplainedVariance, active, is_dead, is_dense
from engine.sae.splice import replace_site, splice_sae


class SAEEvalError(UserError):
    """Evaluation input that cannot work (no text, no tokens, nothing to compare)."""


# --- accumulators ---------------------------------------------------------------------------
class ReconStats:
    """Streaming reconstruction and sparsity statistics over ``[n, d]`` batches."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.ev = ExplainedVariance()
        self.d_out = 0
        self.cos_sum = 0.0
        self.l0_sum = 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)

    @property
    def n(self) -> int:
        return self.ev.n

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        """``x``, ``x_hat``: ``[n, d_out]`` (target and output); ``acts``: ``[n, d_sae]``."""
        fired = active(acts)
        self.ev.update(x, x_hat)
        self.d_out = x.shape[1]
        self.cos_sum += float(F.cosine_similarity(x.double(), x_hat.double(), dim=-1).sum())
        self.l0_sum += float(fired.sum())
        self.counts += fired.sum(dim=0).to(self.counts.device)

    def result(self, n_bins: int = 30) -> dict:
        if self.n == 0:
            raise SAEEvalError("No tokens were evaluated: give more text or a larger token budget.")
        density = self.counts.double().cpu() / self.n
        live = density[~is_dead(density)]
        low = math.log10(1.0 / self.n)
        edges = torch.linspace(low, 0.0, n_bins + 1)
        hist = torch.histc(live.log10().float(), bins=n_bins, min=low, max=0.0) if len(live) else torch.zeros(n_bins)
        return {"n_tokens": self.n, "l0": self.l0_sum / self.n, "explained_variance": self.ev.compute(),
                "mse": self.ev.sum_err / (self.n * self.d_out), "cosine": self.cos_sum / self.n,
                "dead_fraction": float(is_dead(density).double().mean()),
                "dense_fraction": float(is_dense(density).double().mean()),
                "density_histogram": {"log10_density_edges": [round(float(e), 4) for e in edges],
                                      "counts": [int(c) for c in hist]},
                "feature_density": density.float()}


# --- token batches from text ----------------------------------------------------------------
def _token_batches(tokenizer, texts: Iterable[str], context_length: int, batch_size: int,
                   pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches ``[B, T]``; texts shorter than 3 tokens are skipped."""
    rows: list[list[int]] = []
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            continue
        ids = tokenizer(text, truncation=True, max_length=context_length)["input_ids"]
        if len(ids) < 3:
            continue
        rows.append(list(ids))
        if len(rows) == batch_size:
            yield pad_batch(rows, pad_id)
            rows = []
    if rows:
        yield pad_batch(rows, pad_id)


def _ce_sums(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum and count of next-token cross-entropy over real (non-pad) targets."""
    targets = input_ids[:, 1:]
    valid = mask[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view_as(targets)
    return float(losses[valid].sum()), int(valid.sum())


def _captured(sink: dict, site: str, layer: int) -> torch.Tensor:
    """``[B, T, width]`` from a :func:`hooked` sink (``resid_mid`` is summed from its parts)."""
    if site == "resid_mid":
        return sink[("resid_pre", layer)] + sink[("attn_out", layer)]
    return sink[(site, layer)]


# --- evaluation -----------------------------------------------------------------------------
def _forward(model, input_ids, mask):
    return run_forward(model, input_ids=input_ids, attention_mask=mask)


def _model_batch(sae: SAE, lm, splice: Splice, input_ids, mask, compute_ce: bool) -> tuple:
    """One batch: ``(x [n, d_in], y [n, d_out])`` at real positions >= 1, and the ``(sum, count)`` of the
    next-token cross-entropy clean, spliced and zero-ablated (or None). Each forward's ``[B, T, V]`` logits
    are reduced to two numbers before the next forward runs, so only one such tensor is alive at a time."""
    anatomy, model = lm.anatomy, lm.model
    wanted: dict[str, list[int]] = {splice.in_site: [splice.in_layer]}
    wanted.setdefault(splice.out_site, [])
    wanted[splice.out_site] = sorted({*wanted[splice.out_site], splice.out_layer})
    sink: dict = {}
    sums: list[tuple[float, int]] = []

    def ce_of(output) -> None:
        sums.append(_ce_sums(output.logits, input_ids, mask))

    with lm.lock, oom_guard("the evaluation batch_size or context_length", doing="evaluating the SAE"):
        with hooked(anatomy, wanted, sink, stop_early=not compute_ce):
            clean = _forward(model, input_ids, mask)
        if compute_ce:
            ce_of(clean)
            del clean
            with splice_sae(anatomy, sae, splice):
                ce_of(_forward(model, input_ids, mask))
            with replace_site(anatomy, splice.out_site, splice.out_layer, torch.zeros_like):
                ce_of(_forward(model, input_ids, mask))
    keep = mask[:, 1:].bool()
    x = _captured(sink, splice.in_site, splice.in_layer)[:, 1:][keep].to(sae.W_enc.dtype)
    y = _captured(sink, splice.out_site, splice.out_layer)[:, 1:][keep].to(sae.W_enc.dtype)
    return x, y, (sums if compute_ce else None)


@torch.no_grad()
def evaluate_with_model(sae: SAE, lm, texts: Iterable[str], *, site: str | None = None, layer: int | None = None,
                        out_site: str | None = None, out_layer: int | None = None, max_tokens: int = 16_384,
                        context_length: int = 128, batch_size: int = 4, compute_ce: bool = True, n_bins: int = 30,
                        progress: Progress | None = None) -> dict:
    """Report card from held-out ``texts`` run through ``lm``: reconstruction stats and CE loss recovered.

    ``site``/``layer`` (and for a transcoder ``out_site``/``out_layer``) override the config's hooks.
    """
    splice = resolve_splice(sae, lm.anatomy, site, layer, out_site, out_layer)
    if module_device(sae) != lm.device:  # never move the caller's (possibly cached) SAE
        sae = copy.deepcopy(sae).to(lm.device)
    sae = sae.eval()
    stats = ReconStats(sae.d_sae, lm.device)
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero_ablated": [0.0, 0]}
    tokenizer = lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for input_ids, mask in _token_batches(tokenizer, texts, context_length, batch_size, pad_id):
        if stats.n >= max_tokens:
            break
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        x, y, sums = _model_batch(sae, lm, splice, input_ids, mask, compute_ce)
        y_hat, acts = sae.reconstruct(x)
        stats.update(y, y_hat, acts)
        for name, (total, count) in zip(ce, sums or ()):
            ce[name][0] += total
            ce[name][1] += count
        report(progress, stats.n / max_tokens, f"evaluated {stats.n:,} tokens")
    result = stats.result(n_bins)
    result["ce"] = _ce_report(ce) if compute_ce else None
    result.update(site=splice.in_site, layer=splice.in_layer, model=getattr(lm, "name", None), source="model")
    if sae.is_transcoder:
        result.update(site_out=splice.out_site, layer_out=splice.out_layer)
    result["sae"] = describe(sae)
    return result


def _ce_report(ce: dict) -> dict:
    if ce["clean"][1] == 0:
        raise SAEEvalError("No next-token targets were evaluated: the texts are too short.")
    clean, spliced, zero = (ce[name][0] / ce[name][1] for name in ("clean", "spliced", "zero_ablated"))
    gap = zero - clean
    recovered = (zero - spliced) / gap if abs(gap) > 1e-9 else None
    return {"clean": clean, "spliced": spliced, "zero_ablated": zero, "delta": spliced - clean,
            "recovered": recovered, "n_targets": ce["clean"][1]}


def _store_splice(sae: SAE, store, site, layer, out_site, out_layer) -> Splice:
    site, layer = pick_site(sae.cfg.site, site, layer)
    out_site, out_layer = pick_site(sae.cfg.output_site, out_site, out_layer) if sae.is_transcoder else (site, layer)
    for s, lay in ((site, layer), (out_site, out_layer)):
        if s not in store.sites or lay not in list(store.layers):
            raise SAEEvalError(f"The activation store holds no {s} activations for layer {lay}.")
    return Splice(site, layer, out_site, out_layer)


@torch.no_grad()
def evaluate_on_store(sae: SAE, store, *, site: str | None = None, layer: int | None = None,
                      out_site: str | None = None, out_layer: int | None = None, max_tokens: int = 65_536,
                      batch_size: int = 4096, n_bins: int = 30, progress: Progress | None = None) -> dict:
    """Reconstruction and sparsity stats from cached activations (no model needed, no CE loss).

    For a transcoder the store must hold both its input and its output site (rows are paired).
    """
    splice = _store_splice(sae, store, site, layer, out_site, out_layer)
    stats = ReconStats(sae.d_sae)
    sae = sae.to("cpu").eval()
    inputs = store.iter_batches(splice.in_site, splice.in_layer, batch_size, shuffle=False, dtype=torch.float32)
    targets = inputs if splice.same_site else store.iter_batches(splice.out_site, splice.out_layer, batch_size,
                                                                 shuffle=False, dtype=torch.float32)
    for x in inputs:
        y = x if splice.same_site else next(targets)
        if x.shape[-1] != sae.d_in or y.shape[-1] != sae.d_out:
            raise SAECompatibilityError(f"The SAE maps width {sae.d_in} to {sae.d_out}, but the store's activations "
                                        f"have widths {x.shape[-1]} and {y.shape[-1]}.")
        x, y = x[: max_tokens - stats.n], y[: max_tokens - stats.n]
        y_hat, acts = sae.reconstruct(x)
        stats.update(y, y_hat, acts)
        report(progress, stats.n / max_tokens, f"evaluated {stats.n:,} tokens")
        if stats.n >= max_tokens:
            break
    result = stats.result(n_bins)
    result.update(ce=None, site=splice.in_site, layer=splice.in_layer, model=getattr(store, "model_name", None),
                  source="store")
    if sae.is_transcoder:
        result.update(site_out=splice.out_site, layer_out=splice.out_layer)
    result["sae"] = describe(sae)
    return result


def report_to_json(report: dict) -> dict:
    """Drop tensors and turn NaN into None so the report is valid JSON."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    return clean(report)


def held_out_texts(store, corpus_spec: str | None = None, skip_docs: int | None = None) -> Iterator[str]:
    """Texts of the store's corpus that the store did not capture (those after its last document)."""
    from engine.data.corpora import iter_texts

    manifest = getattr(store, "manifest", {}) or {}
    spec = corpus_spec or manifest.get("corpus") or manifest.get("corpus_spec") or "builtin"
    if skip_docs is None:
        skip_docs = 0
        if store is not None:
            try:
                doc_ids = store.doc_ids()
                skip_docs = int(doc_ids.max()) + 1 if len(doc_ids) else 0
            except (AttributeError, NotImplementedError, RuntimeError, ValueError):
                skip_docs = 0
    for index, text in enumerate(iter_texts(spec)):
        if index >= skip_docs:
            yield text
