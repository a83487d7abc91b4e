"""The load-time self-check: the anatomy's read-out of the last layer must reproduce the model's logits.

It needs only the anatomy (layers, final norm, head and its scaling) and one captured residual,
so it lives in core; the lens builds on the same read-out. A failure means the final norm, a
read-out projection or the head scaling of this architecture was not understood.
"""
from __future__ import annotations

import torch

from engine.core.capture import capture

SELF_CHECK_TEXT = "The quick brown fox jumps over the lazy dog."


def self_check(lm, text: str = SELF_CHECK_TEXT) -> float:
    """Max |read-out(last layer's residual) - model logits| over every position of ``text``.

    ``lm`` is a :class:`engine.core.models.LoadedModel` (anything with ``anatomy``, ``tokenizer``
    and ``lock``).
    """
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    last_layer = lm.anatomy.n_layers - 1
    with lm.lock:
        captured, output = capture(lm.anatomy, torch.tensor([ids]), sites={"resid_post": [last_layer]},
                                   stop_early=False)
        with torch.inference_mode():
            last = lm.anatomy.logits(captured["resid_post"][0, 0]).float()
            return float((last - output.logits[0].float()).abs().max())


def tolerance(dtype: torch.dtype) -> float:
    """Acceptable self-check difference in logit units for a compute dtype."""
    return 0.25 if dtype in (torch.bfloat16, torch.float16) else 1e-3
