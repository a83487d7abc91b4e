"""CLI: ``dashboards`` builds every feature's dashboard of an SAE over an activation store."""
from __future__ import annotations

import argparse
import sys

from .cli import emit
from .errors import UserError


class DashboardCliError(UserError):
    pass


def _run(args) -> int:
    from tqdm import tqdm

    from .dashboards import Dashboard, DashboardConfig, build_dashboards
    from .models import load_model
    from .store import ActivationStore

    store = ActivationStore.open(args.store)
    spec = args.model or store.model_name
    lm = load_model(spec, device=args.device, dtype=args.dtype,
                    progress=lambda message: print(message, file=sys.stderr))
    if lm.weights_hash != store.weights_hash:
        raise DashboardCliError(f"The model '{spec}' is not the one the store was captured from "
                                f"('{store.model_name}'); pass that model with --model.")
    config = DashboardConfig(top_k=args.top_k, n_bins=args.bins, n_intervals=args.intervals,
                             samples_per_interval=args.samples, n_logits=args.logits, n_neighbours=args.neighbours,
                             batch_size=args.batch_size, device=args.device)
    with tqdm(total=1000, desc="dashboards", unit="‰", bar_format="{l_bar}{bar}| {postfix}",
              file=sys.stderr) as bar:
        def progress(fraction: float, message: str) -> None:
            bar.update(max(0, round(fraction * 1000) - bar.n))
            bar.set_postfix_str(message, refresh=True)

        out = build_dashboards(args.sae, args.store, lm, args.out, config=config, force=args.force,
                               progress=progress)
    dash = Dashboard.open(out)
    summary = dash.summary()
    payload = {"path": str(out), "features": summary["features"], "dead": summary["dead"],
               "dense": summary["dense"], "tokens": summary["tokens"],
               "pass_seconds": dash.manifest.get("pass_seconds")}
    emit(payload, args.json, f"saved {out}\n{summary['features']:,} features ({summary['dead']:,} dead, "
                             f"{summary['dense']:,} dense) over {summary['tokens']:,} tokens")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("dashboards", help="build feature dashboards of an SAE over an activation store")
    parser.add_argument("--sae", required=True, help="SAE folder (SAELens format)")
    parser.add_argument("--store", required=True, help="activation store folder holding the SAE's site and layer")
    parser.add_argument("--out", default=None, help="output folder (default cache/dashboards/<key>)")
    parser.add_argument("--model", default=None, help="the store's model (default: the name in its manifest)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--top-k", type=int, default=20, help="top activating examples kept per feature")
    parser.add_argument("--bins", type=int, default=32, help="histogram bins (a power of two)")
    parser.add_argument("--intervals", type=int, default=10, help="equal-width activation intervals per feature")
    parser.add_argument("--samples", type=int, default=5, help="samples per interval")
    parser.add_argument("--logits", type=int, default=10, help="top and bottom logit tokens per feature")
    parser.add_argument("--neighbours", type=int, default=10, help="nearest features by decoder cosine")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens encoded per batch")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date dashboard exists")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run)
