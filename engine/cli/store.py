"""CLI: ``cache``, ``store-info``, ``project`` and ``geometry``; :func:`run_job` for the long commands.

``cache`` (like ``sae train``, ``sae demo``, ``tuned-lens train`` and ``dashboards``) runs as a job of the job runner
(:mod:`engine.jobs`): it submits the job, follows it with a progress bar and prints the same result as before.
``--detach`` returns once the job has started (its JSON with ``--json``); Ctrl-C detaches too (the job keeps
running in its worker process) unless ``--cancel-on-interrupt`` is given.
"""
from __future__ import annotations

import contextlib
import sys

from engine.cli.common import add_model_args, emit, load_from_args, progress_bar


# --- long commands as jobs ----------------------------------------------------------------------
def job_args(p) -> None:
    """``--detach`` and ``--cancel-on-interrupt`` of a command that runs as a job."""
    p.add_argument("--detach", action="store_true",
                   help="submit the job and return once it has started (follow it with 'python -m engine jobs')")
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="Ctrl-C cancels the job (default: Ctrl-C detaches and the job keeps running)")


def model_params(args) -> dict:
    """The model arguments of :func:`engine.cli.common.add_model_args` as job parameters."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype,
            "trust_remote_code": bool(getattr(args, "trust_remote_code", False)),
            "device_map": getattr(args, "device_map", None)}


def run_job(spec: dict, args):
    """Submit ``spec`` and follow it (:func:`engine.cli.jobs.submit_and_follow`).

    Returns ``(0, job)`` once the job is done, so the command prints its own result; ``(code, None)`` when it was
    detached (``--detach``: the job's JSON or line is the output), failed or was cancelled (already said on stderr).
    A spec the runner refuses raises its one sentence (a ``UserError``) before anything runs.
    """
    from engine.cli.jobs import _runner, submit_and_follow
    from engine.jobs.spec import validate

    if args.detach:
        return submit_and_follow(spec, detach=True, as_json=args.json), None
    job_id = validate(spec).id
    with contextlib.redirect_stdout(sys.stderr):  # the job's own line goes to stderr; stdout is the command's
        code = submit_and_follow(spec, cancel_on_interrupt=args.cancel_on_interrupt)
    if code != 0:
        return code, None
    runner = _runner()
    job = runner.get(job_id)
    runner.close()
    return (0, job) if job.state == "done" else (1, None)


# --- cache --------------------------------------------------------------------------------------
def _parse_layers(text: str) -> str | list[int]:
    from engine.core.errors import UserError
    from engine.data.store import _parse_layers as parse

    if text.strip().lower() in ("all", ""):
        return "all"
    try:
        return sorted(parse(text))
    except ValueError:
        raise UserError(f"--layers takes all, 3,5,7 or 2-6, not '{text}'.") from None


def _cache(args) -> int:
    from engine.data.store import ActivationStore, normalize_store_sites

    spec = {"kind": "capture", "params": {
        **model_params(args), "corpus": args.corpus, "sites": normalize_store_sites(args.sites),
        "layers": _parse_layers(args.layers), "max_tokens": args.max_tokens, "context_length": args.context_length,
        "batch_size": args.batch_size, "store_dtype": args.store_dtype, "shard_tokens": args.shard_tokens,
        "out": args.out}}
    code, job = run_job(spec, args)
    if job is None:
        return code
    store = ActivationStore.open(job.result["path"])
    payload = _describe(store)
    emit(payload, args.json, f"{store.n_tokens:,} tokens of {store.model_name} in {store.path} "
                             f"({payload['size_bytes'] / 2**20:.1f} MiB, {len(store.manifest['shards'])} shards)")
    return 0


def _describe(store) -> dict:
    manifest = {k: v for k, v in store.manifest.items() if k != "shards"}
    return {"path": str(store.path), **manifest, "n_shards": len(store.manifest["shards"]),
            "size_bytes": store.size_bytes()}


def _store_info(args) -> int:
    from engine.data.store import ActivationStore
    from engine.data.store_admin import remove_stale_temp_files, stale_temp_files

    store = ActivationStore.open(args.store, allow_incomplete=True)
    problems = [] if args.no_verify else store.verify()
    stale = stale_temp_files(store.path)
    freed = remove_stale_temp_files(store.path) if args.clean else 0
    payload = {**_describe(store), "problems": problems, "stale_temp_files": [f.name for f in stale],
               "freed_bytes": freed}
    lines = [f"{store.path}: {store.model_name}, {store.n_tokens:,} tokens, sites {', '.join(store.sites)}, "
             f"layers {store.layers[0]}..{store.layers[-1]} ({len(store.layers)}), {store.manifest['dtype']}, "
             f"{payload['n_shards']} shards, {payload['size_bytes'] / 2**20:.1f} MiB, "
             f"{'complete' if store.manifest.get('complete') else 'INCOMPLETE (run the capture again to resume)'}"]
    lines += [f"corpus {store.manifest.get('corpus') or '(unnamed)'}, context {store.manifest['context_length']}"]
    if store.manifest.get("n_clamped"):
        lines.append(f"note: {store.manifest['n_clamped']:,} values exceeded the float16 range and were clamped "
                     "(capture in bfloat16 to keep them)")
    if stale:
        lines.append(f"{len(stale)} unfinished shard file(s) left by killed captures" +
                     (f": removed ({freed / 2**20:.1f} MiB)" if args.clean else "; --clean removes them"))
    lines += ([f"PROBLEM {p}" for p in problems] if problems else
              ["every shard verified against the manifest" if not args.no_verify else "not verified"])
    emit(payload, args.json, "\n".join(lines))
    return 1 if problems else 0


def _cloud(args, layers=None):
    from engine.geometry.projections import prompt_cloud, store_cloud

    if args.prompt_set:
        from engine.data.corpora import prompt_set

        lm = load_from_args(args)
        return prompt_cloud(lm, prompt_set(args.prompt_set), site=args.site or "resid_post", positions=args.positions,
                            layers=layers if layers is not None else "all")
    if not args.store:
        from engine.core.errors import UserError

        raise UserError("Give --store DIR or --prompt-set NAME.")
    from engine.data.store import ActivationStore

    store = ActivationStore.open(args.store)
    if layers is not None:
        store._name(args.site or store.sites[0], layers[0])  # clear message for a missing layer
    return store_cloud(store, site=args.site, layers=layers, max_points=args.max_points, seed=args.seed)


def _project(args) -> int:
    from engine.geometry.projections import project

    cloud = _cloud(args, layers=[args.layer])
    coords = project(cloud.at(args.layer), args.method, args.dims, seed=args.seed, normalize=args.normalize)
    payload = {"layer": args.layer, "method": args.method, "site": cloud.site, "n_points": cloud.n_points,
               "rows": cloud.row_ids, "labels": cloud.labels, "coords": coords.round(5).tolist()}
    text = "\n".join(f"{r}\t" + "\t".join(f"{v:.4f}" for v in c) for r, c in zip(cloud.row_ids, coords.tolist()))
    emit(payload, args.json, text)
    return 0


def _geometry(args) -> int:
    from engine.geometry.probes import probe_by_layer
    from engine.geometry.spread import geometry_by_layer

    cloud = _cloud(args)
    with progress_bar("geometry") as progress:
        result = geometry_by_layer(cloud, args.concept_label, args.language_label, progress=progress)
        if args.label:
            result["probe"] = probe_by_layer(cloud, args.label, folds=args.folds, seed=args.seed, progress=progress,
                                             group_label=args.concept_label).to_json()
    lines = ["layer  " + "  ".join(result["measures"])]
    for i, layer in enumerate(result["layers"]):
        lines.append(f"{layer:>5}  " + "  ".join(f"{values[i]:.4f}" for values in result["measures"].values()))
    if args.label:
        probe = result["probe"]
        grouping = f", folds grouped by '{probe['grouped_by']}'" if probe["grouped_by"] else ""
        lines.append(f"probe '{args.label}' (chance {probe['chance']:.3f}{grouping}): " +
                     " ".join(f"{a:.3f}" for a in probe["accuracy"]) +
                     f"; first layer at 90% of best: {probe['first_layer_at_90']}")
        if probe["ungrouped_accuracy"]:
            lines.append("  ungrouped, for comparison (test points share their concept with training points): " +
                         " ".join(f"{a:.3f}" for a in probe["ungrouped_accuracy"]))
    emit(result, args.json, "\n".join(lines))
    return 0


def _cloud_args(p) -> None:
    p.add_argument("--store", help="activation store folder")
    p.add_argument("--prompt-set", choices=["concepts", "days", "months", "numbers", "countries"],
                   help="embed a built-in prompt set with --model instead of reading a store")
    p.add_argument("--positions", default="last", choices=["last", "all", "mean"], help="for --prompt-set")
    p.add_argument("--site", default=None, help="store site (default: the store's first)")
    p.add_argument("--max-points", type=int, default=5000, help="tokens sampled from the store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    add_model_args(p)


def register(sub) -> None:
    p = sub.add_parser("cache", help="capture activations of a corpus into an on-disk store (resumable)")
    add_model_args(p)
    p.add_argument("--corpus", default="builtin",
                   help="builtin, builtin-multilingual, a .txt file, a folder, a .jsonl file or hf:<dataset>")
    p.add_argument("--layers", default="all", help="all, 3,5,7 or 2-6")
    p.add_argument("--sites", default="resid", help="comma-separated: resid, resid_pre, resid_mid, attn_out, "
                                                    "mlp_out, mlp_hidden")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored activations (--dtype is the model's compute dtype)")
    p.add_argument("--shard-tokens", type=int, default=None, help="rows per shard (default: ~256 MB shards)")
    p.add_argument("--out", default=None, help="store folder (default: cache/activations/<model>-<key>)")
    p.add_argument("--json", action="store_true")
    job_args(p)
    p.set_defaults(handler=_cache)

    p = sub.add_parser("store-info", help="describe a store and verify every shard against its manifest")
    p.add_argument("store")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums")
    p.add_argument("--clean", action="store_true", help="delete unfinished shard files of killed captures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_store_info)

    p = sub.add_parser("project", help="PCA or UMAP of one layer of a store (or a prompt set)")
    _cloud_args(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--method", default="pca", choices=["pca", "umap"])
    p.add_argument("--dims", type=int, default=2, choices=[2, 3])
    p.add_argument("--normalize", action="store_true", help="unit-normalise points before projecting")
    p.set_defaults(handler=_project)

    p = sub.add_parser("geometry", help="spread measures per layer, and probe accuracy per layer for --label")
    _cloud_args(p)
    p.add_argument("--label", default=None, help="label to probe: token/position/doc for stores; prompt-set labels")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--concept-label", default=None, help="with --language-label: translation similarity; "
                                                          "also groups the probe's folds by concept")
    p.add_argument("--language-label", default=None)
    p.set_defaults(handler=_geometry)
