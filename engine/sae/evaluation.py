"""Evaluate a sparse autoencoder: reconstruction quality, sparsity, and the model's loss with it spliced in.

Metrics (the report card):

- ``l0``: mean number of active latents per token;
- ``explained_variance``: ``1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2`` over all evaluated tokens;
- ``mse``: mean squared error per element; ``cosine``: mean cosine of ``x`` and ``x_hat``;
- ``dead_fraction``: latents that never fire on the evaluated tokens; ``dense_fraction``: latents firing on
  more than 10 % of them; ``density_histogram``: counts of log10 firing density of the live latents;
- ``ce``: next-token cross-entropy of the model clean, with the site's activation replaced by the SAE's
  reconstruction, and with it replaced by zeros; ``recovered = (zero - spliced) / (zero - clean)``.

Position 0 (BOS, with its outsized norm) is excluded from training by the activation store, so it is
neither counted nor replaced here. Replacement runs as a forward hook on the module the site belongs to
(``resid_post`` of layer i = output of ``anatomy.layers[i]``), and hooks are always removed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from engine.core.capture import hooked, pad_batch, run_forward
from engine.core.errors import UserError
from engine.sae.base import SAE, SAECompatibilityError, check_attachable, describe

Progress = Callable[[float, str], None]
DENSE_THRESHOLD = 0.1


class SAEEvalError(UserError):
    """Evaluation input that cannot work (no text, no tokens, nothing to compare)."""


# --- splicing -------------------------------------------------------------------------------
def _apply(fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, skip_first: bool) -> torch.Tensor:
    if not skip_first:
        return fn(hidden).to(hidden.dtype)
    if hidden.ndim < 3 or hidden.shape[1] < 2:
        return hidden
    out = hidden.clone()
    out[:, 1:] = fn(hidden[:, 1:]).to(hidden.dtype)
    return out


@contextmanager
def replace_site(anatomy, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor],
                 skip_first_position: bool = True):
    """Within the block, the activation at ``site``/``layer`` is replaced by ``fn(activation)``.

    ``fn`` gets ``[batch, seq, width]`` (without position 0 when ``skip_first_position``).
    """
    handles = []

    def output_hook(module, args, output):
        if isinstance(output, tuple):
            return (_apply(fn, output[0], skip_first_position),) + tuple(output[1:])
        return _apply(fn, output, skip_first_position)

    def pre_hook_kwargs(module, args, kwargs):
        if args:
            return (_apply(fn, args[0], skip_first_position),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = _apply(fn, kwargs["hidden_states"], skip_first_position)
        return args, kwargs

    def pre_hook(module, args):
        return (_apply(fn, args[0], skip_first_position),) + tuple(args[1:])

    try:
        if site == "resid_post":
            handles.append(anatomy.layers[layer].register_forward_hook(output_hook))
        elif site == "attn_out":
            handles.append(anatomy.attn_branch(layer).register_forward_hook(output_hook))
        elif site == "mlp_out":
            handles.append(anatomy.mlp_branch(layer).register_forward_hook(output_hook))
        elif site == "resid_pre":
            handles.append(anatomy.layers[layer].register_forward_pre_hook(pre_hook_kwargs, with_kwargs=True))
        elif site == "mlp_hidden":
            handles.append(anatomy.mlp_out_proj(layer).register_forward_pre_hook(pre_hook))
        else:
            raise SAECompatibilityError(f"The site '{site}' cannot be replaced in a forward pass.")
        yield
    finally:
        for handle in handles:
            handle.remove()


def sae_replacement(sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return sae(hidden.to(sae.W_enc.dtype))
    return fn


# --- accumulators ---------------------------------------------------------------------------
class ReconStats:
    """Streaming reconstruction and sparsity statistics over ``[n, d]`` batches."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.d_in = 0
        self.sq_err = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0
        self.cos_sum = 0.0
        self.l0_sum = 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        active = acts > 0
        self.n += x.shape[0]
        self.d_in = x.shape[1]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_x = x.sum(dim=0) if self.sum_x is None else self.sum_x + x.sum(dim=0)
        self.sum_sq += float(x.pow(2).sum())
        self.cos_sum += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        self.l0_sum += float(active.sum())
        self.counts += active.sum(dim=0).to(self.counts.device)

    def result(self, n_bins: int = 30) -> dict:
        if self.n == 0:
            raise SAEEvalError("No tokens were evaluated: give more text or a larger token budget.")
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        density = self.counts.double().cpu() / self.n
        live = density[density > 0]
        low = math.log10(1.0 / self.n)
        edges = torch.linspace(low, 0.0, n_bins + 1)
        hist = torch.histc(live.log10().float(), bins=n_bins, min=low, max=0.0) if len(live) else torch.zeros(n_bins)
        return {"n_tokens": self.n, "l0": self.l0_sum / self.n,
                "explained_variance": 1.0 - self.sq_err / total_var if total_var > 0 else None,
                "mse": self.sq_err / (self.n * self.d_in), "cosine": self.cos_sum / self.n,
                "dead_fraction": float((density == 0).double().mean()),
                "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
                "density_histogram": {"log10_density_edges": [round(float(e), 4) for e in edges],
                                      "counts": [int(c) for c in hist]},
                "feature_density": density.float()}


