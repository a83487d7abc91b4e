"""Tuned lens (Belrose et al., 2023): one learned affine translator per layer, then the model's own head.

A :class:`TunedLens` holds a translator for every hidden-state index ``0 .. n_layers-1`` (index 0 is
the embedding output, ``i+1`` the output of layer ``i``); the last layer's output needs none. Each
translator maps ``h -> h + (A h + b)`` with ``A`` and ``b`` initialised to zero, so an untrained lens
*is* the logit lens. The object is a :data:`engine.lens.logit.Transform` (``lens(index, resid)``), so it
plugs into :func:`engine.lens.logit.run_lens`, :func:`engine.lens.logit.lens_stats` and
:func:`engine.lens.latent_language.run_latent_language` as their ``transform``.

This module holds the lens and its files. Training: :mod:`engine.lens.tuned_train`; logit vs tuned lens
on held-out text: :mod:`engine.lens.compare`; text windows, held-out split and the read-out head they
share: :mod:`engine.lens.tuned_data`.

On disk a lens is a folder in the ``tuned-lens`` package's layout, so published lenses load:
``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
``base_model_revision``, ``unembed_hash``, ``lens_type``) and ``params.pt`` (the state dict of the
translator list: ``"<i>.weight"`` ``[d, d]`` and ``"<i>.bias"`` ``[d]``), read with
``torch.load(weights_only=True)``. We add ``lens.safetensors`` (same keys) and our own provenance
under the ``latent_explorer`` key of ``config.json`` (the tuned-lens package ignores unknown keys).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from engine.core.anatomy import Anatomy
from engine.core.devices import module_tensor, to_host
from engine.core.errors import UserError
from engine.core.fileio import atomic_write, sha256_file

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

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
    weight = to_host(module_tensor(anatomy.unembed), torch.float32).numpy()
    return hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()


def default_lens_dir(model_name: str) -> Path:
    """``cache_root()/tuned_lens/<model>``: where the CLI and the demo put a lens by default."""
    from engine.core.models import cache_root

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    return cache_root() / "tuned_lens" / safe


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
    def for_model(cls, lm: LoadedModel, bias: bool = True) -> TunedLens:
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
        """Write ``config.json`` + ``params.pt`` (tuned-lens layout) and ``lens.safetensors`` as one set.

        Each file is written atomically, the weights first and ``config.json`` last with their sha256 under
        ``latent_explorer.files``; :meth:`load` checks them, so a save cut short (new weights next to an old
        config) is reported as a half-written lens instead of mixing two lenses."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = self.params_state()
        atomic_write(folder / PARAMS_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write(folder / SAFETENSORS_FILE, lambda tmp: save_file(state, str(tmp)))
        config = self.config_dict()
        config["latent_explorer"]["files"] = {name: sha256_file(folder / name) for name in (PARAMS_FILE,
                                                                                           SAFETENSORS_FILE)}
        text = json.dumps(config, indent=1)
        atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
        return folder

    @staticmethod
    def _check_set(folder: Path, meta: dict) -> None:
        """Every weights file named in ``config.json`` (our own saves) has the digest recorded there."""
        for name, digest in (meta.get("files") or {}).items():
            path = folder / name
            if path.is_file() and sha256_file(path) != digest:
                raise TunedLensError(f"'{path}' does not match the '{CONFIG_FILE}' next to it (a save was cut "
                                     "short, or the files come from two lenses); train or copy the lens again.")

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None, *, strict_hash: bool = False) -> TunedLens:
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
        cls._check_set(folder, meta)
        state = cls._read_params(folder, params_path)
        lens = cls(n_layers, d_model, bias, base_model=str(config.get("base_model_name_or_path") or ""),
                   unembed_hash=config.get("unembed_hash"), meta={k: v for k, v in meta.items() if k not in ("format", "files")})
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


def list_lenses(lm: LoadedModel) -> list[Path]:
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
