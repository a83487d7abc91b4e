"""Eight browser sessions at once on one server and one model: lens, SAE features and interventions links opened
together finish without an error, show exactly what one session alone shows, and the server's memory stays within
what it holds after that one session (the model loaded) plus :data:`MEMORY_BOUND`.

Two fresh servers with the same model and cache: the first serves ONE session at a time, opening each view in turn
(the reference texts, the single-session wall time and the baseline memory); the second serves the eight sessions,
all started at once in one Chromium (eight browser contexts = eight Streamlit sessions), so they race for the model
load and for every computation. A second server is needed because ``st.cache_data`` is shared by sessions: after
the reference session the same links on the same server would only read its cache. Sessions that open the same
view wait for one computation (Streamlit's per-key compute lock); the other views take turns on the shared model
(its lock), and none may see another's hooks (a steering hook leaking into a lens pass would change the lens).

This test found the server starving itself: Streamlit's ``runner.postScriptGC`` ran a full ``gc.collect()`` after
every script run, including the job tray's 2-second fragment reruns of every open session; with torch and a model
in memory each takes 0.3-1 s holding the GIL, and with eight sessions the pages never finished (.streamlit/config.toml
turns it off).
"""
from __future__ import annotations

import asyncio
import difflib
import json
import threading
import time
from urllib.parse import urlencode

import pytest
from browser_util import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OUTPUT,
    app_server,
    healthy,
    require_browser,
    settle,
    tree_rss,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 2**20
# What eight sessions may add to the server's memory on top of the model and one session. Per session Streamlit keeps
# its state and the last run's messages (Plotly figures of some hundred kB here); the computations take turns under
# the model's lock, so their temporary tensors do not add up; the allocator may keep a few arenas per script thread.
# Measured: +6 to +10 MiB with this tiny model. (The same two phases on Gemma 3 270M, lens and interventions only:
# 1,984 MiB after one session, peak 2,201 MiB with eight, so +217 MiB, mostly float32 logits over its 262k-token
# vocabulary; a second copy of that model would add over 1 GiB.)
MEMORY_BOUND = 200 * MiB
SESSIONS_TIMEOUT_S = 240  # every session's whole wait, on a loaded 2-core machine
ERRORS = "[data-testid='stException'], [data-testid='stAlertContentError']"
TEXTS = "els => els.map(e => e.textContent)"
READY = {"lens": ".js-plotly-plot .heatmaplayer", "features": ".le-context",
         "interventions": "[data-testid='stCaptionContainer']:has-text('KL(clean')"}
TABLES = {"lens": 1, "features": 1, "interventions": 2}  # tables each view shows (top-k; logit effects; clean, hit)
# The cells of the visible tables, once there are ``n``, each has drawn some (Glide's accessible copy of its canvas
# holds the text; tables mount lazily) and every visible chart has drawn its SVG; read in the same JavaScript turn
# as the check, as Glide redraws that copy at times.
CELLS = ("n => { const shown = s => [...document.querySelectorAll(s)].filter(e => e.offsetParent !== null);"
         " if (shown(\"[data-testid='stPlotlyChart']\").some(c => !c.querySelector('.main-svg'))) return null;"
         " const t = shown(\"[data-testid='stDataFrame']\")"
         ".map(t => [...t.querySelectorAll(\"[role='gridcell']\")].map(c => c.textContent));"
         " return t.length >= n && t.every(c => c.length) ? t : null; }")


def _views(features: list[int]) -> dict[str, tuple[str, str]]:
    """view name -> (page kind, path with query): every one differs from the page defaults, so every one computes."""
    return {
        "lens-rome": ("lens", "/?" + urlencode({"lens_prompt": "Rome is the capital of", "lens_topk": "5",
                                                "lens_track": " Italy"})),
        "lens-water": ("lens", "/?" + urlencode({"lens_prompt": "Water boils at one hundred degrees",
                                                 "lens_metric": "entropy", "lens_sublayers": "true"})),
        "feature-a": ("features", f"/sae-features?sae=tiny-sae&feature={features[0]}"),
        "feature-b": ("features", f"/sae-features?sae=tiny-sae&feature={features[1]}"),
        "steer-dog": ("interventions", "/intervene?" + urlencode({"iv_prompt": "The dog sat on the", "gen_n": "8"})),
        "steer-sky": ("interventions", "/intervene?" + urlencode({"iv_prompt": "The sky above the city was"})),
    }


