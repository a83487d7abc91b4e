"""Installing compiled edits as forward hooks for one forward pass, and running that pass.

Every hook goes through :func:`engine.core.sites.write_hook` (the one site registry); :func:`applied`
removes them again on exit, also when the pass raises.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from engine.core.capture import accepts_logits_to_keep
from engine.core.sites import write_hook
from engine.interventions.edits import CompiledEdit, compile_interventions
from engine.interventions.specs import Intervention, InterventionError, prompt_ids

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

NON_FINITE = "The intervention made the model's output NaN or infinite; use a smaller alpha or value."


@contextmanager
def applied(lm: LoadedModel, edits: Sequence[CompiledEdit]) -> Iterator[None]:
    """Install every compiled edit (in order) for the block; hooks are removed on exit, also on errors."""
    handles = []
    try:
        for edit in edits:
            handles.append(write_hook(lm.anatomy, edit.site, edit.layer, edit.fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise InterventionError(NON_FINITE)


@torch.inference_mode()
def forward_logits(lm: LoadedModel, input_ids: torch.Tensor, edits: Sequence[CompiledEdit] = (),
                   last_only: bool = False) -> torch.Tensor:
    """Float32 logits ``[B, T, V]`` on the model's device (``[B, 1, V]`` with ``last_only``: a 262k-token head
    on every position of a big batch would dominate a sweep's memory and time). ``input_ids``: ``[B, T]``."""
    extra = {"logits_to_keep": 1} if last_only and accepts_logits_to_keep(lm.model) else {}
    with lm.lock, applied(lm, edits):
        logits = lm.model(input_ids=input_ids.to(lm.device), use_cache=False, **extra).logits
    if last_only:
        logits = logits[:, -1:]
    logits = logits.float()
    _check_finite(logits)
    return logits


def run_with(lm: LoadedModel, prompt: str | Sequence[int], specs: Sequence[Intervention]) -> torch.Tensor:
    """Logits ``[T, V]`` (float32) of one prompt with the interventions applied (none: the clean run)."""
    ids = prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    return forward_logits(lm, torch.tensor([ids]), edits)[0]
