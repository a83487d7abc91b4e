"""The demo SAE: capture the built-in corpus on the default model and train a small TopK SAE (minutes on a CPU)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.core.fileio import atomic_write_json
from engine.core.progress import Progress
from engine.core.progress import report as report_progress
from engine.sae.training import SAETrainConfig, train_sae


@dataclass
class DemoSettings:
    """A small SAE whose first run (capture, train, evaluate, dashboards) fits well within 3 minutes on 2 CPU cores.

    Sized with ``benchmarks/first_run.py`` on gemma-3-270m on a quiet 2-core machine: 76 s in all (capture 27 s,
    train 14 s, evaluation 20 s, dashboards 9 s), report card EV 0.945, CE recovered 0.972; the capture (a forward
    pass to the middle layer) is the largest part and training makes five passes over the store; the report card's
    CE loss recovered needs full forward passes through a 262k-token unembedding, hence few evaluation tokens.
    """

    model: str = "gemma-3-270m"
    corpus: str = "builtin"
    layer: int | None = None  # default: the middle layer
    site: str = "resid_post"
    capture_tokens: int = 40_000
    train_tokens: int = 200_000
    width: int = 2048
    k: int = 32
    batch_size: int = 512
    lr: float = 2e-3
    eval_tokens: int = 1024
    context_length: int = 128
    name: str | None = None


def demo_sae_dir(settings: DemoSettings, layer: int) -> Path:
    from engine.core.models import cache_root

    name = settings.name or f"demo-{settings.model}-L{layer}-{settings.site}-topk{settings.k}-w{settings.width}"
    return cache_root() / "saes" / name


def train_demo_sae(settings: DemoSettings | None = None, *, lm=None, progress: Progress | None = None,
                   on_metrics: Callable[[dict], None] | None = None, evaluate: bool = True) -> dict:
    """Capture the built-in corpus on the default model, train a TopK SAE on a middle layer, evaluate it.

    Returns ``{"path", "store", "train": {...}, "report": {...} | None}``; the SAE lands in
    ``cache_root()/"saes"/<name>``. Every stage resumes: the store and the training checkpoint are reused.
    """
    from engine.core.models import load_model
    from engine.data.corpora import iter_texts
    from engine.data.store_writer import build_store, default_store_dir
    from engine.sae.evaluation import evaluate_with_model, held_out_texts, report_to_json

    settings = settings or DemoSettings()

    def say(fraction: float, message: str) -> None:
        report_progress(progress, fraction, message)

    say(0.0, f"loading {settings.model}")
    lm = lm or load_model(settings.model)
    layer = settings.layer if settings.layer is not None else lm.n_layers // 2
    store_dir = default_store_dir(lm, settings.corpus, sites=(settings.site,), layers=[layer],
                                  context_length=settings.context_length)
    store = build_store(lm, iter_texts(settings.corpus), store_dir, layers=[layer], sites=(settings.site,),
                        max_tokens=settings.capture_tokens, context_length=settings.context_length,
                        corpus_spec=settings.corpus,
                        progress=lambda f, m: say(0.3 * f, f"capturing activations: {m}"))
    out = demo_sae_dir(settings, layer)
    config = SAETrainConfig(architecture="topk", d_sae=settings.width, k=settings.k, batch_size=settings.batch_size,
                         total_tokens=settings.train_tokens, lr=settings.lr, warmup_steps=20, log_every=5,
                         checkpoint_every=50)
    result = train_sae(store, out, site=settings.site, layer=layer, config=config, model_name=settings.model,
                       progress=lambda f, m: say(0.3 + 0.6 * f, f"training: {m}"), on_metrics=on_metrics)
    report = None
    if evaluate:
        say(0.9, "evaluating: the report card on held-out text")
        texts = held_out_texts(store, settings.corpus)
        report = evaluate_with_model(result.sae, lm, texts, site=settings.site, layer=layer,
                                     max_tokens=settings.eval_tokens, context_length=settings.context_length,
                                     progress=lambda f, m: say(0.9 + 0.1 * f, f"evaluating: {m}"))
        report = report_to_json(report)
        atomic_write_json(out / "report.json", report)
    say(1.0, f"demo SAE saved to {out}")
    return {"path": str(out), "store": str(store.path),
            "train": {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 1),
                      "tokens_per_second": round(result.tokens_per_second), "final": result.history[-1]},
            "report": report}
