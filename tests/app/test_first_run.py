"""AppTest: on a first run with no SAE, SAE features queues the demo SAE in the background and shows its progress;
``LATENT_EXPLORER_NO_DEMO=1`` keeps the old empty state. Tiny random Llama, tiny demo settings, a fresh cache."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.jobs import LocalRunner, wait_idle

APP = "../../app.py"
TINY_DEMO = {"capture_tokens": 1500, "train_tokens": 2048, "width": 64, "k": 4, "batch_size": 256,
             "eval_tokens": 128, "context_length": 32, "corpus": "builtin-multilingual"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    import torch

    import components.first_run as first_run

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    monkeypatch.delenv("LATENT_EXPLORER_NO_DEMO", raising=False)
    monkeypatch.delenv("LATENT_EXPLORER_DEMO", raising=False)
    monkeypatch.setattr(first_run, "DEMO_SETTINGS", TINY_DEMO)
    monkeypatch.setattr(first_run, "DEMO_DASHBOARD_CONFIG", {"top_k": 4, "batch_size": 512})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    wait_idle(tmp_path / "cache" / "jobs", timeout=180)  # no worker outlives its test folder
    torch.set_num_threads(before)


def _features_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/features.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _progress_texts(at) -> list[str]:
    return [element.proto.text for element in at.get("progress")]


def _demo_jobs(tmp_path) -> list:
    return [job for job in LocalRunner(tmp_path / "cache" / "jobs").list() if job.kind == "sae_demo"]


def test_first_run_queues_the_demo_shows_its_progress_and_opens_it(tmp_path):
    at = _features_page()
    jobs = _demo_jobs(tmp_path)
    assert len(jobs) == 1 and jobs[0].spec["params"]["model"] == "tiny:llama"
    assert jobs[0].spec["params"]["settings"] == TINY_DEMO and jobs[0].spec["params"]["dashboards"]
    texts = _progress_texts(at)
    if jobs[0].active or texts:  # the tiny demo may already be done by now; then the page shows it (below)
        assert texts and "being built:" in texts[0] and "%" in texts[0], texts
        assert not any("No feature dashboards" in i.value for i in at.info)

    at.run()  # another script run (another session would be the same): the same job, never a second one
    assert [job.id for job in _demo_jobs(tmp_path)] == [jobs[0].id]

    runner = LocalRunner(tmp_path / "cache" / "jobs")
    done = runner.wait(jobs[0].id, timeout=180)
    assert done.state == "done", (done.error, runner.logs(done.id))
    at.run()  # what the fragment's rerun does once the job is done
    assert not at.exception and not _progress_texts(at)
    assert at.selectbox(key="features_sae").value  # the demo's dashboards are browsable
    assert len(at.tabs) == 4
    assert [job.id for job in _demo_jobs(tmp_path)] == [jobs[0].id]


def test_no_demo_env_keeps_the_empty_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_NO_DEMO", "1")
    at = _features_page()
    assert not _demo_jobs(tmp_path) and not _progress_texts(at)
    assert any("No feature dashboards" in i.value for i in at.info)


def test_demo_mode_does_not_queue_it(tmp_path):
    """Unit check of the hook: demo mode (a public server) does not start a long job on its own."""
    from unittest import mock

    import components.first_run as first_run

    lm = mock.Mock(name="lm", source=mock.Mock(kind="embedded"))
    lm.name = "gemma-3-270m"
    with mock.patch("engine.serving.current_policy", return_value=mock.Mock(demo=True)):
        assert first_run.ensure_demo(lm) is None
    assert not _demo_jobs(tmp_path)


def test_the_entry_script_queues_the_demo_from_any_page(tmp_path):
    """app.py queues the demo after whichever page runs (here the lens, the default page), for the same cached
    model the page loaded (the sidebar's whole model key, device map included)."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value.startswith("Lens")
    jobs = _demo_jobs(tmp_path)
    assert len(jobs) == 1 and jobs[0].spec["params"]["model"] == "tiny:llama", jobs
    LocalRunner(tmp_path / "cache" / "jobs").cancel(jobs[0].id)  # its build is tested above
