"""Compiling specs into edits: one small compile function per operation.

Compiling validates a spec against the model and a prompt of ``n_tokens`` tokens (layer, site, positions,
indices, finite numbers), loads its SAE, captures a patch's source activations, and returns a
:class:`CompiledEdit`: the site, the layer and a function ``activation -> edited activation`` on
``[batch, positions, width]`` tensors. Nothing is hooked yet; :mod:`engine.interventions.hooks` installs edits.

An edit gets the activation on whatever device its layer computes (a device map may put consecutive layers on
different devices) and in the model's dtype: every value it holds (steering vector, patch values, index tensors,
the SAE's output) is moved to the activation's device, and the result has the activation's device and dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.core.capture import capture
from engine.core.devices import module_device
from engine.core.sites import EDIT_SITES, site_width
from engine.interventions.directions import load_sae_cached, sae_feature_direction
from engine.interventions.specs import (
    OPS,
    Intervention,
    InterventionError,
    check_index,
    check_layer,
    resolve_positions,
)
from engine.lens.logit import check_prompt

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.sae.base import SAE

Edit = Callable[[torch.Tensor], torch.Tensor]  # [B, T, width] (or a [B, P, width] slice) -> same shape and dtype
SaeChange = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (acts at positions, all acts) -> new acts
_SITE_OF_OP = {"ablate_heads": "attn_heads", "ablate_neurons": "mlp_hidden"}  # ops bound to one site


@dataclass
class CompiledEdit:
    """``fn`` rewrites the activation at ``site``/``layer`` once :func:`engine.interventions.hooks.applied` hooks it."""

    site: str
    layer: int
    fn: Edit
    label: str = ""


@dataclass(frozen=True)
class _Target:
    """A spec resolved against the model and the prompt: what every compile function gets."""

    lm: LoadedModel
    spec: Intervention
    site: str
    positions: list[int] | None  # resolved to 0..n_tokens-1; None: every position
    width: int

    @property
    def params(self) -> dict:
        return self.spec.params

    @property
    def device(self) -> torch.device:
        return self.lm.device


# --- building blocks -----------------------------------------------------------------------------
def at_positions(positions: list[int] | None, fn: Edit) -> Edit:
    """Apply ``fn`` to ``h[:, positions]`` ([B, P, d]) and leave the other positions bit-identical."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return fn(h).to(device=h.device, dtype=h.dtype)
        idx = torch.tensor([p for p in positions if p < h.shape[1]], dtype=torch.long, device=h.device)
        if not len(idx):
            return h
        out = h.clone()
        out[:, idx] = fn(h[:, idx]).to(device=h.device, dtype=h.dtype)
        return out
    return edit


def replaced_by(values: torch.Tensor) -> Edit:
    """An edit of ``h[:, P]`` that writes ``values`` (``[P, d]``) into every batch row."""
    return lambda h: values.to(device=h.device, dtype=h.dtype).expand(h.shape[0], -1, -1)


def _prompt_mean(h: torch.Tensor) -> torch.Tensor:
    """Mean over the prompt's tokens except position 0 (BOS has an outsized norm), per batch row: [B, 1, d]."""
    body = h[:, 1:] if h.shape[1] > 1 else h
    return body.mean(dim=1, keepdim=True)


def _reference_means(raw, n: int, device: torch.device) -> torch.Tensor | None:
    """``params["means"]`` checked: ``[n]`` finite numbers, one per feature, or None when not given."""
    if raw is None:
        return None
    try:
        values = torch.tensor([float(v) for v in raw], dtype=torch.float32, device=device)
    except (TypeError, ValueError):
        raise InterventionError("The ablation means must be a list of numbers, one per feature.") from None
    if values.numel() != n:
        raise InterventionError(f"{values.numel()} ablation means were given for {n} features; give one per feature.")
    if not bool(torch.isfinite(values).all()):
        raise InterventionError("The ablation means must be finite numbers.")
    return values


def _ablation_mode(params: dict) -> str:
    mode = params.get("mode", "zero")
    if mode not in ("zero", "mean"):
        raise InterventionError(f"Ablation mode '{mode}' is unknown; choose 'zero' or 'mean'.")
    return mode


