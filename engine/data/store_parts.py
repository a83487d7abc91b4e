"""Sharded capture: one store written by several workers, part by part, merged through its manifest.

A capture of ``max_tokens`` tokens is cut into contiguous **parts** by corpus windows
(:func:`plan_parts`): part ``i`` covers windows ``[window_start, window_stop)`` and exactly ``rows`` stored
rows, and every part starts at a multiple of ``batch_size``, so its batches are the single-process
capture's batches and its values are the same bytes. The last part runs to the end (``window_stop``
None), so the last batch also holds the windows the single run computes but does not store.

Layout of a sharded store folder ``out``::

    parts.json                 the plan (reused by a resubmission, whatever the worker count)
    parts/p00000/...           part 0: an ordinary store (its own manifest and shards, resumable)
    parts/p00001/...
    manifest.json              the merged manifest: the shards of every finished part, in part order

Each part is captured by :func:`engine.data.store_writer.build_store` with ``window_range`` into its own
subfolder (one writer per subfolder); :func:`merge_manifests` rewrites ``manifest.json`` atomically after
each finished part. Until every part is done the merged manifest says ``complete: false`` and lists the
finished parts only (readable with ``ActivationStore.open(out, allow_incomplete=True)``); a resubmission
skips finished parts and resumes unfinished ones from their own last shard.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.fileio import atomic_write_json
from engine.data.store import MANIFEST, StoreError
from engine.data.windows import iter_windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PLAN = "parts.json"
PARTS_DIR = "parts"


@dataclass(frozen=True)
class Part:
    index: int
    window_start: int
    window_stop: int | None  # None: to the end of the corpus (the last part)
    row_start: int           # first row of the part in the merged store
    rows: int                # rows the part stores
    first_doc: int = 0       # documents before it are skipped untokenized (:func:`part_texts`)
    window_offset: int = 0   # windows of those documents: the part's own manifest counts windows after them

    def local_range(self) -> tuple[int, int | None]:
        """The part's windows in its own stream (documents before ``first_doc`` given as empty texts)."""
        stop = None if self.window_stop is None else self.window_stop - self.window_offset
        return self.window_start - self.window_offset, stop


def part_dir(out: str | Path, index: int) -> Path:
    return Path(out) / PARTS_DIR / f"p{index:05d}"


def part_texts(texts: Iterable[str], part: Part) -> Iterator[str]:
    """The corpus as a part reads it: documents before its first one as empty texts (no windows, nothing to
    tokenize), so document ids stay those of the whole corpus."""
    for doc, text in enumerate(texts):
        yield "" if doc < part.first_doc else text


def window_rows(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], context_length: int,
                max_tokens: int) -> tuple[list[int], list[int]]:
    """Stored rows and document of each window of the corpus until ``max_tokens`` rows (the last window may
    store fewer)."""
    rows, docs, total = [], [], 0
    for window in iter_windows(tokenizer, texts, context_length):
        take = min(len(window.ids), max_tokens - total)
        rows.append(take)
        docs.append(window.doc)
        total += take
        if total >= max_tokens:
            break
    return rows, docs


def plan_parts(rows_per_window: list[int], batch_size: int, n_parts: int, docs: list[int] | None = None
               ) -> list[Part]:
    """Cut the windows into at most ``n_parts`` contiguous parts of whole batches, balanced by rows
    (``docs``: each window's document, to let a part skip the documents before its first window)."""
    if not rows_per_window or sum(rows_per_window) == 0:
        raise StoreError("The corpus produced no tokens; give a corpus with some text.")
    n_batches = math.ceil(len(rows_per_window) / batch_size)
    batch_rows = [sum(rows_per_window[b * batch_size:(b + 1) * batch_size]) for b in range(n_batches)]
    n_parts = max(1, min(n_parts, n_batches))
    total, target = sum(batch_rows), sum(batch_rows) / n_parts
    bounds, acc = [0], 0
    for b, rows in enumerate(batch_rows[:-1]):
        acc += rows
        if len(bounds) < n_parts and acc >= target * len(bounds):
            bounds.append(b + 1)
    bounds.append(n_batches)
    parts, row_start = [], 0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = sum(batch_rows[lo:hi])
        last = i == len(bounds) - 2
        start = lo * batch_size
        first_doc = docs[start] if docs else 0
        offset = docs.index(first_doc) if docs else 0
        parts.append(Part(i, start, None if last else hi * batch_size, row_start, rows, first_doc, offset))
        row_start += rows
    assert row_start == total
    return parts


def load_or_write_plan(out: Path, plan: list[Part], key: dict) -> list[Part]:
    """The plan already in ``out`` for the same capture (``key``), else ``plan`` written there."""
    file = out / PLAN
    try:
        old = json.loads(file.read_text()) if file.is_file() else None
    except ValueError:
        old = None
    if old is not None and old.get("key") == key:
        return [Part(**p) for p in old["parts"]]
    if old is not None and any(part_dir(out, p["index"]).exists() for p in old.get("parts", [])):
        raise StoreError(f"The folder '{out}' holds parts of a different sharded capture; choose another output "
                         "folder or delete that store.")
    atomic_write_json(file, {"key": key, "parts": [asdict(p) for p in plan]})
    return plan


def part_done(out: Path, part: Part) -> bool:
    return _finished(_read(part_dir(out, part.index) / MANIFEST), part)


def _finished(manifest: dict | None, part: Part) -> bool:
    return bool(manifest and manifest.get("complete") and (int(manifest.get("n_tokens", 0)) >= part.rows
                                                           or manifest.get("exhausted")))


def part_tokens(out: Path, part: Part) -> int:
    """Rows of the part committed so far (for progress)."""
    manifest = _read(part_dir(out, part.index) / MANIFEST)
    return int(manifest.get("n_tokens", 0)) if manifest else 0


def _read(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, ValueError):
        return None


def merge_manifests(out: Path, parts: list[Part], max_tokens: int) -> dict:
    """Write ``out/manifest.json`` listing the shards of every finished part in part order (atomically).

    ``complete`` once every part is finished; ``n_windows`` and shard ``windows_end`` stay absolute corpus
    window indices (each part records them so). Returns the merged manifest.
    """
    merged: dict | None = None
    shards: list[dict] = []
    done: list[int] = []
    for part in parts:
        manifest = _read(part_dir(out, part.index) / MANIFEST)
        if not _finished(manifest, part):
            continue
        if merged is None:
            merged = {k: v for k, v in manifest.items() if k not in ("shards", "updated")}
        prefix = part_dir(out, part.index).relative_to(out).as_posix()
        shards.extend(_absolute(shard, prefix, part.window_offset) for shard in manifest["shards"])
        done.append(part.index)
    if merged is None:
        return {}
    n_tokens = sum(int(s["rows"]) for s in shards)
    complete = len(done) == len(parts)
    merged.update({"shards": shards, "n_tokens": n_tokens, "max_tokens": max_tokens, "complete": complete,
                   "exhausted": complete and n_tokens < max_tokens,
                   "n_windows": int(shards[-1]["windows_end"]) if shards else 0,
                   "n_clamped": sum(int(s.get("n_clamped", 0)) for s in shards),
                   "parts": {"total": len(parts), "done": done},
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(out / MANIFEST, merged)
    return merged


def _absolute(shard: dict, prefix: str, offset: int) -> dict:
    """A part's shard entry as the merged manifest lists it: path from the store folder, corpus window indices."""
    moved = {**shard, "file": f"{prefix}/{shard['file']}"}
    for key in ("windows_end", "resume_window"):
        if key in moved:
            moved[key] = int(moved[key]) + offset
    return moved
