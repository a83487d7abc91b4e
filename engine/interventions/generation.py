"""Clean vs intervened views of one prompt: next token, generation side by side, Δ-lens and dose-response.

Each view compiles the specs against the prompt (:mod:`engine.interventions.edits`), runs the model once
without and once with the edits hooked in (:mod:`engine.interventions.hooks`), and returns plain
lists, floats and dataclasses with ``to_json`` (nothing on the model's device).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.devices import to_host
from engine.core.numerics import kl_from_logits
from engine.interventions.edits import CompiledEdit, compile_interventions
from engine.interventions.hooks import NON_FINITE, applied, forward_logits
from engine.interventions.specs import Intervention, InterventionError, prompt_ids
from engine.lens.logit import run_lens, tracked_token_ids

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.lens.logit import LensResult


# --- next token ----------------------------------------------------------------------------------
def compare_next_token(lm: LoadedModel, prompt: str, specs: Sequence[Intervention], top_k: int = 10) -> dict:
    """Next-token top-k clean vs intervened, and the KL from clean to intervened."""
    ids = prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = forward_logits(lm, torch.tensor([ids]))[0, -1]  # [V]
    hit = forward_logits(lm, torch.tensor([ids]), edits)[0, -1]
    out = {"kl": float(kl_from_logits(clean, hit))}
    for name, logits in (("clean", clean), ("intervened", hit)):
        probs = torch.softmax(logits, -1)
        top = probs.topk(min(top_k, probs.numel()))
        out[name] = [{"token": lm.tokenizer.decode([int(i)]), "id": int(i), "prob": float(v)}
                     for v, i in zip(top.values, top.indices)]
    return out


# --- generation side by side ---------------------------------------------------------------------
@dataclass
class GenerationComparison:
    prompt_tokens: list[str]
    clean_tokens: list[str]
    intervened_tokens: list[str]
    clean_ids: list[int]
    intervened_ids: list[int]
    differs: list[bool]           # per generated position: the two tokens differ
    first_divergence: int | None  # index into the generated tokens, None when identical
    sampled: bool
    seed: int

    @property
    def clean_text(self) -> str:
        return "".join(self.clean_tokens)

    @property
    def intervened_text(self) -> str:
        return "".join(self.intervened_tokens)

    def to_json(self) -> dict:
        return {**asdict(self), "clean_text": self.clean_text, "intervened_text": self.intervened_text}


def _next_token(logits: torch.Tensor, sample: bool, temperature: float, top_k: int,
                generator: torch.Generator) -> int:
    """Greedy, or sampled from the top-k of ``logits`` ``[V]`` (the draw happens on the CPU, seeded)."""
    if not sample:
        return int(logits.argmax())
    scaled = logits / max(temperature, 1e-5)
    if top_k:
        kth = scaled.topk(min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -float("inf"))
    return int(torch.multinomial(to_host(torch.softmax(scaled, -1)), 1, generator=generator))


@torch.inference_mode()
def _generate(lm: LoadedModel, ids: list[int], edits: Sequence[CompiledEdit], max_new_tokens: int, sample: bool,
              temperature: float, seed: int, top_k: int) -> list[int]:
    """Full forward per step (no KV cache), so position-bound edits see the same absolute positions each step."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    seq = list(ids)
    limit = lm.context_length or 10**9
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        if len(seq) >= limit:
            break
        logits = forward_logits(lm, torch.tensor([seq]), edits, last_only=True)[0, -1]
        token = _next_token(logits, sample, temperature, top_k, generator)
        seq.append(token)
        if eos is not None and token == eos:
            break
    return seq[len(ids):]


