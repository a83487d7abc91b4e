"""Gemma Scope folders, read the way SAELens's Gemma loaders read them.

Gemma Scope (Gemma 2): ``params.npz`` with ``W_enc``/``w_enc [d_in, d_sae]``, ``W_dec``/``w_dec
[d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``: a JumpReLU SAE that does not subtract ``b_dec`` from
its input. The layer and width come from the path (``.../gemma-scope-2b-pt-res/layer_9/width_16k/
average_l0_71``), the site from the release name when it is part of the path (``-res`` -> resid_post,
``-mlp`` -> mlp_out, ``-att`` -> the attention heads, not spliceable). Read with
``numpy.load(allow_pickle=False)``: an archive holding Python objects is refused.

Gemma Scope 2 (Gemma 3): ``config.json`` (``architecture: "jump_relu"``, ``model_name``,
``hf_hook_point_in``, ``hf_hook_point_out`` and ``affine_connection`` for transcoders) and
``params.safetensors`` (``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``, and
``affine_skip_connection [d_in, d_out]`` for affine transcoders).
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.sae.base import SAEConfig, SAELoadError

NPZ_FILE = "params.npz"
ST_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
WEIGHT_FILES = (NPZ_FILE, ST_FILE)
WIDTHS = {"4k": 4096, "16k": 16384, "32k": 32768, "65k": 65536, "131k": 131072, "262k": 262144,
          "524k": 524288, "1m": 1048576}
_RELEASE_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_CONFIG_KEYS = {"architecture", "model_name", "hf_hook_point_in", "hf_hook_point_out", "affine_connection"}


def is_gemma_scope_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / NPZ_FILE).is_file() or ((folder / CONFIG_FILE).is_file() and (folder / ST_FILE).is_file())


def read(folder: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    """``(config, tensors in SAELens names, source name)`` of a Gemma Scope folder; nothing is checked twice."""
    folder = Path(folder)
    if (folder / NPZ_FILE).is_file():
        return _read_npz(folder)
    return _read_safetensors(folder)


def _layer(folder: Path) -> int:
    match = re.search(r"layer_(\d+)", folder.as_posix())
    if match is None:
        raise SAELoadError(f"The Gemma Scope folder '{folder}' names no layer (a 'layer_N' part in its path).")
    return int(match.group(1))


def _as_tensors(arrays: dict[str, np.ndarray], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise SAELoadError(f"{source}: '{key}' has dtype {array.dtype}; SAE weights must be floating point.")
        name = "W_" + key[2:] if key.startswith("w_") else key
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # an npz archive is a zip file
                raise SAELoadError(f"'{path}' is not a readable npz archive (it is not a zip file).")
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise SAELoadError(f"'{path}' is a single array, not an npz archive of named tensors.")
        with data:
            return {key: data[key] for key in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise SAELoadError(f"'{path}' holds pickled Python objects, which are never loaded.") from exc
        raise SAELoadError(f"'{path}' is not a readable npz archive ({exc}).") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SAELoadError(f"'{path}' is not a readable npz archive ({type(exc).__name__}: {exc}).") from exc


def _model_and_hook(folder: Path, layer: int) -> dict[str, Any]:
    """Metadata the path implies: the release (``gemma-scope-2b-pt-res``) gives the model and the site."""
    meta: dict[str, Any] = {"hook_layer": layer}
    match = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)", folder.as_posix())
    if match:
        size, kind, site = match.groups()
        meta["model_name"] = f"gemma-2-{size}" + ("-it" if kind == "it" else "")
        meta["hook_name"] = f"blocks.{layer}.{_RELEASE_HOOKS[site]}"
    return meta


def _read_npz(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    source = f"{folder / NPZ_FILE}"
    tensors = _as_tensors(_load_npz(folder / NPZ_FILE), source)
    layer = _layer(folder)
    w_enc = tensors.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        raise SAELoadError(f"{source} lacks a 2-D W_enc (or w_enc) tensor.")
    d_in, d_sae = (int(n) for n in w_enc.shape)
    width = re.search(r"width_(\d+[km]?)(?:/|$)", folder.as_posix())
    if width and width.group(1) in WIDTHS and WIDTHS[width.group(1)] != d_sae:
        raise SAELoadError(f"The folder name says width_{width.group(1)} ({WIDTHS[width.group(1)]} latents) but "
                           f"W_enc has shape {tuple(w_enc.shape)}.")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=False,
                    metadata={**_model_and_hook(folder, layer), "context_size": 1024, "prepend_bos": True,
                              "dataset_path": "monology/pile-uncopyrighted"})
    return cfg, {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}, source


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SAELoadError(f"'{path}' is not valid JSON ({exc}).") from exc
    if not isinstance(raw, dict):
        raise SAELoadError(f"'{path}' is not a JSON object.")
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise SAELoadError(f"The Gemma Scope config field '{unknown[0]}' is not understood by this engine, "
                           "so the SAE is not loaded.")
    if raw.get("architecture") != "jump_relu":
        raise SAELoadError(f"The Gemma Scope config names architecture {raw.get('architecture')!r}; only "
                           "'jump_relu' is known.")
    return raw


def _model_name(name: str | None) -> str | None:
    if not name:
        return None
    name = name.replace("-v3", "-3")
    return name.replace("-pt", "") if "270m" in name else name


def _read_safetensors(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    from engine.sae.io import read_safetensors

    raw = _read_config(folder)
    source = f"{folder / ST_FILE}"
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in read_safetensors(folder / ST_FILE).items()}
    if "affine_skip_connection" in tensors:  # stored [d_in, d_out]; SAELens's W_skip is [d_out, d_in]
        tensors["W_skip"] = tensors.pop("affine_skip_connection").T.contiguous()
    w_enc, w_dec = tensors.get("W_enc"), tensors.get("W_dec")
    if w_enc is None or w_dec is None or w_enc.ndim != 2:
        raise SAELoadError(f"{source} lacks the 2-D w_enc and w_dec tensors of a Gemma Scope SAE.")
    if w_dec.ndim != 2:
        raise SAELoadError(f"{source} holds a cross-layer transcoder (w_dec is {w_dec.ndim}-D), which is not supported.")
    transcoder = "hf_hook_point_out" in raw or "affine_connection" in raw
    metadata: dict[str, Any] = {"model_name": _model_name(raw.get("model_name")), "context_size": 1024,
                                "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted",
                                "hf_hook_name": raw.get("hf_hook_point_in")}
    layer = re.search(r"layer_(\d+)", folder.as_posix())
    kind = next((k for k in ("resid_post", "attn_out", "mlp_out", "transcoder") if k in folder.as_posix()), None)
    if layer and kind:
        hooks = {"resid_post": "hook_resid_post", "attn_out": "attn.hook_z", "mlp_out": "hook_mlp_out",
                 "transcoder": "hook_mlp_in"}
        metadata["hook_name"] = f"blocks.{layer.group(1)}.{hooks[kind]}"
        if transcoder:
            metadata["hook_name_out"] = f"blocks.{layer.group(1)}.hook_mlp_out"
    if transcoder:
        metadata["hf_hook_name_out"] = raw.get("hf_hook_point_out")
        architecture = "jumprelu_skip_transcoder" if raw.get("affine_connection") else "jumprelu_transcoder"
    else:
        architecture = "jumprelu"
    cfg = SAEConfig(d_in=int(w_enc.shape[0]), d_sae=int(w_enc.shape[1]), architecture=architecture,
                    d_out=int(w_dec.shape[1]) if transcoder else None, apply_b_dec_to_input=False,
                    metadata={key: value for key, value in metadata.items() if value is not None})
    return cfg, tensors, source
