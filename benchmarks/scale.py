"""Corpus-scale jobs: capture and dashboard throughput with 1 vs N Ray workers, and the Ray path's overhead.

Runs the same ``capture`` and ``dashboards`` job specs (same corpus, same settings) three ways, each with
one CPU thread per worker process so the comparison is about processes, not BLAS threads:

- **local**: :class:`engine.jobs.LocalRunner` with one worker process (the baseline);
- **ray 1**: :class:`engine.jobs.ray_runner.RayRunner` on a local Ray with 1 CPU (one part per job);
- **ray N**: a local Ray with N CPUs (N parts per job).

Each job runs in a fresh output folder and its wall time (submit to done) includes loading the model in
the workers; starting Ray itself is timed separately. Prints tokens/s, the speed-up of N workers over 1
and the overhead of the Ray path at N=1 over the local runner (goal: at most 1.15x).

    python benchmarks/scale.py --workers 2 --tokens 40000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import english_text  # noqa: F401  (also puts the repo root on sys.path)


def _sae(d_in: int, d_sae: int, folder: Path, model: str) -> Path:
    from engine.sae.base import SAE, SAEConfig
    from engine.sae.io import save_sae

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": model}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.05)
        sae.b_enc.sub_(0.5)
    return save_sae(sae, folder)


def _run(runner, spec: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    job = runner.wait(runner.submit(spec, rerun=True).id, timeout=3600)
    seconds = time.perf_counter() - started
    if job.state != "done":
        raise SystemExit(f"{spec['kind']} failed on {type(runner).__name__}: {job.error}\n{runner.logs(job.id)}")
    return seconds, job.result


def _specs(args, corpus: Path, out: Path, sae: Path | None, store: Path | None) -> tuple[dict, dict | None]:
    capture = {"kind": "capture", "params": {"model": args.model, "corpus": str(corpus), "layers": [1],
                                             "max_tokens": args.tokens, "context_length": args.context,
                                             "batch_size": args.batch_size, "out": str(out / "store")}}
    if sae is None or store is None:
        return capture, None
    dashboards = {"kind": "dashboards", "params": {"model": args.model, "sae": str(sae), "store": str(store),
                                                   "config": {"top_k": 20, "batch_size": 1024, "device": "cpu"},
                                                   "out": str(out / "dash")}}
    return capture, dashboards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=1024)
    args = parser.parse_args()

    import ray

    from engine.core.models import load_model
    from engine.jobs import LocalRunner
    from engine.jobs.ray_runner import RayRunner

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    os.environ["LATENT_EXPLORER_CACHE"] = str(tmp / "cache")
    corpus = tmp / "corpus.jsonl"  # documents of ~2,000 characters
    text = english_text(args.tokens * 6)
    corpus.write_text("\n".join(json.dumps({"text": text[i:i + 2000]}) for i in range(0, len(text), 2000)),
                      encoding="utf-8")
    lm = load_model(args.model, device="cpu")
    sae = _sae(lm.d_model, args.d_sae, tmp / "sae", args.model)

    results: dict[str, dict[str, float]] = {}
    local = LocalRunner(tmp / "cache" / "jobs", workers=1, threads=1)
    capture, _ = _specs(args, corpus, tmp / "local", None, None)
    seconds, result = _run(local, capture)
    _, dashboards = _specs(args, corpus, tmp / "local", sae, Path(result["path"]))
    results["local"] = {"capture": seconds, "dashboards": _run(local, dashboards)[0]}
    n_tokens = result["n_tokens"]
    local.close()

    for n in (1, args.workers):
        started = time.perf_counter()
        runner = RayRunner(tmp / "cache" / "jobs", address="auto", workers=n, start=True)
        init = time.perf_counter() - started
        capture, _ = _specs(args, corpus, tmp / f"ray{n}", None, None)
        seconds, result = _run(runner, capture)
        _, dashboards = _specs(args, corpus, tmp / f"ray{n}", sae, Path(result["path"]))
        results[f"ray {n}"] = {"capture": seconds, "dashboards": _run(runner, dashboards)[0], "init": init}
        runner.close()
        ray.shutdown()

    print(f"\n{args.model}, {n_tokens:,} tokens, context {args.context}, SAE width {args.d_sae}, "
          f"{os.cpu_count()} CPUs on this machine")
    print(f"{'':10} {'capture s':>10} {'tok/s':>9} {'dashboards s':>13} {'tok/s':>9} {'ray init s':>11}")
    for name, r in results.items():
        print(f"{name:10} {r['capture']:10.2f} {n_tokens / r['capture']:9,.0f} {r['dashboards']:13.2f} "
              f"{n_tokens / r['dashboards']:9,.0f} {r.get('init', 0.0):11.2f}")
    one, many, base = results["ray 1"], results[f"ray {args.workers}"], results["local"]
    for what in ("capture", "dashboards"):
        print(f"{what}: speed-up with {args.workers} Ray workers over 1: {one[what] / many[what]:.2f}x; "
              f"Ray at N=1 over the local runner: {one[what] / base[what]:.2f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
