"""Which token ids a word becomes when the model produces it after some text.

SentencePiece tokenizers (Llama-2, Mistral v0.1, ...) prepend a dummy space to every text they encode, so
``" Paris"`` encoded on its own is ``["▁", "▁Paris"]``: its first id is a lone ``▁``, not the ``▁Paris`` the
model produces after ``"The capital of France is"``. Here a word is always encoded after its preceding
text and the ids it adds are taken (:func:`continuation_ids`); when a word is several tokens, the first is
the one followed (a prediction starts with it) and :class:`Continuation` says so for the UI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Continuation:
    """The tokens ``word`` adds after a context; ``id`` (the first) is the one a lens or a metric follows."""

    word: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]   # each id as text (SentencePiece tokens with their ``▁``)

    @property
    def id(self) -> int:
        return self.ids[0]

    def describe(self) -> str:
        """``' Paris' → '▁Paris'`` or ``' Derry' → '▁D' (first of 2 tokens: '▁D' 'erry')``."""
        if len(self.ids) == 1:
            return f"{self.word!r} → {self.pieces[0]!r}"
        return (f"{self.word!r} → {self.pieces[0]!r} (first of {len(self.ids)} tokens: "
                f"{' '.join(repr(p) for p in self.pieces)})")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def continuation_ids(tokenizer: PreTrainedTokenizerBase, context: str, word: str) -> list[int]:
    """The ids ``word`` adds when it follows ``context``: ``encode(context + word)`` minus the longest prefix it
    shares with ``encode(context)``. With an empty context: the word encoded as the start of a text.

    If the tokenizer merges the end of the context with the start of the word, the first returned id also
    covers those last characters of the context (it is still the token the model would produce there).
    """
    if not context:
        return _encode(tokenizer, word)
    before, after = _encode(tokenizer, context), _encode(tokenizer, context + word)
    shared = 0
    for a, b in zip(before, after):
        if a != b:
            break
        shared += 1
    return after[shared:]


def continuation(tokenizer: PreTrainedTokenizerBase, context: str, word: str) -> Continuation:
    """:func:`continuation_ids` with the pieces decoded; an empty result is a ``ValueError``."""
    ids = continuation_ids(tokenizer, context, word)
    if not ids:
        raise ValueError(f"{word!r} adds no token after the given text with this tokenizer.")
    return Continuation(word, tuple(ids), tuple(_piece(tokenizer, i) for i in ids))


def _piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as text; SentencePiece tokens keep their ``▁`` (decoding would drop a leading one)."""
    raw = tokenizer.convert_ids_to_tokens(token_id)
    return raw if isinstance(raw, str) and raw.startswith("▁") else tokenizer.decode([token_id])
