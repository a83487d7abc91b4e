"""CLI: ``explain``, ``score``, ``labels`` and ``search`` over a built dashboard (see :mod:`engine.autointerp`).

The explainer / scorer is a local chat model (``--local smollm2-135m``, the default) or an OpenAI-compatible
endpoint (``--base-url https://api.openai.com/v1 --api-model gpt-4o-mini --api-key-env OPENAI_API_KEY``); the API
key is read from that environment variable and never written anywhere.
"""
from __future__ import annotations

import argparse

from engine.cli.common import emit, progress_bar
from engine.core.errors import UserError


class AutointerpCliError(UserError):
    pass


def parse_features(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; None or "" -> None (all)."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise AutointerpCliError(f"'{text}' is not a feature list; write e.g. 0-9,15.") from None
    return out


def _backend(args):
    from engine.autointerp.backends import LocalChatBackend, OpenAICompatibleBackend

    if args.base_url:
        if not args.api_model:
            raise AutointerpCliError("--base-url needs --api-model (the model name the endpoint serves).")
        return OpenAICompatibleBackend(args.base_url, args.api_model, args.api_key_env or None,
                                       concurrency=args.concurrency, timeout=args.timeout)
    return LocalChatBackend(args.local, batch_size=args.batch_size, device=args.device)


def _explain(args) -> int:
    from engine.autointerp.examples import open_dashboard
    from engine.autointerp.explain import ExplainConfig, explain_features

    dash = open_dashboard(args.dashboard)
    with progress_bar("explaining") as progress:
        result = explain_features(dash, _backend(args), parse_features(args.features),
                                  config=ExplainConfig(max_tokens=args.max_tokens), progress=progress)
    emit(result, args.json, f"saved {result['path']}\n{result['explained']:,} explained, {result['failed']:,} "
                            f"failed, {result['skipped']:,} already done")
    return 0 if not result["failed"] else 1


def _score(args) -> int:
    from engine.autointerp.examples import open_dashboard
    from engine.autointerp.scoring import ScoreConfig, score_features

    dash = open_dashboard(args.dashboard)
    config = ScoreConfig(n_activating=args.n_activating, n_non_activating=args.n_non_activating,
                         methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    with progress_bar("scoring") as progress:
        result = score_features(dash, _backend(args), parse_features(args.features), explainer=args.explainer,
                                config=config, progress=progress)
    emit(result, args.json, f"saved {result['path']}\n{result['scored']:,} scored, {result['failed']:,} failed, "
                            f"{result['skipped']:,} already done")
    return 0 if not result["failed"] else 1


def _labels(args) -> int:
    from engine.autointerp.labels import build_labels

    with progress_bar("labels") as progress:
        path = build_labels(args.dashboard, progress=progress)
    emit({"path": str(path)}, args.json, f"saved {path}")
    return 0


def _search(args) -> int:
    from engine.autointerp.search import search_text

    hits = search_text(args.dashboard, args.query, args.limit)
    rows = hits.to_dict(orient="records")
    text = "\n".join(f"{r['feature']:>7}  {r['score']:6.2f}  {r['explanation'] or r['label']}" for r in rows)
    emit({"method": hits.attrs.get("method"), "hits": rows}, args.json, text or "no match")
    return 0


def _backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dashboard", required=True, help="a built dashboard folder")
    parser.add_argument("--features", default=None, help="features to use, e.g. 0-99,120 (default: all)")
    parser.add_argument("--local", default="smollm2-135m", help="local chat model (default smollm2-135m)")
    parser.add_argument("--batch-size", type=int, default=8, help="local model: conversations per batch")
    parser.add_argument("--device", default="auto", help="local model: auto, cpu, cuda ...")
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. "
                        "https://api.openai.com/v1 (instead of the local model)")
    parser.add_argument("--api-model", default=None, help="the endpoint's model name")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="NAME of the environment variable holding the API key ('' for none)")
    parser.add_argument("--concurrency", type=int, default=4, help="endpoint: requests in flight")
    parser.add_argument("--timeout", type=float, default=60.0, help="endpoint: seconds per request")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    explain = sub.add_parser("explain", help="explain dashboard features with a local or remote chat model")
    _backend_args(explain)
    explain.add_argument("--max-tokens", type=int, default=60, help="tokens per explanation")
    explain.set_defaults(handler=_explain)

    score = sub.add_parser("score", help="score explanations by detection and fuzzing")
    _backend_args(score)
    score.add_argument("--explainer", default=None, help="score this explainer's explanations (default: newest)")
    score.add_argument("--n-activating", type=int, default=10, help="held-out activating contexts per feature")
    score.add_argument("--n-non-activating", type=int, default=10, help="non-activating contexts per feature")
    score.add_argument("--methods", default="detection,fuzzing", help="detection, fuzzing or both")
    score.set_defaults(handler=_score)

    labels = sub.add_parser("labels", help="cheap token / n-gram / logit labels for every feature (no LLM)")
    labels.add_argument("--dashboard", required=True, help="a built dashboard folder")
    labels.add_argument("--json", action="store_true", help="print the result as JSON")
    labels.set_defaults(handler=_labels)

    search = sub.add_parser("search", help="search feature explanations and labels")
    search.add_argument("--dashboard", required=True, help="a built dashboard folder")
    search.add_argument("query", help="words to search for")
    search.add_argument("--limit", type=int, default=20, help="hits to show")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.set_defaults(handler=_search)
