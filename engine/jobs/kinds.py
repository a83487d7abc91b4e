"""The registered job kinds: each a parameter list plus a thin run function over an existing engine function.

A run function is called in a worker process as ``run(params, job)`` with the validated parameters and
a :class:`engine.jobs.worker.JobContext`; it locks its output folder(s) with ``job.claim``, hands
``job.progress`` to the engine as its progress callback and returns a small JSON result whose
``message`` is shown when the job is done. Engine modules are imported inside the functions, so
listing or validating jobs stays light, and every engine function used here resumes on its own
(stores per shard, SAE and tuned-lens training from checkpoints), which is what makes a cancelled or
failed job continue where it stopped when it is submitted again.

Kinds: ``capture``, ``train_sae``, ``train_tuned_lens``, ``dashboards``, ``sae_demo`` (capture, train and
dashboards in one job), ``explain``, ``score`` and ``labels`` (:mod:`engine.autointerp.jobs` on a dashboard) and
``selftest`` (counts with checkpoints, for checking a runner without a model).
"""
from __future__ import annotations

import re
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.fileio import atomic_write_json
from engine.jobs.spec import JobSpecError, Kind, Param, register

if TYPE_CHECKING:
    from engine.jobs.worker import JobContext

MODEL_PARAMS = (
    Param("model", "str", help="an embedded name, a Hugging Face id, a model folder or a .gguf file"),
    Param("device", "str", "auto"),
    Param("dtype", "str", "auto", choices=("auto", "float32", "bfloat16", "float16")),
    Param("trust_remote_code", "bool", False),
    Param("device_map", "str", None, optional=True, help="auto, balanced or a JSON object (accelerate)"),
)


# --- shared checks ------------------------------------------------------------------------------
def _check_settings(kind: str, settings: dict, config_class) -> object:
    """Build the engine's settings dataclass from a JSON object, naming the first unknown setting."""
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise JobSpecError(f"A {kind} job's settings have no '{unknown[0]}'; the settings are {', '.join(names)}.")
    try:
        config = config_class(**settings)
    except TypeError as exc:
        raise JobSpecError(f"The settings of a {kind} job are not valid ({exc}).") from None
    for method in ("validate", "check"):
        if hasattr(config, method):
            getattr(config, method)()
    return config


def _check_corpus(params: dict) -> None:
    """Fail at submit on a bad corpus; a local corpus path becomes absolute."""
    from engine.data.corpora import check_corpus

    found = check_corpus(params["corpus"], enforce_roots=True if params.get("enforce_roots") else None)
    if found.path is not None:
        params["corpus"] = str(Path(found.path).resolve())


def _corpus_inputs(params: dict) -> list[str]:
    corpus = params["corpus"]
    return [corpus] if Path(corpus).is_absolute() and Path(corpus).exists() else []


# --- capture ------------------------------------------------------------------------------------
def _roots(p: dict) -> bool | None:
    """The data-roots rule for a corpus: always for jobs from the UI, else as the CLI decides (engine.core.paths)."""
    return True if p.get("enforce_roots") else None


ROOTS_PARAM = Param("enforce_roots", "bool", False, help="keep a corpus path under the data roots (the UI passes true)")


def run_capture(p: dict, job: JobContext) -> dict:
    from engine.data.corpora import iter_texts
    from engine.data.store_writer import build_store, default_store_dir

    lm = job.load_model(p)
    out = p["out"] or default_store_dir(lm, p["corpus"], p["sites"], p["layers"], p["context_length"],
                                        p["store_dtype"])
    out = job.claim(out)
    job.units(p["max_tokens"], "tokens")
    store = build_store(lm, iter_texts(p["corpus"], enforce_roots=_roots(p)), out, layers=p["layers"], sites=p["sites"],
                        max_tokens=p["max_tokens"], context_length=p["context_length"], batch_size=p["batch_size"],
                        dtype=p["store_dtype"], corpus_spec=p["corpus"], progress=job.progress,
                        shard_tokens=p["shard_tokens"])
    size = store.size_bytes()
    return {"message": f"Stored {store.n_tokens:,} tokens ({size / 2**20:,.1f} MiB) in {store.path}.",
            "path": str(store.path), "n_tokens": store.n_tokens, "size_bytes": size}


register(Kind("capture", "engine.jobs.kinds:run_capture", summary="capture activations of a corpus into a store",
              params=(*MODEL_PARAMS,
                      Param("corpus", "str", "builtin", help="builtin, builtin-multilingual, a file, a folder or hf:NAME"),
                      ROOTS_PARAM,
                      Param("sites", "str_list", ["resid_post"]),
                      Param("layers", "layers", "all"),
                      Param("max_tokens", "int", 100_000),
                      Param("context_length", "int", 128),
                      Param("batch_size", "int", 8),
                      Param("store_dtype", "str", "float16", choices=("float16", "bfloat16", "float32")),
                      Param("shard_tokens", "int", None, optional=True),
                      Param("out", "path", None, optional=True, help="default: cache/activations/<model>-<key>")),
              check=_check_corpus, inputs=_corpus_inputs))


