"""CLI: ``lens``, ``latent-language`` and ``info``."""
from __future__ import annotations

from engine.cli.common import add_model_args, emit, load_from_args, progress_bar


def _lens(args) -> int:
    from engine.lens.logit import run_lens

    lm = load_from_args(args)
    result = run_lens(lm, args.prompt, top_k=args.top_k, track=args.track, sublayers=args.sublayers)
    payload = {"model": lm.describe(), **result.to_json()}
    lines = [f"self-check max |lens(last) - logits| = {result.self_check_max_abs_diff:.3g}"]
    for r, name in enumerate(result.row_names):
        cells = " | ".join(f"{result.top_tokens[r][j][0]!r} {result.top_probs[r, j, 0]:.2f}"
                           for j in range(len(result.positions)))
        lines.append(f"{name:>8}: {cells}")
    emit(payload, args.json, "\n".join(lines))
    return 0


def _latent(args) -> int:
    from engine.lens.latent_language import run_latent_language

    lm = load_from_args(args)
    with progress_bar(f"{args.source}->{args.target}") as progress:
        result = run_latent_language(lm, args.source, args.target, n_shots=args.shots, batch_size=args.batch_size,
                                     progress=progress)
    summary = result.summary()
    rep = summary["items"]
    lines = [f"{rep['kept']} of {rep['total']} items kept ({rep['answer_not_single_token']} multi-token answers, "
             f"{rep['english_overlaps_answer']} same token as English)",
             f"{'layer':>6}  P({args.target})  P(en)"]
    for i, layer in enumerate(summary["layers"]):
        lines.append(f"{layer:>6}  {summary['target_language']['mean'][i]:.3f}   {summary['english']['mean'][i]:.3f}")
    emit({"model": lm.describe(), **summary}, args.json, "\n".join(lines))
    return 0


def _info(args) -> int:
    lm = load_from_args(args)
    emit(lm.describe(), args.json)
    return 0


def register(sub) -> None:
    p = sub.add_parser("lens", help="logit lens at every layer and position of one prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--track", nargs="*", default=[], help="tokens whose probability and rank to follow, e.g. ' Paris'")
    p.add_argument("--sublayers", action="store_true", help="also read out after each attention block")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lens)

    p = sub.add_parser("latent-language", help="P(answer in target language) vs P(English) per layer")
    add_model_args(p)
    p.add_argument("--source", default="fr")
    p.add_argument("--target", default="zh")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_latent)

    p = sub.add_parser("info", help="load a model, run the self-check and describe it")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_info)
