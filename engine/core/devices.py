"""Devices and dtypes: choosing them, and the one way results leave the device.

Every engine result that goes to numpy, pandas, Plotly or a file passes through :func:`to_host`
(detach, move to the CPU, upcast half precision to float32), so no caller ever calls ``.numpy()``
on a CUDA or bfloat16 tensor.

Also here: ``--device-map`` settings (:func:`parse_device_map`), where a module computes and what its
weights hold when accelerate spread or offloaded it (:func:`module_device`, :func:`module_tensor`), and
memory budgets (:func:`oom_guard` turns running out of memory into a sentence naming the setting to lower,
:func:`budget_rows` sizes chunks).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import json
import re
import traceback

import torch

from engine.core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what a model may be loaded in


class DeviceError(UserError):
    pass


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first GPU when there is one, else the CPU; a named device is checked to exist."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"'{device}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for, but this machine has no usable GPU; choose 'cpu'.")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise DeviceError(f"There is no {device}: this machine has {torch.cuda.device_count()} GPU(s).")
    elif chosen.type not in ("cpu", "mps", "meta"):
        raise DeviceError(f"The device type '{chosen.type}' is not supported; use cpu or cuda.")
    return chosen


DEVICE_MAP_PRESETS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own placements


def _map_device(prefix: str, value) -> str:
    """One value of a device map -> ``cuda:N``, ``cpu``, ``mps`` or ``disk``, checked to exist on this machine."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DeviceError(f"The device map puts '{prefix}' on {value!r}; use 'cuda:N', 'cpu' or 'disk'.")
    text = f"cuda:{value}" if isinstance(value, int) else value.strip().lower()
    if text == "disk":
        return text
    if text in ("auto", "meta") or text.startswith("meta:"):
        raise DeviceError(f"The device map puts '{prefix}' on '{value}'; use 'cuda:N', 'cpu' or 'disk'.")
    try:
        device = pick_device(text)
    except DeviceError as exc:
        raise DeviceError(f"The device map puts '{prefix}' on '{value}', which is not usable here: {exc}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return str(device)


def parse_device_map(value) -> str | dict[str, str] | None:
    """A ``--device-map`` setting -> None, one of :data:`DEVICE_MAP_PRESETS`, or ``{module prefix: device}``.

    ``value`` is None/empty, a preset name, a JSON object (text) or a dict mapping module-name prefixes
    (``"model.layers.10"``) to ``"cuda:N"``, ``"cpu"`` or ``"disk"``. Devices are checked to exist here;
    whether the prefixes name modules of the model is checked when the model is loaded.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in DEVICE_MAP_PRESETS:
            return text
        if not text.startswith("{"):
            raise DeviceError(f"The device map '{text[:60]}' is neither {', '.join(DEVICE_MAP_PRESETS)} nor a JSON "
                              'object such as {"model.layers.20": "cuda:1"}.')
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise DeviceError(f"The device map is not valid JSON ({exc.msg} at character {exc.pos}); give an object "
                              'such as {"model.layers.20": "cuda:1", "lm_head": "cpu"}.') from None
    if not isinstance(value, dict):
        raise DeviceError('The device map must be a JSON object from module names to devices, such as '
                          '{"model.layers.20": "cuda:1"}.')
    out: dict[str, str] = {}
    for prefix, device in value.items():
        if not isinstance(prefix, str):
            raise DeviceError(f"The device map's key {prefix!r} is not a module name.")
        out[prefix.strip().strip(".")] = _map_device(prefix, device)
    return out


def map_devices(device_map: dict[str, str | int]) -> list[str]:
    """The distinct devices of a (recorded) device map, accelerate's GPU numbers written ``cuda:N``."""
    return sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()})


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on a CPU; otherwise one of :data:`MODEL_DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in MODEL_DTYPES:
        raise DeviceError(f"Unknown dtype '{dtype}'; choose from auto, {', '.join(MODEL_DTYPES)}.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_host(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Detached CPU copy; half-precision floats become float32 (or ``dtype`` when given)."""
    out = tensor.detach()
    if dtype is None and out.is_floating_point() and out.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    out = out.to("cpu")
    return out.to(dtype) if dtype is not None else out


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes.

    A module dispatched by ``accelerate`` (a device map, disk or CPU offload) carries a hook that names its
    execution device; its offloaded weights sit on the ``meta`` device until a forward loads them, so the
    hook wins over the parameters. Otherwise the first parameter's (or buffer's) device that is not
    ``meta``; CPU for a module without any.
    """
    hook = getattr(module, "_hf_hook", None)
    found = _hook_execution_device(hook)
    if found is not None:
        return found
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _hook_execution_device(hook) -> torch.device | None:
    """The execution device an accelerate hook (or a chain of hooks) names, or None."""
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def module_tensor(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The real value of ``module.<name>``, also when ``accelerate`` offloaded it (then the attribute is an empty
    ``meta`` tensor and the value lives in the hook's weights map, on the CPU or memory-mapped from disk)."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(one, "weights_map", None)
        if weights is not None:
            try:
                return weights[name]
            except KeyError:
                pass
    raise DeviceError(f"The weight '{name}' of {type(module).__name__} was offloaded and cannot be read back.")


# --- memory budgets ---------------------------------------------------------------------------------
class MemoryBudgetError(UserError):
    """The device ran out of memory; the message names the setting to lower."""


_CPU_OOM = re.compile(r"can't allocate memory|cannot allocate memory|not enough memory|out of memory", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports that a device (CUDA, MPS, or the CPU allocator) could not allocate memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    generic = getattr(torch, "OutOfMemoryError", None)
    if generic is not None and isinstance(exc, generic):
        return True
    return isinstance(exc, RuntimeError) and bool(_CPU_OOM.search(str(exc)))


def free_device_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back to the driver (a no-op without CUDA)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _asked_for(message: str) -> str | None:
    """The size an allocator message says it tried to allocate (``2.50 GiB``), bytes written in GiB/MiB."""
    found = re.search(r"tried to allocate (\d+) bytes", message, re.IGNORECASE)
    if found:
        size = int(found.group(1))
        for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if size >= 2**power:
                return f"{size / 2**power:.2f} {unit}"
        return f"{size} bytes"
    found = re.search(r"tried to allocate ([0-9.]+ ?[KMGT]i?B)", message, re.IGNORECASE)
    return found.group(1) if found else None


class _OomGuard(contextlib.ContextDecorator):
    def __init__(self, setting_hint: str, doing: str):
        self.setting_hint, self.doing = setting_hint, doing

    def __enter__(self) -> _OomGuard:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not is_out_of_memory(exc):
            return False
        asked = _asked_for(str(exc))
        # the finished frames of the failed call still hold its tensors: drop them before emptying the cache
        traceback.clear_frames(tb)
        exc.__traceback__ = None
        free_device_memory()
        detail = f" (it asked for {asked} more)" if asked else ""
        raise MemoryBudgetError(f"Out of memory while {self.doing}{detail}; lower {self.setting_hint}.") from None


def oom_guard(setting_hint: str, doing: str = "running this step") -> _OomGuard:
    """Context manager and decorator: an out-of-memory error inside becomes one :class:`MemoryBudgetError`
    sentence, ``"Out of memory while <doing>; lower <setting_hint>."``, after the CUDA cache is freed.

    ``torch.cuda.OutOfMemoryError`` (any ``torch.OutOfMemoryError``), ``MemoryError`` and the ``RuntimeError``
    of the CPU allocator ("can't allocate memory") count; every other error passes through unchanged.
    """
    return _OomGuard(setting_hint, doing)


def budget_rows(bytes_per_row: int, budget_bytes: int, total: int | None = None) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget_bytes`` (at least 1, at most ``total`` when given)."""
    rows = max(1, int(budget_bytes) // max(1, int(bytes_per_row)))
    return min(rows, max(1, int(total))) if total is not None else rows
