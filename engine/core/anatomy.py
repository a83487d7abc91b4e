"""Where a causal LM keeps its decoder layers, final norm, head and (optionally) sub-blocks.

Found by inspecting the module tree, not by a table of per-model attribute names, so Llama,
Gemma 1-3, Qwen, Mistral, GPT-2, GPT-NeoX, Phi, OPT, Granite, Cohere, Mamba and most relatives
work unchanged. The lens needs only three parts: the list of decoder layers, the final norm
(if any, plus OPT's ``project_out``) and the head; those must be found, else
:class:`AnatomyError` names what was missing. Attention and MLP sub-modules are optional: a
model without them (Mamba's mixer blocks, OPT's ``fc1``/``fc2`` sitting directly on the layer)
loads, and only the sites that need them are refused (see :attr:`Anatomy.missing`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.core.devices import module_device
from engine.core.errors import UserError

ATTENTION, MLP, BRANCHES = "attention", "mlp", "branches"  # the optional parts, keys of Anatomy.missing


class AnatomyError(UserError):
    """The module tree does not look like a decoder-only language model we understand."""


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in name


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return int(weight.shape[0])
    return None


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The homogeneous ModuleList holding the most parameters: the decoder blocks.

    Expert lists of MoE models live inside the blocks, so the outer list always wins.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        size = _params(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise AnatomyError(
            f"{type(model).__name__}: no list of decoder layers was found "
            "(looked for an nn.ModuleList of identical blocks)."
        )
    return best[1], best[2]


def _child(layer: nn.Module, exact: tuple[str, ...], fragments: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The sub-module that does the work: an exact name first, else a name fragment; never a
    norm, dropout or other parameter-free wrapper (GPT-NeoX has ``post_mlp_dropout`` before ``mlp``)."""
    candidates = [(name, child) for name, child in layer.named_children()
                  if not _is_norm(child) and not isinstance(child, nn.Dropout) and _params(child) > 0]
    for name, child in candidates:
        if name in exact:
            return name, child
    for name, child in candidates:
        if any(fragment in name.lower() for fragment in fragments):
            return name, child
    return None


