"""Activation-patching sweep: batched (many patched copies of the target per forward) vs one forward per patch.

    .venv/bin/python benchmarks/patching.py [--model smollm2-135m] [--tokens 32] [--batch-size 64]

A full (layer x position) sweep of the residual stream on a ``--tokens``-token prompt, both ways, in the
same process on the same prompts; prints both times, the ratio and the largest difference between the two
heatmaps (they must agree).
"""
from __future__ import annotations

import argparse

import torch
from common import devices, english_text, timed

from engine.core.models import load_model
from engine.interventions.sweeps import patch_sweep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"model={args.model} tokens={args.tokens} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(f"{'device':>6} {'patches':>8} {'looped s':>9} {'batched s':>10} {'speed-up':>9} {'max |diff|':>11}")
    for device in devices():
        lm = load_model(args.model, device=device)
        target = lm.tokenizer(english_text(), add_special_tokens=True)["input_ids"][: args.tokens]
        source = list(target)
        for p in range(2, len(source), 5):  # corrupt every fifth token
            source[p] = target[p - 1]
        token = lm.tokenizer.decode([target[-1]])
        runs = {}

        def sweep(batched: bool):
            runs[batched] = patch_sweep(lm, source, target, token, batched=batched, batch_size=args.batch_size)

        looped = timed(lambda: sweep(False), device, repeats=args.repeats, warmup=0)
        batched = timed(lambda: sweep(True), device, repeats=args.repeats, warmup=1)
        diff = float(abs(runs[True].values - runs[False].values).max())
        cells = runs[True].values.size
        print(f"{device:>6} {cells:>8} {looped:>9.2f} {batched:>10.2f} {looped / batched:>8.1f}x {diff:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
