"""Intervention specs: what to edit, where, and with which parameters, as small JSON-serialisable records.

An :class:`Intervention` names an operation (``op``), a site, a layer, the positions (None: every
position; negative positions count from the end) and the operation's ``params``:

- ``steer``            add ``alpha * unit * direction`` (``params``: ``direction`` list of floats, or ``sae``
                       folder plus ``feature``; ``alpha``; ``unit`` the feature's typical max activation, default 1)
- ``ablate_features``  SAE features set to zero or to a mean, through the SAE (the reconstruction error is kept).
                       The mean is ``params["means"]`` (one per feature, e.g. over a corpus from the SAE's
                       dashboards) or else the prompt's own mean
- ``clamp_feature``    one SAE feature set to ``value``, the same way
- ``ablate_neurons``   MLP hidden units (site ``mlp_hidden``) set to zero or their mean over the prompt
- ``ablate_heads``     attention heads: their slice of the attention output projection's input is zeroed
- ``patch``            the activation at ``site``/``layer``/``positions`` replaced by the one a source prompt has
                       at ``source_layer``/``source_positions`` (``params``: ``source``, ...)

This module also holds the checks every other module of the package shares (layers, indices,
positions, prompts). Nothing here touches a model's weights or runs a forward pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import UserError
from engine.lens.logit import check_prompt

if TYPE_CHECKING:
    from engine.core.anatomy import Anatomy
    from engine.core.models import LoadedModel

OPS = ("steer", "ablate_features", "clamp_feature", "ablate_neurons", "ablate_heads", "patch")


class InterventionError(UserError):
    """An intervention that cannot be applied to this model or prompt."""


@dataclass
class Intervention:
    """One edit of one site at one layer; ``positions`` None means every position (negative counts from the end)."""

    op: str
    site: str
    layer: int
    positions: list[int] | None = None
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> Intervention:
        if not isinstance(raw, dict) or "op" not in raw or "layer" not in raw:
            raise InterventionError("An intervention must be a JSON object with at least 'op' and 'layer'.")
        return cls(op=str(raw["op"]), site=str(raw.get("site", "resid_post")), layer=int(raw["layer"]),
                   positions=None if raw.get("positions") is None else [int(p) for p in raw["positions"]],
                   params=dict(raw.get("params") or {}))

    def describe(self) -> str:
        where = "all positions" if self.positions is None else f"positions {self.positions}"
        p = self.params
        detail = {
            "steer": lambda: f"alpha={p.get('alpha')}" + (f" · SAE feature {p['feature']}" if "sae" in p else ""),
            "ablate_features": lambda: f"{p.get('mode', 'zero')} features {p.get('features')}"
                                       + (" (reference means)" if p.get("means") is not None else ""),
            "clamp_feature": lambda: f"feature {p.get('feature')} = {p.get('value')}",
            "ablate_neurons": lambda: f"{p.get('mode', 'zero')} neurons {p.get('neurons')}",
            "ablate_heads": lambda: f"heads {p.get('heads')}",
            "patch": lambda: f"from {p.get('source', '')[:30]!r} layer {p.get('source_layer', self.layer)}",
        }.get(self.op, lambda: "")()
        return f"{self.op} · {self.site} L{self.layer} · {where} · {detail}"


# --- builders (one per operation) ---------------------------------------------------------------
def _positions(positions: Sequence[int] | None) -> list[int] | None:
    return None if positions is None else list(positions)


def steer(layer: int, direction: Sequence[float], alpha: float, site: str = "resid_post",
          positions: Sequence[int] | None = None, unit: float = 1.0) -> Intervention:
    return Intervention("steer", site, layer, _positions(positions),
                        {"direction": [float(v) for v in direction], "alpha": float(alpha), "unit": float(unit)})


def steer_sae_feature(sae_folder: str | Path, feature: int, alpha: float, layer: int, site: str = "resid_post",
                      positions: Sequence[int] | None = None, unit: float = 1.0) -> Intervention:
    """Steer along an SAE decoder row; ``unit`` is the feature's typical max activation
    (see :func:`engine.interventions.directions.feature_unit`)."""
    return Intervention("steer", site, layer, _positions(positions),
                        {"sae": str(sae_folder), "feature": int(feature), "alpha": float(alpha), "unit": float(unit)})


def ablate_features(sae_folder: str | Path, features: Sequence[int], layer: int, site: str = "resid_post",
                    mode: str = "zero", positions: Sequence[int] | None = None,
                    means: Sequence[float] | None = None) -> Intervention:
    """``mode="mean"`` sets each feature to ``means[i]`` (a reference mean, e.g. over a corpus) or, without
    ``means``, to its mean over the prompt's own tokens."""
    params: dict[str, Any] = {"sae": str(sae_folder), "features": [int(f) for f in features], "mode": mode}
    if means is not None:
        params["means"] = list(means)  # checked when compiled (specs also come from JSON)
    return Intervention("ablate_features", site, layer, _positions(positions), params)


