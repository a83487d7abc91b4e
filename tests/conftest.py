"""Test fixtures: tiny random models of every supported architecture (see engine/tiny.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.tiny import ARCHS, build_tiny, make_tokenizer  # noqa: E402,F401

@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny_lm(request, tokenizer):
    from engine.models import from_model

    model, tok = build_tiny(request.param, tokenizer)
    return from_model(model, tok, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from engine.models import from_model

    model, tok = build_tiny("llama", tokenizer)
    return from_model(model, tok, name="tiny-llama")
