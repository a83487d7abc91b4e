"""Splicing an SAE or transcoder into a forward pass, through the site registry's read and write hooks.

Position 0 (BOS, with its outsized norm) is excluded from training by the activation store, so by
default it is neither read nor replaced here. Hooks are always removed, also when the forward raises.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from engine.core.anatomy import Anatomy
from engine.core.sites import read_hook, write_hook
from engine.sae.attach import Splice
from engine.sae.base import SAE
from engine.sae.hooks import SAECompatibilityError

Fn = Callable[[torch.Tensor], torch.Tensor]


def _apply(fn: Fn, hidden: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """``fn`` on ``hidden [batch, seq, width]`` (without position 0 when ``skip_first``), in its dtype."""
    if not skip_first:
        return fn(hidden).to(device=hidden.device, dtype=hidden.dtype)
    if hidden.ndim < 3 or hidden.shape[1] < 2:
        return hidden
    out = hidden.clone()
    out[:, 1:] = fn(hidden[:, 1:]).to(device=hidden.device, dtype=hidden.dtype)
    return out


@contextmanager
def replace_site(anatomy: Anatomy, site: str, layer: int, fn: Fn, skip_first_position: bool = True) -> Iterator[None]:
    """Within the block, the activation at ``site``/``layer`` is replaced by ``fn(activation)``.

    ``fn`` gets ``[batch, seq, width]`` (without position 0 when ``skip_first_position``).
    """
    handle = write_hook(anatomy, site, layer, lambda hidden: _apply(fn, hidden, skip_first_position))
    try:
        yield
    finally:
        handle.remove()


def read_site(anatomy: Anatomy, site: str, layer: int, fn: Callable[[torch.Tensor], None]) -> list:
    """Hooks calling ``fn(activation)`` at ``site``/``layer``; ``resid_mid`` is ``resid_pre + attn_out``."""
    if site != "resid_mid":
        return [read_hook(anatomy, site, layer, fn)]
    box: dict[str, torch.Tensor] = {}
    first = read_hook(anatomy, "resid_pre", layer, lambda hidden: box.__setitem__("pre", hidden))
    try:
        second = read_hook(anatomy, "attn_out", layer, lambda hidden: fn(box.pop("pre").to(hidden.device) + hidden))
    except Exception:
        first.remove()
        raise
    return [first, second]


@contextmanager
def splice_transcoder(anatomy: Anatomy, splice: Splice, fn: Fn, skip_first_position: bool = True) -> Iterator[None]:
    """Read ``splice.in_site``, replace ``splice.out_site``'s activation by ``fn(input)`` (both ``[B, T, width]``)."""
    box: dict[str, torch.Tensor] = {}
    handles: list = []

    def replace(hidden: torch.Tensor) -> torch.Tensor:
        if "x" not in box:
            raise SAECompatibilityError(f"{splice.in_site} at layer {splice.in_layer} was not computed before "
                                        f"{splice.out_site} at layer {splice.out_layer} in this model.")
        x = box.pop("x")
        if not skip_first_position:
            return fn(x).to(device=hidden.device, dtype=hidden.dtype)
        if hidden.ndim < 3 or hidden.shape[1] < 2:
            return hidden
        out = hidden.clone()
        out[:, 1:] = fn(x[:, 1:]).to(device=hidden.device, dtype=hidden.dtype)
        return out

    try:
        handles += read_site(anatomy, splice.in_site, splice.in_layer, lambda x: box.__setitem__("x", x))
        handles.append(write_hook(anatomy, splice.out_site, splice.out_layer, replace))
        yield
    finally:
        for handle in handles:
            handle.remove()


def sae_replacement(sae: SAE) -> Fn:
    """``hidden [..., d_in]`` -> the SAE's output ``[..., d_out]`` in the SAE's dtype."""
    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return sae(hidden.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype))
    return fn


@contextmanager
def splice_sae(anatomy: Anatomy, sae: SAE, splice: Splice, skip_first_position: bool = True) -> Iterator[None]:
    """Run the model with the SAE's output in place of ``splice.out_site``'s activation."""
    if splice.same_site and not sae.is_transcoder:
        with replace_site(anatomy, splice.in_site, splice.in_layer, sae_replacement(sae), skip_first_position):
            yield
    else:
        with splice_transcoder(anatomy, splice, sae_replacement(sae), skip_first_position):
            yield
