"""Interventions: steering, ablation, clamping and activation patching as forward hooks.

An intervention is a small declarative, JSON-serialisable :class:`Intervention` (operation, site,
layer, positions, params). A list of them is *compiled* against a prompt (validated, SAEs loaded,
source activations captured) into edit functions, which :func:`applied` installs as forward hooks
for one forward pass and always removes again, also when the pass raises.

Operations (``op``):

- ``steer``          add ``alpha * unit * direction`` (``params``: ``direction`` list of floats, or ``sae`` folder
                     plus ``feature``; ``alpha``; ``unit`` the feature's typical max activation, default 1)
- ``ablate_features``  SAE features set to zero or to a mean, through the SAE: ``x' = x + decode(edited acts)
                     - decode(acts)`` (the reconstruction error is kept). The mean is ``params["means"]`` (one
                     per feature, e.g. over a corpus from the SAE's dashboards) or else the prompt's own mean
- ``clamp_feature``  one SAE feature set to ``value``, the same way
- ``ablate_neurons`` MLP hidden units (site ``mlp_hidden``) set to zero or their mean over the prompt
- ``ablate_heads``   attention heads: their slice of the attention output projection's input is zeroed
- ``patch``          the activation at ``site``/``layer``/``positions`` replaced by the one a source prompt has
                     at ``source_layer``/``source_positions`` (``params``: ``source``, ...)

Sweeps (:func:`patch_sweep`) patch every (layer, position) or every (source layer -> target layer) pair.
They are batched: the target prompt is repeated along the batch and each row carries its own patch,
selected with index tensors inside one hook per layer, so a sweep costs ``cells / batch_size`` forwards.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.core.capture import accepts_logits_to_keep, capture
from engine.core.errors import UserError
from engine.lens.logit import check_prompt, run_lens, tracked_token_ids

Progress = Callable[[float, str], None]
EDIT_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden")
OPS = ("steer", "ablate_features", "clamp_feature", "ablate_neurons", "ablate_heads", "patch")


class InterventionError(UserError):
    """An intervention that cannot be applied to this model or prompt."""


# --- specs ----------------------------------------------------------------------------------
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


def steer(layer: int, direction: Sequence[float], alpha: float, site: str = "resid_post",
          positions: Sequence[int] | None = None, unit: float = 1.0) -> Intervention:
    return Intervention("steer", site, layer, None if positions is None else list(positions),
                        {"direction": [float(v) for v in direction], "alpha": float(alpha), "unit": float(unit)})


def steer_sae_feature(sae_folder: str | Path, feature: int, alpha: float, layer: int, site: str = "resid_post",
                      positions: Sequence[int] | None = None, unit: float = 1.0) -> Intervention:
    """Steer along an SAE decoder row; ``unit`` is the feature's typical max activation (see :func:`feature_unit`)."""
    return Intervention("steer", site, layer, None if positions is None else list(positions),
                        {"sae": str(sae_folder), "feature": int(feature), "alpha": float(alpha), "unit": float(unit)})


def ablate_features(sae_folder: str | Path, features: Sequence[int], layer: int, site: str = "resid_post",
                    mode: str = "zero", positions: Sequence[int] | None = None,
                    means: Sequence[float] | None = None) -> Intervention:
    """``mode="mean"`` sets each feature to ``means[i]`` (a reference mean, e.g. over a corpus) or, without
    ``means``, to its mean over the prompt's own tokens."""
    params = {"sae": str(sae_folder), "features": [int(f) for f in features], "mode": mode}
    if means is not None:
        params["means"] = list(means)  # checked when compiled (specs also come from JSON)
    return Intervention("ablate_features", site, layer, None if positions is None else list(positions), params)


