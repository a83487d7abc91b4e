"""The SAE base class, its config, and the registry of architectures.

Every architecture is one subclass registered under its SAELens name with :func:`register_sae_class`;
``SAE(cfg)`` builds the class registered for ``cfg.architecture``. The math is SAELens's::

    x' = normalize_in(x) - b_dec         (b_dec subtracted only when apply_b_dec_to_input)
    acts, pre = activate(x')             (per architecture)
    x_hat = normalize_out(acts @ W_dec + b_dec)

Shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` (``d_out = d_in`` except
for transcoders). Input normalisation follows SAELens: ``constant_norm_rescale`` and ``layer_norm`` are
applied per token and undone on the output (transcoders do not undo them, as in SAELens);
``expected_average_only_in`` does nothing at run time unless the config carries ``norm_scaling_factor``
(then inputs are multiplied by it and outputs divided, which equals SAELens folding it into the weights).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from engine.core.devices import DTYPES
from engine.core.errors import UserError
from engine.sae.hooks import SAECompatibilityError, site_from_metadata

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
SAELENS_FORMAT = "6.0.0"  # metadata.sae_lens_version we write: SAELens >= 6 then reads our nested metadata
# modules holding the built-in architectures; imported on first use of the registry
BUILTIN_MODULES = ("engine.sae.standard", "engine.sae.gated", "engine.sae.topk", "engine.sae.jumprelu",
                   "engine.sae.transcoder")
# architectures SAELens 6 knows that this engine refuses, with the reason (one sentence each)
REFUSED = {
    "temporal": "it encodes each token from the tokens before it, which a per-token SAE splice cannot reproduce",
    "matching_pursuit": "its iterative, tied-weight encoder is not implemented in this engine",
    "batchtopk": "BatchTopK is a training-time architecture that SAELens saves as 'jumprelu'",
    "matryoshka_batchtopk": "Matryoshka BatchTopK is a training-time architecture that SAELens saves as 'jumprelu'",
}

__all__ = ["SAE", "SAEConfig", "Encoded", "SAELoadError", "SAECompatibilityError", "register_sae_class",
           "sae_class", "architectures", "parameter_shapes", "NORMALIZATIONS"]


class SAELoadError(UserError):
    """An SAE folder or config is missing, malformed or inconsistent."""


# --- registry -------------------------------------------------------------------------------
_REGISTRY: dict[str, type[SAE]] = {}
_builtins_loaded = False


def register_sae_class(architecture: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: ``@register_sae_class("topk")`` makes ``SAE(cfg)`` build that class for ``"topk"``."""
    def register(cls: type[SAE]) -> type[SAE]:
        if architecture in _REGISTRY and _REGISTRY[architecture] is not cls:
            raise ValueError(f"An SAE class for architecture '{architecture}' is already registered.")
        cls.architecture_name = architecture
        _REGISTRY[architecture] = cls
        return cls
    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def sae_class(architecture: str) -> type[SAE]:
    """The class registered for ``architecture``; a clear error for refused or unknown ones."""
    _load_builtins()
    if architecture in _REGISTRY:
        return _REGISTRY[architecture]
    if architecture in REFUSED:
        raise SAELoadError(f"The SAE architecture '{architecture}' is not supported: {REFUSED[architecture]}.")
    raise SAELoadError(f"Unknown SAE architecture '{architecture}'; supported: {', '.join(architectures())}.")


def architectures() -> tuple[str, ...]:
    _load_builtins()
    return tuple(_REGISTRY)


