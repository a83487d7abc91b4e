"""Explain features with a chat backend; results go to ``explanations.parquet`` next to the dashboards.

Columns: ``feature``, ``explanation``, ``explainer`` (the backend's name), ``prompt_hash`` (of the messages and the
generation settings), ``time`` (UTC, ISO 8601), ``error`` ("" on success, else the reason), ``seconds`` (the batch's
wall time divided by its features). One row per (feature, explainer): explaining again with another backend adds
rows, with the same backend replaces them.

Resumable at feature granularity: the table is rewritten atomically after every batch; a feature already explained
by the same explainer with the same prompt hash is skipped, a failed one is tried again. ``should_stop()`` is checked
between batches; work finished before it is kept.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from engine.autointerp.backends import ChatBackend
from engine.autointerp.examples import (
    ExampleConfig,
    dashboard_tokenizer,
    feature_examples,
    open_dashboard,
)
from engine.autointerp.prompts import explainer_messages, parse_explanation, prompt_hash
from engine.autointerp.tables import EXPLANATIONS, now, read_table, upsert
from engine.core.progress import Progress, report

COLUMNS = ("feature", "explanation", "explainer", "prompt_hash", "time", "error", "seconds")


@dataclass
class ExplainConfig:
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    max_tokens: int = 60  # tokens the explainer may write


def select_features(dash, features: Sequence[int] | None) -> list[int]:
    """The given features (checked, duplicates dropped, order kept), or every live feature of the dashboard."""
    if features is None:
        return [int(f) for f in dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY feature")["feature"]]
    return list(dict.fromkeys(dash.check_feature(f) for f in features))


def read_explanations(folder: str | Path, explainer: str | None = None, *, successful: bool = True) -> pd.DataFrame:
    """One row per feature: its newest (successful, unless told otherwise) explanation, of ``explainer`` if given."""
    table = read_table(Path(folder) / EXPLANATIONS, COLUMNS)
    if explainer is not None:
        table = table[table["explainer"] == explainer]
    if successful:
        table = table[(table["error"].fillna("") == "") & (table["explanation"].fillna("") != "")]
    table = table.sort_values(["feature", "time"], kind="stable").groupby("feature", as_index=False).tail(1)
    return table.reset_index(drop=True)


def _row(feature: int, explanation: str, explainer: str, digest: str, error: str, seconds: float) -> dict:
    return {"feature": int(feature), "explanation": explanation, "explainer": explainer, "prompt_hash": digest,
            "time": now(), "error": error, "seconds": float(seconds)}


def explain_features(dashboard, backend: ChatBackend, features: Sequence[int] | None = None, *, tokenizer=None,
                     out_dir: str | Path | None = None, config: ExplainConfig | None = None,
                     progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Explain ``features`` (default: every live one) of a dashboard (a ``Dashboard`` or its folder).

    ``tokenizer`` decodes the store's tokens (default: the dashboard's model's). Returns a summary:
    ``path``, ``features``, ``explained``, ``failed``, ``skipped``, ``stopped``, ``seconds``.
    """
    config = config or ExplainConfig()
    config.examples.check()
    dash = open_dashboard(dashboard)
    tokenizer = dashboard_tokenizer(dash, tokenizer)
    chosen = select_features(dash, features)
    path = Path(out_dir if out_dir is not None else dash.path) / EXPLANATIONS
    old = read_table(path, COLUMNS)
    mine = old[(old["explainer"] == backend.name) & (old["error"].fillna("") == "")]
    done = dict(zip(mine["feature"].astype(int), mine["prompt_hash"]))
    counts = {"explained": 0, "failed": 0, "skipped": 0}
    started, stopped = time.time(), False
    step = max(1, int(backend.batch_size))
    report(progress, 0.0, f"explaining {len(chosen):,} features with {backend.name}")
    for start in range(0, len(chosen), step):
        if should_stop is not None and should_stop():
            stopped = True
            break
        rows, pending = [], []
        for f in chosen[start:start + step]:
            examples = feature_examples(dash, f, tokenizer, config.examples)
            messages = explainer_messages(examples, config.examples)
            digest = prompt_hash(messages, {"max_tokens": config.max_tokens})
            if done.get(f) == digest:
                counts["skipped"] += 1
            elif not examples.explain:
                rows.append(_row(f, "", backend.name, digest, "The feature never fired on the dashboard's store, "
                                 "so there is nothing to explain.", 0.0))
            else:
                pending.append((f, messages, digest))
        batch_started = time.time()
        answers = backend.chat_batch([m for _, m, _ in pending], config.max_tokens) if pending else []
        each = (time.time() - batch_started) / max(len(pending), 1)
        for (f, _, digest), answer in zip(pending, answers):
            text = parse_explanation(answer.text) if answer.ok else None
            error = answer.error or ("" if text else "The explainer's answer held no explanation (it was empty).")
            rows.append(_row(f, text or "", backend.name, digest, error, each))
        if rows:
            upsert(path, pd.DataFrame(rows), ["feature", "explainer"], COLUMNS)
            counts["failed"] += sum(1 for r in rows if r["error"])
            counts["explained"] += sum(1 for r in rows if not r["error"])
        finished = min(start + step, len(chosen))
        report(progress, finished / max(len(chosen), 1),
               f"{finished:,}/{len(chosen):,} features ({counts['failed']:,} failed, {counts['skipped']:,} skipped)")
    return {"path": str(path), "features": len(chosen), **counts, "stopped": stopped,
            "seconds": round(time.time() - started, 3)}
