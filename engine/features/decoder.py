"""What each feature's decoder direction does, computed for all features at once in feature chunks.

**Logit effects**: each decoder row is mapped to the residual stream (through the projection a wide site
feeds, e.g. the MLP's output projection for ``mlp_hidden`` SAEs), multiplied by the final norm's gain
(RMSNorm: ``norm(1) * sqrt(1 + eps)``, which also covers Gemma's ``1 + weight``; LayerNorm: centred, times
its weight) and by the unembedding. *Approximation:* the norm's per-token scale ``1/rms(x)`` (a positive
scalar), LayerNorm's bias (the same for every feature) and logit soft-capping are left out, so values are
"logits per unit of decoder direction" and rankings of tokens are exact for the linearised head.

**Neighbours**: cosine similarity of decoder rows, top ``n`` per feature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.core.anatomy import Anatomy
from engine.core.devices import module_device, module_tensor, to_host
from engine.core.progress import Progress, report
from engine.core.sites import get_site, is_conv1d, site_module


def residual_directions(anatomy: Anatomy, W_dec: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """Decoder rows ``[d_sae, d_in]`` as residual-stream directions ``[d_sae, d_model]`` (float32).

    A wide site (``mlp_hidden``) is the input of a projection; its directions go through that projection.
    """
    dirs = W_dec.detach().float()
    if get_site(site).wide:
        module = site_module(anatomy, site, layer)
        weight = module_tensor(module).detach().float().to(dirs.device)  # offloaded weights are read back
        weight = weight.T if is_conv1d(module) else weight  # [d_model, d_in]
        dirs = dirs @ weight.T
    return dirs


def norm_gain(anatomy: Anatomy, d_model: int, device: torch.device | str) -> tuple[torch.Tensor, bool]:
    """``(gain [d_model], centre)``: the final norm's per-dimension gain and whether it centres (LayerNorm)."""
    norm = anatomy.final_norm
    if norm is None:
        return torch.ones(d_model, device=device), False
    name = type(norm).__name__.lower()
    if isinstance(norm, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name):
        weight = module_tensor(norm) if getattr(norm, "weight", None) is not None else None
        gain = weight.detach().float() if weight is not None else torch.ones(d_model)
        return gain.to(device), True
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
    param = next(norm.parameters(), None)
    ones = torch.ones(1, d_model, device=module_device(norm),  # where it computes, also when offloaded
                      dtype=param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        gain = norm(ones)[0].float() * math.sqrt(1.0 + eps)  # RMSNorm(1) = gain / sqrt(1 + eps)
    return gain.to(device), False


@torch.no_grad()
def logit_effects(anatomy: Anatomy, W_dec: torch.Tensor, site: str, layer: int, n: int = 10,
                  progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Top and bottom ``n`` tokens of every feature's direct logit effect, batched over feature chunks.

    Returns ``top_ids``, ``top_values``, ``bottom_ids``, ``bottom_values`` (each ``[d_sae, n]``, on the host).
    """
    W_U = module_tensor(anatomy.unembed).detach()  # an offloaded head is read back from its weights map
    device = anatomy.head_device
    W_U = W_U.to(device)
    dirs = residual_directions(anatomy, W_dec.to(device), site, layer)  # [d_sae, d_model]
    gain, centre = norm_gain(anatomy, dirs.shape[1], device)
    if centre:
        dirs = dirs - dirs.mean(dim=1, keepdim=True)
    dirs = dirs * gain
    W_U = W_U.float()  # [vocab, d_model]
    vocab = W_U.shape[0]
    n = min(n, vocab)
    chunk = max(1, min(dirs.shape[0], 2**25 // max(vocab, 1)))
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ("top_ids", "top_values", "bottom_ids",
                                                                "bottom_values")}
    for start in range(0, dirs.shape[0], chunk):
        logits = dirs[start:start + chunk] @ W_U.T  # [chunk, vocab]
        if anatomy.logit_scale is not None:
            logits = logits * anatomy.logit_scale
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        out["top_ids"].append(to_host(top.indices))
        out["top_values"].append(to_host(top.values))
        out["bottom_ids"].append(to_host(bottom.indices))
        out["bottom_values"].append(to_host(bottom.values))
        report(progress, (start + chunk) / dirs.shape[0], "logit effects")
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, n: int = 10, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, cosines)`` ``[d_sae, n]`` on the host: nearest features by cosine of decoder rows (self excluded)."""
    unit = F.normalize(W_dec.detach().float(), dim=1)
    d_sae = unit.shape[0]
    n = min(n, max(d_sae - 1, 1))
    ids, sims = [], []
    for start in range(0, d_sae, chunk):
        block = unit[start:start + chunk] @ unit.T  # [chunk, d_sae]
        local = torch.arange(block.shape[0], device=block.device)
        if d_sae > 1:
            block[local, local + start] = -math.inf
        top = block.topk(n, dim=1)
        ids.append(to_host(top.indices))
        sims.append(to_host(top.values))
    return torch.cat(ids), torch.cat(sims)
