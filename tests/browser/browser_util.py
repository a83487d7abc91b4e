"""Start the app (`python app.py`, as `make run` does) on a free localhost port and drive it with Debian's Chromium."""
from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Server:
    url: str
    pid: int
    log: Path


@contextlib.contextmanager
def app_server(model: str, timeout: float = 90.0, streamlit_run: bool = False):
    """Serve app.py as `make run` does (`python app.py`), or with plain `streamlit run app.py`; yields a
    :class:`Server` (its URL, process id and log file)."""
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
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + timeout
            while time.time() < deadline:
                if healthy(url):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"streamlit did not start; see {log}")
            yield Server(url, proc.pid, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def streamlit_server(model: str, timeout: float = 90.0, streamlit_run: bool = False):
    """Serve app.py as `make run` does (`python app.py`), or with plain `streamlit run app.py`; yields its URL."""
    with app_server(model, timeout, streamlit_run) as server:
        yield server.url


def healthy(url: str) -> bool:
    """The server answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its children (job workers, if any)."""
    import psutil

    total = 0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for each in procs:
        try:
            total += each.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


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


IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"  # the page's script is not running


def wait_idle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script has finished running (and has started at least once)."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_timeout(500)
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_timeout(300)


async def settle(page, ready: str, timeout_ms: int = 240_000) -> None:
    """Async Playwright: wait until ``ready`` (a selector) is visible and the script is not running, and still
    so half a second later (a rerun that starts right after the first look, e.g. after a query-param write, is
    waited for too)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        left = max(1, int((deadline - time.monotonic()) * 1000))
        await page.wait_for_selector(ready, state="visible", timeout=left)
        await page.wait_for_selector(IDLE, timeout=left)
        await page.wait_for_timeout(500)
        if await page.locator(IDLE).count() and await page.locator(ready).count():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page did not settle on {ready!r} within {timeout_ms} ms")


def feature_dashboard(cache: Path) -> tuple[Path, int]:
    """The page tests' tiny feature build under ``cache`` (tests/app/test_features_page.py) and its most frequent
    live feature: ``(dashboard folder, feature id)``."""
    from engine.features.read import Dashboard
    from tests.app.test_features_page import build_feature_fixture

    _, out = build_feature_fixture(cache)
    live = Dashboard.open(out).query("SELECT feature FROM features WHERE NOT dead ORDER BY count DESC LIMIT 1")
    return out, int(live.iloc[0, 0])
