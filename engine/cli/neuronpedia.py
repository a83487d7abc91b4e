"""CLI: ``neuronpedia export`` writes a dashboard build in Neuronpedia's upload layout; ``neuronpedia import`` turns
such an export into a dashboard folder the feature browser opens offline (see :mod:`engine.features.neuronpedia`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import emit, progress_bar, say


def export_command(args: argparse.Namespace) -> int:
    from engine.core.models import load_model
    from engine.features.neuronpedia import export_neuronpedia
    from engine.features.read import Dashboard

    dash = Dashboard.open(args.dashboards)
    spec = args.model or dash.manifest.get("model")
    lm = load_model(spec, device="cpu", progress=say)  # only its tokenizer is used
    with progress_bar("neuronpedia export") as progress:
        root = export_neuronpedia(dash, args.out, lm.tokenizer, model_id=args.model_id, source_set=args.source_set,
                                  creator_id=args.creator_id, creator_name=args.creator_name,
                                  features_per_batch=args.batch_features, before=args.before, after=args.after,
                                  device=args.device, progress=progress)
    batches = len(list((root / "features").glob("batch-*.jsonl.gz")))
    emit({"path": str(root), "features": dash.d_sae, "batches": batches}, args.json,
         f"saved {root}\n{dash.d_sae:,} features in {batches} batch file(s)")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from engine.features.folder import dashboards_root
    from engine.features.neuronpedia import import_neuronpedia, open_dashboard

    out = args.out or dashboards_root() / f"neuronpedia-{Path(args.export).resolve().name}"
    with progress_bar("neuronpedia import") as progress:
        out = import_neuronpedia(args.export, out, progress=progress)
    summary = open_dashboard(out).summary()
    emit({"path": str(out), "features": summary["features"], "dead": summary["dead"]}, args.json,
         f"saved {out}\n{summary['features']:,} features ({summary['dead']:,} dead)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("neuronpedia", help="export dashboards for Neuronpedia, or import a Neuronpedia export")
    inner = parser.add_subparsers(dest="neuronpedia_command", required=True)
    export = inner.add_parser("export", help="write a dashboard build as Neuronpedia batch files (jsonl.gz)")
    export.add_argument("--dashboards", required=True, help="a built dashboard folder")
    export.add_argument("--out", required=True, help="output folder (gets <modelId>/<sourceId>/ inside)")
    export.add_argument("--model", default=None, help="model whose tokenizer turns tokens into text "
                                                      "(default: the one the dashboard names)")
    export.add_argument("--model-id", default=None, help="Neuronpedia model id (default: from the model name)")
    export.add_argument("--source-set", default=None, help="Neuronpedia source set, e.g. res-le-16k (the layer is "
                                                           "prepended)")
    export.add_argument("--creator-id", default="latent-explorer", help="creatorId written into every record")
    export.add_argument("--creator-name", default="Latent Explorer", help="creator name of the source set")
    export.add_argument("--batch-features", type=int, default=128, help="features per batch file")
    export.add_argument("--before", type=int, default=32, help="tokens kept before each example")
    export.add_argument("--after", type=int, default=16, help="tokens kept after each example")
    export.add_argument("--device", default="cpu", help="where the SAE re-encodes the windows: cpu, cuda, auto")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=export_command)
    imp = inner.add_parser("import", help="turn a Neuronpedia export into a dashboard folder to browse offline")
    imp.add_argument("--export", required=True, help="the export: one source's folder, or a folder holding one")
    imp.add_argument("--out", default=None, help="the dashboard folder to write (default "
                                                 "cache/dashboards/neuronpedia-<export folder name>)")
    imp.add_argument("--json", action="store_true", help="print the result as JSON")
    imp.set_defaults(handler=import_command)