def clamp_feature(sae_folder: str | Path, feature: int, value: float, layer: int, site: str = "resid_post",
                  positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("clamp_feature", site, layer, None if positions is None else list(positions),
                        {"sae": str(sae_folder), "feature": int(feature), "value": float(value)})


def ablate_neurons(layer: int, neurons: Sequence[int], mode: str = "zero",
                   positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("ablate_neurons", "mlp_hidden", layer, None if positions is None else list(positions),
                        {"neurons": [int(n) for n in neurons], "mode": mode})


def ablate_heads(layer: int, heads: Sequence[int], positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("ablate_heads", "attn_heads", layer, None if positions is None else list(positions),
                        {"heads": [int(h) for h in heads]})


def patch(source: str, layer: int, positions: Sequence[int] = (-1,), site: str = "resid_post",
          source_layer: int | None = None, source_positions: Sequence[int] | None = None) -> Intervention:
    return Intervention("patch", site, layer, list(positions),
                        {"source": source, "source_layer": layer if source_layer is None else int(source_layer),
                         "source_positions": list(positions if source_positions is None else source_positions)})


def save_specs(specs: Sequence[Intervention]) -> list[dict]:
    return [spec.to_json() for spec in specs]


def load_specs(raw) -> list[Intervention]:
    if isinstance(raw, dict):
        raw = raw.get("interventions", [raw])
    if not isinstance(raw, list):
        raise InterventionError("The interventions file must hold a JSON list of interventions.")
    return [Intervention.from_json(item) for item in raw]


# --- SAEs (loaded once per folder and modification time) --------------------------------------------
_SAE_CACHE: dict[tuple[str, float, str], object] = {}


def load_sae_cached(folder: str | Path, device: torch.device | str = "cpu"):
    from engine.sae.base import load_sae

    path = Path(folder)
    if not path.is_dir():
        raise InterventionError(f"The SAE folder '{folder}' does not exist; pick one from the SAE list.")
    key = (str(path.resolve()), (path / "sae_weights.safetensors").stat().st_mtime
           if (path / "sae_weights.safetensors").exists() else 0.0, str(device))
    if key not in _SAE_CACHE:
        if len(_SAE_CACHE) >= 4:
            _SAE_CACHE.pop(next(iter(_SAE_CACHE)))
        _SAE_CACHE[key] = load_sae(path, device=device, dtype=torch.float32)
    return _SAE_CACHE[key]


# --- directions ------------------------------------------------------------------------------
def _last_token_acts(lm, prompts: Sequence[str], site: str, layer: int) -> torch.Tensor:
    """``[n, width]`` activation at the last token of each prompt (one forward per prompt, no padding games)."""
    rows = []
    with lm.lock:
        for text in prompts:
            ids = check_prompt(text, lm.tokenizer, lm.context_length)
            got, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [layer]})
            rows.append(got[site][0, 0, -1].float())
    return torch.stack(rows)


def mean_difference_direction(lm, prompts_a: Sequence[str], prompts_b: Sequence[str], layer: int,
                              site: str = "resid_post") -> list[float]:
    """mean(A) - mean(B) of the last-token activation: alpha=1 moves a B prompt to A's mean."""
    if not prompts_a or not prompts_b:
        raise InterventionError("Both prompt sets need at least one prompt to take a difference of means.")
    _check_layer(lm.anatomy, layer)
    return (_last_token_acts(lm, prompts_a, site, layer).mean(0)
            - _last_token_acts(lm, prompts_b, site, layer).mean(0)).tolist()


def probe_direction(lm, prompts_a: Sequence[str], prompts_b: Sequence[str], layer: int,
                    site: str = "resid_post") -> list[float]:
    """Logistic-regression probe A vs B; the unit weight vector scaled to the mean difference along it."""
    from sklearn.linear_model import LogisticRegression

    if len(prompts_a) < 2 or len(prompts_b) < 2:
        raise InterventionError("A probe needs at least two prompts in each set.")
    _check_layer(lm.anatomy, layer)
    a, b = _last_token_acts(lm, prompts_a, site, layer), _last_token_acts(lm, prompts_b, site, layer)
    x = torch.cat([a, b]).numpy()
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    w = torch.tensor(LogisticRegression(max_iter=2000).fit(x, y).coef_[0], dtype=torch.float32)
    w = w / w.norm().clamp_min(1e-12)
    return (w * torch.dot(a.mean(0) - b.mean(0), w)).tolist()


def feature_unit(lm, sae_folder: str | Path, feature: int, texts: Sequence[str] | None = None) -> float:
    """The feature's typical max activation: the median over texts of its max over tokens (position 0 skipped)."""
    from engine.data.prompt_sets import CONCEPTS
    from engine.sae.base import check_attachable

    sae = load_sae_cached(sae_folder, lm.device)
    site, layer = check_attachable(sae, lm.anatomy)
    _check_index(feature, sae.d_sae, "SAE feature")
    if texts is None:
        texts = [", ".join(c[code] for c in CONCEPTS[i:i + 12]) for code in ("en", "fr", "de", "zh")
                 for i in range(0, 48, 12)]
    maxima = []
    with lm.lock, torch.inference_mode():
        for text in texts:
            ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][:256]
            got, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [layer]})
            acts = sae.encode(got[site][0, 0, 1:].float())[:, feature]
            maxima.append(float(acts.max()) if acts.numel() else 0.0)
    positive = [m for m in maxima if m > 0]
    return float(np.median(positive)) if positive else 1.0


# --- validation helpers ----------------------------------------------------------------------
def _check_layer(anatomy, layer: int) -> None:
    if not 0 <= int(layer) < anatomy.n_layers:
        raise InterventionError(f"Layer {layer} does not exist: this model has layers 0..{anatomy.n_layers - 1}.")


