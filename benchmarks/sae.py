"""SAE throughput: training tokens/s and encode/decode speed against plain matmuls of the same shapes.

Run: ``.venv/bin/python benchmarks/sae.py [--d-in 640 --d-sae 4096 --k 32 --batch 1024 --steps 30]``.
Every figure is printed with its baseline measured in the same run (CPU, and GPU when present):

- encode: ``sae.encode(x)`` (subtract b_dec, matmul, top-k, scatter) vs ``x @ W_enc`` alone;
- decode: the sparse top-k decode used in training (``embedding_bag`` over k rows) vs the dense
  ``acts @ W_dec``;
- training: tokens/s of :func:`engine.sae.training.train_sae` vs a bare dense ReLU autoencoder step of the
  same shapes (forward, backward, Adam), i.e. what the matmuls alone cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.sae.base import SAE, SAEConfig  # noqa: E402
from engine.sae.training import SAETrainConfig, sparse_decode, train_sae  # noqa: E402


def timed(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_device(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, steps: int) -> None:
    print(f"\n== {device} == d_in={d_in} d_sae={d_sae} k={k} batch={batch} threads={torch.get_num_threads()}")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), device=device)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, d_in ** -0.5)
    x = torch.randn(batch, d_in, device=device)

    with torch.no_grad():
        t_matmul = timed(lambda: x @ sae.W_enc, device)
        t_encode = timed(lambda: sae.encode(x), device)
        pre = x @ sae.W_enc
        values, indices = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, indices, values)
        t_dense_dec = timed(lambda: acts @ sae.W_dec + sae.b_dec, device)
        t_sparse_dec = timed(lambda: sparse_decode(values, indices, sae.W_dec, sae.b_dec), device)
    print(f"encode        {batch / t_encode:12,.0f} tok/s   plain matmul {batch / t_matmul:12,.0f} tok/s   "
          f"ratio encode/matmul time {t_encode / t_matmul:5.2f}x")
    print(f"decode sparse {batch / t_sparse_dec:12,.0f} tok/s   dense matmul {batch / t_dense_dec:12,.0f} tok/s   "
          f"speed-up sparse vs dense {t_dense_dec / t_sparse_dec:5.2f}x")

    # baseline: a dense ReLU autoencoder training step of the same shapes (no top-k, no aux loss, no bookkeeping)
    W_enc = torch.randn(d_in, d_sae, device=device, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, device=device, requires_grad=True)
    b = torch.zeros(d_in, device=device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b], lr=1e-4)

    def dense_step():
        x_hat = ((x - b) @ W_enc).relu() @ W_dec + b
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_dense_step = timed(dense_step, device, repeats=max(3, steps // 3))
    batches = [torch.randn(batch, d_in) for _ in range(steps)]
    config = SAETrainConfig(d_sae=d_sae, k=k, batch_size=batch, total_tokens=batch * steps, log_every=10 ** 9,
                            init_sample_tokens=batch, device=str(device), dead_window_tokens=batch * 4)
    train_sae(batches[:3], None, config=SAETrainConfig(**{**config.__dict__, "total_tokens": batch * 3}))  # warm-up
    result = train_sae(batches, None, config=config)
    dense_tps = batch / t_dense_step
    print(f"training      {result.tokens_per_second:12,.0f} tok/s   dense AE step {dense_tps:12,.0f} tok/s   "
          f"ratio {result.tokens_per_second / dense_tps:5.2f}x of the bare matmul step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        bench_device(device, args.d_in, args.d_sae, args.k, args.batch, args.steps)


if __name__ == "__main__":
    main()
