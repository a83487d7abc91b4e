"""Train TopK (default) or standard L1 sparse autoencoders on cached activations.

The data is either an activation store (``engine.data.store.ActivationStore`` with a site and a layer,
streamed shard by shard, reshuffled every epoch) or any iterable of ``[batch, d_in]`` tensors.

Recipe (OpenAI's TopK paper and Anthropic's updates, as SAELens trains them):

- inputs scaled by one constant so their mean norm is ``sqrt(d_in)``; the constant is folded into the
  saved weights, so the saved SAE takes raw activations (``normalize_activations: "none"``);
- ``b_dec`` initialised at the geometric median (or mean) of a sample; decoder rows initialised at
  random and kept at unit norm (gradient parallel to each row removed before each step, renormalised
  after it); encoder initialised as the decoder's transpose;
- Adam with linear warm-up and a linear decay over the last 20 %; L1 coefficient warm-up for
  standard SAEs (L1 on activations times decoder norms);
- dead latents (no activation in the last ``dead_window_tokens``) revived by the auxiliary-k loss:
  the top ``k_aux`` dead pre-activations reconstruct the main reconstruction's residual;
- a checkpoint (weights, Adam state, counters, curves) every ``checkpoint_every`` steps under
  ``out/checkpoint/`` so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.core.fileio import atomic_save_tensors, atomic_write_json
from engine.sae.base import SAE, SAEConfig, log_sparsity, save_sae, site_to_hook_name, sparse_decode, unit_norm_rows_

Progress = Callable[[float, str], None]
CHECKPOINT_DIR = "checkpoint"
TRAIN_FORMAT = 1


class SAETrainError(UserError):
    """A training setting or data source that cannot work."""


@dataclass
class TrainConfig:
    """Training settings; ``d_sae`` wins over ``expansion_factor`` when given."""

    architecture: str = "topk"  # "topk" | "standard"
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
        if self.architecture not in ("topk", "standard"):
            raise SAETrainError(f"Training supports the 'topk' and 'standard' architectures, not '{self.architecture}'.")
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


# --- data -----------------------------------------------------------------------------------
class _Source:
    """Endless, resumable stream of ``[batch, d]`` float32 tensors from a store or an iterable."""

    def __init__(self, data, site: str | None, layer: int | None, batch_size: int, seed: int):
        self.store = data if hasattr(data, "iter_batches") else None
        self.site, self.layer, self.batch_size, self.seed = site, layer, batch_size, seed
        if self.store is not None:
            if site is None or layer is None:
                raise SAETrainError("Training from an activation store needs a site and a layer.")
            if site not in self.store.sites:
                raise SAETrainError(f"The store has no site '{site}'; it holds {', '.join(self.store.sites)}.")
            if layer not in list(self.store.layers):
                raise SAETrainError(f"The store has no layer {layer}; it holds layers {list(self.store.layers)}.")
            self.d_in = int(self.store.width(site)) if hasattr(self.store, "width") else int(self.store.d_model)
            self.iterable = None
        else:
            if isinstance(data, torch.Tensor):
                data = data.split(batch_size)
            if not isinstance(data, Iterable):
                raise SAETrainError("Training data must be an activation store or an iterable of [batch, d] tensors.")
            self.iterable = data
            self._first_iter: Iterator | None = iter(data)
            try:
                self._first = next(self._first_iter)
            except StopIteration as exc:
                raise SAETrainError("The training data is empty.") from exc
            self._check(self._first)
            self.d_in = int(self._first.shape[-1])
        self.epoch = 0

    @staticmethod
    def _check(batch) -> None:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or not batch.is_floating_point():
            raise SAETrainError("Each training batch must be a 2-D floating-point tensor [batch, d].")

    def _epoch_iter(self) -> Iterator[torch.Tensor]:
        if self.store is not None:
            return iter(self.store.iter_batches(self.site, self.layer, self.batch_size, shuffle=True,
                                                seed=self.seed + self.epoch, dtype=torch.float32))
        if self._first_iter is not None:  # the first pass reuses the batch already peeked at
            first, rest = self._first, self._first_iter
            self._first_iter = None

            def chain():
                yield first
                yield from rest
            return chain()
        iterator = iter(self.iterable)
        if iterator is self.iterable:  # a one-shot iterator (generator) cannot be replayed
            return iter(())
        return iterator

    def batches(self, skip: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(epoch, index, batch)`` forever (a new epoch when one ends), skipping ``skip`` batches first.

        One-shot iterables (generators) end after their single pass.
        """
        while True:
            produced = False
            for index, batch in enumerate(self._epoch_iter()):
                if index < skip:
                    continue
                self._check(batch)
                produced = True
                yield self.epoch, index + 1, batch.float()
            if not produced and skip == 0:
                return
            skip = 0
            self.epoch += 1


