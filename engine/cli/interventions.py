"""CLI: ``patch-sweep``, ``intervene`` and ``tongue-thought``."""
from __future__ import annotations

import json
from pathlib import Path

from engine.cli.common import add_model_args, emit, load_from_args, progress_bar
from engine.core.errors import UserError


def _patch_sweep(args) -> int:
    from engine.interventions.sweeps import patch_sweep

    lm = load_from_args(args)
    with progress_bar("patching") as progress:
        result = patch_sweep(lm, args.source, args.target, args.token, kind=args.kind.replace("-", "_"),
                             metric=args.metric, token_b=args.token_b, site=args.site,
                             source_position=args.source_position, target_position=args.target_position,
                             batch_size=args.batch_size, progress=progress)
    lines = [f"{result.metric} of {args.token!r}: target (unpatched) {result.target_value:.4g}, "
             f"source {result.source_value:.4g}",
             "rows: " + ("target layer, columns: source layer" if result.kind == "layer_layer"
                         else "layer, columns: position")]
    for r, label in enumerate(result.row_labels):
        lines.append(f"{label:>6}: " + " ".join(f"{v:8.4f}" for v in result.values[r]))
    emit({"model": lm.describe(), **result.to_json()}, args.json, "\n".join(lines))
    return 0


def _intervene(args) -> int:
    from engine.interventions.generation import compare_next_token, generate_compare
    from engine.interventions.specs import load_specs

    path = Path(args.spec)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"The interventions file '{path}' could not be read as JSON ({exc}).") from exc
    specs = load_specs(raw)
    lm = load_from_args(args)
    payload = {"model": lm.describe(), "interventions": [s.to_json() for s in specs],
               "next_token": compare_next_token(lm, args.prompt, specs, top_k=args.top_k)}
    lines = [f"KL(clean || intervened) at the last position: {payload['next_token']['kl']:.4g}"]
    for name in ("clean", "intervened"):
        lines.append(f"{name:>10}: " + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in payload["next_token"][name]))
    if args.generate:
        gen = generate_compare(lm, args.prompt, specs, max_new_tokens=args.generate, sample=args.sample,
                               seed=args.seed, temperature=args.temperature)
        payload["generation"] = gen.to_json()
        lines += [f"clean:      {gen.clean_text!r}", f"intervened: {gen.intervened_text!r}",
                  f"first divergence at generated token {gen.first_divergence}"]
    emit(payload, args.json, "\n".join(lines))
    return 0


def _tongue(args) -> int:
    from engine.interventions.demos import tongue_thought

    lm = load_from_args(args)
    result = tongue_thought(lm, args.concept_a, args.concept_b, args.source_in, args.source_out, args.target_in,
                            args.target_out, n_shots=args.shots)
    labels = list(result.curves)
    lines = ["layer  " + "  ".join(f"{label:>9}" for label in labels)]
    for i, layer in enumerate(result.layers):
        lines.append(f"{layer:>5}  " + "  ".join(f"{result.curves[label][i]:9.4f}" for label in labels))
    for name, values in result.baselines.items():
        lines.append(f"{name:>6} " + "  ".join(f"{values[label]:9.4f}" for label in labels))
    emit({"model": lm.describe(), **result.to_json()}, args.json, "\n".join(lines))
    return 0


def register(sub) -> None:
    p = sub.add_parser("patch-sweep", help="activation patching at every (layer, position) or (layer -> layer) pair")
    add_model_args(p)
    p.add_argument("--source", required=True, help="prompt the activations are taken from")
    p.add_argument("--target", required=True, help="prompt they are written into")
    p.add_argument("--token", required=True, help="token whose probability is measured, e.g. ' Paris'")
    p.add_argument("--token-b", default=None, help="second token for --metric logit_diff")
    p.add_argument("--metric", choices=["prob", "logit_diff"], default="prob")
    p.add_argument("--kind", choices=["layer-position", "layer-layer"], default="layer-position")
    p.add_argument("--site", default="resid_post")
    p.add_argument("--source-position", type=int, default=-1, help="for layer-layer sweeps")
    p.add_argument("--target-position", type=int, default=-1, help="for layer-layer sweeps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_patch_sweep)

    p = sub.add_parser("intervene", help="apply interventions from a JSON file: next token and generation, "
                                         "with and without")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--spec", required=True, help="JSON file: a list of interventions (as saved by the page)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--generate", type=int, default=0, help="also generate this many tokens side by side")
    p.add_argument("--sample", action="store_true", help="sample (fixed seed) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_intervene)

    p = sub.add_parser("tongue-thought", help="patch a translation prompt's last-token latent into another, "
                                              "per layer: does the output follow the source's language or concept?")
    add_model_args(p)
    p.add_argument("--concept-a", default="dog")
    p.add_argument("--concept-b", default="water")
    p.add_argument("--source-in", default="de")
    p.add_argument("--source-out", default="fr")
    p.add_argument("--target-in", default="es")
    p.add_argument("--target-out", default="zh")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_tongue)
