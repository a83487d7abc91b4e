"""THE site registry: where each named activation lives in any decoder stack.

A *site* is a named activation of one decoder layer. Each site knows which module it sits on,
whether it is that module's input (a forward pre-hook) or its output (a forward hook), and how
wide it is. Capture, SAE splicing, evaluation, steering, ablation and patching all go through
:func:`read_hook` / :func:`write_hook` here, so there is one mapping from names to modules.

Sites (per decoder layer ``i``):

- ``resid_pre``   residual stream entering layer i (layer 0: the embedding output)
- ``resid_mid``   ``resid_pre + attn_out`` (derived: read-only, for parallel-residual models a partial sum)
- ``resid_post``  residual stream leaving layer i (pre final norm, also for the last layer)
- ``attn_out``    what the attention branch adds to the residual
- ``mlp_out``     what the MLP branch adds to the residual
- ``mlp_hidden``  the MLP's hidden activation (input of its output projection)
- ``attn_heads``  the concatenated head outputs (input of the attention output projection)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from engine.core.anatomy import ATTENTION, BRANCHES, MLP, Anatomy
from engine.core.errors import UserError


class SiteError(UserError):
    pass


@dataclass(frozen=True)
class Site:
    name: str
    is_input: bool                                   # True: the module's input (pre-hook); False: its output
    module: Callable[[Anatomy, int], nn.Module] | None  # None for derived sites (resid_mid)
    wide: bool = False                               # width is the projection's input width, not d_model
    kwargs_input: bool = False                       # the input may arrive as ``hidden_states=`` (decoder layers)
    needs: tuple[str, ...] = ()                      # optional anatomy parts (keys of ``Anatomy.missing``)


REGISTRY: dict[str, Site] = {
    "resid_pre": Site("resid_pre", True, lambda a, i: a.layers[i], kwargs_input=True),
    "resid_mid": Site("resid_mid", False, None, needs=(ATTENTION, BRANCHES)),
    "resid_post": Site("resid_post", False, lambda a, i: a.layers[i]),
    "attn_out": Site("attn_out", False, lambda a, i: a.attn_branch(i), needs=(ATTENTION, BRANCHES)),
    "mlp_out": Site("mlp_out", False, lambda a, i: a.mlp_branch(i), needs=(MLP, BRANCHES)),
    "mlp_hidden": Site("mlp_hidden", True, lambda a, i: a.mlp_out_proj(i), wide=True, needs=(MLP,)),
    "attn_heads": Site("attn_heads", True, lambda a, i: a.attn_out_proj(i), wide=True, needs=(ATTENTION,)),
}
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden")  # capturable and storable
EDIT_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden")  # steer, ablate, patch, splice SAEs


def get_site(name: str) -> Site:
    if name not in REGISTRY:
        raise SiteError(f"unknown site '{name}'; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_site(anatomy: Anatomy, site: str) -> Site:
    """The site's spec, or a :class:`SiteError` sentence when this model lacks a part the site needs."""
    spec = get_site(site)
    for part in spec.needs:
        if part in anatomy.missing:
            raise SiteError(f"The site '{site}' is not available for this model: {anatomy.missing[part]}")
    return spec


def available_sites(anatomy: Anatomy, sites: Iterable[str] = SITES) -> tuple[str, ...]:
    """The sites of ``sites`` this model supports (all of them for a model with attention and an MLP)."""
    return tuple(site for site in sites if not any(part in anatomy.missing for part in get_site(site).needs))


def normalize_sites(sites: Mapping[str, Iterable[int] | str], n_layers: int) -> dict[str, list[int]]:
    """``{"resid_post": "all"}`` or ``{"attn_out": [3, 4]}`` -> validated ``{site: sorted layers}``."""
    out: dict[str, list[int]] = {}
    for site, layers in sites.items():
        if site not in SITES:
            raise SiteError(f"unknown site '{site}'; choose from {', '.join(SITES)}")
        chosen = list(range(n_layers)) if layers == "all" else sorted({int(i) for i in layers})
        bad = [i for i in chosen if not 0 <= i < n_layers]
        if bad:
            raise SiteError(f"layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}")
        out[site] = chosen
    return out


# --- module orientation ------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]``; ``nn.Linear`` as ``[out, in]``."""
    return type(module).__name__ == "Conv1D"


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as ``[out, in]`` whatever its class stores (a view, not a copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


def site_width(anatomy: Anatomy, site: str, layer: int) -> int:
    """Width of ``site`` at ``layer`` in this model."""
    spec = check_site(anatomy, site)
    if spec.wide:
        return int(weight_out_in(spec.module(anatomy, layer)).shape[1])
    return int(anatomy.d_model)


def site_module(anatomy: Anatomy, site: str, layer: int) -> nn.Module:
    spec = check_site(anatomy, site)
    if spec.module is None:
        raise SiteError(f"The site '{site}' is derived from two others and has no module of its own.")
    return spec.module(anatomy, layer)


# --- hook plumbing -----------------------------------------------------------------------------
def first(output):
    """The hidden state of a module output (decoder layers may return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


def hidden_arg(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()))


def read_hook(anatomy: Anatomy, site: str, layer: int, fn: Callable[[torch.Tensor], None]):
    """Register a hook that calls ``fn(activation)`` at ``site``/``layer``; returns the handle."""
    spec = get_site(site)
    module = site_module(anatomy, site, layer)
    if spec.is_input:
        return module.register_forward_pre_hook(lambda m, args, kwargs: fn(hidden_arg(args, kwargs)),
                                                with_kwargs=True)
    return module.register_forward_hook(lambda m, args, output: fn(first(output)))


def write_hook(anatomy: Anatomy, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Register a hook that replaces the activation at ``site``/``layer`` by ``fn(activation)``."""
    spec = get_site(site)
    module = site_module(anatomy, site, layer)
    if not spec.is_input:
        return module.register_forward_hook(lambda m, args, output: replace_first(output, fn(first(output))))

    def pre_hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
