"""Prompts and examples: marking, answer parsing, and the held-out split (nothing scored is ever shown)."""
from __future__ import annotations

import pytest

from engine.autointerp.examples import (
    Context,
    ExampleConfig,
    feature_examples,
    held_out,
    non_activating,
    split_rows,
)
from engine.autointerp.prompts import (
    activating_marks,
    explainer_messages,
    parse_explanation,
    parse_yes_no,
    prompt_hash,
    render,
    shown_contexts,
)
from engine.core.errors import UserError


def test_render_marks_runs_and_keeps_spaces_outside():
    tokens = ["We", " flew", " to", " Par", "is", " in", "\n", "May"]
    assert render(tokens, {3, 4}) == "We flew to <<Paris>> in↵May"
    assert render(tokens, {1, 7}) == "We <<flew>> to Paris in↵<<May>>"
    assert render(tokens) == "We flew to Paris in↵May"


def test_activating_marks_use_the_fraction_of_the_max_and_the_focus():
    context = Context(row=10, tokens=["a", "b", "c", "d"], acts=[0.0, 0.5, 2.0, 0.1], focus=3)
    assert activating_marks(context, 2.0, 0.25) == {1, 2, 3}  # 0.1 is below 0.5 but it is the focus
    assert activating_marks(context, 2.0, 0.5) == {2, 3}
    assert activating_marks(context, 8.0, 0.5) == {3}
    assert (context.lo, context.hi, context.max_act) == (7, 11, 2.0)


@pytest.mark.parametrize("answer, expected", [
    ("Explanation: the word Paris", "the word Paris"),
    ("Sure!\nExplanation: **city names**\nMore text", "city names"),
    ("  numbers after 'at'  ", "numbers after 'at"),
    ("Explanation:", None),
    ("Explanation:\n\nThe word argument.\n\nMore text", "The word argument."),  # SmolLM2's usual form
    ("", None),
    (None, None),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer, expected", [("yes", True), ("No.", False), ("Yes, it does", True),
                                              ("TRUE", True), ("maybe", None), ("", None), ("The answer: no", False)])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


def test_split_rows_alternates_top_ranks_and_never_shares_a_row():
    explain, held = split_rows([10, 11, 12, 13, 14], [12, 20, 21, 11, 30], [0, 1, 0, 1, 2], explain_per_interval=1)
    assert explain == [(10, "top"), (12, "top"), (14, "top"), (21, "interval")]
    # 12 (explained) is dropped from the held-out intervals; 11 appears once
    assert held == [(11, "top"), (13, "top"), (20, "interval"), (30, "interval")]
    assert not {r for r, _ in explain} & {r for r, _ in held}


def test_held_out_drops_windows_that_overlap_shown_ones():
    shown = [Context(10, ["x"] * 5, [0.0] * 5, 2)]  # rows 8..12
    candidates = [Context(13, ["x"] * 3, [0.0] * 3, 1), Context(14, ["x"] * 3, [0.0] * 3, 1),
                  Context(5, ["x"] * 3, [0.0] * 3, 1), Context(8, ["x"] * 2, [0.0] * 2, 1)]
    kept = held_out(shown, candidates)
    assert [c.row for c in kept] == [14, 5]  # 12..14 and 7..8 overlap 8..12; 13..15 and 4..6 do not


def test_feature_examples_hold_out_what_the_explainer_never_sees(paris):
    dash, tok, _, _ = paris
    for feature in range(dash.d_sae):
        ex = feature_examples(dash, feature, tok)
        shown_rows = {r for c in ex.explain for r in range(c.lo, c.hi)}
        for c in ex.held_out:
            assert not shown_rows & set(range(c.lo, c.hi)), "a held-out window overlaps a shown one"
            assert c.max_act > 0
    ex = feature_examples(dash, 0, tok)
    assert len(ex.explain) >= 4 and len(ex.held_out) >= 4
    assert all("Paris" in c.text() for c in ex.explain + ex.held_out)
    messages = explainer_messages(ex)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # one worked example first
    assert messages[-1]["content"].count("<<Paris>>") == len(ex.explain)
    assert "<bos>" not in messages[-1]["content"] and "(10/10)" in messages[-1]["content"]
    assert prompt_hash(messages) == prompt_hash(explainer_messages(feature_examples(dash, 0, tok)))
    assert prompt_hash(messages) != prompt_hash(explainer_messages(feature_examples(dash, 1, tok)))


def test_non_activating_contexts_are_quiet_and_mix_similar_and_random(paris):
    dash, tok, _, _ = paris
    quiet = non_activating(dash, 0, tok, 8, seed=3)
    assert len(quiet) == 8
    assert all(c.max_act == 0 and "Paris" not in c.text() for c in quiet)
    assert {c.source for c in quiet} <= {"similar", "random"} and any(c.source == "random" for c in quiet)
    assert [c.row for c in quiet] == [c.row for c in non_activating(dash, 0, tok, 8, seed=3)]  # seeded


def test_bad_example_settings_are_refused():
    with pytest.raises(UserError, match="mark_fraction"):
        ExampleConfig(mark_fraction=2.0).check()
    with pytest.raises(UserError, match="before"):
        ExampleConfig(before=-1).check()


def test_the_explainer_sees_at_most_max_explain_contexts_across_the_range():
    top = [Context(row=i, tokens=["t"], acts=[10.0 - i * 0.1], focus=0) for i in range(10)]
    interval = [Context(row=100 + i, tokens=["t"], acts=[5.0 - i], focus=0, source="interval") for i in range(5)]
    chosen = shown_contexts(top + interval, 6)
    assert [c.row for c in chosen] == [0, 1, 2, 3, 100, 104]  # the 4 strongest top ones, the interval ends
    assert shown_contexts(top + interval, 0) == sorted(top + interval, key=lambda c: -c.max_act)
    assert [c.row for c in shown_contexts(interval, 3)] == [100, 102, 104]  # no top examples: spread intervals
