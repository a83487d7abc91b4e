"""Training a tuned lens: ``KL(final || translated layer)`` over all layers jointly, resumable.

The loss goes through the model's frozen final norm and unembedding, on activations captured on the fly
from text windows (padding and position 0 skipped; :mod:`engine.lens.tuned_data`). Adam or SGD with
Nesterov momentum, linear warm-up then linear decay (:func:`engine.core.numerics.lr_factor`); a checkpoint
(one safetensors file whose metadata holds the JSON state) is written atomically every few steps and
training resumes from it.

Vocabulary: logits are computed in chunks sized to a memory budget. On a CPU a 262k-token vocabulary
makes every step slow, so ``vocab_subset=N`` trains on the N tokens that carry most of the final
distribution's mass on a sample of the training text (both distributions renormalised over that
subset); evaluation (:func:`engine.lens.compare.compare_lenses`) always uses the full vocabulary.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.core.devices import to_host
from engine.core.fileio import atomic_write
from engine.core.numerics import kl_from_logprobs, lr_factor
from engine.core.progress import Progress, report
from engine.lens.tuned import STATE_FILE, TunedLens, TunedLensError
from engine.lens.tuned_data import (
    ReadoutHead,
    Texts,
    capture_rows,
    lens_windows,
    resolve_texts,
    rows_per_chunk,
    shuffled,
    split_texts,
)

if TYPE_CHECKING:
    from engine.core.models import LoadedModel


# --- settings and result ------------------------------------------------------------------------
@dataclass
class LensTrainConfig:
    steps: int = 500
    batch_size: int = 8                  # windows per step
    seq_len: int = 128                   # tokens per window, prefix (BOS) included
    optimizer: str = "adam"              # "adam" | "sgd" (Nesterov momentum)
    lr: float | None = None              # default: 3e-2 relative step (adam), 1.0 (sgd)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_fraction: float = 0.1
    vocab_subset: int | None = None      # None: full-vocabulary KL (exact)
    subset_windows: int = 16
    heldout_fraction: float = 0.1
    shuffle_buffer: int = 256
    checkpoint_every: int = 50
    seed: int = 0
    budget_bytes: int = 512 * 2**20

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-2 if self.optimizer == "adam" else 1.0)

    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))

    def validate(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise TunedLensError(f"Unknown optimizer '{self.optimizer}'; choose 'adam' or 'sgd'.")
        if self.steps < 1 or self.batch_size < 1:
            raise TunedLensError("steps and batch size must be at least 1.")
        if self.seq_len < 3:
            raise TunedLensError("seq_len must be at least 3 tokens.")
        if self.vocab_subset is not None and self.vocab_subset < 2:
            raise TunedLensError("vocab_subset must be at least 2 tokens (or None for the full vocabulary).")
        if not 0 <= self.heldout_fraction < 1:
            raise TunedLensError("heldout_fraction must be in [0, 1).")


@dataclass
class TrainResult:
    lens: TunedLens
    steps_done: int
    resumed_from: int
    seconds: float
    losses: list[float]                  # mean KL per step (on the training vocabulary)
    tokens_seen: int
    subset_coverage: float | None = None
    folder: Path | None = None


# --- vocabulary subset --------------------------------------------------------------------------
def choose_vocab_subset(lm: LoadedModel, windows: Sequence[list[int]], size: int, batch_size: int = 4,
                        budget_bytes: int = 512 * 2**20, coverage_batches: int = 2) -> tuple[torch.Tensor, float]:
    """The ``size`` tokens with the most final-distribution mass over ``windows`` (plus every label).

    Returns the sorted ids ``[size]`` and the mean mass the subset covers on the first ``coverage_batches``
    batches of those windows (an in-sample estimate).
    """
    anatomy = lm.anatomy
    vocab = anatomy.vocab_size
    head = ReadoutHead(anatomy, None)
    mass = torch.zeros(vocab, dtype=torch.float64)
    seen = torch.zeros(vocab, dtype=torch.bool)
    finals = []
    chunk = rows_per_chunk(vocab, budget_bytes)
    for start in range(0, len(windows), batch_size):
        rows, labels = capture_rows(lm, windows[start:start + batch_size], with_labels=True)
        seen[labels] = True
        final = rows[-1]                                                         # [N, d]
        finals.append(final)
        with torch.inference_mode():
            for s in range(0, final.shape[0], chunk):
                mass += to_host(torch.softmax(head.logits(final[s:s + chunk]), -1).sum(0), torch.float64)
    score = mass + seen.double() * mass.max()  # tokens that really occur are always kept
    size = min(size, vocab)
    ids = torch.sort(score.topk(size).indices).values
    covered, total = 0.0, 0
    with torch.inference_mode():
        for final in finals[:coverage_batches]:
            for s in range(0, final.shape[0], chunk):
                probs = torch.softmax(head.logits(final[s:s + chunk]), -1)
                covered += float(probs[:, ids.to(probs.device)].sum())
                total += probs.shape[0]
    return ids, covered / max(total, 1)


# --- optimizer and checkpoints ------------------------------------------------------------------
def _make_optimizer(lens: TunedLens, cfg: LensTrainConfig, scales: Sequence[float] | None = None
                    ) -> torch.optim.Optimizer:
    """Adam(W) with per-layer step sizes that respect the residual stream's scale, or Nesterov SGD.

    Adam moves every parameter by about ``lr`` per step whatever its gradient's size, so with
    residual norms in the hundreds one plain learning rate is far too big for ``A`` (``A h`` moves
    by ``lr * sum|h|``) and too small for ``b``. Here ``A``'s step is ``lr / d`` and ``b``'s is
    ``lr * rms(h_layer)``: ``lr`` is a relative step for every layer. SGD keeps one learning rate.
    """
    lr = cfg.learning_rate()
    if cfg.optimizer == "sgd":
        groups = [{"params": list(lens.parameters()), "base_lr": lr}]
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    scales = list(scales) if scales is not None else [1.0] * lens.n_layers
    groups = []
    for translator, scale in zip(lens.translators, scales):
        groups.append({"params": [translator.weight], "base_lr": lr / lens.d_model, "weight_decay": cfg.weight_decay})
        if translator.bias is not None:
            groups.append({"params": [translator.bias], "base_lr": lr * float(scale), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _save_state(folder: Path, lens: TunedLens, optimizer, info: dict, vocab_ids: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    tensors, plain = _flatten_optimizer(optimizer.state_dict())
    tensors.update({f"lens.{k}": v for k, v in lens.params_state().items()})
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.cpu().contiguous()
    metadata = {"state": json.dumps({**info, "optimizer": plain})}
    atomic_write(folder / STATE_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    from safetensors import SafetensorError, safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads(handle.metadata()["state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise TunedLensError(f"The training checkpoint '{path}' is damaged ({type(exc).__name__}); delete it to "
                             "start over.") from exc
    return info, tensors


@dataclass
class _Progress:
    """Where training stands: restored from a checkpoint or fresh."""

    step: int = 0
    windows_used: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0                 # time spent in earlier runs
    optimizer: torch.optim.Optimizer | None = None
    vocab_ids: torch.Tensor | None = None
    coverage: float | None = None


_RESUME_KEYS = ("batch_size", "seq_len", "vocab_subset", "heldout_fraction", "seed", "optimizer")


def _restore(lm: LoadedModel, lens: TunedLens, folder: Path | None, cfg: LensTrainConfig) -> _Progress:
    """Load the checkpoint in ``folder`` into ``lens`` (refusing one of another model or other settings)."""
    saved = _load_state(folder) if folder is not None else None
    if saved is None:
        return _Progress()
    info, tensors = saved
    if info.get("weights_hash") != lm.weights_hash or info.get("d_model") != lm.anatomy.d_model:
        raise TunedLensError(f"The checkpoint in '{folder}' belongs to another model "
                             f"({info.get('model')}); choose another output folder or delete it.")
    old = info.get("config", {})
    if any(old.get(k) != getattr(cfg, k) for k in _RESUME_KEYS):
        raise TunedLensError(f"The checkpoint in '{folder}' was made with other settings "
                             f"({', '.join(f'{k}={old.get(k)}' for k in _RESUME_KEYS)}); use them to resume or "
                             "choose another output folder.")
    lens.translators.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lens.")})
    lens.to(lm.device)
    optimizer = _make_optimizer(lens, cfg)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    return _Progress(step=int(info["step"]), windows_used=int(info["windows_used"]),
                     tokens_seen=int(info["tokens_seen"]), losses=list(info["losses"]), seconds=float(info["seconds"]),
                     optimizer=optimizer, vocab_ids=tensors.get("vocab_ids"), coverage=info.get("subset_coverage"))


# --- one step -----------------------------------------------------------------------------------
@contextmanager
def _frozen(model: nn.Module):
    """Parameters of ``model`` stop requiring gradients inside the block (restored afterwards)."""
    changed = [p for p in model.parameters() if p.requires_grad and not p.is_inference()]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _step_loss(lens: TunedLens, head: ReadoutHead, rows: torch.Tensor, budget_bytes: int
               ) -> tuple[float, list[float]]:
    """Mean KL(final || translated) over layers and tokens of ``rows [n_layers+1, N, d]``; gradients accumulate
    on ``lens``. Returns the mean and the mean per layer.

    Logits are computed in row chunks; the translators' graph is kept small by back-propagating
    each chunk into a detached copy of the translated residuals, then into the lens once.
    """
    n_layers, n_tokens = lens.n_layers, rows.shape[1]
    translated = lens.translate_all(rows[:-1].float())                      # [L, N, d] with graph
    leaf = translated.detach().requires_grad_(True)
    # the teacher block and one student block share the budget: never a full [N, V] teacher
    chunk = max(1, rows_per_chunk(head.size, budget_bytes) // 2)
    per_layer = torch.zeros(n_layers, dtype=torch.float64)
    denominator = n_layers * n_tokens
    for t0 in range(0, n_tokens, chunk):
        t1 = min(t0 + chunk, n_tokens)
        with torch.no_grad():
            teacher = torch.log_softmax(head.logits(rows[-1, t0:t1]), -1)  # [c, V]
        layers_per_block = max(1, chunk // (t1 - t0))
        for l0 in range(0, n_layers, layers_per_block):
            l1 = min(l0 + layers_per_block, n_layers)
            block = leaf[l0:l1, t0:t1]                                      # [l, c, d]
            logq = torch.log_softmax(head.logits(block.reshape(-1, block.shape[-1])), -1)
            kl = kl_from_logprobs(teacher, logq.view(l1 - l0, t1 - t0, -1))  # KL(p || q), [l, c]
            (kl.sum() / denominator).backward()
            per_layer[l0:l1] += to_host(kl, torch.float64).sum(1)
            del logq, kl
        del teacher
    translated.backward(leaf.grad)
    per_layer /= n_tokens
    return float(per_layer.mean()), per_layer.tolist()


# --- training -----------------------------------------------------------------------------------
def _training_windows(lm: LoadedModel, source: Callable[[], Iterable[str]], cfg: LensTrainConfig
                      ) -> Iterator[list[int]]:
    """Shuffled training windows, epoch after epoch (a new shuffle seed each epoch)."""
    epoch = 0
    while True:
        produced = False
        stream = lens_windows(lm.tokenizer, split_texts(source(), cfg.heldout_fraction, heldout=False), cfg.seq_len)
        for window in shuffled(stream, cfg.shuffle_buffer, cfg.seed + epoch):
            produced = True
            yield window
        if not produced:
            raise TunedLensError("The corpus has no training text (every text is empty or held out); give "
                                 "a bigger corpus.")
        epoch += 1


def _subset_sample(lm: LoadedModel, source: Callable[[], Iterable[str]], cfg: LensTrainConfig) -> list[list[int]]:
    """The windows the vocabulary subset is chosen on: a seeded sample of the first training windows."""
    first = lens_windows(lm.tokenizer, split_texts(source(), cfg.heldout_fraction, heldout=False), cfg.seq_len)
    sample = list(itertools.islice(first, cfg.subset_windows * 8))
    return random.Random(cfg.seed + 7919).sample(sample, min(cfg.subset_windows, len(sample)))


def train_tuned_lens(lm: LoadedModel, texts: Texts, out_dir: str | Path | None = None,
                     config: LensTrainConfig | None = None, *,
                     corpus_name: str = "", resume: bool = True, progress: Progress | None = None) -> TrainResult:
    """Train (or resume training) a tuned lens for ``lm`` on the training part of ``texts``.

    ``texts`` is a corpus spec for :func:`engine.data.corpora.iter_texts`, a list of strings, or a function
    returning an iterable of strings. Texts whose hash falls in ``heldout_fraction`` are never used
    here (see :func:`engine.lens.tuned_data.is_heldout`); :func:`engine.lens.compare.compare_lenses`
    evaluates on them. With ``out_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the
    end (the lens folder itself is in the tuned-lens layout); a later call with the same folder resumes.
    """
    cfg = config or LensTrainConfig()
    cfg.validate()
    source = resolve_texts(texts)
    folder = Path(out_dir) if out_dir is not None else None
    if lm.anatomy.n_layers < 1:
        raise TunedLensError("The model has no layers to train a lens for.")
    lens = TunedLens.for_model(lm)
    state = _restore(lm, lens, folder if resume else None, cfg)
    start_step = state.step
    stream = _training_windows(lm, source, cfg)
    for _ in range(state.windows_used):  # resume: skip what earlier steps consumed
        next(stream)
    clock = time.perf_counter()
    if cfg.vocab_subset is not None and state.vocab_ids is None and cfg.vocab_subset < lm.anatomy.vocab_size:
        report(progress, 0.0, f"choosing the {cfg.vocab_subset} tokens to train on")
        state.vocab_ids, state.coverage = choose_vocab_subset(lm, _subset_sample(lm, source, cfg), cfg.vocab_subset,
                                                              budget_bytes=cfg.budget_bytes)
    head = ReadoutHead(lm.anatomy, state.vocab_ids.to(lm.device) if state.vocab_ids is not None else None)

    def save() -> None:
        _finish(lm, lens, state, cfg, corpus_name)
        info = {"model": lm.name, "weights_hash": lm.weights_hash, "d_model": lm.anatomy.d_model,
                "n_layers": lm.anatomy.n_layers, "config": asdict(cfg), "step": state.step,
                "windows_used": state.windows_used, "tokens_seen": state.tokens_seen, "losses": state.losses,
                "seconds": state.seconds + time.perf_counter() - clock, "corpus": corpus_name,
                "subset_coverage": state.coverage}
        _save_state(folder, lens, state.optimizer, info, state.vocab_ids)
        lens.save(folder)

    lens.train()
    for step in range(start_step, cfg.steps):
        _train_step(lm, lens, head, [next(stream) for _ in range(cfg.batch_size)], state, cfg, step,
                    check_head=step == start_step)
        report(progress, state.step / cfg.steps, f"step {state.step}/{cfg.steps}  KL {state.losses[-1]:.3f} nats")
        if folder is not None and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
            save()
    lens.eval()
    _finish(lm, lens, state, cfg, corpus_name)
    if folder is not None:
        lens.save(folder)
    return TrainResult(lens=lens, steps_done=state.step, resumed_from=start_step,
                       seconds=state.seconds + time.perf_counter() - clock, losses=state.losses,
                       tokens_seen=state.tokens_seen, subset_coverage=state.coverage, folder=folder)


def _train_step(lm: LoadedModel, lens: TunedLens, head: ReadoutHead, batch: list[list[int]], state: _Progress,
                cfg: LensTrainConfig, step: int, check_head: bool = False) -> None:
    """One optimizer step on a batch of windows; updates ``state`` (step, windows, tokens, losses)."""
    state.windows_used += len(batch)
    rows, _ = capture_rows(lm, batch)                                         # [L+1, N, d]
    if check_head:  # first step of this run: the subset head must equal the full one
        head.check(rows[-1, :4])
    if state.optimizer is None:  # fresh start: step sizes from the first batch's residual scale per layer
        scales = rows[:-1].float().pow(2).mean(dim=(1, 2)).sqrt().tolist()
        state.optimizer = _make_optimizer(lens, cfg, scales)
    factor = lr_factor(step, cfg.steps, cfg.warmup_steps(), decay_start=cfg.warmup_steps())
    for group in state.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    state.optimizer.zero_grad(set_to_none=True)
    with lm.lock, _frozen(lm.model), torch.enable_grad():
        loss, _ = _step_loss(lens, head, rows, cfg.budget_bytes)
    if not math.isfinite(loss):
        raise TunedLensError(f"Training diverged at step {step} (loss {loss}); lower the learning rate.")
    state.optimizer.step()
    state.losses.append(loss)
    state.tokens_seen += rows.shape[1]
    state.step = step + 1


def _finish(lm: LoadedModel, lens: TunedLens, state: _Progress, cfg: LensTrainConfig, corpus_name: str) -> None:
    """Write the provenance into the lens (saved in ``config.json``)."""
    lens.meta.update({"model": lm.name, "weights_hash": lm.weights_hash, "corpus": corpus_name,
                      "steps": state.step, "tokens_seen": state.tokens_seen, "vocab_subset": cfg.vocab_subset,
                      "subset_coverage": state.coverage, "final_train_kl": state.losses[-1] if state.losses else None})
