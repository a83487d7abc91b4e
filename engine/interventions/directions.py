"""Steering directions: difference of means, a logistic-regression probe, SAE decoder rows, and the SAE cache.

A direction is a plain list of floats of the site's width, so it can go into a JSON spec
(:func:`engine.interventions.specs.steer`). SAE-based steering keeps the folder and feature instead; the
SAE is loaded through :func:`load_sae_cached` here, shared with the compiled edits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.capture import capture
from engine.core.devices import to_host
from engine.interventions.specs import InterventionError, check_index, check_layer
from engine.lens.logit import check_prompt

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.sae.base import SAE

# --- SAEs (loaded once per folder, modification time and device) -------------------------------------
_SAE_CACHE: dict[tuple[str, float, str], SAE] = {}
_SAE_CACHE_SIZE = 4


def load_sae_cached(folder: str | Path, device: torch.device | str = "cpu") -> SAE:
    """The SAE in ``folder`` in float32 on ``device``; reloaded when its weights file changes."""
    from engine.sae.io import load_sae

    path = Path(folder)
    if not path.is_dir():
        raise InterventionError(f"The SAE folder '{folder}' does not exist; pick one from the SAE list.")
    weights = path / "sae_weights.safetensors"
    key = (str(path.resolve()), weights.stat().st_mtime if weights.exists() else 0.0, str(device))
    if key not in _SAE_CACHE:
        if len(_SAE_CACHE) >= _SAE_CACHE_SIZE:
            _SAE_CACHE.pop(next(iter(_SAE_CACHE)))
        _SAE_CACHE[key] = load_sae(path, device=device, dtype=torch.float32)
    return _SAE_CACHE[key]


# --- directions from two prompt sets ------------------------------------------------------------------
def _last_token_acts(lm: LoadedModel, prompts: Sequence[str], site: str, layer: int) -> torch.Tensor:
    """``[n, width]`` float32 CPU activation at the last token of each prompt (one forward per prompt, no
    padding games). Leaves the device through :func:`to_host`: callers hand it to numpy and scikit-learn."""
    rows = []
    with lm.lock:
        for text in prompts:
            ids = check_prompt(text, lm.tokenizer, lm.context_length)
            got, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [layer]})
            rows.append(got[site][0, 0, -1])  # [width], on the model's device and dtype
    return to_host(torch.stack(rows), torch.float32)


def _check_sets(prompts_a: Sequence[str], prompts_b: Sequence[str], least: int, message: str) -> None:
    if len(prompts_a) < least or len(prompts_b) < least:
        raise InterventionError(message)


def mean_difference_direction(lm: LoadedModel, prompts_a: Sequence[str], prompts_b: Sequence[str], layer: int,
                              site: str = "resid_post") -> list[float]:
    """mean(A) - mean(B) of the last-token activation: alpha=1 moves a B prompt to A's mean."""
    _check_sets(prompts_a, prompts_b, 1, "Both prompt sets need at least one prompt to take a difference of means.")
    check_layer(lm.anatomy, layer)
    return (_last_token_acts(lm, prompts_a, site, layer).mean(0)
            - _last_token_acts(lm, prompts_b, site, layer).mean(0)).tolist()


def probe_direction(lm: LoadedModel, prompts_a: Sequence[str], prompts_b: Sequence[str], layer: int,
                    site: str = "resid_post") -> list[float]:
    """Logistic-regression probe A vs B; the unit weight vector scaled to the mean difference along it."""
    from sklearn.linear_model import LogisticRegression

    _check_sets(prompts_a, prompts_b, 2, "A probe needs at least two prompts in each set.")
    check_layer(lm.anatomy, layer)
    a, b = _last_token_acts(lm, prompts_a, site, layer), _last_token_acts(lm, prompts_b, site, layer)  # [n, d]
    x = torch.cat([a, b]).numpy()
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    w = torch.tensor(LogisticRegression(max_iter=2000).fit(x, y).coef_[0], dtype=torch.float32)
    w = w / w.norm().clamp_min(1e-12)
    return (w * torch.dot(a.mean(0) - b.mean(0), w)).tolist()


# --- SAE features -------------------------------------------------------------------------------------
def sae_feature_direction(sae: SAE, feature: int) -> torch.Tensor:
    """``[d_in]`` decoder row of one SAE feature (on the SAE's device): the direction the feature writes."""
    check_index(feature, sae.d_sae, "SAE feature")
    return sae.W_dec[int(feature)].detach()


def _unit_texts() -> list[str]:
    from engine.data.prompt_sets import CONCEPTS

    return [", ".join(c[code] for c in CONCEPTS[i:i + 12]) for code in ("en", "fr", "de", "zh")
            for i in range(0, 48, 12)]


def feature_unit(lm: LoadedModel, sae_folder: str | Path, feature: int, texts: Sequence[str] | None = None) -> float:
    """The feature's typical max activation: the median over texts of its max over tokens (position 0 skipped)."""
    from engine.sae.attach import check_attachable

    sae = load_sae_cached(sae_folder, lm.device)
    site, layer = check_attachable(sae, lm.anatomy)
    check_index(feature, sae.d_sae, "SAE feature")
    maxima = []
    with lm.lock, torch.inference_mode():
        for text in _unit_texts() if texts is None else texts:
            ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][:256]
            got, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [layer]})
            acts = sae.encode(got[site][0, 0, 1:].float())[:, feature]  # [T - 1]
            maxima.append(float(acts.max()) if acts.numel() else 0.0)
    positive = [m for m in maxima if m > 0]
    return float(np.median(positive)) if positive else 1.0
