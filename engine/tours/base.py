"""What every guided tour returns, and the small helpers the tours share.

A tour is a function ``run_<tour>(lm, **try_this) -> TourResult``. Everything it shows is measured in
that call: the step texts are written *after* the computation, with the measured numbers formatted in,
so a sentence never states a number the run did not produce. ``checks`` list the measured figures with
the range they must lie in (probabilities in [0, 1], cosines in [-1, 1] ...); ``matches_paper`` says
whether this model shows the paper's effect (``None`` when the run cannot tell) with a one-line reason.

Figures travel as plain data (``figures[name] = {"kind": ..., ...}``: lists, floats, strings) so the
result pickles into ``st.cache_data`` and :mod:`components.tour_views` can draw it without model code.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.core.errors import UserError


class TourError(UserError):
    """A tour was asked for with settings it cannot run (unknown tour, bad parameter)."""


@dataclass
class Check:
    """A measured quantity (one value or a curve) and the closed range every value must lie in."""

    name: str
    values: list[float]
    lo: float
    hi: float

    @property
    def ok(self) -> bool:
        return all(math.isfinite(v) and self.lo <= v <= self.hi for v in self.values)

    def describe(self) -> str:
        shown = ", ".join(f"{v:.3g}" for v in self.values[:6]) + (" …" if len(self.values) > 6 else "")
        return f"{self.name}: [{shown}] in [{self.lo:g}, {self.hi:g}] → {'ok' if self.ok else 'OUT OF RANGE'}"


@dataclass
class TourStep:
    """Two or three sentences, and the name of the figure (in ``TourResult.figures``) shown beside them."""

    title: str
    text: str
    figure: str | None = None


@dataclass
class TourResult:
    tour: str
    title: str
    paper: str
    model: str
    params: dict
    steps: list[TourStep]
    figures: dict[str, dict] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    matches_paper: bool | None = None
    reason: str = ""
    measured: dict = field(default_factory=dict)  # the headline numbers, for notes and tests
    seconds: float = 0.0

    @property
    def checks_ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def failed_checks(self) -> list[str]:
        return [check.describe() for check in self.checks if not check.ok]

    def to_json(self) -> dict:
        return asdict(self)


# --- the checks ---------------------------------------------------------------------------------
def _floats(values: float | Iterable[float]) -> list[float]:
    array = np.asarray(values, dtype=float).ravel()
    return [float(v) for v in array]


def probability(name: str, values: float | Iterable[float]) -> Check:
    return Check(name, _floats(values), 0.0, 1.0)


def cosine(name: str, values: float | Iterable[float]) -> Check:
    return Check(name, _floats(values), -1.0 - 1e-6, 1.0 + 1e-6)


def accuracy(name: str, values: float | Iterable[float]) -> Check:
    return Check(name, _floats(values), 0.0, 1.0)


def nonnegative(name: str, values: float | Iterable[float], hi: float = float("inf")) -> Check:
    return Check(name, _floats(values), 0.0, hi)


def within(name: str, values: float | Iterable[float], lo: float, hi: float) -> Check:
    return Check(name, _floats(values), lo, hi)


# --- formatting ---------------------------------------------------------------------------------
def pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def layer_bands(layers: Sequence, mask: Sequence[bool]) -> list[tuple]:
    """Contiguous runs of ``layers`` where ``mask`` holds, as ``(first, last)`` pairs."""
    bands, start = [], None
    for index, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            bands.append((layers[start], layers[index - 1]))
            start = None
    return bands


def bands_text(bands: Sequence[tuple]) -> str:
    """``[(12, 15), (17, 17)]`` -> ``"12–15 and 17"``; empty -> ``"no layer"``."""
    if not bands:
        return "no layer"
    parts = [str(a) if a == b else f"{a}–{b}" for a, b in bands]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def band_around(values: Sequence[float], peak: int, fraction: float) -> tuple[int, int]:
    """The contiguous index range around ``peak`` where ``values >= fraction * values[peak]``."""
    threshold = fraction * values[peak]
    lo = hi = peak
    while lo > 0 and values[lo - 1] >= threshold:
        lo -= 1
    while hi < len(values) - 1 and values[hi + 1] >= threshold:
        hi += 1
    return lo, hi


def first_reaching(layers: Sequence, values: Sequence[float], fraction: float = 0.9):
    """The first layer whose value reaches ``fraction`` of the best value (None for an empty curve)."""
    if not len(values):
        return None
    best = max(values)
    return next(layer for layer, value in zip(layers, values) if value >= fraction * best)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run small-matrix numerics (spread measures, probes, PCA of a few hundred points) on one thread, for
    numpy's BLAS and torch alike. Matrices this small gain nothing from threads, but a thread pool that
    spin-waits on a busy CPU costs a lot: 18 layers of spread measures on 280 x 640 points took 217 s with
    two BLAS threads and 1.3 s with one on a loaded 2-core machine (measured). Both limits are process-wide,
    so they are restored right after; model forward passes stay outside and keep every thread."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def timed(fn: Callable[..., TourResult]) -> Callable[..., TourResult]:
    """Record how long a tour took in ``result.seconds``."""
    def wrapper(*args, **kwargs) -> TourResult:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        result.seconds = round(time.perf_counter() - start, 2)
        return result

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn  # type: ignore[attr-defined]
    return wrapper
