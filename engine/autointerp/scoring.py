"""Score explanations by detection and fuzzing (the two cheap scorers of EleutherAI's delphi), ``scores.parquet``.

Every trial is one prompt with one context, answered yes or no (:mod:`engine.autointerp.prompts`): an endpoint
writes its answer; a local model's answer is read from its next-token logits for yes vs no in one forward pass
(:meth:`engine.autointerp.backends.LocalChatBackend.judge_batch`), so it never gives an unclear answer. Only held-out
contexts are used (:func:`engine.autointerp.examples.feature_examples`), never one the explainer saw.

- **Detection**: up to ``n_activating`` held-out activating contexts (top examples and interval samples, so the
  whole activation range) against up to ``n_non_activating`` contexts on which the feature is zero everywhere
  (about half "similar" ones from its decoder neighbours' top examples, the rest random store windows). The scorer
  is asked whether the feature, as explained, fires in the text. Truth: activating or not.
- **Fuzzing**: the held-out activating contexts, half (chosen by a seeded shuffle) with the truly activating tokens
  marked, half with as many other tokens marked at random. The scorer is asked whether the marked tokens are the
  ones the explanation describes. Truth: the marking is the true one.

Each score is the balanced accuracy ``(TPR + TNR) / 2`` over the trials the scorer answered with a clear yes or no
(0.5 = chance, 1 = perfect); ``*_n`` counts those trials, ``invalid`` the unclear answers left out. A scorer that
gives a graded answer (a local model: its yes-minus-no logit) also gets ``*_auc``, the area under the ROC curve of
that grade against the truth, which does not depend on where the scorer puts its yes/no threshold (a small model
that answers "yes" to everything has balanced accuracy 0.5 whatever it has understood; its AUC can still tell).
Columns: ``feature``, ``explainer``, ``scorer``, ``explanation``, ``detection``, ``detection_n``, ``detection_auc``,
``fuzzing``, ``fuzzing_n``, ``fuzzing_auc``, ``invalid``, ``prompt_hash``, ``time``, ``error``. One row per (feature, explainer, scorer);
resumable as :mod:`engine.autointerp.explain` (same prompts: skipped; failed: tried again).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine.autointerp.backends import ChatBackend
from engine.autointerp.examples import (
    AutointerpError,
    Context,
    ExampleConfig,
    dashboard_tokenizer,
    feature_examples,
    non_activating,
    open_dashboard,
)
from engine.autointerp.explain import read_explanations
from engine.autointerp.prompts import (
    activating_marks,
    detection_messages,
    fuzzing_messages,
    parse_yes_no,
    prompt_hash,
)
from engine.autointerp.tables import SCORES, now, read_table, upsert
from engine.core.progress import Progress, report

COLUMNS = ("feature", "explainer", "scorer", "explanation", "detection", "detection_n", "detection_auc", "fuzzing",
           "fuzzing_n", "fuzzing_auc", "invalid", "prompt_hash", "time", "error")
METHODS = ("detection", "fuzzing")


@dataclass
class ScoreConfig:
    examples: ExampleConfig = field(default_factory=ExampleConfig)  # must equal the one used to explain
    n_activating: int = 10
    n_non_activating: int = 10
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    max_tokens: int = 5

    def check(self) -> None:
        self.examples.check()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise AutointerpError(f"Unknown scoring method {unknown[0] if unknown else '(none)'}; choose from "
                                  f"{', '.join(METHODS)}.")
        if self.n_activating < 1 or self.n_non_activating < 0:
            raise AutointerpError("Scoring needs at least one activating context per feature.")


@dataclass
class Trial:
    method: str  # detection | fuzzing
    truth: bool
    messages: list[dict]


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """``(TPR + TNR) / 2``: the mean of the recall on the positives and on the negatives.

    NaN when there are no trials; with only one class present, that class's recall."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"truth and predicted differ in length ({t.size} vs {p.size})")
    recalls = [float((p[t == cls] == cls).mean()) for cls in (True, False) if (t == cls).any()]
    return float(np.mean(recalls)) if recalls else math.nan


def roc_auc(truth: Sequence[bool], grade: Sequence[float]) -> float:
    """Area under the ROC curve of ``grade`` against ``truth``; NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(truth, dtype=bool)
    return float(roc_auc_score(t, np.asarray(grade, dtype=float))) if 0 < t.sum() < t.size else math.nan


def wrong_marks(context: Context, true_marks: set[int], rng: np.random.Generator) -> set[int]:
    """As many marks as ``true_marks``, on other (non-blank) tokens chosen at random; empty if there are none."""
    others = [i for i, t in enumerate(context.tokens) if i not in true_marks and t.strip()]
    if not others:
        return set()
    k = min(max(len(true_marks), 1), len(others))
    return {int(i) for i in rng.choice(others, size=k, replace=False)}


def build_trials(dashboard, feature: int, explanation: str, tokenizer, config: ScoreConfig | None = None
                 ) -> list[Trial]:
    """The feature's detection and fuzzing trials (deterministic for a seed)."""
    config = config or ScoreConfig()
    dash = open_dashboard(dashboard)
    examples = feature_examples(dash, feature, tokenizer, config.examples)
    rng = np.random.default_rng([int(config.seed), int(feature)])
    positives = examples.held_out[:config.n_activating]
    trials: list[Trial] = []
    if "detection" in config.methods and positives:
        negatives = non_activating(dash, feature, tokenizer, config.n_non_activating, seed=config.seed,
                                   config=config.examples)
        trials += [Trial("detection", True, detection_messages(explanation, c)) for c in positives]
        trials += [Trial("detection", False, detection_messages(explanation, c)) for c in negatives]
    if "fuzzing" in config.methods and positives:
        order = rng.permutation(len(positives))
        for index, position in enumerate(order):
            context = positives[int(position)]
            marks = activating_marks(context, examples.max_act, config.examples.mark_fraction)
            correct = index % 2 == 0
            if not correct:
                marks = wrong_marks(context, marks, rng)
            if marks:
                trials.append(Trial("fuzzing", correct, fuzzing_messages(explanation, context, marks)))
    return trials


