"""A feature's contexts, read from its dashboard and split so that no scored context is ever shown to the explainer.

**Held-out split** (deterministic, the same for explaining and scoring, see :func:`split_rows`):

- top activating examples: even ranks (0, 2, 4, ...) go to the explainer, odd ranks are held out for scoring;
- interval samples (across the activation range): the first ``explain_per_interval`` of each interval go to the
  explainer, the rest are held out;
- a store row chosen for both sides goes to the explainer only, and after the windows are read, every held-out
  context whose token window overlaps a window shown to the explainer is dropped (:func:`held_out`).

**Non-activating contexts** for detection (:func:`non_activating`): "similar" ones from the top examples of the
feature's decoder neighbours, and "random" ones at uniformly drawn store rows (seeded by the feature); a window is
kept only if the feature is zero on every token in it.

Windows are ``before`` tokens before the row and ``after`` after it, clipped to the store window.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.core.errors import UserError


class AutointerpError(UserError):
    """Explaining, scoring or searching cannot proceed with the given dashboard, backend or setting."""


@dataclass(frozen=True)
class ExampleConfig:
    """How a feature's contexts are cut and marked (part of every prompt hash); use the same for explain and score."""

    before: int = 12
    after: int = 4
    explain_per_interval: int = 1  # interval samples per interval shown to the explainer (the rest are held out)
    mark_fraction: float = 0.25  # tokens with act >= this x the feature's max are marked (the focus token always)
    n_logits: int = 8  # top positive logit tokens in the explainer prompt
    max_explain: int = 12  # excerpts in the explainer prompt (2/3 top examples, 1/3 interval samples); 0: all

    def check(self) -> None:
        for name in ("before", "after", "explain_per_interval", "n_logits", "max_explain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AutointerpError(f"The example setting '{name}' must be a non-negative integer (found {value!r}).")
        if not 0.0 <= float(self.mark_fraction) <= 1.0:
            raise AutointerpError(f"mark_fraction must lie in [0, 1] (found {self.mark_fraction!r}).")

    def key(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """A token window around store row ``row`` (at index ``focus``) with the feature's activation on every token."""

    row: int
    tokens: list[str]
    acts: list[float]
    focus: int
    source: str = "top"  # top | interval | similar | random

    @property
    def lo(self) -> int:
        return self.row - self.focus

    @property
    def hi(self) -> int:
        return self.lo + len(self.tokens)

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureExamples:
    """What the explainer sees (``explain``) and what is held out for scoring (``held_out``)."""

    feature: int
    max_act: float
    explain: list[Context] = field(default_factory=list)
    held_out: list[Context] = field(default_factory=list)
    logits: list[str] = field(default_factory=list)


# --- dashboards and tokenizers ------------------------------------------------------------------
def open_dashboard(dashboard):
    """A ``Dashboard`` as is, or the dashboard folder at this path opened."""
    if isinstance(dashboard, (str, bytes)) or hasattr(dashboard, "__fspath__"):
        from engine.features.read import Dashboard

        return Dashboard.open(dashboard)
    return dashboard


@functools.lru_cache(maxsize=4)
def tokenizer_for(spec: str):
    """The tokenizer of the model a store was captured with (tiny models, hub ids and folders without loading
    weights; embedded and .gguf models through :func:`engine.core.models.load_model`)."""
    from engine.core.models import resolve

    if not spec:
        raise AutointerpError("The dashboard's manifest names no model, so its tokens cannot be decoded; "
                              "pass the model's tokenizer.")
    source = resolve(spec)
    if source.kind == "tiny":
        from engine.core.tiny import make_tokenizer

        return make_tokenizer()
    if source.kind in ("local", "hub"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source.path or source.spec))
    from engine.core.models import load_model

    return load_model(spec, device="cpu", check=False).tokenizer


def dashboard_tokenizer(dashboard, tokenizer=None):
    return tokenizer if tokenizer is not None else tokenizer_for(str(dashboard.manifest.get("model") or ""))


# --- the split ----------------------------------------------------------------------------------
def split_rows(top_rows: Sequence[int], interval_rows: Sequence[int], interval_ranks: Sequence[int],
               explain_per_interval: int = 1) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(explain, held_out)`` lists of ``(row, source)``: ``top_rows`` in rank order (even ranks explain),
    ``interval_rows`` with their rank inside their interval (ranks below ``explain_per_interval`` explain).
    A row never appears on both sides nor twice on one."""
    explain: list[tuple[int, str]] = []
    held: list[tuple[int, str]] = []
    for rank, row in enumerate(top_rows):
        (explain if rank % 2 == 0 else held).append((int(row), "top"))
    for row, rank in zip(interval_rows, interval_ranks):
        (explain if int(rank) < explain_per_interval else held).append((int(row), "interval"))
    shown: set[int] = set()
    explain_unique = []
    for row, source in explain:
        if row not in shown:
            shown.add(row)
            explain_unique.append((row, source))
    held_unique, seen = [], set(shown)
    for row, source in held:
        if row not in seen:
            seen.add(row)
            held_unique.append((row, source))
    return explain_unique, held_unique


def held_out(shown: Sequence[Context], candidates: Sequence[Context]) -> list[Context]:
    """The candidates whose token windows overlap none of the shown windows."""
    if not shown or not candidates:
        return list(candidates)
    s_lo = np.array([c.lo for c in shown])[None, :]
    s_hi = np.array([c.hi for c in shown])[None, :]
    c_lo = np.array([c.lo for c in candidates])[:, None]
    c_hi = np.array([c.hi for c in candidates])[:, None]
    overlaps = ((c_lo < s_hi) & (s_lo < c_hi)).any(axis=1)
    return [c for c, bad in zip(candidates, overlaps) if not bad]


def _contexts(dash, feature: int, rows: Sequence[int], sources: Sequence[str], tokenizer,
              config: ExampleConfig) -> list[Context]:
    if not rows:
        return []
    found = dash.contexts(feature, list(rows), tokenizer, before=config.before, after=config.after)
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])  # <bos> and friends are not text
    return [Context(int(c["row"]), ["" if t in special else t for t in c["tokens"]], [float(a) for a in c["acts"]],
                    int(c["focus"]), source)
            for c, source in zip(found, sources)]


def feature_examples(dashboard, feature: int, tokenizer, config: ExampleConfig | None = None) -> FeatureExamples:
    """The feature's explainer contexts, held-out activating contexts and top positive logit tokens."""
    config = config or ExampleConfig()
    dash = open_dashboard(dashboard)
    f = dash.check_feature(feature)
    top = dash.query("SELECT row FROM top_examples WHERE feature = ? ORDER BY rank", [f])
    intervals = dash.query("SELECT row, rank FROM intervals WHERE feature = ? ORDER BY interval DESC, rank", [f])
    stats = dash.query("SELECT max_act FROM features WHERE feature = ?", [f])
    logits = dash.query("SELECT token FROM logits WHERE feature = ? AND sign = '+' ORDER BY rank LIMIT ?",
                        [f, int(config.n_logits)])
    explain_rows, held_rows = split_rows(top["row"].tolist(), intervals["row"].tolist(), intervals["rank"].tolist(),
                                         config.explain_per_interval)
    rows = [r for r, _ in explain_rows + held_rows]
    sources = [s for _, s in explain_rows + held_rows]
    contexts = _contexts(dash, f, rows, sources, dashboard_tokenizer(dash, tokenizer), config)
    shown, candidates = contexts[:len(explain_rows)], contexts[len(explain_rows):]
    max_act = float(stats["max_act"].iloc[0]) if len(stats) else 0.0
    return FeatureExamples(f, max_act, shown, held_out(shown, candidates),
                           [str(t) for t in logits["token"].tolist()])


def non_activating(dashboard, feature: int, tokenizer, n: int, *, seed: int = 0,
                   config: ExampleConfig | None = None, similar_share: float = 0.5) -> list[Context]:
    """Up to ``n`` windows on which the feature is zero everywhere: about ``similar_share`` of them from its decoder
    neighbours' top examples (source ``similar``), the rest at random store rows (source ``random``)."""
    config = config or ExampleConfig()
    dash = open_dashboard(dashboard)
    f = dash.check_feature(feature)
    if n <= 0:
        return []
    tokenizer = dashboard_tokenizer(dash, tokenizer)
    n_similar = int(round(n * similar_share))
    similar = dash.query("SELECT t.row FROM neighbours n JOIN top_examples t ON t.feature = n.neighbour "
                         "WHERE n.feature = ? ORDER BY n.rank, t.rank LIMIT ?", [f, 3 * max(n_similar, 1)])
    store = dash.store()
    rng = np.random.default_rng([int(seed), f])
    drawn = rng.integers(0, store.n_tokens, size=4 * n)
    positions = store.positions().numpy()
    drawn = [int(r) for r in dict.fromkeys(drawn.tolist()) if positions[r] != 0]
    similar_rows = list(dict.fromkeys(int(r) for r in similar["row"].tolist()))
    contexts = _contexts(dash, f, similar_rows + drawn, ["similar"] * len(similar_rows) + ["random"] * len(drawn),
                         tokenizer, config)
    quiet = [c for c in contexts if c.max_act <= 0.0]
    chosen: list[Context] = []
    for c in [c for c in quiet if c.source == "similar"][:n_similar] + [c for c in quiet if c.source == "random"]:
        if len(chosen) < n and held_out(chosen, [c]):
            chosen.append(c)
    for c in quiet:  # too few random ones: fill with further similar ones
        if len(chosen) >= n:
            break
        if c not in chosen and held_out(chosen, [c]):
            chosen.append(c)
    return chosen