# sessions 0, 3, 6 on the lens, 1, 4, 7 on a feature, 2, 5 on interventions; two pairs open the very same view
SESSIONS = ["lens-rome", "feature-a", "steer-dog", "lens-rome", "feature-a", "steer-sky", "lens-water", "feature-b"]


async def _open(page, url: str, kind: str, path: str) -> dict:
    """Open one view and read what it shows (the main area's text, the tables' cells, any error) once the browser
    has finished drawing it: two reads half a second apart agree (charts and tables render after the script ends)."""
    start = time.monotonic()
    await page.goto(url + path)
    await settle(page, READY[kind], timeout_ms=SESSIONS_TIMEOUT_S * 1000)
    seconds, shown = None, None
    while True:
        left = max(1_000, int((SESSIONS_TIMEOUT_S - (time.monotonic() - start)) * 1000))
        cells = await (await page.wait_for_function(CELLS, arg=TABLES[kind], timeout=left)).json_value()
        now = {"cells": cells, "text": await page.locator("[data-testid='stMain']").inner_text()}
        seconds = seconds or time.monotonic() - start
        if now == shown:
            break
        if time.monotonic() - start > SESSIONS_TIMEOUT_S:
            raise TimeoutError(f"{path}: what the page shows kept changing")
        shown = now
        await page.wait_for_timeout(500)
    return {"seconds": seconds, **shown, "errors": await page.locator(ERRORS).evaluate_all(TEXTS),
            "not found": await page.get_by_text("Page not found").count()}


class _PeakRSS:
    """Samples the server's resident memory (with its child processes) every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _browser_cpu_seconds() -> float:
    """CPU time of Chromium's processes (this test's descendants), to tell the browser's share of the wall time."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name().lower():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


async def _one_session(browser, views: dict, report: dict) -> dict:
    """A fresh server; one browser context opens each view in turn. Returns what each view shows."""
    with app_server("tiny:llama") as server:
        context = await browser.new_context(viewport={"width": 1500, "height": 2200})
        page, shown, start, cpu = await context.new_page(), {}, time.monotonic(), _cpu_seconds(server.pid)
        for name, (kind, path) in views.items():
            shown[name] = await _open(page, server.url, kind, path)
        report["single_s"] = time.monotonic() - start
        report["single_server_cpu_s"] = _cpu_seconds(server.pid) - cpu
        await context.close()
        report["baseline_rss"] = tree_rss(server.pid)
    return shown


async def _eight_sessions(browser, views: dict, report: dict) -> list:
    """Another fresh server; eight browser contexts open their views at once. Returns what each shows (or why not)."""
    with app_server("tiny:llama") as server:
        report["idle_rss"] = tree_rss(server.pid)
        contexts = [await browser.new_context(viewport={"width": 1500, "height": 2200}) for _ in SESSIONS]
        pages = [await context.new_page() for context in contexts]
        try:
            with _PeakRSS(server.pid) as rss:
                start, cpu, browser_cpu = time.monotonic(), _cpu_seconds(server.pid), _browser_cpu_seconds()
                shown = await asyncio.wait_for(asyncio.gather(
                    *(_open(page, server.url, *views[name]) for page, name in zip(pages, SESSIONS)),
                    return_exceptions=True), timeout=SESSIONS_TIMEOUT_S + 60)
                report["eight_s"] = time.monotonic() - start
                report["eight_server_cpu_s"] = _cpu_seconds(server.pid) - cpu
                report["eight_browser_cpu_s"] = _browser_cpu_seconds() - browser_cpu
            report["peak_rss"] = rss.peak
            before = _cpu_seconds(server.pid)  # what eight open, idle pages cost the server
            await asyncio.sleep(4)
            report["idle_cpu_percent"] = 100 * (_cpu_seconds(server.pid) - before) / 4
            for i, page in enumerate(pages):
                await page.screenshot(path=str(OUTPUT / f"sessions-{i}-{SESSIONS[i]}.png"), full_page=True)
        finally:
            for context in contexts:
                await context.close()
        report["after_rss"] = tree_rss(server.pid)
        report["alive"] = healthy(server.url)
        report["log"] = server.log.read_text()
    return shown