# --- token batches from text ----------------------------------------------------------------
def _token_batches(tokenizer, texts: Iterable[str], context_length: int, batch_size: int,
                   pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches; texts shorter than 3 tokens are skipped."""
    rows: list[list[int]] = []

    def flush():
        return pad_batch(rows, pad_id)

    for text in texts:
        if not isinstance(text, str) or not text.strip():
            continue
        ids = tokenizer(text, truncation=True, max_length=context_length)["input_ids"]
        if len(ids) < 3:
            continue
        rows.append(list(ids))
        if len(rows) == batch_size:
            yield flush()
            rows = []
    if rows:
        yield flush()


def _ce_sums(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum and count of next-token cross-entropy over real (non-pad) targets."""
    targets = input_ids[:, 1:]
    valid = mask[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view_as(targets)
    return float(losses[valid].sum()), int(valid.sum())


# --- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_with_model(sae: SAE, lm, texts: Iterable[str], *, site: str | None = None, layer: int | None = None,
                        max_tokens: int = 16_384, context_length: int = 128, batch_size: int = 4,
                        compute_ce: bool = True, n_bins: int = 30, progress: Progress | None = None) -> dict:
    """Report card from held-out ``texts`` run through ``lm``: reconstruction stats and CE loss recovered."""
    anatomy = lm.anatomy
    site, layer = check_attachable(sae, anatomy, site, layer)
    sae = sae.to(lm.device).eval()
    stats = ReconStats(sae.d_sae, lm.device)
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero_ablated": [0.0, 0]}
    tokenizer = lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    say = progress or (lambda fraction, message: None)
    replacement = sae_replacement(sae)
    model = lm.model
    for input_ids, mask in _token_batches(tokenizer, texts, context_length, batch_size, pad_id):
        if stats.n >= max_tokens:
            break
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        sink: dict = {}
        with lm.lock:
            with hooked(anatomy, {site: [layer]}, sink, stop_early=not compute_ce):
                clean = _forward(model, input_ids, mask)
            if compute_ce:
                with replace_site(anatomy, site, layer, replacement):
                    spliced = _forward(model, input_ids, mask)
                with replace_site(anatomy, site, layer, torch.zeros_like):
                    zeroed = _forward(model, input_ids, mask)
        acts_in = sink[(site, layer)][:, 1:]
        keep = mask[:, 1:].bool()
        x = acts_in[keep].to(sae.W_enc.dtype)
        x_hat, acts = sae.reconstruct(x)
        stats.update(x, x_hat, acts)
        if compute_ce:
            for name, out in (("clean", clean), ("spliced", spliced), ("zero_ablated", zeroed)):
                total, count = _ce_sums(out.logits, input_ids, mask)
                ce[name][0] += total
                ce[name][1] += count
        say(min(1.0, stats.n / max_tokens), f"evaluated {stats.n:,} tokens")
    report = stats.result(n_bins)
    report["ce"] = _ce_report(ce) if compute_ce else None
    report.update(site=site, layer=layer, model=getattr(lm, "name", None), source="model")
    report["sae"] = describe(sae)
    return report


def _forward(model, input_ids, mask):
    return run_forward(model, input_ids=input_ids, attention_mask=mask)


def _ce_report(ce: dict) -> dict:
    if ce["clean"][1] == 0:
        raise SAEEvalError("No next-token targets were evaluated: the texts are too short.")
    clean, spliced, zero = (ce[name][0] / ce[name][1] for name in ("clean", "spliced", "zero_ablated"))
    gap = zero - clean
    recovered = (zero - spliced) / gap if abs(gap) > 1e-9 else None
    return {"clean": clean, "spliced": spliced, "zero_ablated": zero, "delta": spliced - clean,
            "recovered": recovered, "n_targets": ce["clean"][1]}


@torch.no_grad()
def evaluate_on_store(sae: SAE, store, *, site: str | None = None, layer: int | None = None,
                      max_tokens: int = 65_536, batch_size: int = 4096, n_bins: int = 30,
                      progress: Progress | None = None) -> dict:
    """Reconstruction and sparsity stats from cached activations (no model needed, no CE loss)."""
    if site is None or layer is None:
        cfg_site, cfg_layer = sae.cfg.site()
        site = site or cfg_site
        layer = cfg_layer if layer is None else layer
    if site not in store.sites or layer not in list(store.layers):
        raise SAEEvalError(f"The activation store holds no {site} activations for layer {layer}.")
    stats = ReconStats(sae.d_sae)
    say = progress or (lambda fraction, message: None)
    sae = sae.to("cpu").eval()
    for batch in store.iter_batches(site, layer, batch_size, shuffle=False, dtype=torch.float32):
        if batch.shape[-1] != sae.d_in:
            raise SAECompatibilityError(f"The SAE expects d_in={sae.d_in} but the store's {site} activations "
                                        f"have width {batch.shape[-1]}.")
        batch = batch[: max_tokens - stats.n]
        x_hat, acts = sae.reconstruct(batch)
        stats.update(batch, x_hat, acts)
        say(min(1.0, stats.n / max_tokens), f"evaluated {stats.n:,} tokens")
        if stats.n >= max_tokens:
            break
    report = stats.result(n_bins)
    report.update(ce=None, site=site, layer=layer, model=getattr(store, "model_name", None), source="store")
    report["sae"] = describe(sae)
    return report


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
