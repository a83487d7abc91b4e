"""What fires on my text: an SAE's feature activations on every token of a text the user types."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.core.capture import capture
from engine.core.devices import module_device, to_host
from engine.features.folder import DashboardError

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.sae.base import SAE


@torch.no_grad()
def text_hidden(lm: LoadedModel, sae: SAE, site: str, layer: int, text: str, max_tokens: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [T], hidden [T, d_in])``: the text's tokens after the tokenizer's leading special tokens, and the
    model's activation at ``site``/``layer`` on each, moved to the SAE's device (the SAE itself is never moved:
    it is often a cached, shared object). Empty text, no ordinary tokens or a width mismatch: one sentence."""
    if not text or not text.strip():
        raise DashboardError("Enter some text to see which features fire on it.")
    ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
    special = set(lm.tokenizer.all_special_ids or [])
    skip = 0
    while skip < ids.shape[1] and int(ids[0, skip]) in special:
        skip += 1
    if skip >= ids.shape[1]:
        raise DashboardError("The text has no ordinary tokens; enter some words.")
    with lm.lock:
        captured, _ = capture(lm.anatomy, ids, sites={site: [layer]})
    hidden = captured[site][0, 0, skip:].to(module_device(sae)).float()  # [T, d_in], on the SAE's device
    if hidden.shape[-1] != sae.d_in:
        raise DashboardError(f"The SAE expects d_in={sae.d_in}, but the model's {site} has width "
                             f"{hidden.shape[-1]}: choose an SAE of this model.")
    return ids[0, skip:], hidden


@torch.no_grad()
def text_activations(lm: LoadedModel, sae: SAE, site: str, layer: int, text: str, max_tokens: int = 256
                     ) -> tuple[list[str], torch.Tensor]:
    """``(tokens, acts [T, d_sae])`` of the SAE on ``text``; ``acts`` leaves through
    :func:`~engine.core.devices.to_host` (float32, CPU)."""
    ids, hidden = text_hidden(lm, sae, site, layer, text, max_tokens)
    acts = to_host(sae.encode(hidden), torch.float32)  # [T, d_sae]
    words = lm.tokenizer.batch_decode([[int(i)] for i in ids])
    return words, acts
