"""The lens view: robust colour ranges (high = dark), tracked tokens over every row, and links (query params)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from components.lens_plots import lens_heatmap, tracked_lines

APP = "../../app.py"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_result():
    from engine.core.models import load_model
    from engine.lens.logit import run_lens

    return run_lens(load_model("tiny:llama"), "The capital of France is", track=[" Paris", " London"],
                    sublayers=True)


def _open(params: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": "tiny:llama", **(params or {})})
    at.run()
    assert not at.exception, at.exception
    return at


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _luminance(color: str) -> float:
    color = color.strip()
    if color.startswith("#"):
        rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    else:
        rgb = [float(v) for v in color[color.index("(") + 1:color.index(")")].split(",")[:3]]
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def _robust_top(values: np.ndarray) -> float:
    """The 98th percentile over the non-embedding rows, or Q3 + 3 IQR where lower."""
    q1, q3, p98 = np.percentile(values[1:], [25, 75, 98])
    return min(p98, q3 + 3 * (q3 - q1))


def _heatmap(fig: dict) -> dict:
    return next(trace for trace in fig["data"] if trace["type"] == "heatmap")


def _values(array) -> list:
    if isinstance(array, dict):  # Plotly >= 6 sends arrays as base64 {"dtype", "bdata"}
        import base64

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def _colour_at_top_is_darkest(scale) -> bool:
    if isinstance(scale, str):  # named scales are expanded by plotly.py; a bare name would be ambiguous
        return False
    return _luminance(scale[-1][1]) < _luminance(scale[0][1])


@pytest.mark.parametrize("metric, field", [("kl", "kl_to_final"), ("entropy", "entropy")])
def test_embedding_row_does_not_set_the_colour_range(tiny_result, metric, field):
    values = getattr(tiny_result, field).copy()
    values[0] = 1000.0 + np.arange(values.shape[1])  # the embedding row read through the final norm: ~1,000 nats
    result = dataclasses.replace(tiny_result, **{field: values})
    fig = lens_heatmap(result, metric)
    heat = fig.data[0]
    layers = values[1:]
    assert heat.zmax == pytest.approx(_robust_top(values)) and heat.zmax <= np.percentile(layers, 98) < 100
    assert heat.zmin == pytest.approx(np.percentile(layers, 2))
    assert "true value on hover" in heat.colorbar.title.text
    assert _colour_at_top_is_darkest(heat.colorscale)
    cells = fig.data[1]
    embed_hover = cells.hovertext[list(map(tuple, cells.customdata)).index((0, 3))]
    name = "KL" if metric == "kl" else "entropy"
    assert f"{name} 1003.00" in embed_hover  # the true value, not the clipped one


def test_every_metric_puts_the_darkest_colour_at_the_top(tiny_result):
    for metric in ("top1", "entropy", "kl", "tracked_prob", "tracked_rank"):
        heat = lens_heatmap(tiny_result, metric).data[0]
        assert _colour_at_top_is_darkest(heat.colorscale), metric
    rank = lens_heatmap(tiny_result, "tracked_rank").data[0]
    assert rank.zmax == 0 and rank.colorbar.ticktext[0] == "1"  # rank 1 (the top token) at the top of the bar


def test_tracked_lines_connect_every_row_in_order(tiny_result):
    fig = tracked_lines(tiny_result, col=len(tiny_result.positions) - 1)
    names = tiny_result.row_names
    assert names[:3] == ["embed", "0.attn", "0"]
    assert len(fig.data) == 2
    for trace in fig.data:
        assert trace.mode == "lines+markers" and list(trace.x) == list(range(len(names)))
        assert len(trace.y) == len(names) and all(np.isfinite(trace.y))
    assert list(fig.layout.xaxis.ticktext) == names


def test_page_uses_robust_range_and_draws_all_rows_with_sub_blocks(tiny_result):
    at = _open({"lens_metric": "kl", "lens_sublayers": "true", "lens_track": " Paris, London"})
    assert not at.error
    figures = _figures(at)
    heat = _heatmap(figures[0])
    kl = tiny_result.kl_to_final
    assert heat["zmax"] == pytest.approx(_robust_top(kl), rel=1e-4)
    assert heat["zmax"] < kl[0].max()  # the embedding row's cells go past the top of the colour bar
    assert _luminance(heat["colorscale"][-1][1]) < _luminance(heat["colorscale"][0][1])
    cells = next(t for t in figures[0]["data"] if t.get("name") == "cells")
    assert any(t.startswith("layer embed") and "KL" in t for t in cells["hovertext"])

    tracked = next(f for f in figures if f["layout"].get("yaxis", {}).get("title", {}).get("text") == "probability")
    names = tiny_result.row_names
    assert len(tracked["data"]) == 2  # one connected trace per tracked token
    for trace in tracked["data"]:
        assert trace["mode"] == "lines+markers" and _values(trace["x"]) == list(range(len(names)))
        assert len(_values(trace["y"])) == len(names)
    assert tracked["layout"]["xaxis"]["ticktext"] == names  # embed, 0.attn, 0, 1.attn, ...


VIEW = {"lens_prompt": "Rome is the capital of", "lens_metric": "entropy", "lens_track": " Italy", "lens_topk": "7",
        "lens_sublayers": "true", "lens_cell_row": "1.attn", "lens_cell_pos": "4", "lens_tab": "Latent language",
        "ll_source": "de", "ll_target": "ja"}


def test_a_link_opens_the_same_view():
    at = _open(VIEW)
    assert at.text_area(key="lens_prompt").value == VIEW["lens_prompt"]
    assert at.selectbox(key="lens_metric").value == "entropy"
    assert at.text_input(key="lens_track").value == " Italy"
    assert at.number_input(key="lens_topk").value == 7
    assert at.toggle(key="lens_sublayers").value is True
    assert at.selectbox(key="lens_cell_row").value == "1.attn"
    assert at.selectbox(key="lens_cell_pos").value == 4
    assert at.radio(key="lens_kind").value == ""  # the logit lens
    assert at.session_state["lens_tab"] == "Latent language"
    assert (at.selectbox(key="ll_source").value, at.selectbox(key="ll_target").value) == ("de", "ja")
    assert len(at.dataframe[0].value) == 7  # the selected cell's top-7
    shapes = _figures(at)[0]["layout"]["shapes"]
    assert shapes[0]["x0"] == 3.5 and shapes[0]["y0"] == 2.5  # the selected cell is outlined
    assert {k: _param(at, k) for k in VIEW} == VIEW  # the link is kept as it came


def test_changing_the_view_updates_the_link_and_the_link_reopens_it():
    at = _open()
    assert "lens_prompt" not in at.query_params and "lens_metric" not in at.query_params  # defaults stay out
    at.text_area(key="lens_prompt").set_value("Berlin is a city in").run()
    at.selectbox(key="lens_metric").set_value("kl").run()
    at.number_input(key="lens_topk").set_value(4).run()
    at.toggle(key="lens_sublayers").set_value(True).run()
    at.selectbox(key="lens_cell_row").set_value("0.attn").run()
    at.selectbox(key="lens_cell_pos").set_value(2).run()
    assert not at.exception
    link = {name: _param(at, name) for name in at.query_params}
    assert link["lens_prompt"] == "Berlin is a city in" and link["lens_metric"] == "kl" and link["lens_topk"] == "4"
    assert link["lens_sublayers"] == "true" and (link["lens_cell_row"], link["lens_cell_pos"]) == ("0.attn", "2")

    again = _open(link)  # a fresh session from the saved link
    assert again.text_area(key="lens_prompt").value == "Berlin is a city in"
    assert again.selectbox(key="lens_metric").value == "kl"
    assert again.number_input(key="lens_topk").value == 4
    assert again.toggle(key="lens_sublayers").value is True
    assert (again.selectbox(key="lens_cell_row").value, again.selectbox(key="lens_cell_pos").value) == ("0.attn", 2)
    assert _figures(again)[0]["data"][0]["z"] == _figures(at)[0]["data"][0]["z"]


def _param(at, name: str) -> str:
    value = at.query_params[name]
    return value[0] if isinstance(value, list) else value


def test_a_long_prompt_goes_into_the_link_as_a_share_id():
    at = _open()
    long_prompt = ("word " * 3000).strip()  # 14,999 characters
    at.text_area(key="lens_prompt").set_value(long_prompt).run()
    assert not at.exception
    link = {name: _param(at, name) for name in at.query_params}
    assert "lens_prompt" not in link and len(link["s_lens_prompt"]) == 16  # a share id, not 15,000 characters
    assert sum(len(k) + len(v) for k, v in link.items()) < 300
    again = _open(link)
    assert again.text_area(key="lens_prompt").value == long_prompt
    assert not again.warning


def test_a_bad_link_falls_back_to_defaults():
    at = _open({"lens_metric": "nonsense", "lens_topk": "x", "lens_cell_row": "99", "lens_cell_pos": "99",
                "lens_tab": "Nope", "lens_kind": "/no/such/lens", "s_lens_track": "0123456789abcdef"})
    assert not at.error and len(at.warning) == 5  # one sentence per bad value; the defaults are shown
    assert at.selectbox(key="lens_metric").value == "top1"
    assert at.number_input(key="lens_topk").value == 10
    assert at.session_state["lens_tab"] == "Lens" and at.radio(key="lens_kind").value == ""
    rows = at.selectbox(key="lens_cell_row")
    assert rows.value == rows.options[-1]  # the last layer, the default cell
    assert at.text_input(key="lens_track").value == " Paris"


def test_a_link_made_before_the_keys_still_opens():
    at = _open({"prompt": "Paris is in", "metric": "entropy", "track": " France"})
    assert at.text_area(key="lens_prompt").value == "Paris is in"
    assert at.selectbox(key="lens_metric").value == "entropy" and at.text_input(key="lens_track").value == " France"
    assert "prompt" not in at.query_params and _param(at, "lens_prompt") == "Paris is in"


def test_the_lens_view_downloads_as_one_self_contained_html_file(downloads):
    at = _open({"lens_cell_row": "1", "lens_cell_pos": "3", "lens_metric": "kl"})
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels[:2] == ["Download data (CSV)", "Download HTML"]
    page = downloads(at, "Download HTML").decode()
    assert page.startswith("<!DOCTYPE html>") and "<title>Logit lens</title>" in page
    assert "layer 1, position 3" in page and "KL to final" in page
    assert page.count("Plotly.newPlot") == 2  # the heatmap and the tracked-token lines
    assert "<script src=" not in page and "<script type=\"text/javascript\" src=" not in page  # opens offline
    csv = downloads(at, "Download data (CSV)").decode()
    assert csv.startswith("layer,position,input_token")