# --- SAE training -------------------------------------------------------------------------------
def _check_train_sae(params: dict) -> None:
    from engine.sae.training import SAETrainConfig

    _check_settings("train_sae", params["config"], SAETrainConfig)


def run_train_sae(p: dict, job: JobContext) -> dict:
    from engine.core.models import cache_root
    from engine.data.store import ActivationStore
    from engine.sae.evaluation import evaluate_on_store, report_to_json
    from engine.sae.training import SAETrainConfig, train_sae

    config = SAETrainConfig(**p["config"])
    store = ActivationStore.open(p["store"])
    site = p["site"] or store.sites[0]
    layer = p["layer"] if p["layer"] is not None else store.layers[len(store.layers) // 2]
    name = f"{Path(p['store']).name}-L{layer}-{site}-{config.architecture}-w{config.width(store.width(site))}"
    out = job.claim(p["out"] or cache_root() / "saes" / name)
    job.units(config.total_tokens, "tokens")
    result = train_sae(store, out, site=site, layer=layer, target_site=p["target_site"],
                       target_layer=p["target_layer"], config=config, model_name=p["model_name"],
                       resume=not p["restart"], progress=job.progress, on_metrics=job.metrics)
    report = None
    if p["evaluate"]:
        job.say("evaluating on the cached activations")
        report = report_to_json(evaluate_on_store(result.sae, store, site=site, layer=layer))
        atomic_write_json(out / "report.json", report)
    return {"message": f"Saved {result.path or out} ({result.steps} steps, {result.tokens:,} tokens).",
            "path": str(result.path or out), "steps": result.steps, "tokens": result.tokens,
            "resumed_from_step": result.resumed_from_step, "tokens_per_second": round(result.tokens_per_second),
            "seconds": round(result.seconds, 2), "final": result.history[-1] if result.history else {},
            "report": "report.json" if report is not None else None}


register(Kind("train_sae", "engine.jobs.kinds:run_train_sae", summary="train a TopK or L1 SAE on a store",
              params=(Param("store", "path", help="an activation store folder", must_exist=True),
                      Param("site", "str", None, optional=True),
                      Param("layer", "int", None, optional=True),
                      Param("target_site", "str", None, optional=True, help="transcoders: the site they predict"),
                      Param("target_layer", "int", None, optional=True, help="transcoders: default the layer"),
                      Param("config", "dict", {}, help="training settings (architecture, d_sae, k, lr, ...)"),
                      Param("model_name", "str", None, optional=True),
                      Param("evaluate", "bool", True),
                      Param("restart", "bool", False, help="ignore an existing checkpoint"),
                      Param("out", "path", None, optional=True, help="default: cache/saes/<store>-L<layer>-...")),
              check=_check_train_sae))


# --- tuned lens ---------------------------------------------------------------------------------
def _check_tuned_lens(params: dict) -> None:
    from engine.lens.tuned_train import LensTrainConfig

    _check_corpus(params)
    _check_settings("train_tuned_lens", params["config"], LensTrainConfig)


def run_train_tuned_lens(p: dict, job: JobContext) -> dict:
    from engine.lens.tuned import default_lens_dir
    from engine.lens.tuned_train import LensTrainConfig, train_tuned_lens

    config = LensTrainConfig(**p["config"])
    lm = job.load_model(p)
    out = job.claim(p["out"] or default_lens_dir(lm.name))
    job.units(config.steps, "steps")

    def progress(fraction: float, message: str = "") -> None:
        found = re.search(r"step (\d+)/\d+\s+KL ([0-9.eE+-]+)", message)  # "step 12/60  KL 3.210 nats"
        if found:
            job.metrics({"step": int(found.group(1)), "kl": float(found.group(2))})
        job.progress(fraction, message)

    from engine.data.corpora import iter_texts

    texts = (lambda: iter_texts(p["corpus"], enforce_roots=True)) if _roots(p) else p["corpus"]
    result = train_tuned_lens(lm, texts, out, config, corpus_name=p["corpus"], resume=not p["restart"],
                              progress=progress)
    return {"message": f"Trained {result.steps_done} steps in {result.seconds:.0f} s; saved to {out}. Choose it on "
                       "the Lens page with the 'Lens' selector.",
            "path": str(out), "steps": result.steps_done, "resumed_from": result.resumed_from,
            "final_kl": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 1),
            "tokens_seen": result.tokens_seen, "subset_coverage": result.subset_coverage, "model": lm.describe()}


