"""Crash-safe file writes and content hashes shared by every on-disk cache.

Each write goes to a hidden temporary file next to its target (unique per process and thread) and is
moved into place with ``os.replace``, so a reader sees either the old file or the whole new one,
never a half-written file, even when the process is killed mid-write.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

BLOCK = 1 << 22  # 4 MiB reads while hashing


def temp_path(path: Path) -> Path:
    """The temporary sibling a write to ``path`` goes through."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and move ``tmp`` onto ``path``; ``tmp`` never survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, ensure_ascii=False, default=str))


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors (detached, on the CPU, contiguous)."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def update_digest(digest: "hashlib._Hash", path: Path) -> None:
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()