# --- config ---------------------------------------------------------------------------------
def dtype_name(value: Any) -> str:
    name = str(value or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise SAELoadError(f"The SAE config names dtype '{value}'; use one of {', '.join(DTYPES)}.")
    return name


def _check_positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise SAELoadError(f"The SAE config needs '{key}' as a positive integer (found {value!r}).")
    return int(value)


@dataclass
class SAEConfig:
    """What ``cfg.json`` says, in the current SAELens layout (parsed from any layout by :mod:`engine.sae.io`)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None                       # topk, abstopk
    rescale_acts_by_decoder_norm: bool = False  # topk, abstopk
    d_out: int | None = None                   # transcoders
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None   # expected_average_only_in: applied at run time when known
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # ``latent_explorer`` and training-only fields, written back as they are

    def __post_init__(self) -> None:
        self.d_in = _check_positive_int(self.d_in, "d_in")
        self.d_sae = _check_positive_int(self.d_sae, "d_sae")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAELoadError(f"Unknown normalize_activations '{self.normalize_activations}'; "
                               f"supported: {', '.join(NORMALIZATIONS)}.")
        self.dtype = dtype_name(self.dtype)
        factor = self.norm_scaling_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
            raise SAELoadError(f"The SAE config's norm_scaling_factor must be a positive number (found {factor!r}).")
        sae_class(self.architecture).check_config(self)

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def hook_name_out(self) -> str | None:
        return self.metadata.get("hook_name_out")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def is_transcoder(self) -> bool:
        return sae_class(self.architecture).is_transcoder

    @property
    def width_out(self) -> int:
        """Width of what the SAE writes: ``d_out`` for transcoders, else ``d_in``."""
        return int(self.d_out) if self.is_transcoder else self.d_in

    def site(self) -> tuple[str, int]:
        """The engine site and layer this SAE reads, from ``metadata.hf_hook_name`` or ``hook_name``."""
        return site_from_metadata(self.metadata, "in")

    def output_site(self) -> tuple[str, int]:
        """Where the SAE's output belongs: ``hook_name_out`` for transcoders, else :meth:`site`."""
        return site_from_metadata(self.metadata, "out") if self.is_transcoder else self.site()

    def to_dict(self) -> dict:
        """The SAELens 6 ``cfg.json`` layout (plus ``norm_scaling_factor`` and our extras when present)."""
        out: dict[str, Any] = dict(self.extra)
        out.update({"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
                    "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
                    "normalize_activations": self.normalize_activations, "reshape_activations": "none"})
        out.update(sae_class(self.architecture).config_fields(self))
        if self.norm_scaling_factor is not None:
            out["norm_scaling_factor"] = self.norm_scaling_factor
        metadata = dict(self.metadata)
        version = str(metadata.get("sae_lens_version") or "0")
        if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 6:
            metadata["sae_lens_version"] = SAELENS_FORMAT
        out["metadata"] = metadata
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> SAEConfig:
        """Read a current or older SAELens ``cfg.json`` dictionary (see :func:`engine.sae.io.parse_config`)."""
        from engine.sae.io import parse_config

        return parse_config(raw)


def parameter_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor ``sae_weights.safetensors`` must hold for this architecture, with its shape."""
    return sae_class(cfg.architecture).parameter_shapes(cfg)


# --- the module -----------------------------------------------------------------------------
@dataclass
class Encoded:
    """Result of :meth:`SAE.encode_full`: activations, pre-activations and what decode needs to undo scaling."""

    acts: torch.Tensor                    # [..., d_sae]
    pre: torch.Tensor                     # [..., d_sae] (SAELens's hook_sae_acts_pre)
    scale: torch.Tensor | float = 1.0     # [..., 1] or a number (see SAE.normalize_in)
    shift: torch.Tensor | float = 0.0     # [..., 1] or a number


class SAE(nn.Module, ABC):
    """A sparse autoencoder (or transcoder) with SAELens's parameter names and math.

    ``SAE(cfg)`` returns an instance of the class registered for ``cfg.architecture``.
    """

    architecture_name: ClassVar[str] = ""
    uses_k: ClassVar[bool] = False          # topk-style: needs cfg.k, may rescale by decoder norms
    is_transcoder: ClassVar[bool] = False   # reads one site, writes another (d_out, no b_dec on the input)

    def __new__(cls, cfg: SAEConfig | None = None, *args: Any, **kwargs: Any) -> SAE:
        if cls is SAE:
            if cfg is None:
                raise TypeError("SAE(cfg) needs a config.")
            cls = sae_class(cfg.architecture)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if cfg.architecture != self.architecture_name:
            raise SAELoadError(f"A {type(self).__name__} cannot hold a '{cfg.architecture}' SAE.")
        self.cfg = cfg
        dtype = dtype or DTYPES[cfg.dtype]
        for name, shape in self.parameter_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))

    # -- per-architecture config
    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        d_out = cfg.width_out
        return {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, d_out),
                "b_dec": (d_out,)}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse settings this architecture does not have (one sentence each)."""
        name = cls.architecture_name
        if cfg.k is not None:
            raise SAELoadError(f"A {name} SAE has no 'k' setting (found k={cfg.k!r}).")
        if cfg.rescale_acts_by_decoder_norm:
            raise SAELoadError(f"A {name} SAE has no 'rescale_acts_by_decoder_norm' setting.")
        if cfg.d_out is not None:
            raise SAELoadError(f"Only transcoders have 'd_out'; this config is a {name} SAE.")

    @classmethod
    def config_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        """The architecture's own ``cfg.json`` fields."""
        return {}

    # -- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.width_out

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    def input_site(self) -> tuple[str, int]:
        """``(site, layer)`` this SAE reads, from its config."""
        return self.cfg.site()

    def output_site(self) -> tuple[str, int]:
        """``(site, layer)`` whose activation the output replaces (the input site unless a transcoder)."""
        return self.cfg.output_site()

    # -- math
    def normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        """``x [..., d_in]`` -> ``(normalised x, scale, shift)``; :meth:`normalize_out` undoes it with those.

        ``scale`` is the factor the input was multiplied by (``constant_norm_rescale``, a known
        ``norm_scaling_factor``; the output is divided by it, as SAELens does) or the per-token standard
        deviation (``layer_norm``; output times ``scale`` plus ``shift``, the per-token mean).
        """
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in" and self.cfg.norm_scaling_factor is not None:
            factor = self.cfg.norm_scaling_factor
            return x * factor, factor, 0.0
        if mode == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [..., 1]
            return x * coeff, coeff, 0.0
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), std, mu
        return x, 1.0, 0.0

    def normalize_out(self, out: torch.Tensor, scale: torch.Tensor | float, shift: torch.Tensor | float) -> torch.Tensor:
        if self.cfg.normalize_activations == "layer_norm":
            return out * scale + shift
        if self.cfg.normalize_activations == "none":
            return out
        return out / scale

    @abstractmethod
    def activate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared input ``[..., d_in]`` -> ``(acts, pre)``, both ``[..., d_sae]``."""

    def decode_linear(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts [..., d_sae]`` -> ``[..., d_out]`` without bias."""
        return acts.to(self.W_dec.dtype) @ self.W_dec

    def encode_full(self, x: torch.Tensor) -> Encoded:
        """Encode ``[..., d_in]`` and keep what :meth:`decode` needs to undo input normalisation."""
        x = x.to(self.W_enc.dtype)
        x, scale, shift = self.normalize_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        acts, pre = self.activate(x)
        return Encoded(acts, pre, scale, shift)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]``."""
        return self.encode_full(x).acts

    def decode(self, acts: torch.Tensor, scale: torch.Tensor | float = 1.0,
               shift: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Reconstruction ``[..., d_out]``; pass ``scale``/``shift`` from :meth:`encode_full` for per-token norms."""
        return self.normalize_out(self.decode_linear(acts) + self.b_dec, scale, shift)

    def output(self, x: torch.Tensor, enc: Encoded) -> torch.Tensor:
        """What replaces the activation: the decoded ``enc`` (skip transcoders add their skip path of ``x``)."""
        return self.decode(enc.acts, enc.scale, enc.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` -> ``[..., d_out]``."""
        return self.output(x, self.encode_full(x))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output [..., d_out], acts [..., d_sae])`` in one pass."""
        enc = self.encode_full(x)
        return self.output(x, enc), enc.acts

    # -- housekeeping
    @torch.no_grad()
    def fold_scales(self, scale_in: float, scale_out: float | None = None) -> None:
        """Make an SAE trained on ``x * scale_in -> y * scale_out`` take raw ``x`` and give raw ``y``."""
        scale_out = scale_in if scale_out is None else scale_out
        if not self.is_transcoder and scale_out != scale_in:
            raise ValueError("An SAE reads and writes the same site, so it has one scale.")
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if hasattr(self, "W_skip"):
            self.W_skip.mul_(scale_in / scale_out)

    def fold_input_scale(self, factor: float) -> None:
        """Make an SAE trained on ``x * factor`` take raw ``x`` with identical activations (SAELens folding)."""
        self.fold_scales(factor, factor)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().contiguous() for name, param in self.named_parameters()}

    def save(self, folder: str | Path, sparsity: torch.Tensor | None = None) -> Path:
        """Write ``cfg.json``, ``sae_weights.safetensors`` (and ``sparsity.safetensors``) atomically."""
        from engine.sae.io import save_sae

        return save_sae(self, folder, sparsity)
