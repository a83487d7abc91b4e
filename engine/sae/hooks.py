"""SAELens hook names <-> this engine's capture sites.

SAELens configs name where an SAE reads (``metadata.hook_name``) and, for transcoders, where it writes
(``metadata.hook_name_out``) in TransformerLens naming (``blocks.9.hook_resid_post``); some releases add
or only give Hugging Face module paths (``metadata.hf_hook_name``: ``model.layers.9.output``). When both
are given the Hugging Face path wins, because it names the exact module (Gemma Scope 2 transcoders read
``pre_feedforward_layernorm.output``, which TransformerLens calls ``hook_mlp_in`` although it is the
*normalised* MLP input; no site of this engine holds it, so such an SAE loads but is not spliced).

``hook_mlp_in`` maps to ``resid_mid`` (what TransformerLens stores there for sequential blocks; for
parallel-residual models such as GPT-NeoX and Phi the MLP reads ``resid_pre`` instead).
"""
from __future__ import annotations

import re

from engine.core.errors import UserError


class SAECompatibilityError(UserError):
    """An SAE does not fit the model or site it is asked to attach to."""


_TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "mlp.hook_post": "mlp_hidden",
             "hook_mlp_in": "resid_mid"}
_SITE_HOOKS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
               "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_hidden": "mlp.hook_post"}
_PREFIX = r"^(?:model\.|transformer\.|gpt_neox\.|model\.language_model\.)?(?:layers|h)\.(\d+)"
_HF_PATTERNS = [  # Hugging Face module paths used by some SAE releases (EleutherAI, Llama Scope, Gemma Scope 2)
    (re.compile(_PREFIX + r"(?:\.output)?$"), "resid_post"),
    (re.compile(_PREFIX + r"\.mlp(?:\.output)?$"), "mlp_out"),
    (re.compile(_PREFIX + r"\.post_feedforward_layernorm\.output$"), "mlp_out"),  # sandwich-norm models (Gemma 2/3)
    (re.compile(_PREFIX + r"\.mlp\.(?:down_proj|c_proj|fc2|dense_4h_to_h)\.input$"), "mlp_hidden"),
    (re.compile(_PREFIX + r"\.(?:self_attn|attn|attention)(?:\.output)?$"), "attn_out"),
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


def site_from_metadata(metadata: dict, direction: str = "in") -> tuple[str, int]:
    """The site an SAE reads (``direction="in"``) or a transcoder writes (``"out"``), from its metadata."""
    suffix = "" if direction == "in" else "_out"
    hf_name, tl_name = metadata.get(f"hf_hook_name{suffix}"), metadata.get(f"hook_name{suffix}")
    if metadata.get(f"hook_head_index{suffix}") is not None:
        raise SAECompatibilityError("The SAE reads a single attention head (hook_head_index is set), which this "
                                    "engine cannot splice.")
    if hf_name:
        return hook_name_to_site(hf_name)
    if tl_name:
        return hook_name_to_site(tl_name)
    raise SAECompatibilityError(f"The SAE config names no {'input' if direction == 'in' else 'output'} hook "
                                f"(metadata.hook_name{suffix}), so its site and layer are unknown.")