register(Kind("train_tuned_lens", "engine.jobs.kinds:run_train_tuned_lens", summary="train a tuned lens for a model",
              params=(*MODEL_PARAMS,
                      Param("corpus", "str", "builtin"),
                      ROOTS_PARAM,
                      Param("config", "dict", {}, help="training settings (steps, batch_size, seq_len, ...)"),
                      Param("restart", "bool", False, help="ignore an existing checkpoint"),
                      Param("out", "path", None, optional=True, help="default: cache/tuned_lens/<model>")),
              check=_check_tuned_lens, inputs=_corpus_inputs))


# --- dashboards ---------------------------------------------------------------------------------
def _check_dashboards(params: dict) -> None:
    from engine.features.build import DashboardConfig

    _check_settings("dashboards", params["config"], DashboardConfig)


def _build_dashboards(job: JobContext, lm, sae_dir, store_dir, settings: dict, out=None, force: bool = False,
                      progress=None) -> Path:
    from engine.data.store import ActivationStore
    from engine.features.build import DashboardConfig, build_dashboards, dashboard_key
    from engine.features.folder import dashboards_root

    config = DashboardConfig(**settings)
    out = job.claim(out or dashboards_root() / dashboard_key(sae_dir, ActivationStore.open(store_dir), config))
    return build_dashboards(sae_dir, store_dir, lm, out, config=config, force=force,
                            progress=progress or job.progress)


def run_dashboards(p: dict, job: JobContext) -> dict:
    lm = job.load_model(p)
    out = _build_dashboards(job, lm, p["sae"], p["store"], p["config"], p["out"], p["force"])
    return {"message": f"Dashboards saved in `{out}`.", "path": str(out)}


register(Kind("dashboards", "engine.jobs.kinds:run_dashboards", summary="build every feature's dashboard of an SAE",
              params=(*MODEL_PARAMS,
                      Param("sae", "path", help="an SAE folder", must_exist=True),
                      Param("store", "path", help="an activation store folder of the model", must_exist=True),
                      Param("config", "dict", {}, help="dashboard settings (top_k, batch_size, ...)"),
                      Param("force", "bool", False),
                      Param("out", "path", None, optional=True, help="default: cache/dashboards/<sae>-<key>")),
              check=_check_dashboards))


# --- the demo SAE: capture -> train -> dashboards -------------------------------------------------
def _check_demo(params: dict) -> None:
    from engine.sae.demo import DemoSettings

    _check_settings("sae_demo", {"model": params["model"] or DemoSettings.model, **params["settings"]}, DemoSettings)


def run_sae_demo(p: dict, job: JobContext) -> dict:
    from engine.core.progress import scaled
    from engine.data.store_writer import default_store_dir
    from engine.sae.demo import DemoSettings, demo_sae_dir, train_demo_sae

    settings = DemoSettings(**{**p["settings"], "model": p["model"] or DemoSettings.model})
    lm = job.load_model({**p, "model": settings.model})
    layer = settings.layer if settings.layer is not None else lm.n_layers // 2
    job.claim(demo_sae_dir(settings, layer))
    job.claim(default_store_dir(lm, settings.corpus, sites=(settings.site,), layers=[layer],
                                context_length=settings.context_length))
    split = 0.85 if p["dashboards"] else 1.0
    result = train_demo_sae(settings, lm=lm, progress=scaled(job.progress, 0.0, split), on_metrics=job.metrics,
                            evaluate=p["evaluate"])
    out = {"message": f"Demo SAE saved to {result['path']}.", "path": result["path"], "store": result["store"],
           "train": result["train"], "report": "report.json" if result.get("report") else None}
    if p["dashboards"]:
        dash = _build_dashboards(job, lm, result["path"], result["store"], p["dashboard_config"],
                                 progress=scaled(job.progress, split, 1.0))
        out.update(dashboards=str(dash), message=f"Demo SAE saved to {result['path']}; dashboards in {dash}.")
    return out


register(Kind("sae_demo", "engine.jobs.kinds:run_sae_demo",
              summary="the demo SAE: capture the built-in corpus, train a TopK SAE, build its dashboards",
              params=(Param("model", "str", None, optional=True, help="default: the demo's model"),
                      *MODEL_PARAMS[1:],
                      Param("settings", "dict", {}, help="DemoSettings fields (layer, width, k, train_tokens, ...)"),
                      Param("dashboards", "bool", True),
                      Param("evaluate", "bool", True, help="the report card (L0, explained variance, CE recovered)"),
                      Param("dashboard_config", "dict", {})),
              check=_check_demo))


