"""Plain job functions for a job runner: ``fn(params, progress=None, should_stop=None) -> dict``.

``params`` is JSON-able and never holds a secret (an OpenAI-compatible backend names the environment variable
that holds its key):

- ``dashboard``: the dashboard folder;
- ``backend``: a backend spec (:meth:`engine.autointerp.backends.ChatBackend.spec`), e.g.
  ``{"kind": "local", "model": "smollm2-135m"}`` or
  ``{"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}``;
- ``features``: a list of feature ids, or absent / null for every live (explain) or explained (score) feature;
- optional ``out_dir``, ``examples`` (fields of :class:`ExampleConfig`), ``max_tokens``; for scoring also
  ``explainer``, ``n_activating``, ``n_non_activating``, ``methods``, ``seed``.

The tokenizer is the dashboard's model's (loaded once per process from its manifest).
"""
from __future__ import annotations

from collections.abc import Callable

from engine.autointerp.backends import backend_from_spec
from engine.autointerp.examples import AutointerpError, ExampleConfig, open_dashboard
from engine.autointerp.explain import ExplainConfig, explain_features
from engine.autointerp.labels import build_labels
from engine.autointerp.scoring import METHODS, ScoreConfig, score_features
from engine.core.progress import Progress


def _examples(params: dict) -> ExampleConfig:
    try:
        return ExampleConfig(**(params.get("examples") or {}))
    except TypeError as exc:
        raise AutointerpError(f"Unknown example setting in the job ({exc}).") from None


def _require(params: dict, *names: str) -> None:
    missing = [n for n in names if not params.get(n)]
    if missing:
        raise AutointerpError(f"The job lacks '{missing[0]}'.")


def explain_job(params: dict, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict:
    _require(params, "dashboard", "backend")
    config = ExplainConfig(examples=_examples(params), max_tokens=int(params.get("max_tokens", 60)))
    return explain_features(open_dashboard(params["dashboard"]), backend_from_spec(params["backend"]),
                            params.get("features"), out_dir=params.get("out_dir"), config=config,
                            progress=progress, should_stop=should_stop)


def score_job(params: dict, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    _require(params, "dashboard", "backend")
    config = ScoreConfig(examples=_examples(params), n_activating=int(params.get("n_activating", 10)),
                         n_non_activating=int(params.get("n_non_activating", 10)),
                         methods=tuple(params.get("methods") or METHODS), seed=int(params.get("seed", 0)),
                         max_tokens=int(params.get("max_tokens", 5)))
    return score_features(open_dashboard(params["dashboard"]), backend_from_spec(params["backend"]),
                          params.get("features"), explainer=params.get("explainer"), out_dir=params.get("out_dir"),
                          config=config, progress=progress, should_stop=should_stop)


def labels_job(params: dict, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    _require(params, "dashboard")
    path = build_labels(open_dashboard(params["dashboard"]), out_dir=params.get("out_dir"), progress=progress)
    return {"path": str(path)}


JOB_KINDS: dict[str, Callable[..., dict]] = {"explain": explain_job, "score": score_job, "labels": labels_job}
