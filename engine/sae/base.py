"""Sparse autoencoders in the SAELens on-disk format: modules, load/save, where they attach.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, plus ``threshold [d_sae]`` for JumpReLU and ``b_gate``,
``r_mag``, ``b_mag`` instead of ``b_enc`` for gated SAEs) and optionally ``sparsity.safetensors``
(``sparsity [d_sae]``: log10 feature firing frequency).

The math is SAELens's::

    x' = normalize_in(x) - b_dec        (b_dec subtracted only when apply_b_dec_to_input)
    pre = x' @ W_enc + b_enc
    a = activation(pre)                 (relu | top-k then relu | relu masked by pre > threshold | gated)
    x_hat = normalize_out(a @ W_dec + b_dec)

Configs written by older SAELens versions (flat ``hook_point``, ``activation_fn_str``,
``activation_fn_kwargs``) load too. ``metadata.hook_name`` in TransformerLens naming
(``blocks.L.hook_resid_post``) or Hugging Face naming (``model.layers.L``) is mapped to this engine's
capture sites, so a published SAE attaches to the right module of a Hugging Face model.
Nothing is unpickled, and a folder that fails any check loads nothing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import UserError
from engine.core.fileio import atomic_save_tensors, atomic_write_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# keys SAELens accepts inside cfg["metadata"]; anything of ours goes under cfg["latent_explorer"]
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index",
                 "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
                 "context_size", "seqpos_slice", "dataset_path", "sae_lens_version", "sae_lens_training_version")
# sites an SAE can read (resid_mid has no module of its own, so it cannot be spliced)
SAE_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden")


class SAELoadError(UserError):
    """An SAE folder or config is missing, malformed or inconsistent."""


class SAECompatibilityError(UserError):
    """An SAE does not fit the model or site it is asked to attach to."""


# --- hook names <-> sites -------------------------------------------------------------------
_TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "mlp.hook_post": "mlp_hidden"}
_SITE_HOOKS = {site: hook for hook, site in _TL_HOOKS.items()}
_HF_PATTERNS = [  # Hugging Face module paths used by some SAE releases (EleutherAI, Llama Scope ...)
    (re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$"), "resid_post"),
    (re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp$"), "mlp_out"),
    (re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)$"),
     "attn_out"),
]


def hook_name_to_site(hook_name: str) -> tuple[str, int]:
    """``blocks.6.hook_resid_post`` (TransformerLens) or ``model.layers.6`` (HF) -> ``("resid_post", 6)``."""
    name = (hook_name or "").strip()
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in _TL_HOOKS:
        return _TL_HOOKS[match.group(2)], int(match.group(1))
    for pattern, site in _HF_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return site, int(match.group(1))
    raise SAECompatibilityError(
        f"The SAE's hook '{hook_name}' is not supported: use a residual-stream, attn_out, mlp_out or MLP-hidden "
        "hook such as 'blocks.6.hook_resid_post'."
    )


def site_to_hook_name(site: str, layer: int) -> str:
    """``("resid_post", 6)`` -> ``blocks.6.hook_resid_post`` (the name SAELens and Neuronpedia use)."""
    if site not in _SITE_HOOKS:
        raise SAECompatibilityError(f"Unknown site '{site}'; choose from {', '.join(_SITE_HOOKS)}.")
    return f"blocks.{int(layer)}.{_SITE_HOOKS[site]}"


# --- config ---------------------------------------------------------------------------------
def _dtype_name(value: Any) -> str:
    name = str(value or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise SAELoadError(f"The SAE config names dtype '{value}'; use one of {', '.join(DTYPES)}.")
    return name


def _positive_int(raw: dict, key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise SAELoadError(f"The SAE config needs '{key}' as a positive integer (found {value!r}).")
    return int(value)


@dataclass
class SAEConfig:
    """What ``cfg.json`` says, normalised to the current SAELens layout."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None  # for expected_average_only_in; applied at run time when known
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # unknown top-level fields, written back unchanged

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(f"Unknown SAE architecture '{self.architecture}'; "
                               f"supported: {', '.join(ARCHITECTURES)}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAELoadError(f"Unknown normalize_activations '{self.normalize_activations}'; "
                               f"supported: {', '.join(NORMALIZATIONS)}.")
        if self.architecture == "topk":
            if self.k is None or not 0 < int(self.k) <= self.d_sae:
                raise SAELoadError(f"A topk SAE needs k between 1 and d_sae={self.d_sae} (found {self.k!r}).")
            self.k = int(self.k)
        self.dtype = _dtype_name(self.dtype)

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    def site(self) -> tuple[str, int]:
        """The engine site and layer this SAE reads, from ``metadata.hook_name``."""
        if not self.hook_name:
            raise SAECompatibilityError("The SAE config names no hook (metadata.hook_name), so its layer is unknown.")
        return hook_name_to_site(self.hook_name)

    def to_dict(self) -> dict:
        out: dict[str, Any] = dict(self.extra)
        out.update({"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
                    "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
                    "normalize_activations": self.normalize_activations, "reshape_activations": "none"})
        if self.k is not None:
            out["k"] = self.k
        if self.norm_scaling_factor is not None:
            out["norm_scaling_factor"] = self.norm_scaling_factor
        out["metadata"] = {key: value for key, value in self.metadata.items() if key in METADATA_KEYS}
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> SAEConfig:
        """Read a current or older SAELens ``cfg.json`` dictionary."""
        if not isinstance(raw, dict):
            raise SAELoadError("The SAE config is not a JSON object.")
        d_in, d_sae = _positive_int(raw, "d_in"), _positive_int(raw, "d_sae")
        activation = raw.get("activation_fn_str") or raw.get("activation_fn")
        kwargs = raw.get("activation_fn_kwargs") or {}
        architecture = raw.get("architecture")
        if architecture is None or (architecture == "standard" and activation == "topk"):
            architecture = "topk" if activation == "topk" else (architecture or "standard")
        if activation not in (None, "relu", "topk") and architecture == "standard":
            raise SAELoadError(f"The SAE uses activation function '{activation}', which is not supported.")
        k = raw.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        metadata: dict = {}
        for key in METADATA_KEYS:
            if raw.get(key) is not None:
                metadata[key] = raw[key]
        if raw.get("hook_point") and "hook_name" not in metadata:
            metadata["hook_name"] = raw["hook_point"]
        if raw.get("hook_point_layer") is not None and "hook_layer" not in metadata:
            metadata["hook_layer"] = raw["hook_point_layer"]
        nested = raw.get("metadata", raw.get("meta"))
        if nested is not None and not isinstance(nested, dict):
            raise SAELoadError("The SAE config's 'metadata' is not a JSON object.")
        metadata.update({key: value for key, value in (nested or {}).items() if value is not None})
        normalize = raw.get("normalize_activations", "none")
        if normalize in (None, False):
            normalize = "none"
        factor = raw.get("norm_scaling_factor")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
            raise SAELoadError(f"The SAE config's norm_scaling_factor must be a positive number (found {factor!r}).")
        known = {"d_in", "d_sae", "architecture", "k", "dtype", "apply_b_dec_to_input", "normalize_activations",
                 "norm_scaling_factor", "metadata", "meta", "activation_fn_str", "activation_fn",
                 "activation_fn_kwargs", "hook_point", "hook_point_layer", "device", "reshape_activations",
                 *METADATA_KEYS}
        extra = {key: value for key, value in raw.items() if key not in known}
        if raw.get("reshape_activations", "none") not in ("none", None):
            raise SAELoadError("SAEs on reshaped activations (hook_z) are not supported.")
        return cls(d_in=d_in, d_sae=d_sae, architecture=str(architecture), k=k, dtype=raw.get("dtype", "float32"),
                   apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                   normalize_activations=str(normalize),
                   norm_scaling_factor=float(factor) if isinstance(factor, (int, float)) else None,
                   metadata=metadata, extra=extra)


