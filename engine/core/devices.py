"""Devices and dtypes: choosing them, and the one way results leave the device.

Every engine result that goes to numpy, pandas, Plotly or a file passes through :func:`to_host`
(detach, move to the CPU, upcast half precision to float32), so no caller ever calls ``.numpy()``
on a CUDA or bfloat16 tensor.
"""
from __future__ import annotations

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
    """Device of the module's first parameter (CPU for a module without parameters)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
