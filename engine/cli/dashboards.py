"""CLI: ``dashboards`` builds every feature's dashboard of an SAE over an activation store.

It runs as a ``dashboards`` job (after a ``capture`` job with ``--corpus``), followed with a progress bar;
``--detach`` returns once the job has started, ``--cancel-on-interrupt`` makes Ctrl-C cancel it.
"""
from __future__ import annotations

import argparse

from engine.cli.common import emit
from engine.cli.store import job_args, run_job
from engine.core.errors import UserError


class DashboardCliError(UserError):
    pass


def _store(args, cfg) -> tuple[str | None, str | None]:
    """``(store folder, model)``: ``--store`` as given, or ``--corpus`` captured first by a ``capture`` job (only the
    SAE's site and layer, into the resumable default store folder; a second run reuses it). ``(None, None)`` when
    that job did not finish (detached, failed or cancelled)."""
    from engine.data.store import ActivationStore

    if bool(args.store) == bool(args.corpus):
        raise DashboardCliError("Give either --store (an activation store) or --corpus (capture one now).")
    if args.store:
        store = ActivationStore.open(args.store)
        return str(store.path), args.model or store.model_name
    spec = args.model or cfg.model_name
    if not spec:
        raise DashboardCliError("The SAE's cfg.json names no model (metadata.model_name); pass one with --model.")
    site, layer = cfg.site()
    capture = {"kind": "capture", "params": {
        "model": spec, "device": args.device, "dtype": args.dtype, "corpus": args.corpus, "sites": [site],
        "layers": [layer], "max_tokens": args.tokens, "context_length": args.context_length}}
    code, job = run_job(capture, argparse.Namespace(**{**vars(args), "detach": False}))
    return (job.result["path"], spec) if job is not None else (None, None)


def _run(args) -> int:
    from engine.features.read import Dashboard
    from engine.sae.io import read_config

    cfg = read_config(args.sae)
    store, model = _store(args, cfg)
    if store is None:
        return 1
    config = {"top_k": args.top_k, "n_bins": args.bins, "n_intervals": args.intervals,
              "samples_per_interval": args.samples, "n_logits": args.logits, "n_neighbours": args.neighbours,
              "n_cooccur": args.cooccur, "batch_size": args.batch_size, "device": args.device}
    spec = {"kind": "dashboards", "params": {"model": model, "device": args.device, "dtype": args.dtype,
                                             "sae": args.sae, "store": store, "config": config, "force": args.force,
                                             "out": args.out}}
    code, job = run_job(spec, args)
    if job is None:
        return code
    out = job.result["path"]
    dash = Dashboard.open(out)
    summary = dash.summary()
    payload = {"path": str(out), "features": summary["features"], "dead": summary["dead"],
               "dense": summary["dense"], "tokens": summary["tokens"],
               "pass_seconds": dash.manifest.get("pass_seconds")}
    emit(payload, args.json, f"saved {out}\n{summary['features']:,} features ({summary['dead']:,} dead, "
                             f"{summary['dense']:,} dense) over {summary['tokens']:,} tokens")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("dashboards", help="build feature dashboards of an SAE over an activation store "
                                               "(or over a corpus, captured first)")
    parser.add_argument("--sae", required=True, help="SAE folder (SAELens format)")
    parser.add_argument("--store", default=None, help="activation store folder holding the SAE's site and layer")
    parser.add_argument("--corpus", default=None, help="instead of --store: capture this corpus (builtin, a .txt "
                        "file, a folder, a .jsonl file or hf:<dataset>) at the SAE's site and layer first")
    parser.add_argument("--tokens", type=int, default=100_000, help="with --corpus: tokens to capture")
    parser.add_argument("--context-length", type=int, default=128, help="with --corpus: tokens per window")
    parser.add_argument("--out", default=None, help="output folder (default cache/dashboards/<key>)")
    parser.add_argument("--model", default=None, help="the model (default: the one the store or SAE names)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--top-k", type=int, default=20, help="top activating examples kept per feature")
    parser.add_argument("--bins", type=int, default=32, help="histogram bins (a power of two)")
    parser.add_argument("--intervals", type=int, default=10, help="equal-width activation intervals per feature")
    parser.add_argument("--samples", type=int, default=5, help="samples per interval")
    parser.add_argument("--logits", type=int, default=10, help="top and bottom logit tokens per feature")
    parser.add_argument("--neighbours", type=int, default=10, help="nearest features by decoder cosine")
    parser.add_argument("--cooccur", type=int, default=10, help="most co-occurring features kept (0: off)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens encoded per batch")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date dashboard exists")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    job_args(parser)
    parser.set_defaults(handler=_run)