async def _run(views: dict) -> tuple[dict, dict, list]:
    from playwright.async_api import async_playwright

    report: dict = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            reference = await _one_session(browser, views, report)
            shown = await _eight_sessions(browser, views, report)
        finally:
            await browser.close()
    return report, reference, shown


def _summary(report: dict, reference: dict, shown: list) -> dict:
    numbers = {key: value for key, value in report.items() if key != "log"}
    numbers["single_view_s"] = {name: round(view["seconds"], 2) for name, view in reference.items()}
    numbers["session_s"] = [round(s["seconds"], 2) if isinstance(s, dict) else repr(s) for s in shown]
    return {key: round(value / MiB) if key.endswith("_rss") else value for key, value in numbers.items()}


def _diff(alone: str, together: str) -> str:
    return "\n".join(difflib.unified_diff(alone.splitlines(), together.splitlines(), "alone", "together", lineterm=""))


def test_eight_sessions_at_once_match_one_session_alone(tmp_path, monkeypatch):
    require_browser()
    from engine.features.read import Dashboard
    from tests.app.test_features_page import build_feature_fixture

    cache = tmp_path / "cache"
    _, out = build_feature_fixture(cache)
    live = Dashboard.open(out).query("SELECT feature FROM features WHERE NOT dead ORDER BY count DESC LIMIT 2")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))  # both servers inherit it
    monkeypatch.setenv("LATENT_EXPLORER_NO_DEMO", "1")
    OUTPUT.mkdir(exist_ok=True)
    views = _views([int(f) for f in live["feature"]])
    report, reference, shown = asyncio.run(_run(views))

    summary = _summary(report, reference, shown)
    (OUTPUT / "sessions-report.json").write_text(json.dumps(summary, indent=1))
    print(f"\none session, {len(views)} views in turn: {report['single_s']:.1f} s {summary['single_view_s']} "
          f"(server CPU {report['single_server_cpu_s']:.1f} s)\n"
          f"eight sessions at once: {report['eight_s']:.1f} s {summary['session_s']} "
          f"(server CPU {report['eight_server_cpu_s']:.1f} s, Chromium CPU {report['eight_browser_cpu_s']:.1f} s)\n"
          f"server RSS (MiB): after one session {summary['baseline_rss']}; another server idle "
          f"{summary['idle_rss']}, peak with eight sessions {summary['peak_rss']}, after {summary['after_rss']}; "
          f"bound {summary['baseline_rss'] + MEMORY_BOUND // MiB}\n"
          f"server CPU with eight idle pages open: {report['idle_cpu_percent']:.0f} %")

    stuck = [f"session {i} ({SESSIONS[i]}): {each!r}" for i, each in enumerate(shown) if not isinstance(each, dict)]
    assert not stuck, "\n".join(stuck)
    for name, view in reference.items():
        assert not view["errors"] and not view["not found"], (name, view["errors"])
        assert view["cells"] and all(view["cells"]), name  # the view's tables were read
    for i, view in enumerate(shown):
        name = SESSIONS[i]
        assert not view["errors"] and not view["not found"], (i, name, view["errors"])
        assert view["cells"] == reference[name]["cells"], (i, name, view["cells"], reference[name]["cells"])
        assert view["text"] == reference[name]["text"], (i, name, _diff(reference[name]["text"], view["text"]))
    assert report["alive"], "the server is not answering after the eight sessions"
    assert "Traceback" not in report["log"], report["log"][-4000:]
    assert report["peak_rss"] <= report["baseline_rss"] + MEMORY_BOUND, summary
