"""A dashboard folder on disk: its file names, format version, error type, and the helpers both the
writer (:mod:`engine.features.build`) and the reader (:mod:`engine.features.read`) need.

A dashboard lives in ``cache/dashboards/<key>/`` as parquet tables (``features``, ``histograms``,
``top_examples``, ``intervals``, ``logits``, ``neighbours``, ``cooccurrence``) plus ``manifest.json``, written
atomically, the manifest last (a folder without a manifest is incomplete). Contexts are not stored: they are
rebuilt from the store's token ids (:meth:`engine.features.read.Dashboard.contexts`).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.core.devices import to_host
from engine.core.errors import UserError
from engine.core.fileio import atomic_write, sha256_file
from engine.sae.metrics import DENSE_DENSITY  # noqa: F401  (one definition, re-used by the pages)

DASHBOARD_FORMAT = 3  # 3: order-independent interval samples and top-k ties (mergeable across workers)
MANIFEST = "manifest.json"
TABLES = ("features", "histograms", "top_examples", "intervals", "logits", "neighbours", "cooccurrence")


class DashboardError(UserError):
    """A dashboard cannot be built or read from the given SAE, store or folder."""


def dashboards_root() -> Path:
    """``cache/dashboards``: where dashboards are built unless told otherwise."""
    from engine.core.models import cache_root

    return cache_root() / "dashboards"


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def sae_digest(sae_dir: str | Path) -> str:
    """sha256 of the SAE's weights file (memoised by path, size and mtime)."""
    from engine.sae.io import WEIGHTS_FILE

    path = Path(sae_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise DashboardError(f"'{sae_dir}' holds no {WEIGHTS_FILE}, so it is not an SAE folder.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key not in _HASHES:
            _HASHES[key] = sha256_file(path)
        return _HASHES[key]


def write_parquet(columns: dict[str, Sequence], path: Path) -> None:
    """Write equal-length columns (tensors on any device and dtype, numpy arrays or lists) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: (to_host(values).numpy() if isinstance(values, torch.Tensor) else values)
                      for name, values in columns.items()})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def decode_tokens(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """``{token id: its text}`` for the distinct ids (one ``batch_decode``)."""
    unique = sorted({int(i) for i in ids})
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]))) if unique else {}
