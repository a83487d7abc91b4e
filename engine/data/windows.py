"""Text -> context windows of token ids, each starting with the tokenizer's special prefix (e.g. BOS).

The one windowing used by the activation store (:mod:`engine.data.store_writer`), tuned-lens training and
evaluation (:mod:`engine.lens.tuned_train`, :mod:`engine.lens.compare`) and prompt clouds
(:mod:`engine.geometry.projections`, which only needs :func:`special_prefix`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Window(NamedTuple):
    doc: int             # index of the text the window was cut from
    ids: list[int]       # special prefix + body tokens
    truncated: bool      # the body was cut short to stop at exactly ``max_tokens``


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the tokenizer puts before a text (e.g. ``[bos]``); ``[]`` for tokenizers like GPT-2's.

    Found as the difference between ``"a"`` encoded with and without special tokens, so a tokenizer that
    also appends something (an EOS) contributes only what comes before the text.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return [int(i) for i in with_special[: len(with_special) - len(without)]]
    return []


def iter_windows(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], context_length: int, *,
                 max_tokens: int | None = None, min_body: int = 1) -> Iterator[Window]:
    """Cut every text into windows of at most ``context_length`` tokens, special prefix included.

    The body of a window (the text's tokens after the prefix) is ``context_length - len(prefix)`` tokens
    long, but at least ``min_body``; a text's last piece shorter than ``min_body`` is dropped. With
    ``max_tokens`` the stream stops after exactly that many tokens in total: the last window is then cut
    short and marked ``truncated`` (unless the texts run out first).

    - activation store: ``min_body=1`` (every token is stored), ``max_tokens`` set;
    - tuned lens: ``min_body=2`` (a window needs a position with a next token after position 0).
    """
    prefix = special_prefix(tokenizer)
    body = max(min_body, context_length - len(prefix))
    total = 0
    for doc, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunk = ids[start:start + body]
            if len(chunk) < min_body:
                continue
            window = prefix + [int(i) for i in chunk]
            truncated = max_tokens is not None and total + len(window) > max_tokens
            if truncated:
                window = window[: max_tokens - total]
            total += len(window)
            yield Window(doc, window, truncated)
            if max_tokens is not None and total >= max_tokens:
                return