def _check_index(index: int, size: int, what: str) -> None:
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


def site_width(anatomy, site: str, layer: int) -> int:
    from engine.sae.base import site_width as width_of

    if site == "attn_heads":
        proj = anatomy.attn_out_proj(layer)
        weight = proj.weight
        return int(weight.shape[0] if type(proj).__name__ == "Conv1D" else weight.shape[1])
    return width_of(anatomy, site, layer)


# --- compiled edits --------------------------------------------------------------------------
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CompiledEdit:
    site: str
    layer: int
    fn: Edit
    label: str = ""


def _at(positions: list[int] | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    """Apply ``fn`` to ``h[:, positions]`` ([B, P, d]) and leave the other positions bit-identical."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return fn(h).to(h.dtype)
        idx = torch.tensor([p for p in positions if p < h.shape[1]], dtype=torch.long, device=h.device)
        if not len(idx):
            return h
        out = h.clone()
        out[:, idx] = fn(h[:, idx]).to(h.dtype)
        return out
    return edit


def _prompt_mean(h: torch.Tensor) -> torch.Tensor:
    """Mean over the prompt's tokens except position 0 (BOS has an outsized norm), per batch row: [B, 1, d]."""
    body = h[:, 1:] if h.shape[1] > 1 else h
    return body.mean(dim=1, keepdim=True)


def _reference_means(raw, n: int, device) -> torch.Tensor | None:
    """``params["means"]`` checked: one finite number per feature, or None when not given."""
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


def _sae_edit(sae, positions, change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Edit:
    """Encode, edit the activations (``change(acts_at_positions, acts_all)``), decode, keep the reconstruction error."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        enc = sae.encode_full(x)
        recon = sae.decode(enc.acts, enc.scale, enc.shift)
        acts = enc.acts.clone()
        if positions is None:
            acts = change(acts, enc.acts)
        else:
            idx = torch.tensor(positions, dtype=torch.long, device=h.device)
            acts[:, idx] = change(acts[:, idx], enc.acts)
        edited = sae.decode(acts, enc.scale, enc.shift)
        out = x + (edited - recon)
        if positions is not None:  # untouched positions stay bit-identical
            keep = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
            keep[idx] = False
            out[:, keep] = x[:, keep]
        return out.to(h.dtype)
    return edit


def _compile_one(lm, spec: Intervention, n_tokens: int) -> CompiledEdit:
    anatomy = lm.anatomy
    if spec.op not in OPS:
        raise InterventionError(f"Unknown intervention '{spec.op}'; choose from {', '.join(OPS)}.")
    _check_layer(anatomy, spec.layer)
    site = "attn_heads" if spec.op == "ablate_heads" else "mlp_hidden" if spec.op == "ablate_neurons" else spec.site
    if site not in EDIT_SITES + ("attn_heads",):
        raise InterventionError(f"The site '{site}' cannot be edited; choose from {', '.join(EDIT_SITES)}.")
    positions = resolve_positions(spec.positions, n_tokens)
    width = site_width(anatomy, site, spec.layer)
    p = spec.params
    device = lm.device

    if spec.op in ("ablate_features", "clamp_feature") or (spec.op == "steer" and "sae" in p):
        from engine.sae.base import check_attachable

        sae = load_sae_cached(p.get("sae", ""), device)
        check_attachable(sae, anatomy, site, spec.layer)

    if spec.op == "steer":
        alpha, unit = float(p.get("alpha", 0.0)), float(p.get("unit", 1.0))
        if not (math.isfinite(alpha) and math.isfinite(unit)):
            raise InterventionError(f"The steering strength must be a finite number (got alpha={alpha}, unit={unit}).")
        if "sae" in p:
            _check_index(p.get("feature", -1), sae.d_sae, "SAE feature")
            direction = sae.W_dec[int(p["feature"])].detach()
        else:
            direction = torch.tensor(p.get("direction") or [], dtype=torch.float32)
            if direction.ndim != 1 or direction.numel() != width:
                raise InterventionError(f"The steering direction has {direction.numel()} values, but {site} at layer "
                                        f"{spec.layer} has width {width}: build it on the same model and site.")
            if not bool(torch.isfinite(direction).all()):
                raise InterventionError("The steering direction contains NaN or infinite values.")
        vector = (alpha * unit * direction.float()).to(device)
        if not bool(torch.isfinite(vector).all()):
            raise InterventionError(f"alpha={alpha:g} makes the steering vector overflow to infinity; use a smaller alpha.")
        fn = _at(positions, lambda h: h.float() + vector)
    elif spec.op in ("ablate_features", "clamp_feature"):
        if spec.op == "clamp_feature":
            _check_index(p.get("feature", -1), sae.d_sae, "SAE feature")
            feature, value = int(p["feature"]), float(p.get("value", 0.0))
            if not math.isfinite(value):
                raise InterventionError("The clamp value must be a finite number.")

            def change(acts, _all):
                acts[..., feature] = value
                return acts
        else:
            features = [int(f) for f in p.get("features") or []]
            if not features:
                raise InterventionError("Choose at least one SAE feature to ablate.")
            for f in features:
                _check_index(f, sae.d_sae, "SAE feature")
            mode = p.get("mode", "zero")
            if mode not in ("zero", "mean"):
                raise InterventionError(f"Ablation mode '{mode}' is unknown; choose 'zero' or 'mean'.")
            idx = torch.tensor(features, dtype=torch.long, device=device)
            means = _reference_means(p.get("means"), len(features), device) if mode == "mean" else None

            def change(acts, all_acts):
                if mode == "zero":
                    acts[..., idx] = 0.0
                elif means is not None:
                    acts[..., idx] = means.to(acts.dtype).expand_as(acts[..., idx])
                else:
                    acts[..., idx] = _prompt_mean(all_acts)[..., idx].expand_as(acts[..., idx])
                return acts
        fn = _sae_edit(sae, positions, change)
    elif spec.op == "ablate_neurons":
        neurons = [int(n) for n in p.get("neurons") or []]
        if not neurons:
            raise InterventionError("Choose at least one MLP neuron to ablate.")
        for n in neurons:
            _check_index(n, width, f"Neuron (layer {spec.layer} has {width} MLP neurons)")
        mode = p.get("mode", "zero")
        if mode not in ("zero", "mean"):
            raise InterventionError(f"Ablation mode '{mode}' is unknown; choose 'zero' or 'mean'.")
        idx = torch.tensor(neurons, dtype=torch.long, device=device)

        def neuron_edit(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            sel = out[:, pos_idx] if positions is not None else out
            sel[..., idx] = 0.0 if mode == "zero" else _prompt_mean(h)[..., idx].expand_as(sel[..., idx])
            if positions is not None:
                out[:, pos_idx] = sel
            return out
        pos_idx = None if positions is None else torch.tensor(positions, dtype=torch.long, device=device)
        fn = neuron_edit
    elif spec.op == "ablate_heads":
        n_heads = anatomy.n_heads
        heads = [int(h) for h in p.get("heads") or []]
        if not heads:
            raise InterventionError("Choose at least one attention head to ablate.")
        for h in heads:
            _check_index(h, n_heads, f"Attention head (layer {spec.layer} has {n_heads} heads)")
        head_dim = width // n_heads
        mask = torch.ones(width, device=device)
        for h in heads:
            mask[h * head_dim:(h + 1) * head_dim] = 0.0
        fn = _at(positions, lambda h: h * mask.to(h.dtype))
    else:  # patch
        source = p.get("source")
        if not isinstance(source, str):
            raise InterventionError("A patch needs the source prompt to take the activation from.")
        src_ids = check_prompt(source, lm.tokenizer, lm.context_length)
        src_layer = int(p.get("source_layer", spec.layer))
        _check_layer(anatomy, src_layer)
        if positions is None:
            raise InterventionError("A patch needs explicit target positions (e.g. -1 for the last token).")
        src_positions = resolve_positions(p.get("source_positions", spec.positions), len(src_ids))
        if len(src_positions) != len(positions):
            raise InterventionError(f"The patch takes {len(src_positions)} source positions but writes "
                                    f"{len(positions)} target positions; give as many of each.")
        with lm.lock:
            got, _ = capture(anatomy, torch.tensor([src_ids]), sites={site: [src_layer]})
        values = got[site][0, 0, src_positions].clone()  # [P, d]
        fn = _at(positions, lambda h: values.to(h.dtype).expand(h.shape[0], -1, -1))
    return CompiledEdit(site, spec.layer, fn, spec.describe())


def compile_interventions(lm, specs: Sequence[Intervention], n_tokens: int) -> list[CompiledEdit]:
    """Validate every spec against a prompt of ``n_tokens`` and prepare its edit (nothing is hooked yet)."""
    return [_compile_one(lm, spec, n_tokens) for spec in specs]


# --- hooks -----------------------------------------------------------------------------------
def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


def _install(anatomy, site: str, layer: int, fn: Edit):
    """Register one hook that rewrites ``site`` at ``layer`` with ``fn``; returns the handle."""
    def output_hook(module, args, output):
        return _replace_first(output, fn(_first(output)))

    def pre_hook_kwargs(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    def pre_hook(module, args):
        return (fn(args[0]),) + tuple(args[1:])

    if site == "resid_post":
        return anatomy.layers[layer].register_forward_hook(output_hook)
    if site == "attn_out":
        return anatomy.attn_branch(layer).register_forward_hook(output_hook)
    if site == "mlp_out":
        return anatomy.mlp_branch(layer).register_forward_hook(output_hook)
    if site == "resid_pre":
        return anatomy.layers[layer].register_forward_pre_hook(pre_hook_kwargs, with_kwargs=True)
    if site == "mlp_hidden":
        return anatomy.mlp_out_proj(layer).register_forward_pre_hook(pre_hook)
    if site == "attn_heads":
        return anatomy.attn_out_proj(layer).register_forward_pre_hook(pre_hook)
    raise InterventionError(f"The site '{site}' cannot be edited; choose from {', '.join(EDIT_SITES)}.")


@contextmanager
def applied(lm, edits: Sequence[CompiledEdit]) -> Iterator[None]:
    """Install every compiled edit (in order) for the block; hooks are removed on exit, also on errors."""
    handles = []
    try:
        for edit in edits:
            handles.append(_install(lm.anatomy, edit.site, edit.layer, edit.fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise InterventionError("The intervention made the model's output NaN or infinite; "
                                "use a smaller alpha or value.")


def _prompt_ids(lm, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return check_prompt(prompt, lm.tokenizer, lm.context_length)
    ids = [int(i) for i in prompt]
    if not ids:
        raise InterventionError("The prompt is empty: type some text to intervene on.")
    return ids


@torch.inference_mode()
def _forward_logits(lm, input_ids: torch.Tensor, edits: Sequence[CompiledEdit] = (),
                    last_only: bool = False) -> torch.Tensor:
    """Logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``: a 262k-token head on every position of a big
    batch would dominate a sweep's memory and time)."""
    extra = {"logits_to_keep": 1} if last_only and accepts_logits_to_keep(lm.model) else {}
    with lm.lock, applied(lm, edits):
        logits = lm.model(input_ids=input_ids.to(lm.device), use_cache=False, **extra).logits
    if last_only:
        logits = logits[:, -1:]
    logits = logits.float()
    _check_finite(logits)
    return logits


def run_with(lm, prompt: str | Sequence[int], specs: Sequence[Intervention]) -> torch.Tensor:
    """Logits ``[T, V]`` (float32) of one prompt with the interventions applied (none: the clean run)."""
    ids = _prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    return _forward_logits(lm, torch.tensor([ids]), edits)[0]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, nats."""
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)


def compare_next_token(lm, prompt: str, specs: Sequence[Intervention], top_k: int = 10) -> dict:
    """Next-token top-k clean vs intervened, and the KL from clean to intervened."""
    ids = _prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = _forward_logits(lm, torch.tensor([ids]))[0, -1]
    hit = _forward_logits(lm, torch.tensor([ids]), edits)[0, -1]
    out = {"kl": float(_kl(clean, hit))}
    for name, logits in (("clean", clean), ("intervened", hit)):
        probs = torch.softmax(logits, -1)
        top = probs.topk(min(top_k, probs.numel()))
        out[name] = [{"token": lm.tokenizer.decode([int(i)]), "id": int(i), "prob": float(v)}
                     for v, i in zip(top.values, top.indices)]
    return out


# --- generation side by side -----------------------------------------------------------------
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


@torch.inference_mode()
def _generate(lm, ids: list[int], edits, max_new_tokens: int, sample: bool, temperature: float, seed: int,
              top_k: int) -> list[int]:
    """Full forward per step (no KV cache), so position-bound edits see the same absolute positions each step."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    seq = list(ids)
    limit = lm.context_length or 10**9
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        if len(seq) >= limit:
            break
        logits = _forward_logits(lm, torch.tensor([seq]), edits, last_only=True)[0, -1]
        if sample:
            scaled = logits / max(temperature, 1e-5)
            if top_k:
                kth = scaled.topk(min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, -float("inf"))
            token = int(torch.multinomial(torch.softmax(scaled, -1).cpu(), 1, generator=generator))
        else:
            token = int(logits.argmax())
        seq.append(token)
        if eos is not None and token == eos:
            break
    return seq[len(ids):]


def generate_compare(lm, prompt: str, specs: Sequence[Intervention], max_new_tokens: int = 20,
                     sample: bool = False, temperature: float = 0.8, seed: int = 0,
                     top_k: int = 50) -> GenerationComparison:
    """Generate with and without the interventions (greedy, or sampled with the same seed) and diff token by token."""
    if not 1 <= int(max_new_tokens) <= 512:
        raise InterventionError("Generate between 1 and 512 new tokens.")
    ids = _prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = _generate(lm, ids, (), max_new_tokens, sample, temperature, seed, top_k)
    hit = _generate(lm, ids, edits, max_new_tokens, sample, temperature, seed, top_k)
    n = max(len(clean), len(hit))
    differs = [i >= len(clean) or i >= len(hit) or clean[i] != hit[i] for i in range(n)]
    decode = lambda seq: [lm.tokenizer.decode([t]) for t in seq]  # noqa: E731
    return GenerationComparison(decode(ids), decode(clean), decode(hit), clean, hit, differs,
                                differs.index(True) if any(differs) else None, sample, seed)


# --- Δ-lens ----------------------------------------------------------------------------------
def delta_lens(lm, prompt: str, specs: Sequence[Intervention], track: Sequence[str] = (), top_k: int = 5,
               positions: Sequence[int] | None = None):
    """``(clean, intervened)`` :class:`LensResult` of the same prompt; subtract them for the Δ view."""
    ids = _prompt_ids(lm, prompt)
    edits = compile_interventions(lm, specs, len(ids))
    clean = run_lens(lm, ids, top_k=top_k, track=track, positions=positions)
    with lm.lock, applied(lm, edits):
        hit = run_lens(lm, ids, top_k=top_k, track=track, positions=positions)
    if not np.isfinite(hit.entropy).all():
        raise InterventionError("The intervention made the model's output NaN or infinite; "
                                "use a smaller alpha or value.")
    return clean, hit


# --- dose-response ---------------------------------------------------------------------------
@dataclass
class DoseResponse:
    alphas: list[float]
    target_prob: list[float]
    kl_to_clean: list[float]
    token: str
    clean_prob: float

    def to_json(self) -> dict:
        return asdict(self)


def dose_response(lm, prompt: str, spec: Intervention, alphas: Sequence[float], token: str) -> DoseResponse:
    """Sweep a steering spec's alpha in ONE batched forward (row r gets alpha r); P(token) and KL to clean."""
    if spec.op != "steer":
        raise InterventionError("A dose-response sweep needs a steering intervention (it varies alpha).")
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise InterventionError("Give at least one finite alpha for the dose-response sweep.")
    ids = _prompt_ids(lm, prompt)
    token_id = tracked_token_ids(lm.tokenizer, [token])[0]
    unit_spec = Intervention(spec.op, spec.site, spec.layer, spec.positions, {**spec.params, "alpha": 1.0})
    edit = compile_interventions(lm, [unit_spec], len(ids))[0]
    scale = torch.tensor(alphas, device=lm.device)

    def batched(h: torch.Tensor) -> torch.Tensor:  # alpha_r * (edit(h) - h) per row r
        delta = edit.fn(h).float() - h.float()
        return (h.float() + scale[:, None, None] * delta).to(h.dtype)

    batch = torch.tensor([ids]).expand(len(alphas), -1)
    clean = _forward_logits(lm, torch.tensor([ids]))[0, -1]
    hit = _forward_logits(lm, batch, [CompiledEdit(edit.site, edit.layer, batched)], last_only=True)[:, -1]
    probs = torch.softmax(hit, -1)[:, token_id]
    kl = _kl(clean.expand_as(hit), hit)
    return DoseResponse(alphas, probs.tolist(), kl.tolist(), token, float(torch.softmax(clean, -1)[token_id]))


# --- patching sweeps -------------------------------------------------------------------------
@dataclass
class SweepResult:
    """Effect of each patch on the target's last-position metric; rows and columns depend on ``kind``."""

    kind: str                 # "layer_position" (rows layers, cols positions) or "layer_layer" (rows target, cols source)
    metric: str               # "prob" or "logit_diff"
    values: np.ndarray        # [rows, cols]
    row_labels: list[str]
    col_labels: list[str]
    target_value: float       # the target run, unpatched ("corrupted" baseline)
    source_value: float       # the source run itself ("clean" baseline)
    token: str
    token_b: str | None = None
    site: str = "resid_post"

    def to_json(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "values": self.values.tolist(),
                "row_labels": self.row_labels, "col_labels": self.col_labels, "target_value": self.target_value,
                "source_value": self.source_value, "token": self.token, "token_b": self.token_b, "site": self.site}


def _metric_fn(lm, metric: str, token: str, token_b: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    ids = tracked_token_ids(lm.tokenizer, [token] + ([token_b] if token_b else []))
    if metric == "prob":
        return lambda logits: torch.softmax(logits.float(), -1)[..., ids[0]]
    if metric == "logit_diff":
        if len(ids) < 2:
            raise InterventionError("A logit difference needs a second token to compare with.")
        return lambda logits: logits[..., ids[0]].float() - logits[..., ids[1]].float()
    raise InterventionError(f"Unknown metric '{metric}'; choose 'prob' or 'logit_diff'.")


@torch.inference_mode()
@contextmanager
def replayed_prefix(anatomy, outputs: Sequence, upto: int, batch: int) -> Iterator[None]:
    """Make decoder layers ``0..upto-1`` return their recorded clean outputs instead of computing.

    Every row of a patching batch is the same prompt and no row is edited before layer ``upto``, so
    those layers would recompute the clean run; replaying it skips them. Only ``forward`` is swapped
    on the instance (hooks, attributes and any wrapper already installed there stay as they are).
    """
    swapped = []
    try:
        for i in range(upto):
            layer = anatomy.layers[i]
            recorded = outputs[i]

            def replay(*args, recorded=recorded, **kwargs):
                first = _hidden_of(recorded)
                hidden = first.expand(batch, *first.shape[1:]).contiguous()
                return (hidden, *recorded[1:]) if isinstance(recorded, tuple) else hidden
            swapped.append((layer, layer.__dict__.get("forward")))
            layer.forward = replay
        yield
    finally:
        for layer, previous in swapped:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _clean_layer_outputs(lm, ids: list[int]) -> list:
    """Each decoder layer's output object on the clean prompt (batch of one)."""
    outputs: list = [None] * lm.anatomy.n_layers
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(lm.anatomy.layers)]
    try:
        _forward_logits(lm, torch.tensor([ids]), last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def run_row_patches(lm, ids: list[int], site: str, layers: torch.Tensor, positions: torch.Tensor,
                    values: torch.Tensor, batch_size: int = 64,
                    progress: Progress | None = None) -> torch.Tensor:
    """Last-position logits ``[R, V]`` of R copies of ``ids``; row r has ``values[r]`` written at
    (``layers[r]``, ``positions[r]``) of ``site``. One hook per layer edits its rows through index tensors.

    Rows are run in batches ordered by layer; in each batch the layers below its lowest patched layer
    replay the clean run's outputs instead of being computed (about half the work of a full sweep).
    """
    total = len(layers)
    order = torch.argsort(layers, stable=True)
    out = torch.empty(0)
    base = torch.tensor([ids], device=lm.device)
    with lm.lock:
        clean = _clean_layer_outputs(lm, ids)
        for start in range(0, total, batch_size):
            stop = min(total, start + batch_size)
            picked = order[start:stop]
            chunk_layers = layers[picked].to(lm.device)
            chunk_pos = positions[picked].to(lm.device)
            chunk_vals = values[picked.to(values.device)].to(lm.device)
            edits = []
            for layer in torch.unique(chunk_layers).tolist():
                rows = (chunk_layers == layer).nonzero()[:, 0]

                def fn(h, rows=rows):
                    h = h.clone()
                    h[rows, chunk_pos[rows]] = chunk_vals[rows].to(h.dtype)
                    return h
                edits.append(CompiledEdit(site, int(layer), fn))
            with replayed_prefix(lm.anatomy, clean, int(chunk_layers.min()), stop - start):
                logits = _forward_logits(lm, base.expand(stop - start, -1).contiguous(), edits, last_only=True)
            if not len(out):
                out = torch.empty((total, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
            out[picked.to(out.device)] = logits[:, -1]
            if progress:
                progress(stop / total, f"patched {stop} of {total}")
    return out


def patch_sweep(lm, source: str, target: str, token: str, *, kind: str = "layer_position",
                metric: str = "prob", token_b: str | None = None, site: str = "resid_post",
                source_position: int = -1, target_position: int = -1, batched: bool = True,
                batch_size: int = 64, progress: Progress | None = None) -> SweepResult:
    """Patch the source's activation into the target at every (layer, position) or (target layer, source layer).

    ``layer_position`` needs prompts of equal token length (position p goes to position p);
    ``layer_layer`` patches ``source_position`` -> ``target_position`` from each source layer into each
    target layer (back-patching when the source layer is later). ``batched=False`` runs one forward per patch
    with the same cached source activations (the baseline the benchmark times the batched path against).
    """
    if kind not in ("layer_position", "layer_layer"):
        raise InterventionError(f"Unknown sweep '{kind}'; choose 'layer_position' or 'layer_layer'.")
    if site not in EDIT_SITES:
        raise InterventionError(f"The site '{site}' cannot be patched; choose from {', '.join(EDIT_SITES)}.")
    anatomy = lm.anatomy
    src_ids, tgt_ids = _prompt_ids(lm, source), _prompt_ids(lm, target)
    measure = _metric_fn(lm, metric, token, token_b)
    n_layers = anatomy.n_layers
    with lm.lock:
        got, src_out = capture(anatomy, torch.tensor([src_ids]), sites={site: "all"}, stop_early=False)
    src_acts = got[site][:, 0]  # [L, T_src, d]
    source_value = float(measure(src_out.logits[0, -1]))
    target_value = float(measure(_forward_logits(lm, torch.tensor([tgt_ids]))[0, -1]))
    if kind == "layer_position":
        if len(src_ids) != len(tgt_ids):
            raise InterventionError(f"The source has {len(src_ids)} tokens and the target {len(tgt_ids)}; a "
                                    "(layer, position) sweep needs prompts of the same token length.")
        n_pos = len(tgt_ids)
        grid_l, grid_p = torch.meshgrid(torch.arange(n_layers), torch.arange(n_pos), indexing="ij")
        t_layers, t_pos = grid_l.reshape(-1), grid_p.reshape(-1)
        s_layers, s_pos = t_layers, t_pos
        rows = [str(i) for i in range(n_layers)]
        decoded = [lm.tokenizer.decode([t]) for t in tgt_ids]
        cols = [f"{p}:{decoded[p]}" for p in range(n_pos)]
        shape = (n_layers, n_pos)
    else:
        sp = resolve_positions([source_position], len(src_ids))[0]
        tp = resolve_positions([target_position], len(tgt_ids))[0]
        grid_t, grid_s = torch.meshgrid(torch.arange(n_layers), torch.arange(n_layers), indexing="ij")
        t_layers, s_layers = grid_t.reshape(-1), grid_s.reshape(-1)
        t_pos = torch.full_like(t_layers, tp)
        s_pos = torch.full_like(s_layers, sp)
        rows = cols = [str(i) for i in range(n_layers)]
        shape = (n_layers, n_layers)
    if batched:
        values = src_acts[s_layers.to(src_acts.device), s_pos.to(src_acts.device)]  # [R, d]
        logits = run_row_patches(lm, tgt_ids, site, t_layers, t_pos, values, batch_size, progress)
        cells = measure(logits)
    else:  # one forward per patch, with the same cached source activations
        results = []
        total = len(t_layers)
        for r in range(total):
            value = src_acts[int(s_layers[r]), int(s_pos[r])][None]
            edit = CompiledEdit(site, int(t_layers[r]),
                                _at([int(t_pos[r])], lambda h, v=value: v.to(h.dtype).expand(h.shape[0], -1, -1)))
            results.append(measure(_forward_logits(lm, torch.tensor([tgt_ids]), [edit], last_only=True)[0, -1]))
            if progress:
                progress((r + 1) / total, f"patched {r + 1} of {total}")
        cells = torch.stack(results)
    return SweepResult(kind, metric, cells.reshape(shape).cpu().numpy(), rows, cols, target_value, source_value,
                       token, token_b, site)


# --- "Separating tongue from thought" --------------------------------------------------------
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
    import random

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


def tongue_thought(lm, concept_a: str = "dog", concept_b: str = "water", source_in: str = "de",
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
    x, y = source_out, target_out
    words = {f"{ca} in {lang}": conc[lang] for ca, conc in (("A", a), ("B", b)) for lang in (y, x)}
    labels = list(words)
    token_ids = []
    for label in labels:
        ids = lm.tokenizer(words[label], add_special_tokens=False)["input_ids"]
        token_ids.append(int(ids[0]))
    token_idx = torch.tensor(token_ids, device=lm.device)
    src_ids, tgt_ids = _prompt_ids(lm, src_prompt), _prompt_ids(lm, tgt_prompt)
    n_layers = lm.anatomy.n_layers
    with lm.lock:
        got, src_out = capture(lm.anatomy, torch.tensor([src_ids]), sites={site: "all"}, stop_early=False)
    values = got[site][:, 0, -1]  # [L, d]: the last-token latent of the source at each layer
    layers = torch.arange(n_layers)
    logits = run_row_patches(lm, tgt_ids, site, layers, torch.full_like(layers, len(tgt_ids) - 1), values, batch_size)
    probs = torch.softmax(logits, -1)[:, token_idx].cpu()  # [L, labels]
    clean = torch.softmax(_forward_logits(lm, torch.tensor([tgt_ids]))[0, -1], -1)[token_idx].cpu()
    src_probs = torch.softmax(src_out.logits[0, -1].float(), -1)[token_idx].cpu()
    return TongueThoughtResult(
        layers=[str(i) for i in range(n_layers)],
        curves={label: probs[:, i].tolist() for i, label in enumerate(labels)},
        baselines={"target": {label: float(clean[i]) for i, label in enumerate(labels)},
                   "source": {label: float(src_probs[i]) for i, label in enumerate(labels)}},
        source_prompt=src_prompt, target_prompt=tgt_prompt, tokens=words)
