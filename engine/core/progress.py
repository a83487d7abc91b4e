"""The one progress-callback type every long engine function accepts.

``progress(fraction, message)``: ``fraction`` in [0, 1], ``message`` a short status line. The CLI hands
in a tqdm bar, the job runner a writer of the job's state file, tests a list's ``append``.
"""
from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def report(progress: Progress | None, fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def scaled(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A callback for a sub-task that maps its [0, 1] onto [start, end] of the parent's."""
    if progress is None:
        return None
    return lambda fraction, message="": report(progress, start + (end - start) * fraction, message)
