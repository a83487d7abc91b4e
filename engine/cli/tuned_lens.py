"""CLI: ``tuned-lens train`` and ``tuned-lens eval``.

``python -m engine tuned-lens train --model M --corpus C --out DIR`` trains (or resumes) a tuned
lens as a ``train_tuned_lens`` job (a progress bar; ``--detach``, ``--cancel-on-interrupt``) and writes it in the
tuned-lens checkpoint layout; ``tuned-lens eval`` prints, per layer,
KL to the final distribution and next-token cross-entropy for the logit lens and the tuned lens
over held-out text (``--json`` for machine-readable output).
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.cli.common import add_model_args, emit, load_from_args, progress_bar
from engine.cli.store import job_args, model_params, run_job


def _table(comparison) -> str:
    lines = [f"{comparison.n_tokens} held-out tokens; model cross-entropy {comparison.model_ce:.3f} nats",
             f"{'layer':>6}  {'KL logit':>9}  {'KL tuned':>9}  {'CE logit':>9}  {'CE tuned':>9}"]
    for i, name in enumerate(comparison.layers):
        lines.append(f"{name:>6}  {comparison.kl_logit[i]:9.3f}  {comparison.kl_tuned[i]:9.3f}  "
                     f"{comparison.ce_logit[i]:9.3f}  {comparison.ce_tuned[i]:9.3f}")
    return "\n".join(lines)


def _train(args) -> int:
    config = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "optimizer": args.optimizer, "lr": args.lr, "vocab_subset": args.vocab_subset or None,
              "heldout_fraction": args.heldout, "checkpoint_every": args.checkpoint_every, "seed": args.seed}
    spec = {"kind": "train_tuned_lens", "params": {**model_params(args), "corpus": args.corpus, "config": config,
                                                   "restart": args.restart, "out": args.out}}
    code, job = run_job(spec, args)
    if job is None:
        return code
    result = job.result
    out = Path(result["path"])
    payload = {"model": result.get("model"), "out": str(out), "steps": result["steps"],
               "resumed_from": result["resumed_from"], "seconds": result.get("seconds"),
               "tokens_seen": result.get("tokens_seen"), "final_train_kl": result.get("final_kl"),
               "vocab_subset": config["vocab_subset"], "subset_coverage": result.get("subset_coverage")}
    text = (f"trained {result['steps']} steps ({result.get('tokens_seen')} tokens, resumed from step "
            f"{result['resumed_from']}) in {result.get('seconds') or 0:.0f} s; lens saved in {out}")
    if config["vocab_subset"]:
        text += (f"\ntrained on the {config['vocab_subset']} most probable tokens (covering "
                 f"{(result.get('subset_coverage') or 0) * 100:.1f}% of the final distribution on a sample)")
    if args.eval_tokens:
        from engine.lens.compare import compare_lenses
        from engine.lens.tuned import TunedLens

        lm = load_from_args(args)
        with progress_bar("evaluating") as progress:
            comparison = compare_lenses(lm, TunedLens.load(out, lm), args.corpus, max_tokens=args.eval_tokens,
                                        heldout_fraction=args.heldout, progress=progress)
        payload["eval"] = comparison.to_json()
        text += "\n" + _table(comparison)
    emit(payload, args.json, text)
    return 0


def _eval(args) -> int:
    from engine.lens.compare import compare_lenses
    from engine.lens.tuned import TunedLens, default_lens_dir

    lm = load_from_args(args)
    folder = Path(args.lens) if args.lens else default_lens_dir(lm.name)
    lens = TunedLens.load(folder, lm)
    for warning in lens.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    with progress_bar("evaluating") as progress:
        comparison = compare_lenses(lm, lens, args.corpus, max_tokens=args.tokens, seq_len=args.seq_len,
                                    heldout_fraction=None if args.all_texts else args.heldout, progress=progress)
    emit({"model": lm.describe(), "lens": str(folder), **comparison.to_json()}, args.json, _table(comparison))
    return 0


def register(sub) -> None:
    group = sub.add_parser("tuned-lens", help="train and evaluate tuned lenses")
    commands = group.add_subparsers(dest="tuned_lens_command", required=True)

    p = commands.add_parser("train", help="train (or resume) a tuned lens on a corpus")
    add_model_args(p)
    p.add_argument("--corpus", default="builtin", help="builtin, a .txt/.jsonl file, a folder or hf:<name>")
    p.add_argument("--out", default=None, help="lens folder (default cache/tuned_lens/<model>)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8, help="text windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=None, help="adam: relative step (default 0.03); sgd: default 1.0")
    p.add_argument("--vocab-subset", type=int, default=0,
                   help="train on the N most probable tokens (faster on a CPU); 0 = full vocabulary")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of texts kept out of training")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--eval-tokens", type=int, default=0, help="afterwards compare with the logit lens on N tokens")
    p.add_argument("--json", action="store_true")
    job_args(p)
    p.set_defaults(handler=_train)

    p = commands.add_parser("eval", help="per-layer KL and cross-entropy: logit vs tuned lens on held-out text")
    add_model_args(p)
    p.add_argument("--lens", default=None, help="lens folder (default cache/tuned_lens/<model>)")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--tokens", type=int, default=512, help="number of positions to score")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heldout", type=float, default=0.1, help="the held-out fraction used in training")
    p.add_argument("--all-texts", action="store_true", help="score every text, not only the held-out ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_eval)