def _attached_sae(t: _Target) -> SAE:
    from engine.sae.attach import check_attachable

    sae = load_sae_cached(t.params.get("sae", ""), t.device)
    check_attachable(sae, t.lm.anatomy, t.site, t.spec.layer)
    return sae


def _sae_edit(sae: SAE, positions: list[int] | None, change: SaeChange) -> Edit:
    """Encode, edit the activations (``change(acts_at_positions, acts_all)``), decode, keep the reconstruction error."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        x = h.to(device=module_device(sae), dtype=torch.float32)  # the SAE computes where it lives
        enc = sae.encode_full(x)
        recon = sae.decode(enc.acts, enc.scale, enc.shift)
        acts = enc.acts.clone()  # [B, T, d_sae]
        if positions is None:
            acts = change(acts, enc.acts)
        else:
            idx = torch.tensor(positions, dtype=torch.long, device=x.device)
            acts[:, idx] = change(acts[:, idx], enc.acts)
        edited = sae.decode(acts, enc.scale, enc.shift)
        out = x + (edited - recon)
        if positions is not None:  # untouched positions stay bit-identical
            keep = torch.ones(h.shape[1], dtype=torch.bool, device=x.device)
            keep[idx] = False
            out[:, keep] = x[:, keep]
        return out.to(device=h.device, dtype=h.dtype)
    return edit


# --- one compile function per operation ---------------------------------------------------------
def _given_direction(t: _Target) -> torch.Tensor:
    direction = torch.tensor(t.params.get("direction") or [], dtype=torch.float32)
    if direction.ndim != 1 or direction.numel() != t.width:
        raise InterventionError(f"The steering direction has {direction.numel()} values, but {t.site} at layer "
                                f"{t.spec.layer} has width {t.width}: build it on the same model and site.")
    if not bool(torch.isfinite(direction).all()):
        raise InterventionError("The steering direction contains NaN or infinite values.")
    return direction


def _steer(t: _Target) -> Edit:
    p = t.params
    sae = _attached_sae(t) if "sae" in p else None
    alpha, unit = float(p.get("alpha", 0.0)), float(p.get("unit", 1.0))
    if not (math.isfinite(alpha) and math.isfinite(unit)):
        raise InterventionError(f"The steering strength must be a finite number (got alpha={alpha}, unit={unit}).")
    direction = _given_direction(t) if sae is None else sae_feature_direction(sae, p.get("feature", -1))
    vector = (alpha * unit * direction.float()).to(t.device)  # [width]
    if not bool(torch.isfinite(vector).all()):
        raise InterventionError(f"alpha={alpha:g} makes the steering vector overflow to infinity; use a smaller alpha.")
    return at_positions(t.positions, lambda h: h.float() + vector.to(h.device))


def _clamp_feature(t: _Target) -> Edit:
    sae = _attached_sae(t)
    check_index(t.params.get("feature", -1), sae.d_sae, "SAE feature")
    feature, value = int(t.params["feature"]), float(t.params.get("value", 0.0))
    if not math.isfinite(value):
        raise InterventionError("The clamp value must be a finite number.")

    def change(acts: torch.Tensor, _all: torch.Tensor) -> torch.Tensor:
        acts[..., feature] = value
        return acts
    return _sae_edit(sae, t.positions, change)


def _ablate_features(t: _Target) -> Edit:
    sae = _attached_sae(t)
    features = [int(f) for f in t.params.get("features") or []]
    if not features:
        raise InterventionError("Choose at least one SAE feature to ablate.")
    for f in features:
        check_index(f, sae.d_sae, "SAE feature")
    mode = _ablation_mode(t.params)
    idx = torch.tensor(features, dtype=torch.long, device=t.device)
    means = _reference_means(t.params.get("means"), len(features), t.device) if mode == "mean" else None

    def change(acts: torch.Tensor, all_acts: torch.Tensor) -> torch.Tensor:
        where = idx.to(acts.device)
        if mode == "zero":
            acts[..., where] = 0.0
        elif means is not None:
            acts[..., where] = means.to(device=acts.device, dtype=acts.dtype).expand_as(acts[..., where])
        else:
            acts[..., where] = _prompt_mean(all_acts)[..., where].expand_as(acts[..., where])
        return acts
    return _sae_edit(sae, t.positions, change)


def _ablate_neurons(t: _Target) -> Edit:
    layer, width = t.spec.layer, t.width
    neurons = [int(n) for n in t.params.get("neurons") or []]
    if not neurons:
        raise InterventionError("Choose at least one MLP neuron to ablate.")
    for n in neurons:
        check_index(n, width, f"Neuron (layer {layer} has {width} MLP neurons)")
    mode = _ablation_mode(t.params)
    idx = torch.tensor(neurons, dtype=torch.long, device=t.device)
    pos_idx = None if t.positions is None else torch.tensor(t.positions, dtype=torch.long, device=t.device)

    def neuron_edit(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        neurons_here = idx.to(h.device)
        positions_here = pos_idx.to(h.device) if pos_idx is not None else None
        sel = out[:, positions_here] if positions_here is not None else out
        sel[..., neurons_here] = 0.0 if mode == "zero" else \
            _prompt_mean(h)[..., neurons_here].expand_as(sel[..., neurons_here])
        if positions_here is not None:
            out[:, positions_here] = sel
        return out
    return neuron_edit


def _ablate_heads(t: _Target) -> Edit:
    n_heads = t.lm.anatomy.n_heads
    heads = [int(h) for h in t.params.get("heads") or []]
    if not heads:
        raise InterventionError("Choose at least one attention head to ablate.")
    for h in heads:
        check_index(h, n_heads, f"Attention head (layer {t.spec.layer} has {n_heads} heads)")
    head_dim = t.width // n_heads
    mask = torch.ones(t.width, device=t.device)  # [width]: 0 on the ablated heads' slices
    for h in heads:
        mask[h * head_dim:(h + 1) * head_dim] = 0.0
    return at_positions(t.positions, lambda h: h * mask.to(device=h.device, dtype=h.dtype))


def _patch(t: _Target) -> Edit:
    lm, p = t.lm, t.params
    source = p.get("source")
    if not isinstance(source, str):
        raise InterventionError("A patch needs the source prompt to take the activation from.")
    src_ids = check_prompt(source, lm.tokenizer, lm.context_length)
    src_layer = int(p.get("source_layer", t.spec.layer))
    check_layer(lm.anatomy, src_layer)
    if t.positions is None:
        raise InterventionError("A patch needs explicit target positions (e.g. -1 for the last token).")
    src_positions = resolve_positions(p.get("source_positions", t.spec.positions), len(src_ids))
    if len(src_positions) != len(t.positions):
        raise InterventionError(f"The patch takes {len(src_positions)} source positions but writes "
                                f"{len(t.positions)} target positions; give as many of each.")
    with lm.lock:
        got, _ = capture(lm.anatomy, torch.tensor([src_ids]), sites={t.site: [src_layer]})
    values = got[t.site][0, 0, src_positions].clone()  # [P, d]
    return at_positions(t.positions, replaced_by(values))


_COMPILERS: dict[str, Callable[[_Target], Edit]] = {
    "steer": _steer, "ablate_features": _ablate_features, "clamp_feature": _clamp_feature,
    "ablate_neurons": _ablate_neurons, "ablate_heads": _ablate_heads, "patch": _patch,
}  # keys: specs.OPS


def _compile_one(lm: LoadedModel, spec: Intervention, n_tokens: int) -> CompiledEdit:
    if spec.op not in _COMPILERS:
        raise InterventionError(f"Unknown intervention '{spec.op}'; choose from {', '.join(OPS)}.")
    check_layer(lm.anatomy, spec.layer)
    site = _SITE_OF_OP.get(spec.op, spec.site)
    if site not in EDIT_SITES + ("attn_heads",):
        raise InterventionError(f"The site '{site}' cannot be edited; choose from {', '.join(EDIT_SITES)}.")
    positions = resolve_positions(spec.positions, n_tokens)
    target = _Target(lm, spec, site, positions, site_width(lm.anatomy, site, spec.layer))
    return CompiledEdit(site, spec.layer, _COMPILERS[spec.op](target), spec.describe())


def compile_interventions(lm: LoadedModel, specs: Sequence[Intervention], n_tokens: int) -> list[CompiledEdit]:
    """Validate every spec against a prompt of ``n_tokens`` and prepare its edit (nothing is hooked yet)."""
    return [_compile_one(lm, spec, n_tokens) for spec in specs]
