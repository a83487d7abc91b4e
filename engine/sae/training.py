"""Train TopK (default) or standard L1 sparse autoencoders, and ReLU (skip) transcoders, on cached activations.

Data: see :mod:`engine.sae.train_data` (a store with ``site``/``layer``, plus ``target_site``/``target_layer``
for a transcoder, or an iterable of batches or of ``(input, target)`` pairs).

Recipe (OpenAI's TopK paper and Anthropic's updates, as SAELens trains them):

- inputs (and a transcoder's targets) scaled by one constant each so their mean norm is ``sqrt(width)``;
  the constants are folded into the saved weights, so the saved SAE takes raw activations
  (``normalize_activations: "none"``);
- ``b_dec`` initialised at the geometric median (or mean) of a sample of what is reconstructed; decoder
  rows initialised at random and kept at unit norm (gradient parallel to each row removed before each
  step, renormalised after it); encoder initialised as the decoder's transpose (random unit columns
  when a transcoder's input and output widths differ); a skip transcoder's ``W_skip`` starts at zero;
- Adam with linear warm-up and a linear decay over the last 20 % (:func:`engine.core.numerics.lr_factor`);
  L1 coefficient warm-up for standard SAEs and transcoders (L1 on activations times decoder norms);
- dead latents (no activation in the last ``dead_window_tokens``) revived by the auxiliary-k loss:
  the top ``k_aux`` dead pre-activations reconstruct the main reconstruction's residual;
- a checkpoint (weights, Adam state, counters, curves) every ``checkpoint_every`` steps under
  ``out/checkpoint/`` so an interrupted run resumes where it stopped.

The logged ``explained_variance`` is :class:`engine.sae.metrics.ExplainedVariance` over the logging window.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.core.devices import pick_device
from engine.core.fileio import atomic_write_json
from engine.core.numerics import lr_factor
from engine.core.progress import Progress, report
from engine.sae.base import SAE, SAEConfig
from engine.sae.hooks import site_to_hook_name
from engine.sae.io import save_sae
from engine.sae.metrics import ExplainedVariance, log_sparsity
from engine.sae.train_data import (
    ActivationSource,
    SAETrainError,
    geometric_median,
    init_sae,
    load_checkpoint,
    remove_parallel_grad,
    save_checkpoint,
    sparse_decode,
    unit_norm_rows_,
)

CHECKPOINT_DIR = "checkpoint"
TRAIN_FORMAT = 2
TRAINABLE = ("topk", "standard", "transcoder", "skip_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder")

__all__ = ["SAETrainConfig", "TrainResult", "SAETrainError", "train_sae", "geometric_median", "sparse_decode",
           "unit_norm_rows_", "CHECKPOINT_DIR"]


@dataclass
class SAETrainConfig:
    """Training settings; ``d_sae`` wins over ``expansion_factor`` when given."""

    architecture: str = "topk"  # "topk" | "standard" | "transcoder" | "skip_transcoder"
    expansion_factor: float = 8.0
    d_sae: int | None = None
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05
    lr: float = 4e-4
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    batch_size: int = 4096
    total_tokens: int = 2_000_000
    b_dec_init: str = "geometric_median"  # "geometric_median" | "mean" | "zeros"
    init_sample_tokens: int = 16_384
    normalize_input: bool = True
    aux_k: int | None = None  # default d_in // 2
    aux_k_coefficient: float = 1 / 32
    dead_window_tokens: int | None = None  # default: a tenth of the budget, at least 4 batches, at most 10M
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.architecture not in TRAINABLE:
            raise SAETrainError(f"Training supports the 'topk' and 'standard' architectures and the "
                                f"'transcoder' and 'skip_transcoder' ones, not '{self.architecture}'.")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAETrainError(f"Unknown b_dec initialisation '{self.b_dec_init}'; use geometric_median, mean or zeros.")
        for name in ("batch_size", "total_tokens", "k", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) <= 0:
                raise SAETrainError(f"The training setting '{name}' must be a positive number.")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise SAETrainError("The learning rate must be a positive number.")
        if self.d_sae is None and self.expansion_factor <= 0:
            raise SAETrainError("The expansion factor must be positive.")

    def width(self, d_in: int) -> int:
        return int(self.d_sae) if self.d_sae else max(1, int(round(d_in * self.expansion_factor)))


@dataclass
class TrainResult:
    sae: SAE
    path: Path | None
    history: list[dict] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


# --- the run --------------------------------------------------------------------------------
def _forward(sae: SAE, x: torch.Tensor, k: int | None):
    """``(pre [n, d_sae], acts, y_hat [n, d_out])``; TopK (``k`` given) decodes sparsely, acts = (values, indices)."""
    x_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = x_in @ sae.W_enc + sae.b_enc
    if k is not None:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu()
        acts = (values, indices)
        y_hat = sparse_decode(values, indices, sae.W_dec, sae.b_dec)
    else:
        acts = pre.relu()
        y_hat = acts @ sae.W_dec + sae.b_dec
    if hasattr(sae, "W_skip"):
        y_hat = y_hat + x @ sae.W_skip.T
    return pre, acts, y_hat


@dataclass
class _Run:
    """Everything a step changes; saved in checkpoints."""

    sae: SAE
    optimizer: torch.optim.Optimizer
    config: SAETrainConfig
    total_steps: int
    dead_window: int
    aux_k: int
    k: int | None
    scale_in: float = 1.0
    scale_out: float = 1.0
    step: int = 0
    tokens: int = 0
    count_tokens: int = 0
    resumed_from: int = 0
    history: list = field(default_factory=list)
    last_fired: torch.Tensor | None = None  # [d_sae] token count when each latent last fired
    fire_counts: torch.Tensor | None = None  # [d_sae] firings over the final dead window
    last_lr: float = 0.0
    window: dict = field(default_factory=dict)
    ev: ExplainedVariance = field(default_factory=ExplainedVariance)

    def lr(self) -> float:
        decay = self.config.decay_fraction
        decay_start = int(self.total_steps * (1 - decay)) if decay > 0 else sys.maxsize
        return self.config.lr * lr_factor(self.step, self.total_steps, self.config.warmup_steps, decay_start)


def _losses(run: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """``(loss, scalars, fired [d_sae], y_hat)`` for one batch."""
    sae, config, d_sae = run.sae, run.config, run.sae.d_sae
    pre, acts, y_hat = _forward(sae, x, run.k)
    err = y - y_hat
    mse = err.pow(2).sum(dim=-1).mean()
    loss = mse
    if run.k is not None:
        values, indices = acts
        fired = torch.zeros(d_sae, dtype=torch.long, device=x.device).index_add_(
            0, indices[values > 0], torch.ones_like(indices[values > 0]))
        l0 = (values > 0).sum(dim=-1).float().mean()
    else:
        l1_ramp = min(1.0, (run.step + 1) / max(1, config.l1_warmup_fraction * run.total_steps))
        loss = loss + config.l1_coefficient * l1_ramp * (acts * sae.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        fired = (acts > 0).sum(dim=0)
        l0 = (acts > 0).sum(dim=-1).float().mean()
    dead = ((run.tokens + x.shape[0] - run.last_fired) > run.dead_window) & (fired == 0)
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if n_dead > 0 and config.aux_k_coefficient > 0:
        dvals, didx = pre.masked_fill(~dead, float("-inf")).topk(min(run.aux_k, n_dead), dim=-1, sorted=False)
        aux_hat = sparse_decode(dvals, didx, sae.W_dec, torch.zeros_like(sae.b_dec))
        aux = min(n_dead / run.aux_k, 1.0) * (err.detach() - aux_hat).pow(2).sum(dim=-1).mean()
        loss = loss + config.aux_k_coefficient * aux
    return loss, {"loss": loss, "mse": mse, "aux": aux, "l0": l0}, fired, y_hat


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on ``x [n, d_in] -> y [n, d_out]`` (already scaled), plus the bookkeeping."""
    run.last_lr = run.lr()
    for group in run.optimizer.param_groups:
        group["lr"] = run.last_lr
    loss, scalars, fired, y_hat = _losses(run, x, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_grad(run.sae.W_dec)
    run.optimizer.step()
    unit_norm_rows_(run.sae.W_dec)
    tokens_after = run.tokens + x.shape[0]
    with torch.no_grad():
        run.last_fired = torch.where(fired > 0, torch.full_like(run.last_fired, tokens_after), run.last_fired)
        if tokens_after > run.config.total_tokens - run.dead_window:  # density over the last window
            run.fire_counts += fired
            run.count_tokens += x.shape[0]
        run.ev.update(y, y_hat)
        for key, value in scalars.items():
            run.window[key] = run.window.get(key, 0.0) + float(value)
        run.window["n"] = run.window.get("n", 0) + 1
    run.tokens = tokens_after
    run.step += 1


def _log(run: _Run, started: float, on_metrics, progress: Progress | None) -> None:
    count = max(run.window.get("n", 0), 1)
    dead_now = ((run.tokens - run.last_fired) > run.dead_window) if run.tokens >= run.dead_window \
        else torch.zeros_like(run.last_fired).bool()
    ev = run.ev.compute()
    record = {"step": run.step, "tokens": run.tokens, "loss": run.window.get("loss", 0.0) / count,
              "mse": run.window.get("mse", 0.0) / count, "aux_loss": run.window.get("aux", 0.0) / count,
              "l0": run.window.get("l0", 0.0) / count, "explained_variance": ev if ev is not None else float("nan"),
              "dead_fraction": float(dead_now.float().mean()), "lr": run.last_lr,
              "elapsed_s": time.perf_counter() - started}
    run.history.append(record)
    run.window, run.ev = {}, ExplainedVariance()
    if on_metrics:
        on_metrics(record)
    report(progress, run.tokens / run.config.total_tokens,
           f"step {run.step}/~{run.total_steps} loss {record['loss']:.3g} L0 {record['l0']:.1f} "
           f"EV {record['explained_variance']:.3f} dead {100 * record['dead_fraction']:.1f}%")


def _checkpoint_state(run: _Run, position: tuple[int, int]) -> dict:
    return {"format": TRAIN_FORMAT, "d_in": run.sae.d_in, "d_sae": run.sae.d_sae, "d_out": run.sae.d_out,
            "step": run.step, "tokens": run.tokens, "history": run.history, "scale_in": run.scale_in,
            "scale_out": run.scale_out, "count_tokens": run.count_tokens, "epoch": position[0],
            "batches_in_epoch": position[1], "config": asdict(run.config),
            "_last_fired": run.last_fired.cpu(), "_fire_counts": run.fire_counts.cpu()}


def _restore(run: _Run, ckpt: Path, device: torch.device) -> None:
    state = load_checkpoint(ckpt, run.sae, run.optimizer)
    if state is None or state.get("format") != TRAIN_FORMAT or \
            (state.get("d_sae"), state.get("d_in"), state.get("d_out")) != (run.sae.d_sae, run.sae.d_in, run.sae.d_out):
        raise SAETrainError(f"The checkpoint in '{ckpt}' was made with other settings; delete it to start over.")
    run.step, run.tokens, run.history = state["step"], state["tokens"], state["history"]
    run.scale_in, run.scale_out, run.count_tokens = state["scale_in"], state["scale_out"], state["count_tokens"]
    run.last_fired, run.fire_counts = state["_last_fired"].to(device), state["_fire_counts"].to(device)
    run.resumed_from = run.step


def _sae_config(config: SAETrainConfig, source: ActivationSource, site, layer, target_site, target_layer,
                model_name, hook_name, metadata) -> SAEConfig:
    transcoder = config.architecture in TRANSCODERS
    if transcoder != source.paired:
        raise SAETrainError("A transcoder trains on (input, target) pairs: give target_site (and target_layer) with "
                            "a store, or pairs of batches; an SAE trains on one site." if transcoder else
                            "Paired (input, target) data trains a transcoder: choose architecture 'transcoder' or "
                            "'skip_transcoder'.")
    store = source.store
    located = site is not None and layer is not None
    meta = {"model_name": model_name or getattr(store, "model_name", None),
            "hook_name": hook_name or (site_to_hook_name(site, layer) if located else None),
            "hook_layer": layer, "context_size": None, "prepend_bos": True, "dataset_path": None}
    if transcoder and located:
        meta["hook_name_out"] = site_to_hook_name(target_site or site, source.target_layer)
    if store is not None:
        manifest = getattr(store, "manifest", {}) or {}
        meta["context_size"] = manifest.get("context_length")
        meta["dataset_path"] = manifest.get("corpus") or manifest.get("corpus_spec") or None
    meta.update(metadata or {})
    meta = {key: value for key, value in meta.items() if value is not None}
    d_sae = config.width(source.d_in)
    return SAEConfig(d_in=source.d_in, d_sae=d_sae, architecture=config.architecture,
                     k=min(config.k, d_sae) if config.architecture == "topk" else None,
                     d_out=source.d_out if transcoder else None, apply_b_dec_to_input=not transcoder,
                     metadata=meta)


def _scale(sample: torch.Tensor, enabled: bool) -> float:
    mean_norm = float(sample.norm(dim=-1).mean())
    return sample.shape[-1] ** 0.5 / mean_norm if enabled and mean_norm > 0 else 1.0


def _prime(source: ActivationSource, config: SAETrainConfig, ckpt: Path | None, resume: bool):
    """The first batches (for the scales and the init, trained on afterwards), the rest of the stream, and
    whether a checkpoint is to be resumed."""
    skip, resuming = 0, bool(resume and ckpt is not None and (ckpt / "state.json").is_file())
    if resuming:
        state = json.loads((ckpt / "state.json").read_text())
        source.epoch, skip = state.get("epoch", 0), state.get("batches_in_epoch", 0)
    stream = source.batches(skip=skip)
    sample, rows = [], 0
    for tagged in stream:
        sample.append(tagged)
        rows += tagged[2].shape[0]
        if rows >= config.init_sample_tokens:
            break
    if not sample:
        raise SAETrainError("No training batch was read: the data source is empty.")
    return sample, stream, resuming


def _start(cfg: SAEConfig, config: SAETrainConfig, sample: list, device: torch.device, ckpt: Path | None,
           resuming: bool) -> _Run:
    x = torch.cat([batch[2] for batch in sample])[: config.init_sample_tokens]
    y = x if sample[0][3] is None else torch.cat([batch[3] for batch in sample])[: config.init_sample_tokens]
    scale_in = _scale(x, config.normalize_input)
    scale_out = scale_in if sample[0][3] is None else _scale(y, config.normalize_input)
    sae = init_sae(cfg, x * scale_in, y * scale_out, config.b_dec_init, config.seed, device)
    total_steps = max(1, math.ceil(config.total_tokens / config.batch_size))
    dead_window = config.dead_window_tokens or int(min(10_000_000, max(4 * config.batch_size,
                                                                       config.total_tokens // 10)))
    run = _Run(sae=sae, optimizer=torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999)),
               config=config, total_steps=total_steps, dead_window=dead_window,
               aux_k=min(config.aux_k or max(1, cfg.d_in // 2), cfg.d_sae),
               k=cfg.k if cfg.architecture == "topk" else None, scale_in=scale_in, scale_out=scale_out,
               last_fired=torch.zeros(cfg.d_sae, dtype=torch.long, device=device),
               fire_counts=torch.zeros(cfg.d_sae, dtype=torch.long, device=device))
    if resuming:
        _restore(run, ckpt, device)
    return run


def _finish(run: _Run, out, ckpt: Path | None, site, layer, store, seconds: float) -> TrainResult:
    sae = run.sae.eval()
    sae.fold_scales(run.scale_in, run.scale_out)
    sae.cfg.normalize_activations = "none"
    sparsity = log_sparsity(run.fire_counts.cpu(), run.count_tokens) if run.count_tokens else None
    path = None
    if out is not None:
        extra = {"trained_by": "latent-explorer", "site": site, "layer": layer, "scale_folded": run.scale_in,
                 "scale_out_folded": run.scale_out, "train_config": asdict(run.config), "tokens": run.tokens,
                 "steps": run.step, "final": run.history[-1] if run.history else None,
                 "weights_hash": getattr(store, "weights_hash", None)}
        path = save_sae(sae, out, sparsity=sparsity, extra_cfg=extra)
        atomic_write_json(Path(out) / "training_log.json", run.history)
        if ckpt is not None and ckpt.is_dir():
            for file in ckpt.iterdir():
                file.unlink()
            ckpt.rmdir()
    return TrainResult(sae=sae, path=path, history=run.history, tokens=run.tokens, steps=run.step,
                       seconds=seconds, resumed_from_step=run.resumed_from)


def train_sae(data, out: str | Path | None = None, *, site: str | None = None, layer: int | None = None,
              target_site: str | None = None, target_layer: int | None = None,
              config: SAETrainConfig | None = None, model_name: str | None = None, hook_name: str | None = None,
              metadata: dict | None = None, resume: bool = True, progress: Progress | None = None,
              on_metrics: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an SAE (or transcoder) on ``data`` and save it to ``out``.

    ``data``: an ActivationStore with ``site``/``layer`` (a transcoder also needs ``target_site``, and
    ``target_layer`` when it differs from ``layer``), or batches ``[batch, d]`` / pairs for a transcoder.
    ``on_metrics`` receives a dict (step, tokens, loss, mse, aux_loss, l0, explained_variance,
    dead_fraction, lr) every ``config.log_every`` steps; ``progress`` gets (fraction, message).
    With ``resume`` and a checkpoint in ``out/checkpoint``, training continues where it stopped.
    """
    config = config or SAETrainConfig()
    config.validate()
    device = pick_device(config.device)
    source = ActivationSource(data, site, layer, config.batch_size, config.seed, target_site, target_layer)
    cfg = _sae_config(config, source, site, layer, target_site, target_layer, model_name, hook_name, metadata)
    ckpt = Path(out) / CHECKPOINT_DIR if out is not None else None
    torch.manual_seed(config.seed)
    sample, stream, resuming = _prime(source, config, ckpt, resume)
    run = _start(cfg, config, sample, device, ckpt, resuming)
    started, position = time.perf_counter(), (0, 0)
    batches = itertools.chain(sample, stream)
    run.sae.train()
    while run.tokens < config.total_tokens:
        tagged = next(batches, None)
        if tagged is None:
            break
        epoch, index, x, y = tagged
        position = (epoch, index)
        x = x.to(device, non_blocking=True)
        y = x * run.scale_out if y is None else y.to(device, non_blocking=True) * run.scale_out
        _step(run, x * run.scale_in, y)
        done = run.tokens >= config.total_tokens
        if run.step % config.log_every == 0 or done:
            _log(run, started, on_metrics, progress)
        if ckpt is not None and run.step % config.checkpoint_every == 0 and not done:
            save_checkpoint(ckpt, run.sae, run.optimizer, _checkpoint_state(run, position))
    seconds = time.perf_counter() - started
    if run.step == 0:
        raise SAETrainError("No training batch was read: the data source is empty.")
    result = _finish(run, out, ckpt, site, layer, source.store, seconds)
    report(progress, 1.0, f"trained {run.step} steps on {run.tokens:,} tokens")
    return result
