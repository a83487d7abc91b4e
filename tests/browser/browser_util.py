"""Start the app (`python app.py`, as `make run` does) on a free localhost port and drive it with Debian's Chromium."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
OUTPUT = ROOT / "test-output"


def require_browser() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (REQUIRE_BROWSER is set) but /usr/bin/chromium is missing")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(model: str, timeout: float = 90.0, streamlit_run: bool = False):
    """Serve app.py as `make run` does (`python app.py`), or with plain `streamlit run app.py`."""
    port = _free_port()
    env = dict(os.environ, LATENT_EXPLORER_MODEL=model, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = (OUTPUT / f"streamlit-{port}.log")
    OUTPUT.mkdir(exist_ok=True)
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, *(["-m", "streamlit", "run"] if streamlit_run else []), str(ROOT / "app.py"),
             "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            else:
                raise RuntimeError(f"streamlit did not start; see {log}")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def browser_page(width: int = 1500, height: int = 2200):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script has finished running (and has started at least once)."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_timeout(500)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_timeout(300)
