"""Capture any set of sites at any set of layers in ONE forward pass, with forward hooks.

Sites are defined once, in :mod:`engine.core.sites`.

Hooks are always removed, also when the forward pass raises. With ``stop_early`` the pass stops
right after the last layer it needs, skipping the remaining layers and the unembedding (for a
262k-token vocabulary the head alone costs as much as the whole body of a small model).

A model split over several devices by a device map computes consecutive layers on different devices:
every captured tensor is moved to one device as it is captured (the input embedding's, where the token
ids go), so the layers of a site stack and two sites of one layer add.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch

from engine.core.anatomy import Anatomy
from engine.core.sites import normalize_sites, read_hook


class _Stop(Exception):
    """Raised inside a hook once everything wanted is captured."""


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` ``[B, T]`` (long tensors).

    Right padding keeps every real token at positions 0..n-1, as in an unpadded forward pass.
    """
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


@contextmanager
def hooked(anatomy: Anatomy, sites: Mapping[str, list[int]], sink: dict, stop_early: bool = True,
           device: torch.device | str | None = None):
    """Install capture hooks; captured tensors land in ``sink[(site, layer)]`` (detached), all on ``device``
    (default: the input embedding's device, :attr:`Anatomy.input_device`; a no-op on a one-device model)."""
    target = torch.device(device) if device is not None else anatomy.input_device
    wanted = dict(sites)
    if "resid_mid" in wanted:
        for site in ("resid_pre", "attn_out"):
            wanted[site] = sorted(set(wanted.get(site, [])) | set(wanted["resid_mid"]))
        del wanted["resid_mid"]
    last_needed = max((max(ls) for ls in wanted.values() if ls), default=-1)
    handles = []

    def saver(key):
        return lambda hidden: sink.__setitem__(key, hidden.detach().to(target))

    def stopper(module, args, output):
        raise _Stop

    try:
        for site, layers in wanted.items():
            for i in layers:
                handles.append(read_hook(anatomy, site, i, saver((site, i))))
        if stop_early and last_needed >= 0:
            handles.append(anatomy.layers[last_needed].register_forward_hook(stopper))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_forward(model, **inputs):
    """Forward pass that treats an early stop as success; returns the model output or None."""
    try:
        with torch.inference_mode():
            return model(**inputs, use_cache=False)
    except _Stop:
        return None


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits for chosen positions only."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def capture(anatomy: Anatomy, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            sites: Mapping[str, Iterable[int] | str] | None = None, stop_early: bool = True,
            logits_positions: Sequence[int] | None = None):
    """One forward pass; returns ``(captured, output)``.

    ``captured[site]`` is a tensor ``[n_layers_requested, batch, seq, width]`` in layer order, on the input
    embedding's device (:attr:`Anatomy.input_device`), ``output`` the model output (``None`` if the pass
    stopped early). ``logits_positions`` asks the model for logits at those positions only (where its
    forward supports ``logits_to_keep``), so a 262k-vocabulary head is not applied to every position when
    only a few are read.
    """
    model = anatomy.model
    chosen = normalize_sites(sites or {"resid_post": "all"}, anatomy.n_layers)
    sink: dict = {}
    device = anatomy.input_device
    inputs = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    if logits_positions is not None and accepts_logits_to_keep(model):
        inputs["logits_to_keep"] = torch.tensor(list(logits_positions), device=device)
    with hooked(anatomy, chosen, sink, stop_early=stop_early, device=device):
        output = run_forward(model, **inputs)
    captured = {}
    for site, layers in chosen.items():
        if site == "resid_mid":
            rows = [sink[("resid_pre", i)] + sink[("attn_out", i)] for i in layers]
        else:
            rows = [sink[(site, i)] for i in layers]
        captured[site] = torch.stack(rows) if rows else torch.empty(0)
    return captured, output
