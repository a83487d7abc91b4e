"""Dashboard statistics for all features of an SAE: one streaming pass vs a per-feature-batch baseline.

Both methods read the same store rows and compute, per feature, count, max, a histogram of non-zero
activations, the top-k activating rows and interval samples.

- **one pass** (``engine.features.accumulate.FeatureAccumulator``): each token batch is encoded once and all
  features are updated with batched tensor ops.
- **baseline** (the way SAEDashboard organises the work): features are processed in batches of
  ``--feature-batch``; for each feature batch every token is encoded again (a top-k SAE needs the full
  encode to know which latents survive), that batch's activation columns are gathered for all tokens,
  and then each feature is finished in a Python loop (``torch.histc``, ``topk``, interval sampling).
  With ``--baseline-batches N`` only the first N feature batches are timed and the time is scaled to
  all features (stated in the output).

Default: the demo SAE and its store (gemma-3-270m layer 9) on the CPU. ``--synthetic-tokens 1000000
--width 16384 --device cuda`` runs a random 16k SAE over random activations on a GPU instead.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from common import sync  # noqa: F401  (also puts the repo root on sys.path)

from engine.core.models import cache_root
from engine.features.accumulate import FeatureAccumulator


def demo_batches(store, site, layer, batch_size):
    positions = store.positions()
    data = store.read(site, layer, slice(0, store.n_tokens))
    keep = positions != 0
    rows = torch.arange(store.n_tokens)[keep]
    data = data[keep]
    return [(data[i:i + batch_size], rows[i:i + batch_size]) for i in range(0, data.shape[0], batch_size)]


def synthetic_batches(n_tokens, d_in, batch_size, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n_tokens, batch_size):
        n = min(batch_size, n_tokens - start)
        yield torch.randn(n, d_in, generator=generator, device=device), torch.arange(start, start + n, device=device)


def one_pass(sae, batches, device, top_k, n_bins, samples, cooccur=False):
    acc = FeatureAccumulator(sae.d_sae, top_k=top_k, n_bins=n_bins, reservoir=samples, device=device,
                             cooccur=cooccur)
    tokens = 0
    with torch.no_grad():
        for x, rows in batches():
            acc.update(sae.encode(x.to(device)), rows)
            tokens += x.shape[0]
        acc.interval_samples(10, samples)
    sync(device)
    return tokens, acc


def baseline(sae, batches, device, top_k, n_bins, samples, feature_batch, max_batches=None):
    """Feature batches; every token re-encoded per batch; per-feature Python loop for the statistics."""
    generator = torch.Generator().manual_seed(0)
    n_batches = math.ceil(sae.d_sae / feature_batch)
    done = 0
    with torch.no_grad():
        for b in range(n_batches if max_batches is None else min(max_batches, n_batches)):
            features = torch.arange(b * feature_batch, min((b + 1) * feature_batch, sae.d_sae), device=device)
            columns, all_rows = [], []
            for x, rows in batches():
                columns.append(sae.encode(x.to(device))[:, features])
                all_rows.append(rows)
            acts = torch.cat(columns)
            rows = torch.cat(all_rows)
            for j in range(features.numel()):  # per feature, as SAEDashboard builds each feature's data
                column = acts[:, j]
                top = float(column.max())
                nonzero = column[column > 0]
                if nonzero.numel() == 0:
                    continue
                torch.histc(nonzero, bins=n_bins, min=0.0, max=top)
                values, index = column.topk(min(top_k, column.numel()))
                _ = rows[index]
                for i in range(10):  # equal-width intervals of [0, max]
                    inside = torch.nonzero((column > i * top / 10) & (column <= (i + 1) * top / 10)).squeeze(1)
                    if inside.numel():
                        pick = torch.randperm(inside.numel(), generator=generator)[:samples]
                        _ = rows[inside[pick.to(inside.device)]]
            done += features.numel()
    sync(device)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", default=str(cache_root() / "saes" / "demo-gemma-3-270m-L9-resid_post-topk32-w2048"))
    parser.add_argument("--store", default=None, help="default: the store whose manifest matches the SAE's model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--feature-batch", type=int, default=256, help="baseline: features per batch")
    parser.add_argument("--baseline-batches", type=int, default=None, help="baseline: time only N feature batches")
    parser.add_argument("--synthetic-tokens", type=int, default=0, help="random activations instead of a store")
    parser.add_argument("--width", type=int, default=16384, help="synthetic: SAE width")
    parser.add_argument("--d-in", type=int, default=2048, help="synthetic: SAE input width")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    top_k, n_bins, samples = 20, 32, 5

    if args.synthetic_tokens:
        from engine.sae.base import SAE, SAEConfig

        sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.width, architecture="topk", k=64,
                            metadata={"hook_name": "blocks.0.hook_resid_post"}), device=device)
        with torch.no_grad():
            for param in sae.parameters():
                param.normal_(0, 0.05)
        batches = lambda: synthetic_batches(args.synthetic_tokens, args.d_in, args.batch_size, device)  # noqa: E731
        what = f"random top-k SAE {args.width:,} wide over {args.synthetic_tokens:,} random tokens"
    else:
        from engine.data.store import ActivationStore, list_stores
        from engine.features.build import check_sae_store
        from engine.sae.io import load_sae

        sae = load_sae(args.sae).to(device)
        store_path = args.store
        if store_path is None:
            wanted = (sae.cfg.extra.get("latent_explorer") or {}).get("weights_hash")
            store_path = next(s["path"] for s in list_stores(complete=True, weights_hash=wanted))
        store = ActivationStore.open(store_path)
        site, layer = check_sae_store(sae, store)
        cached = demo_batches(store, site, layer, args.batch_size)  # read once: both methods time compute only
        batches = lambda: iter(cached)  # noqa: E731
        what = f"{args.sae.rstrip('/').split('/')[-1]} ({sae.d_sae:,} features) over {store.n_tokens:,}-row store"

    print(f"{what} on {device} ({torch.get_num_threads()} threads)")
    start = time.perf_counter()
    tokens, _ = one_pass(sae, batches, device, top_k, n_bins, samples)
    ours = time.perf_counter() - start
    print(f"one pass:  {ours:8.2f} s  {tokens / ours:12,.0f} tokens/s  ({tokens:,} tokens x {sae.d_sae:,} features)")

    start = time.perf_counter()
    done = baseline(sae, batches, device, top_k, n_bins, samples, args.feature_batch, args.baseline_batches)
    measured = time.perf_counter() - start
    base = measured * sae.d_sae / done
    note = "" if done == sae.d_sae else f"  (measured {measured:.1f} s on {done:,} features, scaled to all)"
    print(f"baseline:  {base:8.2f} s  {tokens / base:12,.0f} tokens/s  (feature batches of {args.feature_batch}){note}")
    print(f"speed-up:  {base / ours:.1f}x")
    if sae.d_sae <= 16384:  # the build's optional extra (not in the baseline): pair counts for co-occurrence
        start = time.perf_counter()
        one_pass(sae, batches, device, top_k, n_bins, samples, cooccur=True)
        extra = time.perf_counter() - start
        print(f"one pass + co-occurrence: {extra:8.2f} s  ({extra / ours:.2f}x the pass without it)")


if __name__ == "__main__":
    main()
