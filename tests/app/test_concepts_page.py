"""AppTest: the concept-space page and the jobs page with a tiny random model (no download)."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    import torch

    import engine.geometry.projections

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine.geometry.projections, "warm_up_umap", lambda *a, **k: None)  # no numba compile in tests
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _open(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _points(fig: dict) -> int:
    return sum(len(trace["customdata"]) for trace in fig["data"])


def test_concepts_page_projects_a_prompt_set(monkeypatch):
    at = _open("pages/concepts.py")
    assert not at.error
    fig = _figures(at)[0]
    assert _points(fig) == 1456 and fig["data"][0]["type"] == "scatter"
    assert isinstance(fig["data"][0]["customdata"][0], list)  # plain lists, not numpy
    assert len(fig["data"]) == 12  # coloured by category by default
    at.selectbox(key="concept_color").set_value("language").run()
    assert len(_figures(at)[0]["data"]) == 7
    at.select_slider(key="concept_layer").set_value(0).run()
    at.checkbox(key="concept_align").check().run()
    at.radio(key="concept_dims").set_value(3).run()
    assert not at.exception and _figures(at)[0]["data"][0]["type"] == "scatter3d"

    at.selectbox(key="concept_set").set_value("days").run()
    at.radio(key="concept_dims").set_value(2).run()
    assert _points(_figures(at)[0]) == 49
    at.button(key="concept_geometry_button").click().run()
    at.button(key="concept_probe_button").click().run()
    assert not at.exception and not at.error
    figures = _figures(at)
    geometry = next(f for f in figures if any("effective rank" in a.get("text", "")
                                              for a in f["layout"].get("annotations", [])))
    assert len(geometry["data"]) == 6  # four measures + two translation curves
    probe = next(f for f in figures if "Linear probe" in f["layout"].get("title", {}).get("text", ""))
    assert len(probe["data"][0]["y"]["bdata"] if isinstance(probe["data"][0]["y"], dict) else probe["data"][0]["y"])


def test_concepts_page_refuses_a_store_of_another_model(tmp_path):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny, make_tokenizer
    from engine.data.store import activations_root, build_store

    model, tokenizer = build_tiny("llama", make_tokenizer(), seed=1)
    other = from_model(model, tokenizer, name="some-other-model", check=False)
    build_store(other, ["a few words of text"] * 4, activations_root() / "other", max_tokens=50, context_length=16)
    at = _open("pages/concepts.py")
    at.radio(key="concept_source").set_value("Activation store").run()
    assert not at.exception
    assert any("None of the 1 stores was captured from tiny:llama" in w.value for w in at.warning)
    assert not at.get("plotly_chart")


def test_jobs_page_captures_lists_and_deletes_a_store(tmp_path):
    at = _open("pages/jobs.py")
    assert not at.exception and any("No activation store" in info.value for info in at.info)
    at.selectbox(key="capture_corpus_kind").set_value("path").run()
    at.text_input(key="capture_corpus_path").set_value(str(tmp_path / "nope.txt")).run()
    at.button(key="capture_start").click().run()
    assert not at.exception and at.error and "neither" in at.error[0].value

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    at.text_input(key="capture_corpus_path").set_value(str(corpus)).run()
    at.number_input(key="capture_tokens").set_value(600).run()
    at.number_input(key="capture_context").set_value(64).run()
    at.button(key="capture_start").click().run()
    assert not at.exception and not at.error
    assert any("Stored 600 tokens" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert table["tokens"].tolist() == [600] and table["state"].tolist() == ["complete"]
    at.button(key="stores_verify").click().run()
    assert any("checksum" in s.value for s in at.success)

    # the concept page can use the new store
    at.switch_page("pages/concepts.py").run()
    at.radio(key="concept_source").set_value("Activation store").run()
    assert not at.exception and not at.error
    fig = _figures(at)[0]
    assert _points(fig) == 600 - 600 // 64 - 1  # every token but position 0 of each 64-token window

    at.switch_page("pages/jobs.py").run()
    at.checkbox(key="stores_confirm").check().run()
    at.button(key="stores_delete").click().run()
    assert not at.exception and any("No activation store" in info.value for info in at.info)