def clamp_feature(sae_folder: str | Path, feature: int, value: float, layer: int, site: str = "resid_post",
                  positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("clamp_feature", site, layer, _positions(positions),
                        {"sae": str(sae_folder), "feature": int(feature), "value": float(value)})


def ablate_neurons(layer: int, neurons: Sequence[int], mode: str = "zero",
                   positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("ablate_neurons", "mlp_hidden", layer, _positions(positions),
                        {"neurons": [int(n) for n in neurons], "mode": mode})


def ablate_heads(layer: int, heads: Sequence[int], positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("ablate_heads", "attn_heads", layer, _positions(positions),
                        {"heads": [int(h) for h in heads]})


def patch(source: str, layer: int, positions: Sequence[int] = (-1,), site: str = "resid_post",
          source_layer: int | None = None, source_positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("patch", site, layer, list(positions),
                        {"source": source, "source_layer": layer if source_layer is None else int(source_layer),
                         "source_positions": list(positions if source_positions is None else source_positions)})


# --- JSON files ---------------------------------------------------------------------------------
def save_specs(specs: Sequence[Intervention]) -> list[dict]:
    return [spec.to_json() for spec in specs]


def load_specs(raw: Any) -> list[Intervention]:
    """A JSON list of specs, a single spec, or ``{"interventions": [...]}`` -> specs."""
    if isinstance(raw, dict):
        raw = raw.get("interventions", [raw])
    if not isinstance(raw, list):
        raise InterventionError("The interventions file must hold a JSON list of interventions.")
    return [Intervention.from_json(item) for item in raw]


# --- checks shared by the package ---------------------------------------------------------------
def check_layer(anatomy: Anatomy, layer: int) -> None:
    if not 0 <= int(layer) < anatomy.n_layers:
        raise InterventionError(f"Layer {layer} does not exist: this model has layers 0..{anatomy.n_layers - 1}.")


def check_index(index: int, size: int, what: str) -> None:
    if not 0 <= int(index) < size:
        raise InterventionError(f"{what} {index} does not exist: valid indices are 0..{size - 1}.")


def resolve_positions(positions: Sequence[int] | None, n: int) -> list[int] | None:
    """Negative positions count from the end; anything outside 0..n-1 is an error."""
    if positions is None:
        return None
    out = []
    for p in positions:
        q = int(p) + n if int(p) < 0 else int(p)
        if not 0 <= q < n:
            raise InterventionError(f"Position {p} is beyond the prompt, which has positions 0..{n - 1} "
                                    f"(or -1..-{n} from the end).")
        out.append(q)
    if not out:
        raise InterventionError("No position was chosen for the intervention.")
    return out


def prompt_ids(lm: LoadedModel, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text (checked against the context length) or as ids."""
    if isinstance(prompt, str):
        return check_prompt(prompt, lm.tokenizer, lm.context_length)
    ids = [int(i) for i in prompt]
    if not ids:
        raise InterventionError("The prompt is empty: type some text to intervene on.")
    return ids