@dataclass
class Anatomy:
    """Handles on the parts of a model the lens and the hooks need.

    The read-out is ``resid -> final_norm -> project_out -> unembed -> head scaling``; the
    head scaling (Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides,
    Gemma 2/3's ``final_logit_softcapping`` caps) is applied exactly once, in
    :meth:`unembed_normed`.
    """

    model: nn.Module
    layers_path: str
    layers: nn.ModuleList
    final_norm_path: str | None
    final_norm: nn.Module | None
    unembed: nn.Module
    embed: nn.Module
    softcap: float | None
    d_model: int                      # width of the residual stream
    vocab_size: int
    logit_multiplier: float | None = None  # Cohere ``logit_scale``, Falcon-H1 ``lm_head_multiplier``
    logit_divisor: float | None = None     # Granite ``logits_scaling``
    attn_names: list[str | None] = field(default_factory=list)
    mlp_names: list[str | None] = field(default_factory=list)
    sandwich: bool = False  # Gemma 2/3, OLMo 2: a norm on each branch output before the residual add
    project_out_path: str | None = None
    project_out: nn.Module | None = None   # OPT: hidden_size -> word_embed_proj_dim after the final norm
    missing: dict[str, str] = field(default_factory=dict)  # optional part -> why it is unavailable

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def logit_scale(self) -> float | None:
        """The head's scaling as one multiplier (for code that rescales logits itself)."""
        scale = (self.logit_multiplier or 1.0) / (self.logit_divisor or 1.0)
        return None if scale == 1.0 else scale

    # --- optional sub-blocks ----------------------------------------------------------
    @property
    def has_attention(self) -> bool:
        return ATTENTION not in self.missing

    @property
    def has_mlp(self) -> bool:
        return MLP not in self.missing

    @property
    def has_sublayers(self) -> bool:
        """Whether the attention branch's contribution can be read, so mid-layer (``resid_mid``) rows exist."""
        return ATTENTION not in self.missing and BRANCHES not in self.missing

    def require(self, part: str) -> None:
        """Raise :class:`AnatomyError` with the recorded reason when ``part`` is unavailable."""
        if part in self.missing:
            raise AnatomyError(self.missing[part])

    def attn_module(self, index: int) -> nn.Module:
        self.require(ATTENTION)
        return getattr(self.layers[index], self.attn_names[index])

    def mlp_module(self, index: int) -> nn.Module:
        self.require(MLP)
        return getattr(self.layers[index], self.mlp_names[index])

    def attn_branch(self, index: int) -> nn.Module:
        """Module whose output is exactly what the attention branch adds to the residual."""
        self.require(BRANCHES)
        if self.sandwich:
            self.require(ATTENTION)
            return self.layers[index].post_attention_layernorm
        return self.attn_module(index)

    def mlp_branch(self, index: int) -> nn.Module:
        """Module whose output is exactly what the MLP branch adds to the residual."""
        self.require(BRANCHES)
        if self.sandwich:
            self.require(MLP)
            return self.layers[index].post_feedforward_layernorm
        return self.mlp_module(index)

    def mlp_out_proj(self, index: int) -> nn.Module:
        """The last projection of the MLP; its input is the MLP's hidden activation."""
        last = None
        for module in self.mlp_module(index).modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                last = module
        if last is None:
            raise AnatomyError(f"layer {index}: the MLP has no linear output projection")
        return last

    def attn_out_proj(self, index: int) -> nn.Module:
        """The attention output projection; its input is the concatenation of head outputs."""
        attn = self.attn_module(index)
        for name in ("o_proj", "c_proj", "dense", "out_proj", "wo"):
            module = getattr(attn, name, None)
            if module is not None:
                return module
        raise AnatomyError(f"layer {index}: no attention output projection found")

    @property
    def n_heads(self) -> int:
        config = self.text_config
        for name in ("num_attention_heads", "n_head", "num_heads"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        raise AnatomyError("the config names no number of attention heads")

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    # --- devices (a model split by a device map keeps its parts on several devices) ---------------
    @property
    def input_device(self) -> torch.device:
        """Where the input embedding computes: where token ids go, and where captured activations are gathered."""
        return module_device(self.embed)

    @property
    def head_device(self) -> torch.device:
        """Where the unembedding computes (the lens is cheapest with its residual rows already there)."""
        return module_device(self.unembed)

    # --- the lens read-out ------------------------------------------------------------
    def _normalize_here(self, resid: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize`, the result left on the device of the last module applied."""
        out = resid
        if self.final_norm is not None:
            out = self.final_norm(out.to(module_device(self.final_norm)))
        if self.project_out is not None:
            out = self.project_out(out.to(device=module_device(self.project_out), dtype=self.project_out.weight.dtype))
        return out

    def normalize(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual stream -> what the head reads: the final norm, then OPT's ``project_out``.

        Each module is applied on its own device; the result comes back on ``resid``'s device.
        """
        return self._normalize_here(resid).to(resid.device)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's own scaling of raw ``unembed`` outputs, in the model's order (scale, then softcap)."""
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _unembed_here(self, normed: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.unembed, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else normed.dtype
        # Mamba keeps its residual in float32 under a bfloat16 head
        return self.scale_logits(self.unembed(normed.to(device=self.head_device, dtype=dtype)))

    def unembed_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Head input -> logits; the only place the head scaling is applied. The head runs on its own device;
        the logits come back on ``normed``'s device."""
        return self._unembed_here(normed).to(normed.device)

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual stream (pre final norm) -> logits, exactly as the model's head does it.

        The final norm and the head run where they live (a device map may put them on another device than
        ``resid``); the logits come back on ``resid``'s device.
        """
        return self._unembed_here(self._normalize_here(resid)).to(resid.device)


# --- finding the parts ----------------------------------------------------------------------
def _residual_width(config, head_width: int) -> int:
    width = getattr(config, "hidden_size", None)
    return width if isinstance(width, int) and width > 0 else head_width


def _outside(name: str, layers_path: str) -> bool:
    return name != layers_path and not name.startswith(layers_path + ".")


def _find_final_norm(model: nn.Module, layers_path: str, d_model: int) -> tuple[str | None, nn.Module | None]:
    """The final norm: the last leaf norm of width ``d_model`` registered after the layer list;
    failing that (OPT registers ``final_layer_norm`` before ``layers``), the last such norm beside
    the layer list. Embedding norms (BLOOM's ``word_embeddings_layernorm``) never qualify."""
    parent = layers_path.rpartition(".")[0]
    after, beside, seen_layers = None, None, False
    for name, module in model.named_modules():
        if name == layers_path:
            seen_layers = True
            continue
        if not _outside(name, layers_path) or list(module.children()) or not _is_norm(module):
            continue
        if _norm_width(module) not in (d_model, None) or "emb" in name.rpartition(".")[2].lower():
            continue
        if seen_layers:
            after = (name, module)
        elif name.rpartition(".")[0] == parent:
            beside = (name, module)
    return after or beside or (None, None)


def _find_project_out(model: nn.Module, layers_path: str, unembed: nn.Module,
                      d_model: int, head_width: int) -> tuple[str | None, nn.Module | None]:
    """A linear map ``d_model -> head_width`` outside the layers, between the final norm and the head."""
    if d_model == head_width:
        return None, None
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not unembed and _outside(name, layers_path)
             and module.in_features == d_model and module.out_features == head_width]
    found.sort(key=lambda item: "out" not in item[0].rpartition(".")[2])  # prefer '...out'
    return found[0] if found else (None, None)


def _sub_blocks(model: nn.Module, layers_path: str, layers: nn.ModuleList):
    """Per-layer attention and MLP child names (None where absent) and the reasons for what is missing."""
    attn_names: list[str | None] = []
    mlp_names: list[str | None] = []
    for layer in layers:
        attn = _child(layer, ("self_attn", "attn", "attention", "self_attention"), ("attn", "attention"))
        mlp = _child(layer, ("mlp", "feed_forward", "ffn"), ("mlp", "feed_forward", "ffn"))
        attn_names.append(attn[0] if attn else None)
        mlp_names.append(mlp[0] if mlp else None)
    missing: dict[str, str] = {}
    layer = layers[0]
    children = ", ".join(name for name, _ in layer.named_children())
    where = f"{type(model).__name__}'s layers ('{layers_path}', {type(layer).__name__}: {children})"
    if any(name is None for name in attn_names):
        missing[ATTENTION] = (f"{where} have no attention sub-module, so the attention sites "
                              "(attn_out, attn_heads) and the mid-layer rows (resid_mid) are unavailable.")
    if any(name is None for name in mlp_names):
        missing[MLP] = (f"{where} have no MLP sub-module of their own, so the MLP sites "
                        "(mlp_out, mlp_hidden) are unavailable.")
    return attn_names, mlp_names, missing


def _head_scaling(config) -> tuple[float | None, float | None, float | None]:
    """``(multiplier, divisor, softcap)`` the model applies to its head output, None where absent."""
    def number(name: str) -> float | None:
        value = getattr(config, name, None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    multiplier = 1.0
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere 1/2, Falcon-H1
        value = number(name)
        if value:
            multiplier *= value
    divisor = number("logits_scaling")  # the Granite family
    softcap = number("final_logit_softcapping")
    return (multiplier if multiplier != 1.0 else None, divisor if divisor and divisor != 1.0 else None,
            softcap or None)


def find_anatomy(model: nn.Module) -> Anatomy:
    layers_path, layers = _find_layers(model)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise AnatomyError(f"{type(model).__name__}: no output embedding (unembedding / lm_head) was found.")
    embed = model.get_input_embeddings()
    weight = getattr(unembed, "weight", None)
    if weight is None or weight.ndim != 2:
        raise AnatomyError(f"{type(model).__name__}: the unembedding has no 2-D weight.")
    vocab_size, head_width = int(weight.shape[0]), int(weight.shape[1])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    d_model = _residual_width(config, head_width)
    project_out_path, project_out = _find_project_out(model, layers_path, unembed, d_model, head_width)
    if project_out is None:
        d_model = head_width  # no read-out projection: the head reads the residual stream itself
    final_norm_path, final_norm = _find_final_norm(model, layers_path, d_model)

    attn_names, mlp_names, missing = _sub_blocks(model, layers_path, layers)
    residual_multiplier = getattr(config, "residual_multiplier", None)
    if isinstance(residual_multiplier, (int, float)) and residual_multiplier != 1:
        missing[BRANCHES] = (f"{type(model).__name__} scales each branch by residual_multiplier="
                             f"{residual_multiplier:g} inside the layer, so no module outputs what a branch adds "
                             "to the residual: attn_out, mlp_out and resid_mid are unavailable.")
    sandwich = all(hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm")
                   for layer in layers)
    multiplier, divisor, softcap = _head_scaling(config)
    return Anatomy(
        model=model, layers_path=layers_path, layers=layers, final_norm_path=final_norm_path,
        final_norm=final_norm, unembed=unembed, embed=embed, softcap=softcap,
        d_model=d_model, vocab_size=vocab_size, logit_multiplier=multiplier, logit_divisor=divisor,
        attn_names=attn_names, mlp_names=mlp_names, sandwich=sandwich,
        project_out_path=project_out_path, project_out=project_out, missing=missing,
    )