def _summarise(trials: list[Trial], answers: list) -> dict:
    out: dict = {"invalid": 0}
    errors = []
    for method in METHODS:
        truth, predicted, grades = [], [], []
        for trial, answer in zip(trials, answers):
            if trial.method != method:
                continue
            said = parse_yes_no(answer.text) if answer.ok else None
            if said is None:
                out["invalid"] += 1
                if not answer.ok:
                    errors.append(answer.error)
                continue
            truth.append(trial.truth)
            predicted.append(said)
            grades.append(answer.score)
        out[method] = balanced_accuracy(truth, predicted) if truth else math.nan
        out[f"{method}_n"] = len(truth)
        graded = truth and all(g is not None for g in grades)
        out[f"{method}_auc"] = roc_auc(truth, grades) if graded else math.nan
    valid = out["detection_n"] + out["fuzzing_n"]
    if not valid:
        out["error"] = errors[0] if errors else "The scorer answered no trial with a clear yes or no."
    return out


def _judge(backend: ChatBackend, trials: list[Trial], max_tokens: int) -> list:
    """The backend's answers to one feature's trials, asked one method at a time: the trials of a method share
    their prompt up to the text, which a local scorer then computes once."""
    answers: list = [None] * len(trials)
    for method in METHODS:
        chosen = [i for i, t in enumerate(trials) if t.method == method]
        if chosen:
            for i, answer in zip(chosen, backend.judge_batch([trials[i].messages for i in chosen], max_tokens)):
                answers[i] = answer
    return answers


def score_features(dashboard, backend: ChatBackend, features: Sequence[int] | None = None, *,
                   explainer: str | None = None, tokenizer=None, out_dir: str | Path | None = None,
                   config: ScoreConfig | None = None, progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Score the newest successful explanation (of ``explainer`` if given) of ``features`` (default: every
    explained feature) with ``backend`` as the scorer; ``out_dir`` holds ``explanations.parquet`` and gets
    ``scores.parquet`` (default: the dashboard folder). Returns a summary like :func:`explain_features`."""
    config = config or ScoreConfig()
    config.check()
    dash = open_dashboard(dashboard)
    tokenizer = dashboard_tokenizer(dash, tokenizer)
    folder = Path(out_dir if out_dir is not None else dash.path)
    explained = read_explanations(folder, explainer)
    if features is not None:
        wanted = {dash.check_feature(f) for f in features}
        explained = explained[explained["feature"].astype(int).isin(wanted)]
    if explained.empty:
        raise AutointerpError("No explained features to score: explain some features first"
                              + (f" with {explainer}." if explainer else "."))
    path = folder / SCORES
    old = read_table(path, COLUMNS)
    mine = old[(old["scorer"] == backend.name) & (old["error"].fillna("") == "")]
    done = {(int(f), str(e)): h for f, e, h in zip(mine["feature"], mine["explainer"], mine["prompt_hash"])}
    todo = list(explained[["feature", "explainer", "explanation"]].itertuples(index=False, name=None))
    counts = {"scored": 0, "failed": 0, "skipped": 0}
    started, stopped = time.time(), False
    step = max(1, int(backend.batch_size) // 8)
    report(progress, 0.0, f"scoring {len(todo):,} explanations with {backend.name}")
    for start in range(0, len(todo), step):
        if should_stop is not None and should_stop():
            stopped = True
            break
        rows, pending = [], []
        for f, who, text in todo[start:start + step]:
            trials = build_trials(dash, int(f), str(text), tokenizer, config)
            digest = prompt_hash([t.messages for t in trials], {"max_tokens": config.max_tokens})
            if done.get((int(f), str(who))) == digest:
                counts["skipped"] += 1
                continue
            rows.append({"feature": int(f), "explainer": who, "scorer": backend.name, "explanation": text,
                         "prompt_hash": digest, "time": now(), "error": "", "detection": math.nan, "detection_n": 0,
                         "fuzzing": math.nan, "fuzzing_n": 0, "invalid": 0, "detection_auc": math.nan,
                         "fuzzing_auc": math.nan})
            pending.append(trials)
            if not trials:
                rows[-1]["error"] = "No held-out activating contexts: the feature fired on too few distinct contexts."
        for row, trials in zip(rows, pending):
            if trials:
                row.update(_summarise(trials, _judge(backend, trials, config.max_tokens)))
        if rows:
            upsert(path, pd.DataFrame(rows), ["feature", "explainer", "scorer"], COLUMNS)
            counts["failed"] += sum(1 for r in rows if r["error"])
            counts["scored"] += sum(1 for r in rows if not r["error"])
        finished = min(start + step, len(todo))
        report(progress, finished / len(todo),
               f"{finished:,}/{len(todo):,} explanations scored ({counts['failed']:,} failed)")
    return {"path": str(path), "features": len(todo), **counts, "stopped": stopped,
            "seconds": round(time.time() - started, 3)}


def read_scores(folder: str | Path) -> pd.DataFrame:
    return read_table(Path(folder) / SCORES, COLUMNS)
