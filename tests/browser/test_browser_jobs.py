"""End to end in Chromium: the job list and the sidebar tray update by themselves; Cancel and Retry work.

The first job is started from outside the server (as the CLI would); Retry makes the server (started
with ``python app.py``) start its own worker process.
"""
from __future__ import annotations

import os
import re

import pytest
from browser_util import OUTPUT, browser_page, require_browser, streamlit_server, wait_idle

from engine.jobs import LocalRunner

pytestmark = [pytest.mark.browser]


def test_job_list_and_tray_follow_a_job(tmp_path, monkeypatch):
    require_browser()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # the server inherits it
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    runner = LocalRunner(cache / "jobs", workers=1)
    job = runner.submit({"kind": "selftest", "params": {"steps": 3000, "seconds_per_step": 0.01,
                                                        "out": str(tmp_path / "count")}})
    try:
        with streamlit_server("tiny:llama") as url, browser_page() as page:
            page.goto(f"{url}/jobs-and-data")
            wait_idle(page)
            sidebar = page.locator("[data-testid='stSidebar']")
            sidebar.get_by_text("Jobs (1)").wait_for(timeout=30_000)
            main = page.locator("[data-testid='stMain']")
            step = main.get_by_text(re.compile(r"^step \d+/3000$")).first
            first = step.inner_text()
            page.wait_for_timeout(2500)  # the list refreshes itself every 2 s
            assert step.inner_text() != first
            page.locator(f".st-key-job_cancel_{job.id}").get_by_role("button", name="Cancel").click()
            main.get_by_text("cancelled", exact=True).first.wait_for(timeout=30_000)
            sidebar.get_by_text("Jobs (1)").wait_for(state="detached", timeout=30_000)
            runner.close()
            page.locator(f".st-key-job_retry_{job.id}").get_by_role("button", name="Retry").click()  # the server's own runner takes it up
            sidebar.get_by_text("Jobs (1)").wait_for(timeout=30_000)
            main.get_by_text(re.compile(r"^step \d+/3000$")).first.wait_for(timeout=60_000)
            assert page.locator("[data-testid='stException']").count() == 0
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "jobs-page.png"), full_page=True)
            page.locator(f".st-key-job_cancel_{job.id}").get_by_role("button", name="Cancel").click()
            main.get_by_text("cancelled", exact=True).first.wait_for(timeout=30_000)
        again = LocalRunner(cache / "jobs").get(job.id)
        assert again.attempts == 2 and again.runner_pid not in (None, os.getpid())  # run by the server
    finally:
        runner.close()


def test_a_capture_started_in_the_browser_survives_switching_pages(tmp_path, monkeypatch):
    """Start a capture on the Jobs page, go to the Lens page while it runs, come back: the job finished and the
    store is listed (before jobs, leaving the page stopped the capture)."""
    require_browser()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    with streamlit_server("tiny:llama") as url, browser_page() as page:
        page.goto(f"{url}/jobs-and-data")
        wait_idle(page)
        page.get_by_role("button", name="Start capture").click()
        main = page.locator("[data-testid='stMain']")
        main.get_by_text(re.compile(r"capture-[0-9a-f]{6}")).first.wait_for(timeout=30_000)
        page.goto(url)  # the Lens page, while the worker captures
        wait_idle(page)
        page.locator("[data-testid='stSidebar']").get_by_text("Lens").first.wait_for(timeout=30_000)
        page.goto(f"{url}/jobs-and-data")
        wait_idle(page)
        main.get_by_text("done", exact=True).first.wait_for(timeout=180_000)
        assert page.locator("[data-testid='stException']").count() == 0
    runner = LocalRunner(cache / "jobs")
    jobs = [job for job in runner.list() if job.kind == "capture"]
    runner.close()
    assert len(jobs) == 1 and jobs[0].state == "done"
    assert (cache / "activations").is_dir() and any((cache / "activations").rglob("manifest.json"))
