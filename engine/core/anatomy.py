"""Where a causal LM keeps its decoder layers, final norm and unembedding.

Found by inspecting the module tree, not by a table of per-model attribute names, so
Llama, Gemma 1-3, Qwen, Mistral, GPT-2, GPT-NeoX, Phi and most relatives work unchanged.
Unknown layouts raise :class:`AnatomyError` naming what was not found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.core.errors import UserError


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
    """Handles on the parts of a model the lens and the hooks need."""

    model: nn.Module
    layers_path: str
    layers: nn.ModuleList
    final_norm_path: str | None
    final_norm: nn.Module | None
    unembed: nn.Module
    embed: nn.Module
    softcap: float | None
    d_model: int
    vocab_size: int
    logit_scale: float | None = None
    attn_names: list[str] = field(default_factory=list)
    mlp_names: list[str] = field(default_factory=list)
    sandwich: bool = False  # Gemma 2/3, OLMo 2: a norm on each branch output before the residual add

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # --- sub-blocks -------------------------------------------------------------------
    def attn_module(self, index: int) -> nn.Module:
        return getattr(self.layers[index], self.attn_names[index])

    def mlp_module(self, index: int) -> nn.Module:
        return getattr(self.layers[index], self.mlp_names[index])

    def attn_branch(self, index: int) -> nn.Module:
        """Module whose output is exactly what the attention branch adds to the residual."""
        layer = self.layers[index]
        if self.sandwich:
            return layer.post_attention_layernorm
        return self.attn_module(index)

    def mlp_branch(self, index: int) -> nn.Module:
        """Module whose output is exactly what the MLP branch adds to the residual."""
        layer = self.layers[index]
        if self.sandwich:
            return layer.post_feedforward_layernorm
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

    # --- the lens read-out ------------------------------------------------------------
    def normalize(self, resid: torch.Tensor) -> torch.Tensor:
        return resid if self.final_norm is None else self.final_norm(resid)

    def unembed_normed(self, normed: torch.Tensor) -> torch.Tensor:
        logits = self.unembed(normed)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual stream (pre final norm) -> logits, exactly as the model's head does it."""
        return self.unembed_normed(self.normalize(resid))


def find_anatomy(model: nn.Module) -> Anatomy:
    layers_path, layers = _find_layers(model)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise AnatomyError(f"{type(model).__name__}: no output embedding (unembedding / lm_head) was found.")
    embed = model.get_input_embeddings()
    weight = getattr(unembed, "weight", None)
    if weight is None or weight.ndim != 2:
        raise AnatomyError(f"{type(model).__name__}: the unembedding has no 2-D weight.")
    vocab_size, d_model = int(weight.shape[0]), int(weight.shape[1])

    # final norm: the last norm module registered after the layer list, outside it, of width d_model
    final_norm_path, final_norm, seen_layers = None, None, False
    for name, module in model.named_modules():
        if name == layers_path:
            seen_layers = True
            continue
        if not seen_layers or name.startswith(layers_path + "."):
            continue
        if _is_norm(module) and _norm_width(module) in (d_model, None) and not list(module.children()):
            final_norm_path, final_norm = name, module

    attn_names, mlp_names = [], []
    for index, layer in enumerate(layers):
        attn = _child(layer, ("self_attn", "attn", "attention", "self_attention"), ("attn", "attention"))
        mlp = _child(layer, ("mlp", "feed_forward", "ffn"), ("mlp", "feed_forward", "ffn"))
        missing = [what for what, found in (("attention", attn), ("MLP", mlp)) if found is None]
        if missing:
            raise AnatomyError(
                f"{type(model).__name__}: layer {index} of '{layers_path}' has no {' or '.join(missing)} "
                f"sub-module (children: {', '.join(n for n, _ in layer.named_children())})."
            )
        attn_names.append(attn[0])
        mlp_names.append(mlp[0])
    sandwich = all(hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm")
                   for layer in layers)

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(config, "logit_scale", None)
    return Anatomy(
        model=model, layers_path=layers_path, layers=layers, final_norm_path=final_norm_path,
        final_norm=final_norm, unembed=unembed, embed=embed,
        softcap=float(softcap) if softcap else None,
        d_model=d_model, vocab_size=vocab_size,
        logit_scale=float(logit_scale) if isinstance(logit_scale, (int, float)) and logit_scale != 1 else None,
        attn_names=attn_names, mlp_names=mlp_names, sandwich=sandwich,
    )
