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
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    monkeypatch.setattr(engine.geometry.projections, "warm_up_umap", lambda *a, **k: None)  # no numba compile in tests
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    from engine.jobs import wait_idle

    wait_idle(tmp_path / "cache" / "jobs", timeout=60)  # no capture job outlives its test folder
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
    assert len(probe["data"]) == 1 and "grouped" not in probe["layout"]["title"]["text"]  # 'day' is the concept

    # the concepts set probes 'category' with folds grouped by concept, the ungrouped curve for comparison
    at.selectbox(key="concept_set").set_value("concepts").run()
    at.button(key="concept_probe_button").click().run()
    assert not at.exception and not at.error
    probe = next(f for f in _figures(at) if "Linear probe" in f["layout"].get("title", {}).get("text", ""))
    assert "'category'" in probe["layout"]["title"]["text"] and "grouped by concept" in probe["layout"]["title"]["text"]
    assert len(probe["data"]) == 2 and "ungrouped" in probe["data"][1]["name"]
    assert any("grouped by 'concept'" in c.value for c in at.caption)


def test_concepts_page_refuses_a_store_of_another_model(tmp_path):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny, make_tokenizer
    from engine.data.store import activations_root
    from engine.data.store_writer import build_store

    model, tokenizer = build_tiny("llama", make_tokenizer(), seed=1)
    other = from_model(model, tokenizer, name="some-other-model", check=False)
    build_store(other, ["a few words of text"] * 4, activations_root() / "other", max_tokens=50, context_length=16)
    at = _open("pages/concepts.py")
    at.radio(key="concept_source").set_value("Activation store").run()
    assert not at.exception
    assert any("None of the 1 stores was captured from tiny:llama" in w.value for w in at.warning)
    assert not at.get("plotly_chart")


def test_jobs_page_captures_lists_and_deletes_a_store(tmp_path):
    data = tmp_path / "cache" / "corpora"  # the UI reads files only under the data folders (the cache is one)
    data.mkdir(parents=True)
    at = _open("pages/jobs.py")
    assert not at.exception and any("No activation store" in info.value for info in at.info)
    at.selectbox(key="capture_corpus_kind").set_value("path").run()
    at.text_input(key="capture_corpus_path").set_value(str(data / "nope.txt")).run()
    at.button(key="capture_start").click().run()
    assert not at.exception and at.error and "neither" in at.error[0].value

    corpus = data / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    at.text_input(key="capture_corpus_path").set_value(str(corpus)).run()
    at.number_input(key="capture_tokens").set_value(600).run()
    at.number_input(key="capture_context").set_value(64).run()
    at.button(key="capture_start").click().run()
    assert not at.exception and not at.error
    from engine.jobs import wait_idle

    jobs = wait_idle(tmp_path / "cache" / "jobs", timeout=90)  # the capture runs as a background job
    assert [j.state for j in jobs] == ["done"], [j.error for j in jobs]
    at.run()
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


def _open_link(params: dict[str, str]) -> AppTest:
    """A fresh session opening the concept page from a saved link."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/concepts.py")
    at.query_params.clear()
    at.query_params.update({"model": "tiny:llama", **params})
    at.run()
    assert not at.exception, at.exception
    return at


def _param(at, name: str) -> str:
    value = at.query_params[name]
    return value[0] if isinstance(value, list) else value


def test_many_concepts_get_top_n_colours_other_in_grey_and_a_legend():
    from components.concept_plots import OTHER_COLOR

    at = _open("pages/concepts.py")
    at.selectbox(key="concept_color").set_value("concept").run()
    assert not at.exception
    fig = _figures(at)[0]
    names = [trace["name"] for trace in fig["data"]]
    assert len(fig["data"]) == 11 and names[0] == "other (198 categories)"  # drawn first, under the colours
    assert fig["data"][0]["marker"]["color"] == OTHER_COLOR
    assert all(trace["showlegend"] for trace in fig["data"]) and fig["layout"]["legend"]["title"]["text"] == "concept"
    assert len({trace["marker"]["color"] for trace in fig["data"]}) == 11
    assert _points(fig) == 1456
    at.number_input(key="concept_top_n").set_value(4).run()
    fig = _figures(at)[0]
    assert len(fig["data"]) == 5 and fig["data"][0]["name"] == "other (204 categories)"
    assert _param(at, "concept_top_n") == "4" and _param(at, "concept_color") == "concept"


def test_search_highlights_a_concept_and_dims_the_rest():
    at = _open("pages/concepts.py")
    at.text_input(key="concept_highlight").set_value("Dog").run()  # colouring by category, searching a concept
    assert not at.exception
    fig = _figures(at)[0]
    star = fig["data"][-1]
    assert star["name"] == "★ Dog (7)" and len(star["customdata"]) == 7 and star["marker"]["opacity"] == 1
    assert all(trace["marker"]["opacity"] < 0.2 for trace in fig["data"][:-1])
    assert _points(fig) == 1456  # every point once
    assert any("Highlighting 7 points: concept = 'dog'" in c.value for c in at.caption)
    assert _param(at, "concept_highlight") == "Dog"
    at.text_input(key="concept_highlight").set_value("zzzz").run()
    assert any("Nothing matches 'zzzz'" in c.value for c in at.caption)
    assert all(trace["marker"]["opacity"] > 0.5 for trace in _figures(at)[0]["data"])


def test_a_concept_link_round_trips():
    at = _open("pages/concepts.py")
    at.selectbox(key="concept_set").set_value("months").run()
    at.select_slider(key="concept_layer").set_value(0).run()
    at.selectbox(key="concept_color").set_value("language").run()
    at.text_input(key="concept_highlight").set_value("March").run()
    at.checkbox(key="concept_normalize").check().run()
    assert not at.exception
    link = {name: _param(at, name) for name in at.query_params}
    assert {k: link.get(k) for k in ("concept_set", "concept_layer", "concept_color", "concept_highlight",
                                     "concept_normalize")} == \
        {"concept_set": "months", "concept_layer": "0", "concept_color": "language", "concept_highlight": "March",
         "concept_normalize": "true"}
    assert "concept_method" not in link  # PCA is the default

    again = _open_link({**link, "concept_method": "pca", "concept_tab": "Spread & geometry"})
    assert again.selectbox(key="concept_set").value == "months"
    assert again.select_slider(key="concept_layer").value == 0
    assert again.selectbox(key="concept_color").value == "language"
    assert again.text_input(key="concept_highlight").value == "March"
    assert again.checkbox(key="concept_normalize").value is True
    assert again.radio(key="concept_method").value == "pca"
    assert again.session_state["concept_tab"] == "Spread & geometry"
    assert _figures(again)[0]["data"][-1]["name"].startswith("★ March")
    assert _figures(again)[0]["layout"]["title"]["text"] == _figures(at)[0]["layout"]["title"]["text"]


def test_the_projection_downloads_as_html_and_csv(downloads):
    at = _open("pages/concepts.py")
    at.selectbox(key="concept_set").set_value("days").run()
    at.text_input(key="concept_highlight").set_value("Monday").run()
    assert not at.exception
    page = downloads(at, "Download HTML").decode()
    assert page.startswith("<!DOCTYPE html>") and "days: PCA of resid_post" in page
    assert page.count("Plotly.newPlot") == 1 and "Points (49)" in page and "highlighted: day = &#x27;Monday&#x27;" in page
    assert "<script src=" not in page
    csv = downloads(at, "Download points (CSV)").decode().splitlines()
    assert csv[0].startswith("point,x,y,") and len(csv) == 50
