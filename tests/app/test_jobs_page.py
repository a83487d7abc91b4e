"""AppTest: the Jobs page submits jobs and returns at once; the job list and the sidebar tray show them.

The capture runs in a worker process on the tiny random Llama; the script run that submits it must
end long before the capture does.
"""
from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from engine.jobs import LocalRunner, wait_idle

APP = "../../app.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    wait_idle(tmp_path / "cache" / "jobs", timeout=60)  # no worker outlives its test folder
    torch.set_num_threads(before)


def _jobs_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _markdown(at) -> str:
    return " ".join(m.value for m in at.markdown)


def test_starting_a_capture_returns_at_once_and_the_job_appears(tmp_path):
    corpus = tmp_path / "cache" / "texts"  # under the data roots (the test's cache), as the UI requires
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text(" ".join(f"word{i} in a long text" for i in range(8000)), encoding="utf-8")
    at = _jobs_page()
    assert any("No jobs yet" in c.value for c in at.caption)
    at.selectbox(key="capture_corpus_kind").set_value("path").run()
    at.text_input(key="capture_corpus_path").set_value(str(corpus)).run()
    at.number_input(key="capture_tokens").set_value(120_000).run()
    at.number_input(key="capture_context").set_value(64).run()

    started = time.monotonic()
    at.button(key="capture_start").click().run()
    script_seconds = time.monotonic() - started
    assert not at.exception and not at.error, [e.value for e in at.error]
    queued = [i.value for i in at.info if "Job `capture-" in i.value]
    assert queued and "the store appears in the table below" in queued[0]
    job_id = queued[0].split("`")[1]

    at.run()  # the next run lists the job (the browser refreshes the list every 2 s)
    assert job_id in _markdown(at)

    jobs = wait_idle(tmp_path / "cache" / "jobs", timeout=90)
    job = next(j for j in jobs if j.id == job_id)
    assert job.state == "done", job.error
    job_seconds = job.ended - job.created
    print(f"\nscript run {script_seconds:.2f} s; job (submit to done) {job_seconds:.1f} s, "
          f"running {job.ended - job.started:.1f} s")
    assert script_seconds < job_seconds / 3

    at.run()
    assert any("Stored 120,000 tokens" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert table["tokens"].tolist() == [120_000] and table["state"].tolist() == ["complete"]


def test_cancel_retry_and_the_sidebar_tray(tmp_path):
    runner = LocalRunner(tmp_path / "cache" / "jobs", workers=1)  # e.g. a job started from the CLI
    job = runner.submit({"kind": "selftest", "params": {"steps": 400, "seconds_per_step": 0.02,
                                                        "out": str(tmp_path / "count")}})
    while runner.get(job.id).progress < 0.02:
        time.sleep(0.05)
    at = _jobs_page()
    assert job.id in _markdown(at)
    tray = at.sidebar.markdown
    assert any("Jobs (1)" in m.value for m in tray)
    assert any(getattr(p.proto, "text", "").startswith("selftest:") for p in at.sidebar.get("progress"))

    at.button(key=f"job_cancel_{job.id}").click().run()
    assert not at.exception
    assert runner.wait(job.id, timeout=30).state == "cancelled"
    runner.close()
    at.run()
    assert not any("Jobs (" in m.value for m in at.sidebar.markdown)  # nothing active: no tray
    at.button(key=f"job_retry_{job.id}").click().run()
    assert not at.exception
    done = wait_idle(tmp_path / "cache" / "jobs", timeout=60)[0]
    assert done.id == job.id and done.state == "done" and done.attempts == 2 and done.result["resumed_from"] > 0
