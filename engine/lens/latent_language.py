"""The latent-language measurement of "Do Llamas Work in English?" (Wendler et al., 2024).

Few-shot translation prompts (``Français: "fleur" - 中文: "花"`` lines, then the query word
and an open quote) are read out with the lens at the last position of every layer. Per layer
we record P(the answer's token in the target language) and P(the same concept's English
token), and report the mean with a 95% confidence band across items.

Only items whose answer is ONE token for the loaded tokenizer are kept, and items whose
English token coincides with the answer token are dropped (the two curves would be the same).
Answer and English tokens are the ids the model produces right after the open quote of the query
(:func:`engine.lens.tokens.continuation_ids`), so SentencePiece tokenizers, which put a dummy space
before a text encoded alone, give the answer's own token and never a lone ``▁``.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.capture import capture, pad_batch
from engine.core.devices import to_host
from engine.core.errors import UserError
from engine.core.progress import Progress, report
from engine.data.prompt_sets import CONCEPTS, LANGUAGES
from engine.lens.logit import Transform
from engine.lens.tokens import continuation_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.core.models import LoadedModel


class LatentLanguageError(UserError):
    pass


@dataclass
class Item:
    concept: str
    prompt: str
    answer: str
    english: str
    answer_id: int
    english_ids: list[int]


@dataclass
class FilterReport:
    total: int = 0
    kept: int = 0
    answer_not_single_token: int = 0
    english_overlaps_answer: int = 0
    dropped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"total": self.total, "kept": self.kept, "answer_not_single_token": self.answer_not_single_token,
                "english_overlaps_answer": self.english_overlaps_answer}


def english_token_ids(tokenizer: PreTrainedTokenizerBase, word: str, context: str = "") -> list[int]:
    """First tokens of the English word as it could start after ``context``: bare, after a space, capitalised."""
    variants = {word, " " + word, word.capitalize(), " " + word.capitalize()}
    firsts = (continuation_ids(tokenizer, context, variant) for variant in variants)
    return sorted({ids[0] for ids in firsts if ids})


def query_line(source: str, target: str, concept: dict) -> str:
    """The last prompt line: the concept in the source language, then the open quote the answer follows."""
    return f'{LANGUAGES[source]}: "{concept[source]}" - {LANGUAGES[target]}: "'


def build_items(tokenizer: PreTrainedTokenizerBase, source: str, target: str, n_shots: int = 5, seed: int = 0,
                concepts: Sequence[dict] = CONCEPTS) -> tuple[list[Item], FilterReport]:
    for code in (source, target):
        if code not in LANGUAGES:
            raise LatentLanguageError(f"Unknown language '{code}'; choose from {', '.join(LANGUAGES)}.")
    if source == target:
        raise LatentLanguageError("Source and target language are the same; pick two different languages.")
    rng = random.Random(seed)
    src_name, tgt_name = LANGUAGES[source], LANGUAGES[target]
    report = FilterReport(total=len(concepts))
    items = []
    for index, concept in enumerate(concepts):
        answer = concept[target]
        query = query_line(source, target, concept)
        answer_ids = continuation_ids(tokenizer, query, answer)  # what the model writes after the open quote
        if len(answer_ids) != 1:
            report.answer_not_single_token += 1
            report.dropped.append(concept["concept"])
            continue
        english = concept["en"]
        english_ids = english_token_ids(tokenizer, english, query)
        if target != "en" and answer_ids[0] in english_ids:
            report.english_overlaps_answer += 1
            report.dropped.append(concept["concept"])
            continue
        others = [c for j, c in enumerate(concepts) if j != index]
        shots = rng.sample(others, min(n_shots, len(others)))
        lines = [f'{src_name}: "{c[source]}" - {tgt_name}: "{c[target]}"' for c in shots]
        lines.append(query)
        items.append(Item(concept["concept"], "\n".join(lines), answer, english, answer_ids[0], english_ids))
    report.kept = len(items)
    return items, report


@dataclass
class LatentLanguageResult:
    source: str
    target: str
    layers: list[str]
    target_probs: np.ndarray   # [items, rows]
    english_probs: np.ndarray  # [items, rows]
    report: FilterReport
    concepts: list[str]
    lens: str = "logit"

    @staticmethod
    def _band(values: np.ndarray) -> dict[str, list[float]]:
        mean = values.mean(0)
        half = 1.96 * values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
        return {"mean": mean.tolist(), "lo": (mean - half).clip(0, 1).tolist(), "hi": (mean + half).clip(0, 1).tolist()}

    def summary(self) -> dict:
        return {"source": self.source, "target": self.target, "lens": self.lens, "layers": self.layers,
                "items": self.report.to_json(), "target_language": self._band(self.target_probs),
                "english": self._band(self.english_probs)}


def run_latent_language(lm: LoadedModel, source: str = "fr", target: str = "zh", *, n_shots: int = 5,
                        batch_size: int = 16,
                        transform: Transform | None = None, lens_name: str = "logit", max_items: int | None = None,
                        progress: Progress | None = None) -> LatentLanguageResult:
    """Per layer (embeddings, then each layer's output): P(answer token) and P(any English token) at the last
    position of every kept item's prompt; ``probs`` arrays are ``[items, n_layers + 1]``."""
    tokenizer, anatomy = lm.tokenizer, lm.anatomy
    items, filtered = build_items(tokenizer, source, target, n_shots=n_shots)
    if max_items:
        items = items[:max_items]
    if not items:
        raise LatentLanguageError(
            f"No item survives for {source}->{target}: no answer is a single token for this tokenizer "
            f"({filtered.answer_not_single_token} multi-token answers, {filtered.english_overlaps_answer} same as English)."
        )
    n_rows = anatomy.n_layers + 1
    hidden_index = list(range(n_rows))
    target_probs, english_probs = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        encoded = [tokenizer(item.prompt, add_special_tokens=True)["input_ids"] for item in batch]
        width = max(map(len, encoded))
        if lm.context_length and width > lm.context_length:
            raise LatentLanguageError(f"The translation prompts are {width} tokens long, more than this model's "
                                      f"context of {lm.context_length}; use fewer shots.")
        input_ids, mask = pad_batch(encoded, pad)
        last = torch.tensor([len(ids) - 1 for ids in encoded])
        with lm.lock:
            captured, _ = capture(anatomy, input_ids, mask, sites={"resid_pre": [0], "resid_post": "all"})
            resid = torch.cat([captured["resid_pre"], captured["resid_post"]])  # [rows, B, T, d]
            resid = resid[:, torch.arange(len(batch)), last.to(resid.device)]     # [rows, B, d]
            with torch.inference_mode():
                if transform is not None:
                    resid = torch.stack([transform(i, resid[i]) for i in hidden_index])
                probs = torch.softmax(anatomy.logits(resid).float(), dim=-1)    # [rows, B, V]
                answer = torch.tensor([it.answer_id for it in batch], device=probs.device)
                target_probs.append(to_host(probs.gather(-1, answer.expand(n_rows, -1)[..., None])[..., 0].T))
                english = torch.zeros(len(batch), probs.shape[-1], device=probs.device)
                for row, item in enumerate(batch):
                    english[row, item.english_ids] = 1.0
                english_probs.append(to_host((probs * english).sum(-1).T))
        done = start + len(batch)
        report(progress, done / len(items), f"{done} of {len(items)} prompts read out")
    return LatentLanguageResult(
        source=source, target=target, layers=["embed"] + [str(i) for i in range(anatomy.n_layers)],
        target_probs=torch.cat(target_probs).numpy(), english_probs=torch.cat(english_probs).numpy(),
        report=filtered, concepts=[it.concept for it in items], lens=lens_name,
    )
