"""First run: wall time from a fresh cache to the first browsable feature dashboard of the demo SAE.

Copies (symlinks) only ``cache/models`` into a temporary cache (``LATENT_EXPLORER_CACHE``), so the
model's conversion is excluded but the store, the SAE and its dashboards start from nothing, then runs
what the ``sae_demo`` job runs (model load, capture, train, eval, dashboards) in this process and prints
each part's wall time, the total and the SAE's report card (L0, explained variance, CE recovered, dead).

    python benchmarks/first_run.py [--model gemma-3-270m] [--settings '{"width": 1024}'] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = (("capturing", "capture"), ("training", "train"), ("evaluating", "eval"))


def _fresh_cache(source: Path) -> Path:
    cache = Path(tempfile.mkdtemp(prefix="first-run-cache-"))
    if (source / "models").is_dir():
        (cache / "models").symlink_to((source / "models").resolve(), target_is_directory=True)
    return cache


def run(model: str | None, settings: dict, keep: bool = False) -> dict:
    repo = Path(__file__).resolve().parent.parent
    source = Path(os.environ.get("LATENT_EXPLORER_CACHE", repo / "cache"))
    cache = _fresh_cache(source)
    os.environ["LATENT_EXPLORER_CACHE"] = str(cache)
    try:
        return _measure(model, settings)
    finally:
        if not keep:
            shutil.rmtree(cache, ignore_errors=True)


def _measure(model: str | None, settings: dict) -> dict:
    from engine.core.models import load_model
    from engine.features.build import DashboardConfig, build_dashboards, dashboard_key
    from engine.features.folder import dashboards_root
    from engine.features.read import Dashboard
    from engine.sae.demo import DemoSettings, train_demo_sae

    demo = DemoSettings(**{**settings, "model": model or DemoSettings.model})
    start = time.perf_counter()
    marks = {"load": start}
    cpu = {"load": time.process_time()}  # CPU seconds of this process (all threads): what the load cannot inflate
    lm = load_model(demo.model)
    marks["capture"], cpu["capture"] = time.perf_counter(), time.process_time()

    last = [0.0]

    def progress(fraction: float, message: str = "") -> None:
        now = time.perf_counter()
        for prefix, part in STAGES:
            if message.startswith(prefix) and part not in marks:
                marks[part], cpu[part] = now, time.process_time()
        if now - last[0] > 10:  # a line every 10 s on stderr
            last[0] = now
            print(f"[{now - start:6.1f} s] {100 * fraction:5.1f}% {message}", file=sys.stderr, flush=True)

    result = train_demo_sae(demo, lm=lm, progress=progress)
    if "eval" not in marks:
        marks["eval"], cpu["eval"] = time.perf_counter(), time.process_time()
    marks["dashboards"], cpu["dashboards"] = time.perf_counter(), time.process_time()
    from engine.data.store import ActivationStore

    config = DashboardConfig()
    out = dashboards_root() / dashboard_key(result["path"], ActivationStore.open(result["store"]), config)
    build_dashboards(result["path"], result["store"], lm, out, config=config)
    Dashboard.open(out).feature(0)  # browsable: the first feature page reads back
    end, cpu_end = time.perf_counter(), time.process_time()
    order = ["load", "capture", "train", "eval", "dashboards"]
    times = [marks[name] for name in order] + [end]
    parts = {name: round(times[i + 1] - times[i], 1) for i, name in enumerate(order)}
    cpus = [cpu[name] for name in order] + [cpu_end]
    cpu_parts = {name: round(cpus[i + 1] - cpus[i], 1) for i, name in enumerate(order)}
    report = result.get("report") or {}
    ce = report.get("ce") or {}
    return {"model": demo.model, "settings": {k: v for k, v in vars(demo).items() if k != "name"},
            "parts_s": parts, "total_s": round(end - start, 1), "cpu_parts_s": cpu_parts,
            "cpu_total_s": round(cpu_end - cpu["load"], 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(), "train": result["train"],
            "report": {"l0": report.get("l0"), "explained_variance": report.get("explained_variance"),
                       "ce_recovered": ce.get("recovered"), "dead_fraction": report.get("dead_fraction")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the demo's model")
    parser.add_argument("--settings", default="{}", help="DemoSettings overrides as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    before = [round(x, 2) for x in os.getloadavg()]
    out = run(args.model, json.loads(args.settings), keep=args.keep)
    out["load_average_before"] = before
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"first run of {out['model']} on {out['cpus']} CPUs (load average before {before}, after "
          f"{out['load_average']})")
    print(f"  {'part':<11} {'wall':>9} {'CPU':>9}  (CPU: seconds of this process on all cores; an idle 2-core "
          "machine needs at least CPU/2)")
    for name, seconds in out["parts_s"].items():
        print(f"  {name:<11} {seconds:7.1f} s {out['cpu_parts_s'][name]:7.1f} s")
    print(f"  {'total':<11} {out['total_s']:7.1f} s {out['cpu_total_s']:7.1f} s")
    r = out["report"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    print(f"report card: L0 {fmt(r['l0'], '.1f')}, explained variance {fmt(r['explained_variance'], '.3f')}, "
          f"CE recovered {fmt(r['ce_recovered'], '.3f')}, dead {fmt(r['dead_fraction'] and 100 * r['dead_fraction'], '.1f')} %")
    print(f"settings: {out['settings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
