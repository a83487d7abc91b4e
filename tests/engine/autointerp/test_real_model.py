"""End to end with the embedded SmolLM2-135M-Instruct as the explainer (slow: loads a real model)."""
from __future__ import annotations

import time

import pandas as pd
import pytest

from engine.autointerp.explain import explain_features
from engine.autointerp.tables import EXPLANATIONS


@pytest.mark.real_model
def test_smollm2_explains_three_features_of_a_tiny_dashboard(paris, tmp_path):
    from engine.autointerp.backends import LocalChatBackend

    dash, tok, _, _ = paris
    started = time.time()
    backend = LocalChatBackend("smollm2-135m", batch_size=3)
    loaded = time.time()
    result = explain_features(dash, backend, [0, 1, 2], tokenizer=tok, out_dir=tmp_path)
    explained = time.time()
    table = pd.read_parquet(tmp_path / EXPLANATIONS)
    print(f"\nSmolLM2: load {loaded - started:.1f} s, 3 explanations in {explained - loaded:.1f} s")
    print(table[["feature", "explanation", "error"]].to_string())
    assert result["explained"] == 3 and result["failed"] == 0
    assert table["explanation"].str.strip().str.len().gt(0).all() and (table["error"] == "").all()
    assert table["explainer"].unique().tolist() == ["local:smollm2-135m"]
    assert backend.prompt_text([{"role": "user", "content": "hi"}]).rstrip().endswith("assistant")
