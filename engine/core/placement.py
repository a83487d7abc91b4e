"""Placing a model over devices with accelerate: device-map presets, JSON maps checked against the module
tree (tied embedding and head kept together), disk offload folders, and the map a loaded model really has."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from engine.core.devices import (
    DeviceError,
    map_devices,
    module_device,
    parse_device_map,
)
from engine.core.sources import ModelLoadError, cache_root


def _module_names_hint(model: torch.nn.Module) -> str:
    anatomy_layers = next((name for name, module in model.named_modules()
                           if isinstance(module, torch.nn.ModuleList) and len(module)), None)
    top = [name for name, _ in model.named_children()]
    inner = [f"{name}.{child}" for name, module in model.named_children() for child, _ in module.named_children()]
    shown = ", ".join(f"'{n}'" for n in (inner or top)[:6] if n != anatomy_layers)
    layers = f", '{anatomy_layers}.0'" if anatomy_layers else ""
    return f"module names look like {shown}{layers}"


def _owner(name: str, wanted: dict[str, str]) -> str | None:
    """The longest key of ``wanted`` that is ``name`` or a dotted prefix of it (None: the map does not name it)."""
    keys = [key for key in wanted if key and (name == key or name.startswith(key + "."))]
    return max(keys, key=len) if keys else None


def _follow_tied(model: torch.nn.Module, wanted: dict[str, str]) -> dict[str, str]:
    """Weights shared by two modules (a head tied to the input embedding) must sit on one device: a tied module
    the map does not name follows its partner; a map that names them on different devices is refused."""
    from accelerate.utils import find_tied_parameters

    out = dict(wanted)
    for group in find_tied_parameters(model):
        owners = {param: _owner(param, out) for param in group}
        named = sorted({out[key] for key in owners.values() if key is not None})
        if len(named) > 1:
            modules = " and ".join(f"'{param.rpartition('.')[0]}'" for param in group)
            raise ModelLoadError(f"{modules} share one weight (tied embeddings), so they must be on the same device; "
                                 f"the device map puts them on {' and '.join(named)}.")
        for param, key in owners.items():
            if named and key is None:
                out[param.rpartition(".")[0]] = named[0]
    return out


def _expand_device_map(model: torch.nn.Module, wanted: dict[str, str], default: str) -> dict[str, str]:
    """The user's ``{prefix: device}`` completed so every module is placed: what it does not name stays on
    ``default`` (a module tied to a named one follows it). Prefixes must be module (or parameter) names."""
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    for prefix in wanted:
        if prefix not in names:
            close = sorted(name for name in names if name.endswith("." + prefix))
            hint = f"did you mean '{close[0]}'?" if close else _module_names_hint(model) + "."
            raise ModelLoadError(f"The device map names '{prefix}', which is not a module of this model; {hint}")
    wanted = _follow_tied(model, wanted)
    if "" in wanted:
        default = wanted[""]
    full: dict[str, str] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if prefix and prefix in wanted:
            full[prefix] = wanted[prefix]
            return
        inside = [key for key in wanted if key and (not prefix or key.startswith(prefix + "."))]
        if not inside:
            full[prefix] = default
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{prefix}.{name}" if prefix else name
            full[key] = wanted.get(key, default)

    visit("", model)
    return full


def _preset_device_map(model: torch.nn.Module, preset: str, dtype: torch.dtype) -> dict:
    """accelerate's placement for a preset (``auto``/``balanced``...) of a model already in memory."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = None
    if preset != "sequential":
        memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split,
                                     low_zero=preset == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def _offload_folder(given: str | Path | None, key: str) -> Path:
    folder = Path(given) if given is not None else cache_root() / "offload" / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _skeleton(folder, options: dict) -> torch.nn.Module:
    """The model's module tree without weights (for checking and completing a device map)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, **options)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=options.get("trust_remote_code", False))
    skeleton.tie_weights()  # transformers ties at load time; the map must see which weights are shared
    return skeleton


def resolve_device_map(device_map, skeleton: Callable[[], torch.nn.Module], torch_device: torch.device):
    """``--device-map`` -> what ``from_pretrained`` / ``dispatch_model`` take: a preset name, or a complete
    ``{module: device}`` (unnamed modules on ``torch_device``); None when no map was given. ``skeleton()``
    gives the module tree the prefixes are checked against."""
    try:
        parsed = parse_device_map(device_map)
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from exc
    if parsed is None or isinstance(parsed, str):
        return parsed
    default = torch.device("cuda", 0) if torch_device.type == "cuda" and torch_device.index is None else torch_device
    return _expand_device_map(skeleton(), parsed, str(default))


def recorded_map(model: torch.nn.Module, fallback) -> dict[str, str] | None:
    """The placement accelerate made (``hf_device_map``), GPU numbers written ``cuda:N``; a preset that kept the
    model on one device is recorded as ``{"": device}``; None when no device map was used."""
    placed = getattr(model, "hf_device_map", None) or (fallback if isinstance(fallback, dict) else None)
    if not placed:
        return {"": str(module_device(model.get_input_embeddings()))} if isinstance(fallback, str) else None
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in placed.items()}


def dispatch_in_memory(model: torch.nn.Module, device_map, dtype: torch.dtype, offload_folder, key: str):
    """Place an in-memory model (``tiny:``) by a device map with accelerate, as ``from_pretrained`` would;
    returns ``(model, the complete map)``."""
    from accelerate import dispatch_model

    full = _preset_device_map(model, device_map, dtype) if isinstance(device_map, str) else device_map
    offload = _offload_folder(offload_folder, key) if "disk" in map_devices(full) else None
    return dispatch_model(model, device_map=full, offload_dir=str(offload) if offload else None), full


def placement_options(device_map, folder, options: dict, torch_device: torch.device, offload_folder,
                       key: str) -> tuple[dict, object]:
    """``from_pretrained`` keyword arguments for a device map (none without one), and the resolved map."""
    placed = resolve_device_map(device_map, lambda: _skeleton(folder, options), torch_device)
    if placed is None:
        return {}, None
    extra: dict = {"device_map": placed}
    if isinstance(placed, str) or "disk" in map_devices(placed):  # a preset may offload to disk when memory is short
        extra["offload_folder"] = str(_offload_folder(offload_folder, key))
    return extra, placed
