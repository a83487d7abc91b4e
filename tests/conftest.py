"""Test fixtures: tiny random models of every supported architecture (see engine/tiny.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# no first-run demo job behind every page test and test server (tests/app/test_first_run.py turns it on)
os.environ.setdefault("LATENT_EXPLORER_NO_DEMO", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.tiny import ARCHS, build_tiny, make_tokenizer  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _keep_main_module():
    """AppTest leaves the page script it ran as ``sys.modules["__main__"]``; processes started later with spawn or
    forkserver would import that script again (and die running page code), so each test gets the real one back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny tensors: one thread avoids thread-pool spin-waiting on a shared 2-core machine (restored after).
    Tests on the real models keep every thread."""
    import torch

    if request.node.get_closest_marker("real_model") or request.node.get_closest_marker("browser"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny_lm(request, tokenizer):
    from engine.core.models import from_model

    model, tok = build_tiny(request.param, tokenizer)
    return from_model(model, tok, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from engine.core.models import from_model

    model, tok = build_tiny("llama", tokenizer)
    return from_model(model, tok, name="tiny-llama")


@pytest.fixture(scope="session")
def gemma_dashboard() -> str:
    """A complete feature dashboard for Gemma 3 270M in the cache: the one already there, else the first-run demo's
    (capture, a small TopK SAE on the middle layer, its dashboards; 71 s on a quiet 2-core machine without the
    report card), built through the CLI as a user would, into the same cache the app reads. For tests on the
    real model that need features (the "One feature, end to end" tour)."""
    import subprocess

    from engine.features.read import list_dashboards

    def found() -> list[dict]:
        return [e for e in list_dashboards() if e["manifest"].get("model") == "gemma-3-270m"]

    if not found():
        done = subprocess.run([sys.executable, "-m", "engine", "sae", "demo", "--dashboards", "--no-eval"],
                              cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entries = found()
    assert entries, "the demo built no dashboard for gemma-3-270m"
    return entries[0]["path"]
