"""The result tables next to a dashboard (``explanations``, ``scores``, ``labels``): read, and upsert by key.

An upsert reads the table, replaces the rows with the same key, and writes the whole table to a temporary file
moved into place (:func:`engine.core.fileio.atomic_write`), so readers never see a half-written file and a killed
job loses at most the batch in flight. Writers of one table are serialised by a thread lock plus an advisory
``flock`` on a hidden lock file, so two jobs on the same dashboard do not drop each other's rows.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from engine.core.fileio import atomic_write

EXPLANATIONS = "explanations.parquet"
SCORES = "scores.parquet"
LABELS = "labels.parquet"
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def now() -> str:
    """UTC time stamp to the second, ISO 8601 (sorts as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextmanager
def locked(path: Path):
    path = Path(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(str(path.resolve()), threading.Lock())
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = (path.parent / f".{path.name}.lock").open("a")
        try:
            try:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX)
            except (ImportError, OSError):  # no advisory locks here (Windows, some network disks)
                pass
            yield
        finally:
            handle.close()  # closing releases the flock


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """The table at ``path`` (missing columns added empty), or an empty one with ``columns``."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    frame = pd.read_parquet(path)
    for column in columns:
        if column not in frame.columns:
            frame[column] = None
    return frame


def write_table(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def upsert(path: Path, rows: pd.DataFrame, key: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Replace the rows of ``path`` whose ``key`` columns match a row of ``rows`` (append the rest); returns all."""
    key = list(key)
    with locked(path):
        old = read_table(path, columns)
        rows = rows[list(columns)]
        if len(old) and len(rows):
            new_keys = pd.MultiIndex.from_frame(rows[key].astype(str))
            old_keys = pd.MultiIndex.from_frame(old[key].astype(str))
            old = old[~old_keys.isin(new_keys)]
        parts = [frame for frame in (old[list(columns)], rows) if len(frame)]
        table = pd.concat(parts, ignore_index=True) if parts else rows
        table = table.sort_values(key, kind="stable").reset_index(drop=True)
        write_table(path, table)
        return table
