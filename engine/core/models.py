"""Load any causal LM (an embedded default, a Hugging Face hub id, a local folder or a ``.gguf`` file), optionally
split over devices, and verify that the lens at the last layer reproduces its logits.

Where weights come from is :mod:`engine.core.sources`; device maps are :mod:`engine.core.placement`. Every
problem the user can cause ends in a :class:`ModelLoadError` with one sentence.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core.anatomy import Anatomy, find_anatomy
from engine.core.devices import (
    DeviceError,
    dtype_name,
    pick_device,
    pick_dtype,
)
from engine.core.placement import dispatch_in_memory, placement_options, recorded_map, resolve_device_map
from engine.core.selfcheck import self_check, tolerance
from engine.core.sources import (  # noqa: F401  (the names callers know from this module)
    DEFAULT_MODEL,
    EMBEDDED,
    ModelLoadError,
    Source,
    cache_root,
    hub_local_only,
    resolve,
    weights_folder,
)

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "LoadedModel", "ModelLoadError", "Source", "cache_root", "from_model",
           "load_model", "resolve"]


@dataclass
class LoadedModel:
    name: str
    source: Source
    model: torch.nn.Module
    tokenizer: object
    anatomy: Anatomy
    device: torch.device
    dtype: torch.dtype
    weights_hash: str
    context_length: int | None
    self_check_max_abs_diff: float = float("nan")
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # {module name: "cuda:N" | "cpu" | "disk"} when a device map split the model; ``device`` is then where the
    # input embedding computes (token ids go there; captured activations are gathered there)
    device_map: dict[str, str] | None = None

    @property
    def n_layers(self) -> int:
        return self.anatomy.n_layers

    @property
    def d_model(self) -> int:
        return self.anatomy.d_model

    def describe(self) -> dict:
        return {"model": self.name, "kind": self.source.kind, "architecture": type(self.model).__name__,
                "layers": self.n_layers, "d_model": self.d_model, "vocab": self.anatomy.vocab_size,
                "device": str(self.device), "dtype": dtype_name(self.dtype), "device_map": self.device_map,
                "context_length": self.context_length, "final_norm": self.anatomy.final_norm_path,
                "softcap": self.anatomy.softcap, "logit_scale": self.anatomy.logit_scale,
                "unavailable": list(self.anatomy.missing.values()), "weights_hash": self.weights_hash[:16],
                "self_check_max_abs_diff": self.self_check_max_abs_diff}


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """:func:`engine.core.devices.pick_device` / ``pick_dtype``, their sentences as load errors."""
    try:
        torch_device = pick_device(device)
        return torch_device, pick_dtype(dtype, torch_device)
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from exc


def _context_length(model, tokenizer) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def _load_tiny(spec: str, source: Source, torch_device: torch.device, torch_dtype: torch.dtype, device_map,
               offload_folder, check: bool) -> LoadedModel:
    """Random weights, for tests and demos without downloads."""
    from engine.core.tiny import build_tiny

    model, tokenizer = build_tiny(spec[5:])
    placed = resolve_device_map(device_map, lambda: model, torch_device)
    if placed is None:
        model = model.to(torch_device, torch_dtype)
    else:
        model, placed = dispatch_in_memory(model.to(torch_dtype), placed, torch_dtype, offload_folder,
                                            spec.replace(":", "-"))
    lm = from_model(model, tokenizer, name=spec, check=check)  # random weights: the difference is recorded only
    lm.source = source
    lm.device_map = recorded_map(model, placed)
    return lm


def _self_check_or_raise(lm: LoadedModel, spec: str) -> None:
    lm.self_check_max_abs_diff = self_check(lm)
    if not lm.self_check_max_abs_diff <= tolerance(lm.dtype):
        raise ModelLoadError(
            f"Self-check failed for '{spec}': the lens at the last layer differs from the model's logits by "
            f"{lm.self_check_max_abs_diff:.3g}, so this architecture's final norm or head was not understood."
        )


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, check: bool = True,
               progress: Callable[[str], None] | None = None, device_map=None,
               offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a causal LM and verify that the lens at the last layer reproduces its logits.

    ``device_map`` splits the model over devices with accelerate: ``"auto"`` or ``"balanced"``, or
    ``{module-name prefix: "cuda:N" | "cpu" | "disk"}`` (as a dict or JSON text; modules it does not name stay
    on ``device``). Weights mapped to ``"disk"`` are offloaded to ``offload_folder`` (default
    ``cache/offload/<model>``) and loaded layer by layer during each forward pass.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    torch_device, torch_dtype = _device_and_dtype(device, dtype)
    if source.kind == "tiny":
        lm = _load_tiny(spec, source, torch_device, torch_dtype, device_map, offload_folder, check)
        return lm
    folder, weights_hash = weights_folder(source, progress)
    local_only = source.kind == "hub" and hub_local_only(spec)
    if progress:
        where = f"with device map {device_map}" if device_map else f"on {torch_device}"
        progress(f"Loading {spec} {where} in {dtype_name(torch_dtype)}")
    options = {"trust_remote_code": trust_remote_code, **({"local_files_only": True} if local_only else {})}
    key = hashlib.sha256(f"{spec}|{weights_hash}|{dtype_name(torch_dtype)}".encode()).hexdigest()[:16]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        placement, placed = placement_options(device_map, folder, options, torch_device, offload_folder, key)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **options, **placement)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if source.kind == "hub":
            raise ModelLoadError(
                f"Model '{spec}' could not be loaded: it is not an embedded model, a local folder or a .gguf file, "
                f"and the Hugging Face hub could not provide it ({first[:200]})."
            ) from exc
        raise ModelLoadError(f"Model '{spec}' could not be loaded ({first[:200]}).") from exc
    if source.kind == "hub":
        weights_hash = hashlib.sha256(f"{spec}@{getattr(model.config, '_commit_hash', '')}".encode()).hexdigest()
    if placed is None:
        model.to(torch_device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    anatomy = find_anatomy(model)
    lm = LoadedModel(name=spec, source=source, model=model, tokenizer=tokenizer, anatomy=anatomy,
                     device=anatomy.input_device, dtype=torch_dtype, weights_hash=weights_hash,
                     context_length=_context_length(model, tokenizer),
                     device_map=recorded_map(model, placed) if placed is not None else None)
    if check:
        _self_check_or_raise(lm, spec)
    return lm


def from_model(model: torch.nn.Module, tokenizer, name: str = "in-memory", check: bool = True) -> LoadedModel:
    """Wrap a model already in memory (tests, notebooks) the same way :func:`load_model` does."""
    model.eval()
    param = next(model.parameters())
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", 0) is None:
        tokenizer.pad_token = tokenizer.eos_token
    anatomy = find_anatomy(model)
    lm = LoadedModel(name=name, source=Source("memory", name), model=model, tokenizer=tokenizer,
                     anatomy=anatomy, device=anatomy.input_device, dtype=param.dtype,
                     weights_hash=hashlib.sha256(name.encode()).hexdigest(),
                     context_length=_context_length(model, tokenizer),
                     device_map=recorded_map(model, None))
    if check and tokenizer is not None:
        lm.self_check_max_abs_diff = self_check(lm)
    return lm
