"""CLI: ``sae train``, ``sae eval``, ``sae demo`` and ``sae info`` (sparse autoencoders and transcoders)."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import add_model_args, emit, progress_bar, say
from engine.cli.store import job_args, run_job
from engine.core.errors import UserError


class SAECliError(UserError):
    pass


def _open_store(path: str):
    try:
        from engine.data.store import ActivationStore
    except ImportError as exc:  # pragma: no cover - the store ships with the engine
        raise SAECliError("The activation store module is not available in this installation.") from exc
    return ActivationStore.open(path)


def _train(args) -> int:
    from engine.sae.training import TRANSCODERS

    store = _open_store(args.store)
    site = args.site
    layer = args.layer if args.layer is not None else (store.layers[0] if len(store.layers) == 1 else None)
    if layer is None:
        raise SAECliError(f"The store holds layers {store.layers}: choose one with --layer.")
    transcoder = args.arch in TRANSCODERS
    if transcoder and not args.target_site:
        raise SAECliError("A transcoder needs the site it predicts: pass --target-site (and --target-layer).")
    target_site = args.target_site if transcoder else None
    out = Path(args.out) if args.out else _default_out(store, site, layer, args)
    config = {"architecture": args.arch, "d_sae": args.width, "expansion_factor": args.expansion, "k": args.k,
              "l1_coefficient": args.l1, "lr": args.lr, "warmup_steps": args.warmup, "batch_size": args.batch_size,
              "total_tokens": args.tokens or store.n_tokens, "b_dec_init": args.b_dec_init,
              "checkpoint_every": args.checkpoint_every, "seed": args.seed, "device": args.device}
    spec = {"kind": "train_sae", "params": {
        "store": str(store.path), "site": site, "layer": layer, "target_site": target_site,
        "target_layer": args.target_layer if transcoder else None, "config": config, "evaluate": False,
        "restart": args.restart, "out": str(out)}}
    code, job = run_job(spec, args)
    if job is None:
        return code
    result = job.result
    final = result.get("final") or {}
    tokens_per_second = result.get("tokens_per_second") or 0
    payload = {"path": result["path"], "tokens": result["tokens"], "steps": result["steps"],
               "seconds": result.get("seconds"), "tokens_per_second": tokens_per_second,
               "resumed_from_step": result.get("resumed_from_step"), "final": final}
    text = (f"saved {result['path']}\n{result['tokens']:,} tokens in {result.get('seconds') or 0:.1f} s "
            f"({tokens_per_second:,.0f} tok/s); L0 {final.get('l0', float('nan')):.1f}, "
            f"explained variance {final.get('explained_variance', float('nan')):.3f}, "
            f"dead {100 * final.get('dead_fraction', 0):.1f}%")
    emit(payload, args.json, text)
    return 0


def _default_out(store, site: str, layer: int, args) -> Path:
    from engine.core.models import cache_root

    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in store.model_name)[-40:]
    width = args.width or f"x{args.expansion:g}"
    detail = f"k{args.k}" if args.arch == "topk" else f"l1-{args.l1:g}"
    if args.arch not in ("topk", "standard"):
        target_layer = layer if args.target_layer is None else args.target_layer
        site = f"{site}-to-L{target_layer}-{args.target_site}"
    return cache_root() / "saes" / f"{slug}-L{layer}-{site}-{args.arch}-{detail}-w{width}"


def _format_report(report: dict) -> str:
    from engine.sae.metrics import DENSE_DENSITY

    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    where = f"{report['site']} layer {report['layer']}"
    if report.get("site_out"):
        where += f" -> {report['site_out']} layer {report['layer_out']}"
    lines = [f"SAE {report['sae'].get('architecture')} d_sae={report['sae'].get('d_sae')} on "
             f"{where} ({report['n_tokens']:,} tokens, from {report['source']})",
             f"  L0                  {fmt(report['l0'], '.2f')}",
             f"  explained variance  {fmt(report['explained_variance'])}",
             f"  MSE                 {fmt(report['mse'], '.5g')}",
             f"  cosine              {fmt(report['cosine'])}",
             f"  dead                {100 * report['dead_fraction']:.2f} %",
             f"  dense (>{100 * DENSE_DENSITY:g}%)        {100 * report['dense_fraction']:.2f} %"]
    ce = report.get("ce")
    if ce:
        lines += [f"  CE clean            {fmt(ce['clean'])}",
                  f"  CE with SAE         {fmt(ce['spliced'])}  (+{fmt(ce['delta'])})",
                  f"  CE zero-ablated     {fmt(ce['zero_ablated'])}",
                  f"  CE loss recovered   {fmt(ce['recovered'])}"]
    return "\n".join(lines)


def _placement(sae, args) -> dict:
    """Site overrides from the command line (``--site``/``--layer`` only together), warned about when off-config."""
    from engine.sae.attach import attach_warning

    where: dict = {}
    if args.layer is not None:
        where.update(site=args.site, layer=args.layer)
    if args.target_layer is not None:
        where.update(out_site=args.target_site or sae.cfg.output_site()[0], out_layer=args.target_layer)
    if where:
        site, layer = where.get("site"), where.get("layer")
        if site is None:
            site, layer = sae.cfg.site()
        warning = attach_warning(sae, site, layer, where.get("out_site"), where.get("out_layer"))
        if warning:
            say(f"warning: {warning}")
    return where


def _eval(args) -> int:
    from engine.sae.evaluation import evaluate_on_store, evaluate_with_model, held_out_texts, report_to_json
    from engine.sae.io import load_sae

    sae = load_sae(args.sae)
    store = _open_store(args.store) if args.store else None
    where = _placement(sae, args)
    if args.no_ce:
        if store is None:
            raise SAECliError("Without the model (--no-ce), evaluation needs cached activations: pass --store.")
        with progress_bar("eval") as progress:
            report = evaluate_on_store(sae, store, max_tokens=args.max_tokens, progress=progress, **where)
    else:
        from engine.cli.common import load_from_args

        if args.model is None:
            args.model = store.model_name if store is not None else sae.cfg.model_name
            if not args.model:
                raise SAECliError("The SAE names no model: pass --model.")
        lm = load_from_args(args)
        if store is not None:
            store.check_model(lm)
        texts = held_out_texts(store, args.corpus, args.skip_docs)
        with progress_bar("eval") as progress:
            report = evaluate_with_model(sae, lm, texts, max_tokens=args.max_tokens,
                                         context_length=args.context_length, batch_size=args.batch_size,
                                         progress=progress, **where)
    report = report_to_json(report)
    emit(report, args.json, _format_report(report))
    return 0


def _demo(args) -> int:
    import json

    settings = {"layer": args.layer, "capture_tokens": args.capture_tokens, "train_tokens": args.train_tokens,
                "width": args.width, "k": args.k, "name": args.name}
    settings = {name: value for name, value in settings.items() if value is not None}
    spec = {"kind": "sae_demo", "params": {"model": args.model, "settings": settings, "evaluate": not args.no_eval,
                                           "dashboards": args.dashboards}}
    code, job = run_job(spec, args)
    if job is None:
        return code
    done = job.result
    report = None
    if done.get("report"):
        report = json.loads((Path(done["path"]) / done["report"]).read_text(encoding="utf-8"))
    result = {"path": done["path"], "store": done["store"], "train": done["train"], "report": report,
              **({"dashboards": done["dashboards"]} if done.get("dashboards") else {})}
    text = f"saved {result['path']}\ntraining: {result['train']}"
    if report:
        text += "\n" + _format_report(report)
    if result.get("dashboards"):
        text += f"\ndashboards: {result['dashboards']}"
    emit(result, args.json, text)
    return 0


def _info(args) -> int:
    from engine.sae.io import describe, load_sae, load_sparsity
    from engine.sae.metrics import dead_in_log_sparsity

    sae = load_sae(args.sae)
    payload = describe(sae)
    sparsity = load_sparsity(args.sae)
    if sparsity is not None:
        payload["dead_in_training"] = float(dead_in_log_sparsity(sparsity).float().mean())
    emit(payload, args.json)
    return 0


def register(sub) -> None:
    sae = sub.add_parser("sae", help="sparse autoencoders: train, evaluate, demo, info")
    inner = sae.add_subparsers(dest="sae_command", required=True)

    p = inner.add_parser("train", help="train an SAE on an activation store",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True, help="activation store folder")
    p.add_argument("--site", default="resid_post")
    p.add_argument("--layer", type=int, help="layer to train on (default: the store's only layer)")
    p.add_argument("--arch", choices=("topk", "standard", "transcoder", "skip_transcoder"), default="topk")
    p.add_argument("--target-site", help="transcoders: the site they predict (e.g. mlp_out)")
    p.add_argument("--target-layer", type=int, help="transcoders: the layer of --target-site (default: --layer)")
    p.add_argument("--width", type=int, help="number of latents (d_sae); overrides --expansion")
    p.add_argument("--expansion", type=float, default=8.0, help="d_sae / d_in when --width is not given")
    p.add_argument("--k", type=int, default=32, help="active latents per token (topk)")
    p.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, help="token budget (default: one pass over the store)")
    p.add_argument("--b-dec-init", choices=("geometric_median", "mean", "zeros"), default="geometric_median")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: cache/saes/<model>-L<layer>-...)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--json", action="store_true")
    job_args(p)
    p.set_defaults(handler=_train)

    p = inner.add_parser("eval", help="report card: L0, explained variance, CE loss recovered, dead/dense latents",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--sae", required=True, help="SAE folder (SAELens format)")
    p.add_argument("--store", help="activation store the SAE was trained on (model, corpus, held-out split)")
    p.add_argument("--site", default="resid_post", help="with --layer: override the SAE's hook")
    p.add_argument("--layer", type=int)
    p.add_argument("--target-site", help="transcoders, with --target-layer: override the output hook")
    p.add_argument("--target-layer", type=int)
    p.add_argument("--corpus", help="held-out text (default: the store's corpus, else 'builtin')")
    p.add_argument("--skip-docs", type=int, help="documents to skip (default: those the store captured)")
    p.add_argument("--max-tokens", type=int, default=16_384)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-ce", action="store_true", help="reconstruction stats from the store only (no model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_eval)

    p = inner.add_parser("demo", help="capture the built-in corpus and train a small SAE (minutes on CPU)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="default: the demo's (gemma-3-270m)")
    p.add_argument("--layer", type=int, help="default: the middle layer")
    p.add_argument("--capture-tokens", type=int, help="default: the demo's (engine.sae.demo.DemoSettings)")
    p.add_argument("--train-tokens", type=int, help="default: the demo's")
    p.add_argument("--width", type=int, help="default: the demo's")
    p.add_argument("--k", type=int, help="default: the demo's")
    p.add_argument("--name", help="folder name under cache/saes")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--dashboards", action="store_true", help="also build the feature dashboards (as the app does)")
    p.add_argument("--json", action="store_true")
    job_args(p)
    p.set_defaults(handler=_demo)

    p = inner.add_parser("info", help="describe an SAE folder")
    p.add_argument("--sae", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_info)