def generate_compare(lm: LoadedModel, prompt: str, specs: Sequence[Intervention], max_new_tokens: int = 20,
                     sample: bool = False, temperature: float = 0.8, seed: int = 0,
                     top_k: int = 50, clean_ids: Sequence[int] | None = None) -> GenerationComparison:
    """Generate with and without the interventions (greedy, or sampled with the same seed) and diff token by token.

    ``clean_ids``: the clean continuation from an earlier call with the same prompt and settings (a UI caches it
    while the interventions change), so only the intervened run is generated; without edits it is not rerun."""
    if not 1 <= int(max_new_tokens) <= 512:
        raise InterventionError("Generate between 1 and 512 new tokens.")
    ids = prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = [int(t) for t in clean_ids] if clean_ids is not None else \
        _generate(lm, ids, (), max_new_tokens, sample, temperature, seed, top_k)
    hit = _generate(lm, ids, edits, max_new_tokens, sample, temperature, seed, top_k) if edits else list(clean)
    n = max(len(clean), len(hit))
    differs = [i >= len(clean) or i >= len(hit) or clean[i] != hit[i] for i in range(n)]

    def decode(seq: list[int]) -> list[str]:
        return [lm.tokenizer.decode([t]) for t in seq]
    return GenerationComparison(decode(ids), decode(clean), decode(hit), clean, hit, differs,
                                differs.index(True) if any(differs) else None, sample, seed)


# --- Δ-lens --------------------------------------------------------------------------------------
def delta_lens(lm: LoadedModel, prompt: str, specs: Sequence[Intervention], track: Sequence[str] = (),
               top_k: int = 5, positions: Sequence[int] | None = None) -> tuple[LensResult, LensResult]:
    """``(clean, intervened)`` :class:`LensResult` of the same prompt; subtract them for the Δ view."""
    ids = prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = run_lens(lm, ids, top_k=top_k, track=track, positions=positions)
    with lm.lock, applied(lm, edits):
        hit = run_lens(lm, ids, top_k=top_k, track=track, positions=positions)
    if not np.isfinite(hit.entropy).all():
        raise InterventionError(NON_FINITE)
    return clean, hit


# --- dose-response -------------------------------------------------------------------------------
@dataclass
class DoseResponse:
    alphas: list[float]
    target_prob: list[float]
    kl_to_clean: list[float]
    token: str
    clean_prob: float

    def to_json(self) -> dict:
        return asdict(self)


def dose_response(lm: LoadedModel, prompt: str, spec: Intervention, alphas: Sequence[float],
                  token: str) -> DoseResponse:
    """Sweep a steering spec's alpha in ONE batched forward (row r gets alpha r); P(token) and KL to clean."""
    if spec.op != "steer":
        raise InterventionError("A dose-response sweep needs a steering intervention (it varies alpha).")
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise InterventionError("Give at least one finite alpha for the dose-response sweep.")
    ids = prompt_ids(lm, prompt)
    if not token:
        raise InterventionError("The token to measure is empty; type the answer token (e.g. ' Paris').")
    token_id = tracked_token_ids(lm.tokenizer, [token], context=prompt if isinstance(prompt, str) else None)[0]
    unit_spec = Intervention(spec.op, spec.site, spec.layer, spec.positions, {**spec.params, "alpha": 1.0})
    edit = compile_interventions(lm, [unit_spec], len(ids))[0]
    scale = torch.tensor(alphas, device=lm.device)  # [R]

    def batched(h: torch.Tensor) -> torch.Tensor:  # alpha_r * (edit(h) - h) per row r
        delta = edit.fn(h).float() - h.float()
        return (h.float() + scale.to(h.device)[:, None, None] * delta).to(h.dtype)

    batch = torch.tensor([ids]).expand(len(alphas), -1)
    clean = forward_logits(lm, torch.tensor([ids]))[0, -1]  # [V]
    hit = forward_logits(lm, batch, [CompiledEdit(edit.site, edit.layer, batched)], last_only=True)[:, -1]  # [R, V]
    probs = torch.softmax(hit, -1)[:, token_id]
    kl = kl_from_logits(clean.expand_as(hit), hit)
    return DoseResponse(alphas, probs.tolist(), kl.tolist(), token, float(torch.softmax(clean, -1)[token_id]))
