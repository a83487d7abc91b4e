"""Lens cost vs a plain forward pass, measured in the same process on the same prompt.

    .venv/bin/python benchmarks/lens.py [--model gemma-3-270m] [--tokens 512]

Prints, per device: plain forward time (the model's own forward, logits for every position),
forward + full lens (every layer x every position: top-k, entropy, KL, 2 tracked tokens), the
ratio, and the ratio for what the UI computes on long prompts (a 40-position window).
"""
from __future__ import annotations

import argparse

import torch
from common import devices, english_text, timed

from engine.core.models import load_model
from engine.lens.logit import run_lens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"model={args.model} tokens={args.tokens} threads={torch.get_num_threads()}")
    print(f"{'device':>6} {'forward s':>10} {'fwd+lens s':>11} {'ratio':>6} {'fwd+lens[40] s':>15} {'ratio':>6}")
    for device in devices():
        lm = load_model(args.model, device=device)
        ids = lm.tokenizer(english_text(), add_special_tokens=True)["input_ids"][: args.tokens]
        batch = torch.tensor([ids], device=lm.device)

        def forward():
            with torch.inference_mode():
                lm.model(batch, use_cache=False)

        def full_lens():
            run_lens(lm, ids, top_k=10, track=[" the", " of"])

        def window_lens():
            run_lens(lm, ids, top_k=10, track=[" the", " of"], positions=range(len(ids) - 40, len(ids)))

        plain = timed(forward, device, args.repeats)
        full = timed(full_lens, device, args.repeats)
        window = timed(window_lens, device, args.repeats)
        print(f"{device:>6} {plain:>10.3f} {full:>11.3f} {full / plain:>6.2f} {window:>15.3f} {window / plain:>6.2f}")


if __name__ == "__main__":
    main()
