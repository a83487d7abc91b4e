"""Scoring: balanced accuracy arithmetic, and a rule-based scorer on a feature that fires exactly on "Paris"."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from engine.autointerp.examples import Context
from engine.autointerp.explain import COLUMNS as EXPLAIN_COLUMNS
from engine.autointerp.explain import explain_features
from engine.autointerp.prompts import DETECTION_SYSTEM, FUZZING_SYSTEM
from engine.autointerp.scoring import (
    ScoreConfig,
    balanced_accuracy,
    build_trials,
    read_scores,
    score_features,
    wrong_marks,
)
from engine.autointerp.tables import EXPLANATIONS, upsert
from engine.core.errors import UserError


def test_balanced_accuracy_arithmetic():
    assert balanced_accuracy([True, True, False, False], [True, True, False, False]) == 1.0
    assert balanced_accuracy([True, True, False, False], [True, True, True, True]) == 0.5  # always yes
    assert balanced_accuracy([True, True, False, False], [False, False, True, True]) == 0.0
    # TPR 2/3, TNR 1/2 -> 7/12, whatever the class sizes
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]) == pytest.approx(7 / 12)
    assert balanced_accuracy([True] * 9 + [False], [True] * 10) == pytest.approx(0.5)  # not 0.9
    assert balanced_accuracy([True, True], [True, False]) == 0.5  # one class: its recall
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError):
        balanced_accuracy([True], [True, False])


def test_wrong_marks_avoid_the_true_ones_and_blank_tokens():
    context = Context(5, ["a", " ", "b", "c", "d"], [0.0, 0.0, 3.0, 0.0, 0.0], 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        marks = wrong_marks(context, {2}, rng)
        assert len(marks) == 1 and marks <= {0, 3, 4}
    assert wrong_marks(Context(0, ["x"], [1.0], 0), {0}, rng) == set()


def write_explanation(folder, feature: int, text: str, explainer: str) -> None:
    row = {"feature": feature, "explanation": text, "explainer": explainer, "prompt_hash": "manual",
           "time": "2024-01-01T00:00:00Z", "error": "", "seconds": 0.0}
    upsert(folder / EXPLANATIONS, pd.DataFrame([row]), ["feature", "explainer"], EXPLAIN_COLUMNS)


def test_rule_scorer_gives_1_to_the_right_explanation_and_chance_to_a_wrong_one(paris, server, backend, tmp_path):
    dash, tok, _, _ = paris
    explain_features(dash, backend, [0, 1], tokenizer=tok, out_dir=tmp_path)
    write_explanation(tmp_path, 0, "the word dog", "manual")
    right = score_features(dash, backend, [0], explainer=backend.name, tokenizer=tok, out_dir=tmp_path)
    wrong = score_features(dash, backend, [0], explainer="manual", tokenizer=tok, out_dir=tmp_path)
    assert right["scored"] == 1 and wrong["scored"] == 1
    scores = read_scores(tmp_path).set_index("explainer")
    good, bad = scores.loc[backend.name], scores.loc["manual"]
    assert good["explanation"] == "the word Paris" and good["scorer"] == backend.name
    assert good["detection"] == pytest.approx(1.0) and good["fuzzing"] == pytest.approx(1.0)
    assert bad["detection"] == pytest.approx(0.5) and bad["fuzzing"] == pytest.approx(0.5)
    assert good["detection_n"] >= 8 and good["fuzzing_n"] >= 4 and good["invalid"] == 0 and good["error"] == ""
    # rerun: same prompts, nothing asked again
    asked = server.count(DETECTION_SYSTEM) + server.count(FUZZING_SYSTEM)
    again = score_features(dash, backend, [0], explainer=backend.name, tokenizer=tok, out_dir=tmp_path)
    assert again["skipped"] == 1 and server.count(DETECTION_SYSTEM) + server.count(FUZZING_SYSTEM) == asked


def test_trials_are_balanced_held_out_and_deterministic(paris):
    dash, tok, _, _ = paris
    config = ScoreConfig(n_activating=6, n_non_activating=6, seed=1)
    trials = build_trials(dash, 0, "the word Paris", tok, config)
    detection = [t for t in trials if t.method == "detection"]
    fuzzing = [t for t in trials if t.method == "fuzzing"]
    assert sum(t.truth for t in detection) >= 4 and sum(not t.truth for t in detection) == 6
    assert abs(sum(t.truth for t in fuzzing) - sum(not t.truth for t in fuzzing)) <= 1
    for t in detection:
        text = t.messages[1]["content"].split("Text: ")[1]
        assert ("Paris" in text) == t.truth and "<<" not in text
    again = build_trials(dash, 0, "the word Paris", tok, config)
    assert [t.messages for t in again] == [t.messages for t in trials]
    only = build_trials(dash, 0, "x", tok, ScoreConfig(methods=("fuzzing",)))
    assert {t.method for t in only} == {"fuzzing"}


def test_unclear_answers_are_left_out_and_counted(paris, server, backend, tmp_path):
    dash, tok, _, _ = paris
    write_explanation(tmp_path, 1, "the word London", "manual")
    server.answer = lambda system, user: "perhaps"
    result = score_features(dash, backend, [1], tokenizer=tok, out_dir=tmp_path)
    row = read_scores(tmp_path).iloc[0]
    assert result["failed"] == 1 and row["invalid"] > 0 and row["detection_n"] == 0 and math.isnan(row["detection"])
    assert "clear yes or no" in row["error"]


def test_scoring_needs_explanations_and_valid_settings(paris, backend, tmp_path):
    dash, tok, _, _ = paris
    with pytest.raises(UserError, match="explain some features first"):
        score_features(dash, backend, tokenizer=tok, out_dir=tmp_path)
    with pytest.raises(UserError, match="Unknown scoring method"):
        score_features(dash, backend, tokenizer=tok, out_dir=tmp_path, config=ScoreConfig(methods=("vibes",)))
