"""End to end in Chromium against `python app.py` started as `make run` does: a bad corpus path gets a clear message
within seconds, the server survives it, and it listens on 127.0.0.1 only."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser_util import OUTPUT, ROOT, browser_page, healthy, require_browser, wait_idle

pytestmark = [pytest.mark.browser]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_run_args(port: int) -> list[str]:
    """The options of the Makefile's `run` target (SERVE plus --server.address 127.0.0.1)."""
    return ["--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]


@contextlib.contextmanager
def served(model: str = "tiny:llama", env: dict | None = None, timeout: float = 120.0):
    """`python app.py` as `make run` starts it; yields (url, process)."""
    port = _free_port()
    full_env = dict(os.environ, LATENT_EXPLORER_MODEL=model, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    OUTPUT.mkdir(exist_ok=True)
    log = OUTPUT / f"streamlit-{port}.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *make_run_args(port)], cwd=ROOT, env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while not healthy(f"http://127.0.0.1:{port}"):
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"streamlit did not start; see {log}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def listening_addresses(pid: int) -> set[str]:
    """The local addresses of the TCP sockets the process listens on."""
    import psutil

    return {conn.laddr.ip for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN}


def test_make_run_binds_localhost_only():
    makefile = (ROOT / "Makefile").read_text()
    run = re.search(r"^run:.*\n\t(.*)$", makefile, re.M).group(1)
    assert "$(SERVE)" in run and "--server.address 127.0.0.1" in run


def test_bad_corpus_message_and_server_survives(tmp_path):
    require_browser()
    with served(env={"LATENT_EXPLORER_CACHE": str(tmp_path / "cache")}) as (url, proc), browser_page() as page:
        assert listening_addresses(proc.pid) == {"127.0.0.1"}, listening_addresses(proc.pid)
        page.goto(f"{url}/jobs-and-data")
        wait_idle(page)
        main = page.locator("[data-testid='stMain']")
        main.locator("[data-testid='stSelectbox']").filter(has_text=re.compile(r"^Corpus$")).first.click()
        page.get_by_role("option", name=re.compile("a .txt file, a folder")).click()
        wait_idle(page)
        box = main.get_by_role("textbox", name="Path on this machine")
        assert "data/" in (box.get_attribute("placeholder") or "")
        box.fill("/dev/zero")
        box.press("Enter")
        wait_idle(page)
        started = time.monotonic()
        main.get_by_role("button", name="Start capture").click()
        alert = main.locator("[data-testid='stAlertContentError']").filter(has_text="/dev/zero")
        alert.first.wait_for(timeout=10_000)
        seconds = time.monotonic() - started
        text = alert.first.inner_text()
        print(f"\n/dev/zero: message after {seconds:.2f} s: {text}")
        assert "outside the allowed data folders" in text and seconds < 5
        wait_idle(page)
        assert page.locator("[data-testid='stException']").count() == 0
        assert main.get_by_text(re.compile(r"Job `capture-")).count() == 0
        page.screenshot(path=str(OUTPUT / "serving-bad-corpus.png"), full_page=True)
        assert proc.poll() is None and healthy(url)
        page.goto(f"{url}/lens-view")  # a second page load works
        wait_idle(page)
        page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0
    assert not Path(tmp_path / "cache" / "jobs").exists() or not any((tmp_path / "cache" / "jobs").rglob("*.json"))
