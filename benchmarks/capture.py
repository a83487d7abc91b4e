"""Tokens/s of a plain forward pass vs forward + capture of every layer's residual stream into a store.

    .venv/bin/python benchmarks/capture.py [--model gemma-3-270m] [--tokens 8192] [--device auto]

Both runs see the same windows (built-in corpus, 128-token windows, batch 8). The plain pass is
measured before and after the capture run and averaged, so load drift on a shared machine is
split evenly. Goal: ratio >= 0.8.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.core.models import load_model  # noqa: E402
from engine.data.corpora import iter_texts  # noqa: E402
from engine.data.store_writer import build_store  # noqa: E402
from engine.data.windows import iter_windows  # noqa: E402


def plain_forward(lm, windows, batch_size: int) -> float:
    pad = lm.tokenizer.pad_token_id or 0
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(batch):
            ids[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w)] = 1
        with torch.inference_mode():
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def body_forward(lm, windows, batch_size: int) -> float:
    """The decoder stack without the unembedding (capture skips the head when it has what it needs)."""
    body = lm.model.get_decoder()
    original, lm.model = lm.model, body
    try:
        return plain_forward(lm, windows, batch_size)
    finally:
        lm.model = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--dtype", default="float16", help="store dtype")
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device)
    windows = [w for _, w, _ in iter_windows(lm.tokenizer, iter_texts("builtin"), args.context_length,
                                                max_tokens=args.tokens)]
    n_tokens = sum(len(w) for w in windows)
    print(f"{lm.name} on {lm.device} ({lm.dtype}), {lm.n_layers} layers, d={lm.d_model}; {n_tokens} tokens in "
          f"{len(windows)} windows of <= {args.context_length}, batch {args.batch_size}; torch threads "
          f"{torch.get_num_threads()}")
    plain_forward(lm, windows[: args.batch_size], args.batch_size)  # warm-up

    before = plain_forward(lm, windows, args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        texts = iter_texts("builtin")
        start = time.perf_counter()
        store = build_store(lm, texts, Path(folder) / "store", layers="all", sites=("resid_post",),
                            max_tokens=args.tokens, context_length=args.context_length, batch_size=args.batch_size,
                            dtype=args.dtype, corpus_spec="builtin")
        captured = time.perf_counter() - start
        size = store.size_bytes()
        bad = sum(int((~torch.isfinite(store.read("resid_post", layer, slice(None), dtype=store.dtype))).sum())
                  for layer in store.layers)
        assert store.n_tokens == n_tokens, (store.n_tokens, n_tokens)
    after = plain_forward(lm, windows, args.batch_size)
    plain = (before + after) / 2
    body = body_forward(lm, windows, args.batch_size)

    print(f"plain forward          : {n_tokens / plain:9.0f} tok/s  ({before:.2f} s before, {after:.2f} s after)")
    print(f"forward + capture+store: {n_tokens / captured:9.0f} tok/s  ({captured:.2f} s, {size / 2**20:.1f} MiB "
          f"{args.dtype}, {len(store.layers)} layers, non-finite values: {bad}, clamped to fp16 range: {store.manifest['n_clamped']})")
    print(f"decoder body only      : {n_tokens / body:9.0f} tok/s  ({body:.2f} s, no unembedding)")
    print(f"ratio (capture / plain forward): {plain / captured:.2f}x  (goal >= 0.8)")
    print(f"ratio (capture / body only)    : {body / captured:.2f}x  (overhead of hooks, copies and writes)")


if __name__ == "__main__":
    main()
