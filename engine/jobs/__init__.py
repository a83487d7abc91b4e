"""Long jobs that survive the browser: declarative specs, state on disk, worker processes.

- :mod:`engine.jobs.spec`    a job = kind + JSON params, validated at submit, id from its content
- :mod:`engine.jobs.state`   ``cache/jobs/<id>/state.json`` + ``log.txt``, cancel flags, output-folder locks
- :mod:`engine.jobs.kinds`   the registered kinds (capture, train_sae, train_tuned_lens, dashboards, sae_demo, selftest)
- :mod:`engine.jobs.worker`  the worker process: runs a kind, throttled progress, records the outcome
- :mod:`engine.jobs.runner`  the :class:`Runner` interface and :class:`LocalRunner` (multiprocessing, spawn)

Nothing here imports Streamlit, and importing this package does not import torch.
"""
from engine.jobs.runner import JobNotFound, LocalRunner, Runner, make_runner, wait_idle
from engine.jobs.spec import JobSpec, JobSpecError, validate
from engine.jobs.state import JobState, output_lock

__all__ = ["JobNotFound", "JobSpec", "JobSpecError", "JobState", "LocalRunner", "Runner", "make_runner",
           "output_lock", "validate", "wait_idle"]