def parameter_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor ``sae_weights.safetensors`` must hold for this architecture, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in),
                                          "b_dec": (cfg.d_in,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(cfg.d_sae,), r_mag=(cfg.d_sae,), b_mag=(cfg.d_sae,))
    else:
        shapes["b_enc"] = (cfg.d_sae,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


# --- the module -----------------------------------------------------------------------------
@dataclass
class Encoded:
    """Result of :meth:`SAE.encode_full`: activations, pre-activations and what decode needs to undo scaling."""

    acts: torch.Tensor
    pre: torch.Tensor
    scale: torch.Tensor | float = 1.0
    shift: torch.Tensor | float = 0.0


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


class SAE(nn.Module):
    """A sparse autoencoder with SAELens's parameter names and math (inference and training)."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = dtype or DTYPES[cfg.dtype]
        for name, shape in parameter_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))

    # -- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    # -- math
    def _normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in" and self.cfg.norm_scaling_factor is not None:
            factor = self.cfg.norm_scaling_factor
            return x * factor, 1.0 / factor, 0.0
        if mode == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coeff, 1.0 / coeff, 0.0
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), std, mu
        return x, 1.0, 0.0

    def encode_full(self, x: torch.Tensor) -> Encoded:
        """Encode ``[..., d_in]`` and keep what :meth:`decode` needs to undo input normalisation."""
        x = x.to(self.W_enc.dtype)
        x, scale, shift = self._normalize_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        arch = self.cfg.architecture
        if arch == "gated":
            pre = x @ self.W_enc + self.b_gate
            magnitude = (x @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
            acts = magnitude * (pre > 0).to(magnitude.dtype)
            return Encoded(acts, pre, scale, shift)
        pre = x @ self.W_enc + self.b_enc
        if arch == "standard":
            acts = pre.relu()
        elif arch == "topk":
            acts = topk_activation(pre, self.cfg.k)
        else:  # jumprelu
            acts = pre.relu() * (pre > self.threshold).to(pre.dtype)
        return Encoded(acts, pre, scale, shift)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]``."""
        return self.encode_full(x).acts

    def decode(self, acts: torch.Tensor, scale: torch.Tensor | float = 1.0,
               shift: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Reconstruction ``[..., d_in]``; pass ``scale``/``shift`` from :meth:`encode_full` for per-token norms."""
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations == "expected_average_only_in" and self.cfg.norm_scaling_factor:
            return out / self.cfg.norm_scaling_factor
        return out * scale + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode_full(x)
        return self.decode(enc.acts, enc.scale, enc.shift)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, acts)`` in one pass."""
        enc = self.encode_full(x)
        return self.decode(enc.acts, enc.scale, enc.shift), enc.acts

    # -- housekeeping
    @torch.no_grad()
    def fold_input_scale(self, factor: float) -> None:
        """Make an SAE trained on ``x * factor`` take raw ``x`` with identical activations (SAELens folding)."""
        self.W_enc.mul_(factor)
        self.W_dec.div_(factor)
        self.b_dec.div_(factor)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().contiguous() for name, param in self.named_parameters()}

    def save(self, folder: str | Path, sparsity: torch.Tensor | None = None) -> Path:
        """Write ``cfg.json``, ``sae_weights.safetensors`` (and ``sparsity.safetensors``) atomically."""
        return save_sae(self, folder, sparsity)


# --- load / save ----------------------------------------------------------------------------
def save_sae(sae: SAE, folder: str | Path, sparsity: torch.Tensor | None = None,
             extra_cfg: dict | None = None) -> Path:
    """Save in the SAELens layout; ``extra_cfg`` lands under ``cfg["latent_explorer"]``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg.to_dict()
    cfg["dtype"] = str(sae.W_enc.dtype).replace("torch.", "")
    if extra_cfg:
        cfg["latent_explorer"] = {**cfg.get("latent_explorer", {}), **extra_cfg}
    atomic_save_tensors(folder / WEIGHTS_FILE, sae.state_tensors())
    if sparsity is not None:
        if tuple(sparsity.shape) != (sae.d_sae,):
            raise SAELoadError(f"The sparsity vector has shape {tuple(sparsity.shape)}, expected ({sae.d_sae},).")
        atomic_save_tensors(folder / SPARSITY_FILE, {"sparsity": sparsity.float()})
    atomic_write_json(folder / CFG_FILE, cfg)  # written last: a folder with a cfg.json is complete
    return folder


def read_config(folder: str | Path) -> SAEConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise SAELoadError(f"The SAE folder '{folder}' does not exist.")
    path = folder / CFG_FILE
    if not path.is_file():
        raise SAELoadError(f"The folder '{folder}' has no {CFG_FILE}, so it is not an SAELens-format SAE.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SAELoadError(f"'{path}' is not valid JSON ({exc}).") from exc
    return SAEConfig.from_dict(raw)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise SAELoadError(f"'{path}' is not a readable safetensors file ({type(exc).__name__}: {exc}).") from exc


def load_sae(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> SAE:
    """Load an SAELens-format folder; every check passes before anything is returned."""
    folder = Path(folder)
    cfg = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SAELoadError(f"The folder '{folder}' has no {WEIGHTS_FILE}.")
    tensors = _read_tensors(weights_path)
    expected = parameter_shapes(cfg)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SAELoadError(f"{WEIGHTS_FILE} lacks {', '.join(missing)} needed by a {cfg.architecture} SAE.")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SAELoadError(f"{WEIGHTS_FILE}: '{name}' has shape {tuple(tensor.shape)} but cfg.json "
                               f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}.")
        if not tensor.is_floating_point():
            raise SAELoadError(f"{WEIGHTS_FILE}: '{name}' has dtype {tensor.dtype}; SAE weights must be floating point.")
        if not bool(torch.isfinite(tensor).all()):
            raise SAELoadError(f"{WEIGHTS_FILE}: '{name}' contains NaN or infinite values.")
    if isinstance(dtype, str):
        dtype = DTYPES[_dtype_name(dtype)]
    target = dtype or DTYPES[cfg.dtype]
    sae = SAE(cfg, device=device, dtype=target)
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name].to(device=device, dtype=target))
    return sae.eval()


def load_sparsity(folder: str | Path) -> torch.Tensor | None:
    """The log10 feature sparsity saved beside the weights, or None when there is none."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    tensors = _read_tensors(path)
    if "sparsity" not in tensors or tensors["sparsity"].ndim != 1:
        raise SAELoadError(f"'{path}' holds no 1-D tensor named 'sparsity'.")
    return tensors["sparsity"].float()


def is_sae_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def list_saes(root: str | Path | None = None) -> list[Path]:
    """SAE folders under ``root`` (default ``cache_root()/"saes"``), newest first."""
    if root is None:
        from engine.core.models import cache_root

        root = cache_root() / "saes"
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path.parent for path in root.rglob(CFG_FILE) if is_sae_folder(path.parent)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


# --- attaching to a model -------------------------------------------------------------------
def site_width(anatomy, site: str, layer: int) -> int:
    """Width of ``site`` at ``layer`` in this model."""
    if site == "mlp_hidden":
        proj = anatomy.mlp_out_proj(layer)
        weight = proj.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        return int(weight.shape[0] if type(proj).__name__ == "Conv1D" else weight.shape[1])
    return int(anatomy.d_model)


def check_attachable(sae: SAE, anatomy, site: str | None = None, layer: int | None = None) -> tuple[str, int]:
    """Resolve the SAE's site and layer on this model, checking layer range and width; returns ``(site, layer)``."""
    if site is None or layer is None:
        cfg_site, cfg_layer = sae.cfg.site()
        site = cfg_site if site is None else site
        layer = cfg_layer if layer is None else layer
    if site not in SAE_SITES:
        raise SAECompatibilityError(f"An SAE on site '{site}' cannot be attached; supported: {', '.join(SAE_SITES)}.")
    if not 0 <= layer < anatomy.n_layers:
        raise SAECompatibilityError(f"The SAE reads layer {layer}, but this model has layers 0..{anatomy.n_layers - 1}.")
    width = site_width(anatomy, site, layer)
    if width != sae.d_in:
        raise SAECompatibilityError(f"The SAE expects d_in={sae.d_in}, but {site} at layer {layer} of this model has "
                                    f"width {width}: it was trained on a different model or site.")
    return site, layer


def log_sparsity(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Firing counts -> SAELens's log10 feature sparsity (``log10(freq + 1e-10)``)."""
    return torch.log10(counts.double() / max(n_tokens, 1) + 1e-10).float()


def describe(sae: SAE) -> dict:
    """A short JSON-able summary of an SAE."""
    cfg = sae.cfg
    out = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
           "dtype": str(sae.W_enc.dtype).replace("torch.", ""), "hook_name": cfg.hook_name,
           "model_name": cfg.model_name, "normalize_activations": cfg.normalize_activations,
           "expansion_factor": round(cfg.d_sae / cfg.d_in, 3)}
    if cfg.hook_name:
        try:
            out["site"], out["layer"] = hook_name_to_site(cfg.hook_name)
        except SAECompatibilityError:
            pass
    if cfg.norm_scaling_factor is not None:
        out["norm_scaling_factor"] = cfg.norm_scaling_factor
    return out


def unit_norm_rows_(weight: torch.Tensor) -> None:
    """Rescale the rows of a decoder to unit norm, in place."""
    with torch.no_grad():
        weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` without materialising ``[batch, d_sae]``."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum") + b_dec
