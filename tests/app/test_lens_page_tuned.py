"""AppTest: the lens selector offers a trained tuned lens and the comparison view uses it."""
from __future__ import annotations

import json

import torch
from streamlit.testing.v1 import AppTest

from engine.core.models import load_model
from engine.lens.tuned import TunedLens, default_lens_dir


def test_lens_selector_and_comparison(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path))
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    lm = load_model("tiny:llama")
    lens = TunedLens.for_model(lm)
    with torch.no_grad():  # a lens that really differs from the logit lens
        for param in lens.parameters():
            param.normal_(0, 0.5)
    lens.save(default_lens_dir(lm.name))

    at = AppTest.from_file("../../app.py", default_timeout=120)
    at.run()
    assert not at.exception
    # the tracked token is read as the model writes it after the prompt, and the page says which token that is
    assert any(c.value.startswith("Following ' Paris' → ") for c in at.caption)
    radio = at.radio(key="lens_kind")
    assert len(radio.options) == 2  # logit + the tuned lens just saved
    logit_fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    radio.set_value(str(default_lens_dir(lm.name))).run()
    assert not at.exception and not at.error
    tuned_fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert tuned_fig["data"][0]["text"] != logit_fig["data"][0]["text"]  # other top-1 tokens
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "") for c in at.get("plotly_chart")]
    assert any("disagree" in t for t in titles)
    assert any("agree on the top-1" in c.value for c in at.caption)