# --- initialisation -------------------------------------------------------------------------
def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points``."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=-1).clamp_min(eps)
        weights = 1.0 / distances
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            return new
        median = new
    return median


def init_sae(cfg: SAEConfig, sample: torch.Tensor, b_dec_init: str, seed: int, device) -> SAE:
    """A fresh SAE: random unit decoder rows, encoder = decoder transpose, b_dec at the sample's centre."""
    generator = torch.Generator().manual_seed(seed)
    sae = SAE(cfg, device=device, dtype=torch.float32)
    with torch.no_grad():
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        if b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample.to(device)))
        elif b_dec_init == "mean":
            sae.b_dec.copy_(sample.mean(dim=0))
    return sae


# --- checkpoints ----------------------------------------------------------------------------
def _save_checkpoint(folder: Path, sae: SAE, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"sae.{name}": value for name, value in sae.state_tensors().items()}
    opt_state = optimizer.state_dict()
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["last_fired"] = state.pop("_last_fired")
    tensors["fire_counts"] = state.pop("_fire_counts")
    atomic_save_tensors(folder / "state.safetensors", tensors)
    state["param_groups"] = opt_state["param_groups"]
    atomic_write_json(folder / "state.json", state)  # written last: marks the checkpoint complete


def _load_checkpoint(folder: Path, sae: SAE, optimizer: torch.optim.Optimizer) -> dict | None:
    from safetensors.torch import load_file

    meta, weights = folder / "state.json", folder / "state.safetensors"
    if not meta.is_file() or not weights.is_file():
        return None
    try:
        state = json.loads(meta.read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # a damaged checkpoint must not be half-used
        raise SAETrainError(f"The checkpoint in '{folder}' is damaged ({exc}); delete it to start over.") from exc
    with torch.no_grad():
        for name, param in sae.named_parameters():
            key = f"sae.{name}"
            if key not in tensors or tensors[key].shape != param.shape:
                raise SAETrainError(f"The checkpoint in '{folder}' does not match these settings; "
                                    "delete it or use the same width and data.")
            param.copy_(tensors[key])
    opt_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    state["_last_fired"] = tensors["last_fired"]
    state["_fire_counts"] = tensors["fire_counts"]
    return state


def _remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit) decoder row, so a step does not change its norm."""
    if W_dec.grad is not None:
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=-1, keepdim=True) * W_dec


# --- training -------------------------------------------------------------------------------
def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lr_factor(step: int, total_steps: int, warmup: int, decay_fraction: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


def _forward(sae: SAE, x: torch.Tensor, arch: str, k: int):
    """Pre-activations, activations and reconstruction; TopK decodes sparsely (k rows per token)."""
    x_in = x - sae.b_dec
    pre = x_in @ sae.W_enc + sae.b_enc
    if arch == "topk":
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu()
        x_hat = sparse_decode(values, indices, sae.W_dec, sae.b_dec)
        return pre, (values, indices), x_hat
    acts = pre.relu()
    return pre, acts, acts @ sae.W_dec + sae.b_dec


def train_sae(data, out: str | Path | None = None, *, site: str | None = None, layer: int | None = None,
              config: TrainConfig | None = None, model_name: str | None = None, hook_name: str | None = None,
              metadata: dict | None = None, resume: bool = True, progress: Progress | None = None,
              on_metrics: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an SAE on ``data`` (an ActivationStore with ``site``/``layer``, or batches) and save it to ``out``.

    ``on_metrics`` receives a dict (step, tokens, loss, mse, aux_loss, l0, explained_variance,
    dead_fraction, lr) every ``config.log_every`` steps; ``progress`` gets (fraction, message).
    With ``resume`` and a checkpoint in ``out/checkpoint``, training continues where it stopped.
    """
    config = config or TrainConfig()
    config.validate()
    device = _pick_device(config.device)
    source = _Source(data, site, layer, config.batch_size, config.seed)
    d_in = source.d_in
    d_sae = config.width(d_in)
    k = min(config.k, d_sae)
    store = source.store
    meta = {"model_name": model_name or getattr(store, "model_name", None),
            "hook_name": hook_name or (site_to_hook_name(site, layer) if site is not None and layer is not None
                                       else None),
            "hook_layer": layer, "context_size": None, "prepend_bos": True,
            "dataset_path": None}
    if store is not None:
        manifest = getattr(store, "manifest", {}) or {}
        meta["context_size"] = manifest.get("context_length")
        meta["dataset_path"] = manifest.get("corpus") or manifest.get("corpus_spec") or None
    meta.update(metadata or {})
    meta = {key: value for key, value in meta.items() if value is not None}
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=config.architecture,
                    k=k if config.architecture == "topk" else None, metadata=meta)

    total_steps = max(1, math.ceil(config.total_tokens / config.batch_size))
    dead_window = config.dead_window_tokens or int(min(10_000_000, max(4 * config.batch_size,
                                                                       config.total_tokens // 10)))
    aux_k = min(config.aux_k or max(1, d_in // 2), d_sae)
    ckpt = Path(out) / CHECKPOINT_DIR if out is not None else None
    torch.manual_seed(config.seed)

    # a sample for the scale and the b_dec init: the first batches of the stream, trained on afterwards
    step, tokens, history, resumed_from, skip, position = 0, 0, [], 0, 0, (0, 0)
    checkpoint_state = None
    if resume and ckpt is not None and (ckpt / "state.json").is_file():
        checkpoint_state = json.loads((ckpt / "state.json").read_text())
        source.epoch, skip = checkpoint_state.get("epoch", 0), checkpoint_state.get("batches_in_epoch", 0)
    stream = source.batches(skip=skip)
    sample_rows, sample = 0, []
    for tagged in stream:
        sample.append(tagged)
        sample_rows += tagged[2].shape[0]
        if sample_rows >= config.init_sample_tokens:
            break
    if not sample:
        raise SAETrainError("No training batch was read: the data source is empty.")
    sample_t = torch.cat([batch for _, _, batch in sample])[: config.init_sample_tokens]
    mean_norm = float(sample_t.norm(dim=-1).mean())
    scale = (d_in ** 0.5 / mean_norm) if config.normalize_input and mean_norm > 0 else 1.0
    sae = init_sae(cfg, sample_t * scale, config.b_dec_init, config.seed, device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))

    last_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)
    count_tokens = 0
    if checkpoint_state is not None:
        state = _load_checkpoint(ckpt, sae, optimizer)
        if state.get("format") != TRAIN_FORMAT or state.get("d_sae") != d_sae or state.get("d_in") != d_in:
            raise SAETrainError(f"The checkpoint in '{ckpt}' was made with other settings; delete it to start over.")
        step, tokens, history = state["step"], state["tokens"], state["history"]
        scale, count_tokens = state["scale"], state["count_tokens"]
        last_fired, fire_counts = state["_last_fired"].to(device), state["_fire_counts"].to(device)
        resumed_from = step

    started = time.perf_counter()
    window = {"loss": 0.0, "mse": 0.0, "aux": 0.0, "l0": 0.0, "ev_num": 0.0, "ev_den": 0.0, "n": 0}
    batches = itertools.chain(sample, stream)
    sae.train()
    say = progress or (lambda fraction, message: None)
    while tokens < config.total_tokens:
        try:
            epoch, index, x = next(batches)
        except StopIteration:
            break
        position = (epoch, index)
        x = x.to(device, non_blocking=True) * scale
        n = x.shape[0]
        lr_now = config.lr * _lr_factor(step, total_steps, config.warmup_steps, config.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        pre, acts, x_hat = _forward(sae, x, config.architecture, k)
        err = x - x_hat
        mse = err.pow(2).sum(dim=-1).mean()
        loss = mse
        if config.architecture == "topk":
            values, indices = acts
            fired = torch.zeros(d_sae, dtype=torch.long, device=device).index_add_(
                0, indices[values > 0], torch.ones_like(indices[values > 0]))
            l0 = (values > 0).sum(dim=-1).float().mean()
        else:
            l1_ramp = min(1.0, (step + 1) / max(1, config.l1_warmup_fraction * total_steps))
            sparsity = (acts * sae.W_dec.norm(dim=-1)).sum(dim=-1).mean()
            loss = loss + config.l1_coefficient * l1_ramp * sparsity
            fired = (acts > 0).sum(dim=0)
            l0 = (acts > 0).sum(dim=-1).float().mean()
        tokens_after = tokens + n
        dead = (tokens_after - last_fired) > dead_window
        dead &= fired == 0
        aux = torch.zeros((), device=device)
        n_dead = int(dead.sum())
        if n_dead > 0 and config.aux_k_coefficient > 0:
            k_dead = min(aux_k, n_dead)
            masked = pre.masked_fill(~dead, float("-inf"))
            dvals, didx = masked.topk(k_dead, dim=-1, sorted=False)
            aux_hat = sparse_decode(dvals, didx, sae.W_dec, torch.zeros_like(sae.b_dec))
            aux_scale = min(n_dead / aux_k, 1.0)
            aux = aux_scale * (err.detach() - aux_hat).pow(2).sum(dim=-1).mean()
            loss = loss + config.aux_k_coefficient * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_grad(sae.W_dec)
        optimizer.step()
        unit_norm_rows_(sae.W_dec)

        with torch.no_grad():
            last_fired = torch.where(fired > 0, torch.full_like(last_fired, tokens_after), last_fired)
            if tokens_after > config.total_tokens - dead_window:  # density over the last window
                fire_counts += fired
                count_tokens += n
            centred = x - x.mean(dim=0)
            window["ev_num"] += float(err.pow(2).sum())
            window["ev_den"] += float(centred.pow(2).sum())
            window["loss"] += float(loss)
            window["mse"] += float(mse)
            window["aux"] += float(aux)
            window["l0"] += float(l0)
            window["n"] += 1
        tokens = tokens_after
        step += 1
        done = tokens >= config.total_tokens
        if step % config.log_every == 0 or done:
            count = max(window["n"], 1)
            ever_window = tokens >= dead_window
            dead_now = ((tokens - last_fired) > dead_window) if ever_window else torch.zeros_like(last_fired).bool()
            record = {"step": step, "tokens": tokens, "loss": window["loss"] / count, "mse": window["mse"] / count,
                      "aux_loss": window["aux"] / count, "l0": window["l0"] / count,
                      "explained_variance": 1.0 - window["ev_num"] / max(window["ev_den"], 1e-12),
                      "dead_fraction": float(dead_now.float().mean()), "lr": lr_now,
                      "elapsed_s": time.perf_counter() - started}
            history.append(record)
            window = {key: 0.0 for key in window}
            window["n"] = 0
            if on_metrics:
                on_metrics(record)
            say(min(1.0, tokens / config.total_tokens), f"step {step}/~{total_steps} loss {record['loss']:.3g} L0 {record['l0']:.1f} "
                                    f"EV {record['explained_variance']:.3f} dead {100 * record['dead_fraction']:.1f}%")
        if ckpt is not None and step % config.checkpoint_every == 0 and not done:
            _save_checkpoint(ckpt, sae, optimizer, {
                "format": TRAIN_FORMAT, "d_in": d_in, "d_sae": d_sae, "step": step, "tokens": tokens,
                "history": history, "scale": scale, "count_tokens": count_tokens, "epoch": position[0],
                "batches_in_epoch": position[1], "config": asdict(config),
                "_last_fired": last_fired.cpu(), "_fire_counts": fire_counts.cpu()})
    seconds = time.perf_counter() - started
    if step == 0:
        raise SAETrainError("No training batch was read: the data source is empty.")

    sae.eval()
    sae.fold_input_scale(scale)
    sae.cfg.normalize_activations = "none"
    sparsity = log_sparsity(fire_counts.cpu(), count_tokens) if count_tokens else None
    path = None
    if out is not None:
        extra = {"trained_by": "latent-explorer", "site": site, "layer": layer, "scale_folded": scale,
                 "train_config": asdict(config), "tokens": tokens, "steps": step,
                 "final": history[-1] if history else None,
                 "weights_hash": getattr(store, "weights_hash", None)}
        path = save_sae(sae, out, sparsity=sparsity, extra_cfg=extra)
        atomic_write_json(Path(out) / "training_log.json", history)
        if ckpt is not None and ckpt.is_dir():
            for file in ckpt.iterdir():
                file.unlink()
            ckpt.rmdir()
    say(1.0, f"trained {step} steps on {tokens:,} tokens")
    return TrainResult(sae=sae, path=path, history=history, tokens=tokens, steps=step, seconds=seconds,
                       resumed_from_step=resumed_from)


# --- the demo SAE ---------------------------------------------------------------------------
@dataclass
class DemoSettings:
    """A small SAE that trains in a few minutes on a CPU."""

    model: str = "gemma-3-270m"
    corpus: str = "builtin"
    layer: int | None = None  # default: the middle layer
    site: str = "resid_post"
    capture_tokens: int = 40_000
    train_tokens: int = 120_000
    width: int = 2048
    k: int = 32
    batch_size: int = 512
    lr: float = 2e-3
    eval_tokens: int = 2048
    context_length: int = 128
    name: str | None = None


def demo_sae_dir(settings: DemoSettings, layer: int) -> Path:
    from engine.core.models import cache_root

    name = settings.name or f"demo-{settings.model}-L{layer}-{settings.site}-topk{settings.k}-w{settings.width}"
    return cache_root() / "saes" / name


def train_demo_sae(settings: DemoSettings | None = None, *, lm=None, progress: Progress | None = None,
                   on_metrics: Callable[[dict], None] | None = None, evaluate: bool = True) -> dict:
    """Capture the built-in corpus on the default model, train a TopK SAE on a middle layer, evaluate it.

    Returns ``{"path", "store", "train": {...}, "report": {...} | None}``; the SAE lands in
    ``cache_root()/"saes"/<name>``. Every stage resumes: the store and the training checkpoint are reused.
    """
    from engine.core.models import load_model
    from engine.data.corpora import iter_texts
    from engine.data.store import build_store, default_store_dir
    from engine.sae.evaluation import evaluate_with_model, held_out_texts, report_to_json

    settings = settings or DemoSettings()
    say = progress or (lambda fraction, message: None)
    say(0.0, f"loading {settings.model}")
    lm = lm or load_model(settings.model)
    layer = settings.layer if settings.layer is not None else lm.n_layers // 2
    store_dir = default_store_dir(lm, settings.corpus, sites=(settings.site,), layers=[layer],
                                  context_length=settings.context_length)
    store = build_store(lm, iter_texts(settings.corpus), store_dir, layers=[layer], sites=(settings.site,),
                        max_tokens=settings.capture_tokens, context_length=settings.context_length,
                        corpus_spec=settings.corpus,
                        progress=lambda f, m: say(0.3 * f, f"capturing activations: {m}"))
    out = demo_sae_dir(settings, layer)
    config = TrainConfig(architecture="topk", d_sae=settings.width, k=settings.k, batch_size=settings.batch_size,
                         total_tokens=settings.train_tokens, lr=settings.lr, warmup_steps=20, log_every=5,
                         checkpoint_every=50)
    result = train_sae(store, out, site=settings.site, layer=layer, config=config, model_name=settings.model,
                       progress=lambda f, m: say(0.3 + 0.6 * f, f"training: {m}"), on_metrics=on_metrics)
    report = None
    if evaluate:
        texts = held_out_texts(store, settings.corpus)
        report = evaluate_with_model(result.sae, lm, texts, site=settings.site, layer=layer,
                                     max_tokens=settings.eval_tokens, context_length=settings.context_length,
                                     progress=lambda f, m: say(0.9 + 0.1 * f, f"evaluating: {m}"))
        report = report_to_json(report)
        atomic_write_json(out / "report.json", report)
    say(1.0, f"demo SAE saved to {out}")
    return {"path": str(out), "store": str(store.path),
            "train": {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 1),
                      "tokens_per_second": round(result.tokens_per_second), "final": result.history[-1]},
            "report": report}
