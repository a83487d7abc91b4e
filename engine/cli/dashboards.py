"""CLI: ``dashboards`` builds every feature's dashboard of an SAE over an activation store."""
from __future__ import annotations

import argparse

from engine.cli.common import emit, progress_bar, say
from engine.core.errors import UserError


class DashboardCliError(UserError):
    pass


def _model_and_store(args):
    """The store to read: ``--store`` as given, or ``--corpus`` captured on the fly (only the SAE's site and
    layer, into the resumable default store folder; a second run reuses or extends it)."""
    from engine.core.models import load_model
    from engine.data.store import ActivationStore
    from engine.data.store_writer import build_store, default_store_dir
    from engine.sae.io import read_config

    if bool(args.store) == bool(args.corpus):
        raise DashboardCliError("Give either --store (an activation store) or --corpus (capture one now).")
    if args.store:
        store = ActivationStore.open(args.store)
        spec = args.model or store.model_name
        lm = load_model(spec, device=args.device, dtype=args.dtype, progress=say)
        store.check_model(lm)
        return lm, store
    from engine.data.corpora import iter_texts

    cfg = read_config(args.sae)
    spec = args.model or cfg.model_name
    if not spec:
        raise DashboardCliError("The SAE's cfg.json names no model (metadata.model_name); pass one with --model.")
    site, layer = cfg.site()
    lm = load_model(spec, device=args.device, dtype=args.dtype, progress=say)
    texts = iter_texts(args.corpus)
    out = default_store_dir(lm, args.corpus, [site], [layer], args.context_length)
    with progress_bar("capturing") as progress:
        store = build_store(lm, texts, out, layers=[layer], sites=[site], max_tokens=args.tokens,
                            context_length=args.context_length, corpus_spec=args.corpus, progress=progress)
    return lm, store


def _run(args) -> int:
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.read import Dashboard

    lm, store = _model_and_store(args)
    config = DashboardConfig(top_k=args.top_k, n_bins=args.bins, n_intervals=args.intervals,
                             samples_per_interval=args.samples, n_logits=args.logits, n_neighbours=args.neighbours,
                             n_cooccur=args.cooccur,
                             batch_size=args.batch_size, device=args.device)
    with progress_bar("dashboards") as progress:
        out = build_dashboards(args.sae, store.path, lm, args.out, config=config, force=args.force,
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
    parser.set_defaults(handler=_run)
