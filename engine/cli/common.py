"""``python -m engine ...``: the headless twin of the UI.

Each topic lives in its own module with a ``register(subparsers)`` function that adds its
sub-commands; a sub-command's handler takes the parsed arguments and returns an exit code.
Bad input (:class:`engine.core.errors.UserError`) prints one line and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.core.errors import UserError

# one module per topic
COMMAND_MODULES = ["engine.cli.lens", "engine.cli.store", "engine.cli.sae", "engine.cli.tuned_lens",
                   "engine.cli.dashboards", "engine.cli.interventions", "engine.cli.jobs", "engine.cli.autointerp",
                   "engine.cli.neuronpedia"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from engine.core.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded name, Hugging Face id, local folder or .gguf file (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device-map", default=None, metavar="auto|balanced|JSON",
                        help="split the model over devices with accelerate: auto, balanced, or a JSON object from "
                             'module-name prefixes to cuda:N, cpu or disk, e.g. \'{"model.layers.20": "cuda:1", '
                             '"model.layers.30": "disk"}\' (modules it does not name stay on --device; disk '
                             "weights go to cache/offload)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the hub to run (off by default)")


def say(message: str) -> None:
    """Status lines go to stderr, so that ``--json`` output on stdout stays clean."""
    print(message, file=sys.stderr)


def load_from_args(args):
    from engine.core.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      progress=say, device_map=getattr(args, "device_map", None))


@contextmanager
def progress_bar(desc: str) -> Iterator[Callable[..., None]]:
    """A tqdm bar on stderr, handed out as the engine's ``progress(fraction, message="")`` callback."""
    from tqdm import tqdm

    with tqdm(total=1000, desc=desc, unit="‰", bar_format="{l_bar}{bar}| {postfix}", file=sys.stderr) as bar:
        def progress(fraction: float, message: str = "") -> None:
            bar.update(max(0, round(fraction * 1000) - bar.n))
            if message:
                bar.set_postfix_str(message, refresh=True)
        yield progress


def emit(payload, as_json: bool, text: str | None = None) -> None:
    if as_json:
        json.dump(payload, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
    else:
        print(text if text is not None else json.dumps(payload, ensure_ascii=False, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Latent Explorer, headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and the job can be resumed", file=sys.stderr)
        return 130