# --- autointerp: explain, score, labels ---------------------------------------------------------
def _check_autointerp(params: dict) -> None:
    """``features`` is a list of feature ids (``"all"`` means every feature, as None does); the backend's kind is
    checked (its model or server only in the worker)."""
    if params.get("features") == "all":
        params["features"] = None
    if params.get("features") is not None and any(f < 0 for f in params["features"]):
        raise JobSpecError("Feature ids are 0 or more.")
    if "backend" in params and params["backend"].get("kind") not in ("local", "openai"):
        raise JobSpecError("An autointerp job's backend is {\"kind\": \"local\", \"model\": ...} or "
                           "{\"kind\": \"openai\", \"base_url\": ..., \"model\": ..., \"api_key_env\": ...}.")


def run_autointerp(p: dict, job: JobContext) -> dict:
    """One of :data:`engine.autointerp.jobs.JOB_KINDS`, with the output folder (the dashboard's, or ``out_dir``)
    claimed, so one autointerp job writes a dashboard's tables at a time and a dashboard rebuild waits for it."""
    from engine.autointerp.jobs import JOB_KINDS

    job.claim(p.get("out_dir") or p["dashboard"])

    def should_stop() -> bool:
        job.check_cancel()  # raises JobCancelled once the cancel flag is set: the job ends as cancelled
        return False

    params = {name: value for name, value in p.items() if value is not None}
    result = JOB_KINDS[job.kind](params, progress=job.progress, should_stop=should_stop) or {}
    if job.kind == "labels":
        return {"message": f"Labels saved in {result.get('path')}.", **result}
    counts = ", ".join(f"{result[k]:,} {k}" for k in ("explained", "scored", "failed", "skipped") if k in result)
    return {"message": f"{job.kind.capitalize()}: {counts or 'done'} ({result.get('features', 0):,} features); "
                       f"saved to {result.get('path')}.", **result}


_AUTOINTERP_COMMON = (
    Param("dashboard", "path", help="a dashboard folder", must_exist=True),
    Param("features", "layers", None, optional=True, help="a list of feature ids (default: every feature)"),
    Param("out_dir", "path", None, optional=True, help="default: the dashboard folder"),
)
_BACKEND = Param("backend", "dict", help='{"kind": "local", "model": ...} or {"kind": "openai", "base_url": ..., '
                                         '"model": ..., "api_key_env": ...}')
register(Kind("explain", "engine.jobs.kinds:run_autointerp", summary="explain SAE features with a chat model",
              params=(*_AUTOINTERP_COMMON, _BACKEND,
                      Param("examples", "dict", {}, help="ExampleConfig fields"),
                      Param("max_tokens", "int", None, optional=True)),
              check=_check_autointerp))
register(Kind("score", "engine.jobs.kinds:run_autointerp",
              summary="score explanations of SAE features (detection, fuzzing) with a chat model",
              params=(*_AUTOINTERP_COMMON, _BACKEND,
                      Param("examples", "dict", {}, help="ExampleConfig fields"),
                      Param("explainer", "str", None, optional=True),
                      Param("n_activating", "int", None, optional=True),
                      Param("n_non_activating", "int", None, optional=True),
                      Param("methods", "str_list", None, optional=True),
                      Param("seed", "int", None, optional=True),
                      Param("max_tokens", "int", None, optional=True)),
              check=_check_autointerp))
register(Kind("labels", "engine.jobs.kinds:run_autointerp",
              summary="cheap labels of SAE features from their top tokens",
              params=(_AUTOINTERP_COMMON[0], _AUTOINTERP_COMMON[2]),
              check=_check_autointerp))


# --- selftest -----------------------------------------------------------------------------------
def run_selftest(p: dict, job: JobContext) -> dict:
    """Count to ``steps`` with a checkpoint per step in ``out``; resumes; fails on purpose at ``fail_at_step``."""
    import json

    start, checkpoint = 0, None
    if p["out"]:
        folder = job.claim(p["out"])
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = folder / "selftest.json"
        if checkpoint.is_file():
            start = min(int(json.loads(checkpoint.read_text()).get("step", 0)), p["steps"])
    job.units(p["steps"], "steps")
    job.progress(start / p["steps"], f"starting at step {start}")
    for step in range(start, p["steps"]):
        if p["fail_at_step"] is not None and step == p["fail_at_step"]:
            raise RuntimeError(f"selftest failed at step {step} on purpose")
        time.sleep(p["seconds_per_step"])
        if checkpoint is not None:
            atomic_write_json(checkpoint, {"step": step + 1})
        job.metrics({"step": step + 1})
        job.progress((step + 1) / p["steps"], f"step {step + 1}/{p['steps']}")
    return {"message": f"Counted to {p['steps']} (started at step {start}).", "resumed_from": start,
            "path": str(p["out"]) if p["out"] else None}


register(Kind("selftest", "engine.jobs.kinds:run_selftest",
              summary="count with a checkpoint per step (checks a runner without a model)",
              params=(Param("steps", "int", 20),
                      Param("seconds_per_step", "float", 0.05),
                      Param("fail_at_step", "int", None, optional=True),
                      Param("out", "path", None, optional=True))))
