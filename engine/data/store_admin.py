"""Looking after activation stores: verifying shards, deleting stores, finding leftovers of killed captures.

A capture that is killed leaves its unfinished shard as a hidden temporary file
(``.shard_00003.safetensors.<pid>.<thread>.tmp``). Writers never delete temporary files they did not
create (another writer may still be filling one); :func:`remove_stale_temp_files` removes those whose
process no longer runs.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from engine.core.fileio import sha256_file
from engine.core.progress import Progress, report
from engine.data.store import MANIFEST, META_TENSORS, ActivationStore, StoreError

_TEMP = re.compile(r"^\..+\.(\d+)\.(\d+)\.tmp$")  # engine.core.fileio.temp_path: .<name>.<pid>.<thread>.tmp


def shard_is_intact(folder: Path, shard: dict) -> bool:
    """The shard file exists with the size and sha256 its manifest entry records."""
    file = Path(folder) / shard["file"]
    return file.is_file() and file.stat().st_size == shard["bytes"] and sha256_file(file) == shard["sha256"]


def intact_shards(folder: Path, manifest: dict, progress: Progress | None = None) -> list[dict]:
    """The leading shards of ``manifest`` whose files verify (the first damaged one and all after it are not)."""
    good = []
    shards = manifest.get("shards", [])
    for index, shard in enumerate(shards):
        report(progress, 0.0, f"checking shard {index + 1} of {len(shards)}")
        if not shard_is_intact(folder, shard):
            break
        good.append(shard)
    return good


def _shard_problems(store: ActivationStore, shard: dict) -> list[str]:
    from safetensors import safe_open

    file = store.path / shard["file"]
    if not file.is_file():
        return [f"{shard['file']}: missing"]
    if file.stat().st_size != shard["bytes"]:
        return [f"{shard['file']}: size {file.stat().st_size} instead of {shard['bytes']} (truncated)"]
    if sha256_file(file) != shard["sha256"]:
        return [f"{shard['file']}: checksum mismatch (corrupt)"]
    problems = []
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for name in (*store.tensor_names, *META_TENSORS):
                if name not in keys:
                    problems.append(f"{shard['file']}: tensor '{name}' missing")
                    continue
                shape = handle.get_slice(name).get_shape()
                if shape[0] != shard["rows"]:
                    problems.append(f"{shard['file']}: tensor '{name}' has {shape[0]} rows, "
                                    f"manifest says {shard['rows']}")
    except Exception as exc:  # a file that is not safetensors raises various errors
        problems.append(f"{shard['file']}: unreadable ({type(exc).__name__})")
    return problems


def verify_store(store: ActivationStore, progress: Progress | None = None) -> list[str]:
    """Check every shard against the manifest (existence, size, sha256, tensor names and shapes)."""
    problems = []
    shards = store.manifest["shards"]
    for index, shard in enumerate(shards):
        report(progress, index / max(len(shards), 1), f"verifying {shard['file']}")
        problems += _shard_problems(store, shard)
    rows = sum(int(s["rows"]) for s in shards)
    if rows != store.n_tokens:
        problems.append(f"manifest: shards hold {rows} rows, n_tokens says {store.n_tokens}")
    report(progress, 1.0, "verified")
    return problems


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files in a store folder whose writing process (same machine) no longer runs."""
    stale = []
    for file in Path(folder).glob(".*.tmp"):
        found = _TEMP.match(file.name)
        if found and int(found.group(1)) != os.getpid() and not _process_runs(int(found.group(1))):
            stale.append(file)
    return sorted(stale)


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete :func:`stale_temp_files`; returns the bytes freed."""
    freed = 0
    for file in stale_temp_files(folder):
        try:
            size = file.stat().st_size
            file.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed


def delete_store(path: str | Path) -> None:
    """Delete a store folder (refuses folders that are not stores)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise StoreError(f"'{path}' is not an activation store (no {MANIFEST}); nothing was deleted.")
    unexpected = [f.name for f in path.iterdir()
                  if not (f.name == MANIFEST or f.name.startswith("shard_") or f.name.endswith(".tmp"))]
    if unexpected:
        raise StoreError(f"'{path}' holds files that are not part of a store ({unexpected[0]}); delete it by hand.")
    shutil.rmtree(path)
