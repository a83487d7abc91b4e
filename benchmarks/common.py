"""Shared helpers for the benchmarks: timing with warm-up, a fixed English text, a result table."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def english_text(min_chars: int = 20_000) -> str:
    """Deterministic English prose from the standard library's docstrings (no files shipped)."""
    import collections
    import functools
    import json
    import pathlib
    import textwrap

    parts = []
    for module in (collections, functools, json, pathlib, textwrap, statistics, time):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                parts.append(" ".join(doc.split()))
        if sum(map(len, parts)) > min_chars:
            break
    return " ".join(parts)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
