"""Tuned lens (Belrose et al., 2023): one learned affine translator per layer, then the model's own head.

A :class:`TunedLens` holds a translator for every hidden-state index ``0 .. n_layers-1`` (index 0 is
the embedding output, ``i+1`` the output of layer ``i``); the last layer's output needs none. Each
translator maps ``h -> h + (A h + b)`` with ``A`` and ``b`` initialised to zero, so an untrained lens
*is* the logit lens. The object is a :data:`engine.lens.logit.Transform` (``lens(index, resid)``), so it
plugs into :func:`engine.lens.logit.run_lens`, :func:`engine.lens.logit.lens_stats` and
:func:`engine.lens.latent_language.run_latent_language` as their ``transform``.

Training (:func:`train_tuned_lens`) minimises ``KL(final || translated layer)`` over all layers
jointly, through the model's frozen final norm and unembedding, on activations captured on the fly
from text windows (padding and position 0 skipped). Adam or SGD with Nesterov momentum, linear
warm-up then linear decay; a checkpoint (one safetensors file whose metadata holds the JSON state)
is written atomically every few steps and training resumes from it.

Vocabulary: logits are computed in chunks sized to a memory budget. On a CPU a 262k-token
vocabulary makes every step slow, so ``vocab_subset=N`` trains on the N tokens that carry most of
the final distribution's mass on a sample of the training text (both distributions renormalised
over that subset); evaluation (:func:`compare_lenses`) always uses the full vocabulary.

On disk a lens is a folder in the ``tuned-lens`` package's layout, so published lenses load:
``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
``base_model_revision``, ``unembed_hash``, ``lens_type``) and ``params.pt`` (the state dict of the
translator list: ``"<i>.weight"`` ``[d, d]`` and ``"<i>.bias"`` ``[d]``), read with
``torch.load(weights_only=True)``. We add ``lens.safetensors`` (same keys) and our own provenance
under the ``latent_explorer`` key of ``config.json`` (the tuned-lens package ignores unknown keys).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.core.anatomy import Anatomy
from engine.core.capture import _Stop as StopForward
from engine.core.capture import hooked, pad_batch, run_forward
from engine.core.errors import UserError
from engine.core.fileio import atomic_write
from engine.core.sites import normalize_sites

Progress = Callable[[float, str], None]
Texts = str | Sequence[str] | Callable[[], Iterable[str]]

CONFIG_FILE, PARAMS_FILE, SAFETENSORS_FILE = "config.json", "params.pt", "lens.safetensors"
STATE_FILE = "training_state.safetensors"
LENS_TYPE = "linear_tuned_lens"
FORMAT_VERSION = 1


class TunedLensError(UserError):
    pass


# --- helpers ------------------------------------------------------------------------------
def unembed_hash(anatomy: Anatomy) -> str:
    """The tuned-lens package's identity of an unembedding: sha256 of ``np.array_str(W, precision=1)``.

    ``array_str`` summarises big arrays to their corners, so this is cheap and tolerant of dtype.
    """
    weight = anatomy.unembed.weight.detach().float().cpu().numpy()
    return hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()


def default_lens_dir(model_name: str) -> Path:
    """``cache_root()/tuned_lens/<model>``: where the CLI and the demo put a lens by default."""
    from engine.core.models import cache_root

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    return cache_root() / "tuned_lens" / safe


@contextmanager
def _frozen(model: nn.Module):
    """Parameters of ``model`` stop requiring gradients inside the block (restored afterwards)."""
    changed = [p for p in model.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


# --- the lens -----------------------------------------------------------------------------
class TunedLens(nn.Module):
    """Affine translators for hidden-state indices ``0 .. n_layers-1``; usable as a lens ``transform``."""

    def __init__(self, n_layers: int, d_model: int, bias: bool = True, *, base_model: str = "",
                 unembed_hash: str | None = None, meta: dict | None = None):
        super().__init__()
        self.n_layers, self.d_model, self.bias = int(n_layers), int(d_model), bool(bias)
        self.base_model = base_model
        self.unembed_hash = unembed_hash
        self.meta: dict = dict(meta or {})      # provenance: model, weights hash, corpus, steps ...
        self.warnings: list[str] = []           # soft problems found on load (shown by the UI)
        self.translators = nn.ModuleList()
        for _ in range(self.n_layers):
            linear = nn.Linear(self.d_model, self.d_model, bias=self.bias)
            nn.init.zeros_(linear.weight)
            if self.bias:
                nn.init.zeros_(linear.bias)
            self.translators.append(linear)

    @classmethod
    def for_model(cls, lm, bias: bool = True) -> TunedLens:
        """An identity-initialised lens for a :class:`engine.core.models.LoadedModel`, on its device."""
        anatomy = lm.anatomy
        lens = cls(anatomy.n_layers, anatomy.d_model, bias, base_model=lm.name, unembed_hash=unembed_hash(anatomy),
                   meta={"model": lm.name, "weights_hash": lm.weights_hash})
        return lens.to(lm.device)

    @property
    def device(self) -> torch.device:
        return self.translators[0].weight.device if self.n_layers else torch.device("cpu")

    def forward(self, index: int, resid: torch.Tensor) -> torch.Tensor:  # the Transform signature
        """Translate the residual stream at hidden-state ``index``; the last layer's output passes unchanged."""
        if not 0 <= index < self.n_layers:
            return resid
        translator = self.translators[index]
        weight = translator.weight
        h = resid.to(device=weight.device, dtype=weight.dtype)
        return (h + translator(h)).to(device=resid.device, dtype=resid.dtype)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All translators at once: ``A [n_layers, d, d]`` (out x in) and ``b [n_layers, d]``."""
        weights = torch.stack([t.weight for t in self.translators])
        biases = torch.stack([t.bias for t in self.translators]) if self.bias else None
        return weights, biases

    def translate_all(self, resid: torch.Tensor) -> torch.Tensor:
        """``resid [n_layers, N, d]`` (hidden indices 0..n_layers-1) -> translated, in one batched matmul."""
        weights, biases = self.stacked()
        h = resid.to(weights.dtype)
        out = h + torch.bmm(h, weights.transpose(1, 2))
        return out if biases is None else out + biases[:, None, :]

    # --- tuned-lens checkpoint layout ------------------------------------------------------
    def config_dict(self) -> dict:
        return {"base_model_name_or_path": self.base_model, "d_model": self.d_model,
                "num_hidden_layers": self.n_layers, "bias": self.bias, "base_model_revision": None,
                "unembed_hash": self.unembed_hash, "lens_type": LENS_TYPE,
                "latent_explorer": {"format": FORMAT_VERSION, **self.meta}}

    def params_state(self) -> dict[str, torch.Tensor]:
        """``params.pt`` content: the translator list's state dict, contiguous CPU float32 tensors."""
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                for k, v in self.translators.state_dict().items()}

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` + ``params.pt`` (tuned-lens layout) and ``lens.safetensors``, atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = self.params_state()
        atomic_write(folder / PARAMS_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write(folder / SAFETENSORS_FILE, lambda tmp: save_file(state, str(tmp)))
        text = json.dumps(self.config_dict(), indent=1)
        atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
        return folder

    @classmethod
    def load(cls, folder: str | Path, lm=None, *, strict_hash: bool = False) -> TunedLens:
        """Load a lens folder (ours or a published tuned-lens one); check it against ``lm`` when given.

        Wrong width or number of layers, a lens trained on other weights (our own provenance), an
        unreadable or truncated file: :class:`TunedLensError`. A published lens whose ``unembed_hash``
        differs from the model's is loaded with a note in ``lens.warnings`` (an error if ``strict_hash``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TunedLensError(f"The tuned-lens folder '{folder}' does not exist; train one or give its path.")
        config_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
        if not config_path.is_file():
            raise TunedLensError(f"'{folder}' has no {CONFIG_FILE}, so it is not a tuned-lens folder.")
        try:
            config = json.loads(config_path.read_text())
            n_layers, d_model = int(config["num_hidden_layers"]), int(config["d_model"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TunedLensError(f"'{config_path}' is not a valid tuned-lens config ({type(exc).__name__}: "
                                 f"{exc}); re-train or re-download the lens.") from exc
        if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
            raise TunedLensError(f"'{folder}' holds a '{config.get('lens_type')}' lens; only "
                                 f"'{LENS_TYPE}' lenses are supported.")
        bias = bool(config.get("bias", True))
        meta = config.get("latent_explorer") or {}
        if lm is not None:
            anatomy = lm.anatomy
            if d_model != anatomy.d_model or n_layers != anatomy.n_layers:
                raise TunedLensError(
                    f"The lens in '{folder}' was made for a model with {n_layers} layers of width {d_model}, "
                    f"but '{lm.name}' has {anatomy.n_layers} layers of width {anatomy.d_model}; use a lens "
                    "trained for this model.")
            theirs = meta.get("weights_hash")
            if theirs and lm.weights_hash and theirs != lm.weights_hash:
                raise TunedLensError(
                    f"The lens in '{folder}' was trained on other weights ({meta.get('model', 'another model')}) "
                    f"than '{lm.name}'; train a lens for this model.")
        state = cls._read_params(folder, params_path)
        lens = cls(n_layers, d_model, bias, base_model=str(config.get("base_model_name_or_path") or ""),
                   unembed_hash=config.get("unembed_hash"), meta={k: v for k, v in meta.items() if k != "format"})
        expected = lens.translators.state_dict()
        problems = sorted(set(expected) ^ set(state))
        if not problems:
            problems = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
        if problems:
            shape = {k: tuple(v.shape) for k, v in state.items()}
            raise TunedLensError(
                f"'{params_path}' does not match its config ({n_layers} translators of width {d_model}): "
                f"'{problems[0]}' is {'missing or unexpected' if problems[0] not in shape or problems[0] not in expected else f'of shape {shape[problems[0]]}'}; "
                "the file belongs to another model or is damaged.")
        lens.translators.load_state_dict({k: v.float() for k, v in state.items()})
        if lm is not None:
            mine = unembed_hash(lm.anatomy)
            if lens.unembed_hash and lens.unembed_hash != mine and not meta.get("weights_hash"):
                message = (f"The lens in '{folder}' was trained with a different unembedding matrix than "
                           f"'{lm.name}' has (tuned-lens hash mismatch); its read-outs may be off.")
                if strict_hash:
                    raise TunedLensError(message)
                lens.warnings.append(message)
            lens = lens.to(lm.device)
        return lens

    @staticmethod
    def _read_params(folder: Path, params_path: Path) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if params_path.is_file():
            try:
                state = torch.load(params_path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated zip, foreign pickle, anything torch refuses
                raise TunedLensError(
                    f"'{params_path}' could not be read as tensors ({type(exc).__name__}); the file is truncated, "
                    "damaged or not a tuned-lens checkpoint: re-train or re-download it.") from exc
        elif (folder / SAFETENSORS_FILE).is_file():
            try:
                state = load_file(str(folder / SAFETENSORS_FILE))
            except (SafetensorError, OSError, ValueError) as exc:
                raise TunedLensError(f"'{folder / SAFETENSORS_FILE}' could not be read ({exc}); re-train the lens."
                                     ) from exc
        else:
            raise TunedLensError(f"'{folder}' has no {PARAMS_FILE}; a tuned-lens folder needs config.json and "
                                 "params.pt.")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TunedLensError(f"'{params_path}' does not hold a dictionary of tensors; it is not a tuned-lens "
                                 "checkpoint.")
        # older checkpoints saved the whole lens module: keep only the translator entries
        cleaned = {}
        for key, value in state.items():
            key = key.removeprefix("layer_translators.")
            if re.fullmatch(r"\d+\.(weight|bias)", key):
                cleaned[key] = value
        return cleaned


def list_lenses(lm) -> list[Path]:
    """Lens folders under ``cache_root()/tuned_lens`` made for ``lm``'s width and depth (newest first)."""
    root = default_lens_dir("x").parent
    found = []
    for config_path in root.glob(f"*/{CONFIG_FILE}"):
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            continue
        if config.get("d_model") == lm.anatomy.d_model and config.get("num_hidden_layers") == lm.anatomy.n_layers:
            weights = (config.get("latent_explorer") or {}).get("weights_hash")
            if not weights or weights == lm.weights_hash:
                found.append(config_path.parent)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


# --- text -> activations ------------------------------------------------------------------
def _resolve_texts(texts: Texts) -> Callable[[], Iterable[str]]:
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


def _prefix_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. BOS): each window starts with them."""
    empty = tokenizer("", add_special_tokens=True)["input_ids"]
    return [int(i) for i in empty]


def iter_windows(tokenizer, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    """Cut every text into windows of ``seq_len`` tokens, each starting with the tokenizer's prefix."""
    prefix = _prefix_ids(tokenizer)
    body = max(2, seq_len - len(prefix))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunk = ids[start:start + body]
            if len(chunk) >= 2:
                yield prefix + [int(i) for i in chunk]


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


def _capture_resid(lm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embeddings and every layer's output in one pass that stops before the unembedding.

    The head would cost as much as a whole extra lens row per token on a 262k vocabulary, and
    nothing here needs the model's own logits (the last layer's output read out is the same).
    """
    anatomy = lm.anatomy
    sink: dict = {}
    sites = normalize_sites({"resid_pre": [0], "resid_post": "all"}, anatomy.n_layers)
    device = next(anatomy.model.parameters()).device
    with lm.lock, hooked(anatomy, sites, sink, stop_early=False):
        handle = anatomy.layers[anatomy.n_layers - 1].register_forward_hook(_stop_after_last_layer)
        try:
            run_forward(anatomy.model, input_ids=ids.to(device), attention_mask=mask.to(device))
        finally:
            handle.remove()
    return torch.stack([sink[("resid_pre", 0)]] + [sink[("resid_post", i)] for i in range(anatomy.n_layers)])


def _stop_after_last_layer(module, args, output):
    raise StopForward


def capture_rows(lm, windows: Sequence[list[int]], with_labels: bool = False):
    """Residual stream at every hidden index for the real tokens of a batch of windows.

    Returns ``resid [n_layers+1, N, d]`` (row 0 embeddings, row i+1 layer i output, pre final norm)
    over the positions that are not padding and not position 0, plus next-token labels ``[N]``
    (only positions that have a next token are kept then).
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


# --- logits on a vocabulary subset --------------------------------------------------------
class _Head:
    """The model's read-out (final norm, unembedding, scale, softcap), on all tokens or on a subset."""

    def __init__(self, anatomy: Anatomy, vocab_ids: torch.Tensor | None):
        self.anatomy = anatomy
        self.ids = vocab_ids
        self.dtype = anatomy.unembed.weight.dtype
        if vocab_ids is not None:
            weight = anatomy.unembed.weight.detach()
            self.weight = weight.index_select(0, vocab_ids.to(weight.device))
            bias = getattr(anatomy.unembed, "bias", None)
            self.bias = bias.detach().index_select(0, vocab_ids.to(bias.device)) if bias is not None else None

    @property
    def size(self) -> int:
        return self.anatomy.vocab_size if self.ids is None else len(self.ids)

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        resid = resid.to(self.dtype)
        if self.ids is None:
            return self.anatomy.logits(resid).float()
        logits = nn.functional.linear(self.anatomy.normalize(resid), self.weight, self.bias)
        if self.anatomy.logit_scale is not None:
            logits = logits * self.anatomy.logit_scale
        if self.anatomy.softcap is not None:
            logits = torch.tanh(logits / self.anatomy.softcap) * self.anatomy.softcap
        return logits.float()

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


def _rows_per_chunk(vocab: int, budget_bytes: int) -> int:
    return max(1, budget_bytes // (vocab * 4 * 6))  # logits, log-probs, probs, grads and temporaries in fp32


def choose_vocab_subset(lm, windows: Sequence[list[int]], size: int, batch_size: int = 4,
                        budget_bytes: int = 512 * 2**20, coverage_batches: int = 2) -> tuple[torch.Tensor, float]:
    """The ``size`` tokens with the most final-distribution mass over ``windows`` (plus every label).

    Returns the sorted ids and the mean mass the subset covers on the first ``coverage_batches``
    batches of those windows (an in-sample estimate).
    """
    anatomy = lm.anatomy
    vocab = anatomy.vocab_size
    head = _Head(anatomy, None)
    mass = torch.zeros(vocab, dtype=torch.float64)
    seen = torch.zeros(vocab, dtype=torch.bool)
    finals = []
    chunk = _rows_per_chunk(vocab, budget_bytes)
    for start in range(0, len(windows), batch_size):
        rows, labels = capture_rows(lm, windows[start:start + batch_size], with_labels=True)
        seen[labels] = True
        final = rows[-1]
        finals.append(final)
        with torch.inference_mode():
            for s in range(0, final.shape[0], chunk):
                mass += torch.softmax(head.logits(final[s:s + chunk]), -1).sum(0).double().cpu()
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


# --- training -----------------------------------------------------------------------------
@dataclass
class TrainConfig:
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


def _make_optimizer(lens: TunedLens, cfg: TrainConfig, scales: Sequence[float] | None = None
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


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to zero."""
    warmup = max(1, round(cfg.warmup_fraction * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))


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


def _step_loss(lens: TunedLens, head: _Head, rows: torch.Tensor, budget_bytes: int) -> tuple[float, list[float]]:
    """Mean KL(final || translated) over layers and tokens; gradients accumulate on ``lens``.

    Logits are computed in row chunks; the translators' graph is kept small by back-propagating
    each chunk into a detached copy of the translated residuals, then into the lens once.
    """
    n_layers, n_tokens = lens.n_layers, rows.shape[1]
    with torch.no_grad():
        teacher = torch.log_softmax(head.logits(rows[-1]), -1)            # [N, V]
        teacher_p = teacher.exp()
        teacher_h = (teacher_p * teacher).sum(-1)                          # -entropy per token
    translated = lens.translate_all(rows[:-1].float())                      # [L, N, d] with graph
    leaf = translated.detach().requires_grad_(True)
    flat = leaf.reshape(n_layers * n_tokens, -1)
    chunk = _rows_per_chunk(head.size, budget_bytes)
    per_layer = torch.zeros(n_layers, dtype=torch.float64)
    denominator = n_layers * n_tokens
    for start in range(0, flat.shape[0], chunk):
        stop = min(start + chunk, flat.shape[0])
        token = torch.arange(start, stop, device=flat.device) % n_tokens
        layer = torch.arange(start, stop) // n_tokens
        logq = torch.log_softmax(head.logits(flat[start:stop]), -1)
        kl = teacher_h[token] - (teacher_p[token] * logq).sum(-1)          # KL(p || q) per row
        (kl.sum() / denominator).backward()
        per_layer.index_add_(0, layer, kl.detach().double().cpu())
        del logq, kl
    translated.backward(leaf.grad)
    per_layer /= n_tokens
    return float(per_layer.mean()), per_layer.tolist()


def train_tuned_lens(lm, texts: Texts, out_dir: str | Path | None = None, config: TrainConfig | None = None, *,
                     corpus_name: str = "", resume: bool = True, progress: Progress | None = None) -> TrainResult:
    """Train (or resume training) a tuned lens for ``lm`` on the training part of ``texts``.

    ``texts`` is a corpus spec for :func:`engine.data.corpora.iter_texts`, a list of strings, or a function
    returning an iterable of strings. Texts whose hash falls in ``heldout_fraction`` are never used
    here (see :func:`is_heldout`); :func:`compare_lenses` evaluates on them. With ``out_dir`` a
    checkpoint is written every ``checkpoint_every`` steps and at the end (the lens folder itself is
    in the tuned-lens layout); a later call with the same folder resumes.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    source = _resolve_texts(texts)
    folder = Path(out_dir) if out_dir is not None else None
    say = progress or (lambda fraction, message: None)
    anatomy = lm.anatomy
    if anatomy.n_layers < 1:
        raise TunedLensError("The model has no layers to train a lens for.")

    lens = TunedLens.for_model(lm)
    optimizer = None
    start_step, windows_used, tokens_seen, losses, elapsed = 0, 0, 0, [], 0.0
    vocab_ids, coverage = None, None
    saved = _load_state(folder) if folder is not None and resume else None
    if saved is not None:
        info, tensors = saved
        if info.get("weights_hash") != lm.weights_hash or info.get("d_model") != anatomy.d_model:
            raise TunedLensError(f"The checkpoint in '{folder}' belongs to another model "
                                 f"({info.get('model')}); choose another output folder or delete it.")
        same = ("batch_size", "seq_len", "vocab_subset", "heldout_fraction", "seed", "optimizer")
        old = info.get("config", {})
        if any(old.get(k) != getattr(cfg, k) for k in same):
            raise TunedLensError(f"The checkpoint in '{folder}' was made with other settings "
                                 f"({', '.join(f'{k}={old.get(k)}' for k in same)}); use them to resume or "
                                 "choose another output folder.")
        lens.translators.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lens.")})
        lens.to(lm.device)
        optimizer = _make_optimizer(lens, cfg)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
        start_step, windows_used = int(info["step"]), int(info["windows_used"])
        tokens_seen, losses, elapsed = int(info["tokens_seen"]), list(info["losses"]), float(info["seconds"])
        coverage = info.get("subset_coverage")
        vocab_ids = tensors.get("vocab_ids")

    def windows() -> Iterator[list[int]]:
        epoch = 0
        while True:
            produced = False
            stream = iter_windows(lm.tokenizer, split_texts(source(), cfg.heldout_fraction, heldout=False),
                                  cfg.seq_len)
            for window in shuffled(stream, cfg.shuffle_buffer, cfg.seed + epoch):
                produced = True
                yield window
            if not produced:
                raise TunedLensError("The corpus has no training text (every text is empty or held out); give "
                                     "a bigger corpus.")
            epoch += 1

    stream = windows()
    for _ in range(windows_used):  # resume: skip what earlier steps consumed
        next(stream)

    clock = time.perf_counter()
    if cfg.vocab_subset is not None and vocab_ids is None and cfg.vocab_subset < anatomy.vocab_size:
        say(0.0, f"choosing the {cfg.vocab_subset} tokens to train on")
        sample = list(itertools.islice(iter_windows(lm.tokenizer, split_texts(source(), cfg.heldout_fraction,
                                                                              heldout=False), cfg.seq_len),
                                       cfg.subset_windows * 8))
        rng = random.Random(cfg.seed + 7919)
        sample = rng.sample(sample, min(cfg.subset_windows, len(sample)))
        vocab_ids, coverage = choose_vocab_subset(lm, sample, cfg.vocab_subset, budget_bytes=cfg.budget_bytes)
    head = _Head(anatomy, vocab_ids.to(lm.device) if vocab_ids is not None else None)

    def info() -> dict:
        return {"model": lm.name, "weights_hash": lm.weights_hash, "d_model": anatomy.d_model,
                "n_layers": anatomy.n_layers, "config": asdict(cfg), "step": step, "windows_used": windows_used,
                "tokens_seen": tokens_seen, "losses": losses, "seconds": elapsed + time.perf_counter() - clock,
                "corpus": corpus_name, "subset_coverage": coverage}

    def finish_lens() -> None:
        lens.meta.update({"model": lm.name, "weights_hash": lm.weights_hash, "corpus": corpus_name,
                          "steps": step, "tokens_seen": tokens_seen, "vocab_subset": cfg.vocab_subset,
                          "subset_coverage": coverage, "final_train_kl": losses[-1] if losses else None})

    step = start_step
    lens.train()
    checked = False
    for step in range(start_step, cfg.steps):
        batch = [next(stream) for _ in range(cfg.batch_size)]
        windows_used += len(batch)
        rows, _ = capture_rows(lm, batch)
        if not checked:
            head.check(rows[-1, :4])
            checked = True
        if optimizer is None:  # fresh start: step sizes from the first batch's residual scale per layer
            scales = rows[:-1].float().pow(2).mean(dim=(1, 2)).sqrt().tolist()
            optimizer = _make_optimizer(lens, cfg, scales)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        with lm.lock, _frozen(lm.model), torch.enable_grad():
            loss, _ = _step_loss(lens, head, rows, cfg.budget_bytes)
        if not math.isfinite(loss):
            raise TunedLensError(f"Training diverged at step {step} (loss {loss}); lower the learning rate.")
        optimizer.step()
        losses.append(loss)
        tokens_seen += rows.shape[1]
        done = step + 1
        say(done / cfg.steps, f"step {done}/{cfg.steps}  KL {loss:.3f} nats")
        if folder is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            step = done
            finish_lens()
            _save_state(folder, lens, optimizer, info(), vocab_ids)
            lens.save(folder)
        step = done
    lens.eval()
    finish_lens()
    seconds = elapsed + time.perf_counter() - clock
    if folder is not None:
        lens.save(folder)
    return TrainResult(lens=lens, steps_done=step, resumed_from=start_step, seconds=seconds, losses=losses,
                       tokens_seen=tokens_seen, subset_coverage=coverage, folder=folder)


# --- evaluation ---------------------------------------------------------------------------
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


@torch.inference_mode()
def compare_lenses(lm, lens: TunedLens, texts: Texts, *, max_tokens: int = 512, seq_len: int = 128,
                   batch_size: int = 4, heldout_fraction: float | None = 0.1, budget_bytes: int = 512 * 2**20,
                   progress: Progress | None = None) -> LensComparison:
    """Logit lens vs tuned lens over (the held-out part of) ``texts``, full vocabulary.

    ``heldout_fraction`` picks the texts :func:`train_tuned_lens` left out with the same fraction;
    ``None`` uses every text. At most ``max_tokens`` positions are scored (position 0, padding
    and positions without a next token are skipped).
    """
    if max_tokens < 1:
        raise TunedLensError("max_tokens must be at least 1.")
    anatomy = lm.anatomy
    if lens.n_layers != anatomy.n_layers or lens.d_model != anatomy.d_model:
        raise TunedLensError(f"The lens has {lens.n_layers} layers of width {lens.d_model}, the model "
                             f"{anatomy.n_layers} of width {anatomy.d_model}; use a lens trained for this model.")
    source = _resolve_texts(texts)
    items = source() if heldout_fraction is None else split_texts(source(), heldout_fraction, heldout=True)
    say = progress or (lambda fraction, message: None)
    n_layers = anatomy.n_layers
    head = _Head(anatomy, None)
    sums = torch.zeros(4, n_layers + 1, dtype=torch.float64)  # kl_logit, kl_tuned, ce_logit, ce_tuned
    scored = 0
    chunk = max(1, _rows_per_chunk(anatomy.vocab_size, budget_bytes) // (2 * n_layers + 1))
    windows = iter_windows(lm.tokenizer, items, seq_len)
    while scored < max_tokens:
        batch = [w for _, w in zip(range(batch_size), windows)]
        if not batch:
            break
        rows, labels = capture_rows(lm, batch, with_labels=True)
        keep = min(rows.shape[1], max_tokens - scored)
        rows, labels = rows[:, :keep], labels[:keep].to(rows.device)
        tuned = lens.translate_all(rows[:-1].to(lens.device).float()).to(rows.device, rows.dtype)
        for start in range(0, keep, chunk):
            sl = slice(start, start + chunk)
            stacked = torch.cat([rows[:, sl], tuned[:, sl]])                  # [2L+1, c, d]
            logp = torch.log_softmax(head.logits(stacked), -1)
            final = logp[n_layers]
            kl = (final.exp() * (final - logp)).sum(-1).clamp_min(0)          # [2L+1, c]
            ce = -logp.gather(-1, labels[sl].expand(logp.shape[0], -1)[..., None])[..., 0]
            for which, values in ((0, kl), (2, ce)):
                values = values.double().sum(-1).cpu()
                sums[which] += values[:n_layers + 1]
                sums[which + 1, :n_layers] += values[n_layers + 1:]
                sums[which + 1, n_layers] += values[n_layers]
            del logp
        scored += keep
        say(min(1.0, scored / max_tokens), f"{scored}/{max_tokens} tokens scored")
    if scored == 0:
        raise TunedLensError("No held-out text to evaluate on: give a bigger corpus or use every text.")
    means = (sums / scored).numpy()
    return LensComparison(layers=["embed"] + [str(i) for i in range(n_layers)], kl_logit=means[0], kl_tuned=means[1],
                          ce_logit=means[2], ce_tuned=means[3], n_tokens=scored, meta=dict(lens.meta))
