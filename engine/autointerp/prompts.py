"""Explainer and scorer prompts (chat messages), parsing of the answers, and prompt hashes.

Contexts are rendered on one line each; the tokens where the feature fires are wrapped as ``<<token>>``
(consecutive marked tokens share one pair of marks, leading spaces stay outside). A token is marked when its
activation is positive and at least ``mark_fraction`` x the feature's maximum, and the context's focus token (the
store row the example was chosen for) is always marked when it is positive.

The explainer sees the contexts of :attr:`FeatureExamples.explain` (even-ranked top examples and some interval
samples, strongest first, each with its peak activation on a 0-10 scale) and the feature's top positive logit
tokens; the scorer sees one context per prompt and answers yes or no. The instructions are all in the system prompt and the
text comes last, so the trials of one feature share everything up to the text (a local scorer computes that once).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

from engine.autointerp.examples import Context, ExampleConfig, FeatureExamples

NEWLINE = "↵"
MAX_EXPLANATION_CHARS = 300

EXPLAINER_SYSTEM = (
    "You are studying one feature of a language model's internals. You are shown text excerpts in which the "
    "feature is active: the tokens where it fires are marked <<like this>>, and each excerpt starts with its "
    "strongest activation on a 0-10 scale. You also see the tokens that the feature makes the model more likely "
    "to predict next. Find the common pattern: which tokens or concepts make it fire, and in which contexts. "
    "Reply with one short phrase of at most 15 words on a single line, starting with 'Explanation:'."
)
DETECTION_SYSTEM = (
    "You check an explanation of a language-model feature against a text. Answer with one word: yes if the "
    "feature, as the explanation describes it, should fire somewhere in the text, no otherwise."
)
FUZZING_SYSTEM = (
    "You check an explanation of a language-model feature against a text in which some tokens are marked "
    "<<like this>>. Answer with one word: yes if the marked tokens are exactly the ones the explanation describes, "
    "no otherwise."
)


# --- rendering ------------------------------------------------------------------------------------
def activating_marks(context: Context, max_act: float, fraction: float) -> set[int]:
    """Indices of the tokens to mark: positive and at least ``fraction`` x ``max_act``, plus a positive focus."""
    floor = fraction * max_act
    marks = {i for i, a in enumerate(context.acts) if a > 0 and a >= floor}
    if 0 <= context.focus < len(context.acts) and context.acts[context.focus] > 0:
        marks.add(context.focus)
    return marks


def render(tokens: Sequence[str], marks: Iterable[int] = ()) -> str:
    """One line of text with the ``marks`` token indices wrapped in ``<<...>>`` (runs merged)."""
    marked = set(marks)
    out: list[str] = []
    inside = False
    for i, token in enumerate(tokens):
        token = token.replace("\r", "").replace("\n", NEWLINE)
        if i in marked:
            if inside:
                out.append(token)
            else:
                stripped = token.lstrip() or token
                out.append(token[:len(token) - len(stripped)] + "<<" + stripped)
                inside = True
        else:
            if inside:
                out.append(">>")
                inside = False
            out.append(token)
    if inside:
        out.append(">>")
    return "".join(out).strip()


def scale10(value: float, max_act: float) -> int:
    return int(round(10 * value / max_act)) if max_act > 0 else 0


# One worked example before the real question (a made-up feature): small explainers copy its short form.
EXAMPLE_USER = (
    "Tokens it makes more likely as the next token: Austrian, Vienna, Danube\n\n"
    "Excerpts where the feature fires (strongest first):\n"
    "1. (10/10) We took the night train from Berlin to <<Vienna>> and arrived at dawn\n"
    "2. (8/10) She studied music in <<Salzburg>> before moving abroad\n"
    "3. (4/10) the best cakes in <<Austria>> are sold near the cathedral\n\nWhat does the feature detect?"
)
EXAMPLE_ANSWER = "Explanation: Austrian cities and places, such as Vienna and Salzburg"


# --- the explainer --------------------------------------------------------------------------------
def shown_contexts(contexts: Sequence[Context], limit: int) -> list[Context]:
    """At most ``limit`` (0: all) explainer contexts, strongest first: the strongest top examples (two thirds)
    and interval samples spread over the activation range (the rest, or more when top examples run short)."""
    ordered = sorted(contexts, key=lambda c: -c.max_act)
    if not limit or len(ordered) <= limit:
        return ordered
    top = [c for c in ordered if c.source == "top"]
    interval = [c for c in ordered if c.source != "top"]
    n_interval = min(len(interval), max(limit - len(top), limit // 3))
    if n_interval:
        interval = [interval[int(i)] for i in np.linspace(0, len(interval) - 1, n_interval).round()]
    else:
        interval = []
    return sorted(top[:limit - len(interval)] + interval, key=lambda c: -c.max_act)


def explainer_messages(examples: FeatureExamples, config: ExampleConfig | None = None) -> list[dict]:
    config = config or ExampleConfig()
    ordered = shown_contexts(examples.explain, config.max_explain)
    lines = [f"{i}. ({scale10(c.max_act, examples.max_act)}/10) "
             f"{render(c.tokens, activating_marks(c, examples.max_act, config.mark_fraction))}"
             for i, c in enumerate(ordered, 1)]
    logits = ", ".join(t.strip() or repr(t) for t in examples.logits[:config.n_logits])
    user = f"Tokens it makes more likely as the next token: {logits}\n\n" if logits else ""
    user += "Excerpts where the feature fires (strongest first):\n" + "\n".join(lines)
    user += "\n\nWhat does the feature detect?"  # the excerpts last: small explainers echo what they read last
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": EXAMPLE_USER},
            {"role": "assistant", "content": EXAMPLE_ANSWER}, {"role": "user", "content": user}]


def parse_explanation(answer: str | None) -> str | None:
    """The explanation in a model's answer (the text after 'Explanation:', else its first line), or None if empty."""
    lines = [line.strip() for line in (answer or "").strip().splitlines() if line.strip()]
    chosen = ""
    for i, line in enumerate(lines):
        match = re.search(r"explanation\s*:\s*(.*)", line, flags=re.IGNORECASE)
        if match and (match.group(1).strip() or i + 1 < len(lines)):
            chosen = match.group(1).strip() or lines[i + 1]  # 'Explanation:' alone: the text is on the next line
            break
    if not chosen and lines:
        chosen = re.sub(r"^\s*explanation\s*:\s*", "", lines[0], flags=re.IGNORECASE)
    chosen = chosen.strip().strip("*_`\"'").strip()
    chosen = re.sub(r"^[-•]\s*", "", chosen)
    if len(chosen) > MAX_EXPLANATION_CHARS:
        chosen = chosen[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0] + "…"
    return chosen or None


# --- the scorers ----------------------------------------------------------------------------------
def detection_messages(explanation: str, context: Context) -> list[dict]:
    user = f"Explanation: {explanation}\n\nText: {render(context.tokens)}"
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, context: Context, marks: Iterable[int]) -> list[dict]:
    user = f"Explanation: {explanation}\n\nText: {render(context.tokens, marks)}"
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": user}]


_YES_NO = re.compile(r"\b(yes|no|true|false|y|n)\b")


def parse_yes_no(answer: str | None) -> bool | None:
    """The first yes/no (or true/false) word of an answer; None when there is none."""
    match = _YES_NO.search((answer or "").lower())
    if match is None:
        return None
    return match.group(1) in ("yes", "true", "y")


# --- hashes ---------------------------------------------------------------------------------------
def prompt_hash(*parts) -> str:
    """16 hex digits of sha256 over JSON of the given messages / settings (key order does not matter)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
