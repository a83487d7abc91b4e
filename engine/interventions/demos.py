"""Worked experiments built from the sweeps: "Separating tongue from thought".

Patch the last-token latent of a source translation prompt (concept A, output language X) into a target
prompt (concept B, output language Y) at each layer, and read at the output whether the model now says
A or B, in X or in Y: does the latent carry the concept, the language, or both?
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from engine.core.capture import capture
from engine.core.devices import to_host
from engine.interventions.hooks import forward_logits
from engine.interventions.specs import InterventionError, prompt_ids
from engine.interventions.sweeps import run_row_patches

if TYPE_CHECKING:
    from engine.core.models import LoadedModel


@dataclass
class TongueThoughtResult:
    layers: list[str]
    curves: dict[str, list[float]]   # label -> P per patched layer
    baselines: dict[str, dict[str, float]]  # "target" / "source" -> label -> P
    source_prompt: str
    target_prompt: str
    tokens: dict[str, str]           # label -> the word whose first token is measured

    def to_json(self) -> dict:
        return asdict(self)


def translation_prompt(concept: dict, source_lang: str, target_lang: str, n_shots: int = 4, seed: int = 0) -> str:
    """Few-shot translation prompt in the latent-language format, ending at the open quote of the answer."""
    from engine.data.prompt_sets import CONCEPTS, LANGUAGES

    for code in (source_lang, target_lang):
        if code not in LANGUAGES:
            raise InterventionError(f"Unknown language '{code}'; choose from {', '.join(LANGUAGES)}.")
    if source_lang == target_lang:
        raise InterventionError("The input and output language of a translation prompt must differ.")
    others = [c for c in CONCEPTS if c["concept"] != concept["concept"]]
    shots = random.Random(seed).sample(others, n_shots)
    src, tgt = LANGUAGES[source_lang], LANGUAGES[target_lang]
    lines = [f'{src}: "{c[source_lang]}" - {tgt}: "{c[target_lang]}"' for c in shots]
    lines.append(f'{src}: "{concept[source_lang]}" - {tgt}: "')
    return "\n".join(lines)


def _concept(name: str) -> dict:
    from engine.data.prompt_sets import CONCEPTS

    for c in CONCEPTS:
        if c["concept"] == name:
            return c
    raise InterventionError(f"Unknown concept '{name}'; pick one from the built-in concept list.")


def tongue_thought(lm: LoadedModel, concept_a: str = "dog", concept_b: str = "water", source_in: str = "de",
                   source_out: str = "fr", target_in: str = "es", target_out: str = "zh", n_shots: int = 4,
                   site: str = "resid_post", batch_size: int = 64) -> TongueThoughtResult:
    """Patch the last-token latent of a source translation prompt (concept A, output language X) into a target
    prompt (concept B, output language Y) at each layer (one batched pass) and read P(A/B in X/Y) at the output."""
    a, b = _concept(concept_a), _concept(concept_b)
    if concept_a == concept_b:
        raise InterventionError("Pick two different concepts for the source and the target prompt.")
    if source_out == target_out:
        raise InterventionError("The source and target output languages must differ to tell language from concept.")
    src_prompt = translation_prompt(a, source_in, source_out, n_shots)
    tgt_prompt = translation_prompt(b, target_in, target_out, n_shots, seed=1)
    words = {f"{name} in {lang}": concept[lang]
             for name, concept in (("A", a), ("B", b)) for lang in (target_out, source_out)}
    labels = list(words)
    token_idx = torch.tensor([int(lm.tokenizer(words[label], add_special_tokens=False)["input_ids"][0])
                              for label in labels], device=lm.device)
    src_ids, tgt_ids = prompt_ids(lm, src_prompt), prompt_ids(lm, tgt_prompt)
    n_layers = lm.anatomy.n_layers
    with lm.lock:
        got, src_out = capture(lm.anatomy, torch.tensor([src_ids]), sites={site: "all"}, stop_early=False)
    values = got[site][:, 0, -1]  # [L, d]: the last-token latent of the source at each layer
    layers = torch.arange(n_layers)
    probs = to_host(run_row_patches(lm, tgt_ids, site, layers, torch.full_like(layers, len(tgt_ids) - 1), values,
                                    batch_size, measure=lambda logits: torch.softmax(logits, -1)[:, token_idx]))
    # probs: [L, labels]; only these columns of each patched row's logits are kept
    clean = to_host(torch.softmax(forward_logits(lm, torch.tensor([tgt_ids]))[0, -1], -1)[token_idx])  # [labels]
    src_probs = to_host(torch.softmax(src_out.logits[0, -1].float(), -1)[token_idx])
    return TongueThoughtResult(
        layers=[str(i) for i in range(n_layers)],
        curves={label: probs[:, i].tolist() for i, label in enumerate(labels)},
        baselines={"target": {label: float(clean[i]) for i, label in enumerate(labels)},
                   "source": {label: float(src_probs[i]) for i, label in enumerate(labels)}},
        source_prompt=src_prompt, target_prompt=tgt_prompt, tokens=words)
