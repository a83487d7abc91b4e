"""Static HTML exports (components.export) and the features page's downloads and links.

The builders are checked on hand-made data: the data is in the file and nothing in it reaches the network
(Plotly's JavaScript is inlined once). The page is checked with AppTest on the tiny feature fixture.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from components.concept_plots import scatter_figure
from components.export import (
    concept_html,
    feature_html,
    feature_tables,
    figure_html,
    file_name,
    lens_html,
    table_csv,
    table_parquet,
)
from components.lens_plots import lens_heatmap, tracked_lines
from engine.lens.logit import LensResult

APP = "../../app.py"
PLOTLY_HEADER = "* plotly.js v"
# a script, stylesheet, image or frame fetched from elsewhere (http:, https: or protocol-relative)
EXTERNAL = re.compile(r"<(?:script|link|img|iframe|source|object|embed|video|audio)\b[^>]*\b(?:src|href|data)\s*=\s*"
                      r"[\"']?\s*(?:https?:)?//", re.I)


def assert_offline(text: str, figures: int = 1) -> None:
    """Self-contained: no external script, link or asset; Plotly's JS inlined exactly once (when figures)."""
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)  # every script is inline
    assert not re.search(r"<link\b", text, re.I)
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert "http" not in style and "@import" not in style and "@font-face" not in style
    assert text.count(PLOTLY_HEADER) == (1 if figures else 0)
    assert text.count('class="plotly-graph-div"') == figures


def feature_data() -> tuple[dict, list[dict], list[dict]]:
    """What Dashboard.feature returns for feature 17 (made up), its top contexts and interval contexts."""
    stats = {"feature": 17, "density": 0.0123, "max_act": 7.654321, "mean_act": 2.5, "count": 1234, "dead": False,
             "dense": False, "act_tokens": " Paris | London", "top_logits": " France", "bottom_logits": " cat"}
    top = pd.DataFrame({"rank": [0, 1], "row": [5, 9], "act": [7.654321, 3.25], "doc": [0, 1], "pos": [3, 4]})
    intervals = pd.DataFrame({"interval": [1, 0], "rank": [0, 0], "lo": [3.0, 0.0], "hi": [7.7, 3.0],
                              "row": [9, 11], "act": [3.25, 0.5], "doc": [1, 2], "pos": [4, 2]})
    logits = pd.DataFrame({"sign": ["+", "+", "-"], "rank": [0, 1, 0], "token_id": [10, 11, 12],
                           "token": [" France", " Lyon", " cat"], "value": [1.875, 0.9, -2.125]})
    data = {"stats": stats, "top": top, "intervals": intervals, "logits": logits,
            "histogram": pd.DataFrame({"bin": [0, 1], "lo": [0.0, 4.0], "hi": [4.0, 8.0], "count": [900, 334]}),
            "neighbours": pd.DataFrame({"rank": [0], "neighbour": [42], "cosine": [0.8125], "act_tokens": ["Rome"]}),
            "cooccurring": pd.DataFrame({"rank": [0], "other": [99], "jaccard": [0.3125], "together": [77],
                                         "act_tokens": ["Berlin"]})}
    contexts = [{"row": 5, "tokens": ["The", " capital", " is", " Paris", "<b>"], "acts": [0, 0, 1.0, 7.654321, 0],
                 "focus": 3},
                {"row": 9, "tokens": ["I", " love", " London"], "acts": [0, 0.5, 3.25], "focus": 2}]
    interval_contexts = [contexts[1], {"row": 11, "tokens": ["a", " Madrid"], "acts": [0, 0.5], "focus": 1}]
    return data, contexts, interval_contexts


def test_feature_html_carries_the_data_offline():
    data, contexts, interval_contexts = feature_data()
    manifest = {"model": "tiny:llama", "sae_name": "tiny-sae", "architecture": "topk", "site": "resid_post",
                "layer": 1, "d_sae": 256, "created": "2026-12-01T10:00:00", "n_rows": 2000,
                "store_path": "/x/activations/tiny"}
    explanation = {"explanation": "capital cities", "explainer": "stub", "detection": 0.85, "fuzzing": float("nan")}
    text = feature_html(17, data, contexts, label="Paris, London", explanation=explanation, manifest=manifest,
                        dashboard="tiny-sae-dash", interval_contexts=interval_contexts, created="2026-12-02 12:00")
    assert_offline(text, figures=1)
    assert "<title>Feature #17 — Paris, London</title>" in text
    assert "Explanation: capital cities (by stub)" in text and "detection 0.85" in text
    for token in ("·capital", "·Paris", "·London", "·Madrid", "·France", "·Lyon", "·cat"):
        assert token in text  # contexts, logit table (whitespace shown as ·)
    assert "&lt;b&gt;" in text and "<b></span>" not in text  # token text escaped
    assert "7.65" in text and "1.23 %" in text and "1,234" in text  # max activation, density, count
    assert "1.875" in text and "-2.125" in text and "0.8125" in text and "0.3125" in text  # logits, neighbours
    assert "tiny:llama" in text and "tiny-sae-dash, built 2026-12-01T10:00:00 on 2,000 tokens" in text
    assert "topk, resid_post L1, 256 features" in text and "exported</b>: 2026-12-02 12:00" in text
    assert text.count('class="le-context"') == 4  # two top contexts, two interval samples
    assert "Download plot as a png" in text  # how to get a PNG
    assert '"toImageButtonOptions"' in text and "feature-17-1" in text


def test_feature_html_without_histogram_or_contexts():
    data, _, _ = feature_data()
    data = {**data, "histogram": data["histogram"].iloc[:0], "stats": {**data["stats"], "dead": True}}
    text = feature_html(3, data, [], created="now")
    assert_offline(text, figures=0)
    assert "Feature #3" in text and "never fired" in text


def test_feature_tables_csv_and_parquet():
    data, contexts, interval_contexts = feature_data()
    tables = feature_tables(data, contexts, interval_contexts)
    assert set(tables) == {"stats", "top_activations", "interval_samples", "histogram", "logits", "neighbours",
                           "cooccurring"}
    top = tables["top_activations"]
    assert list(top["token"]) == ["·Paris", "·London"] and top["context"].iloc[0] == "The capital is Paris<b>"
    assert "row" not in top
    assert "7.654321" in table_csv(top) and "1234" in table_csv(tables["stats"])
    back = pd.read_parquet(io.BytesIO(table_parquet(tables["logits"])))
    assert back["token"].tolist() == [" France", " Lyon", " cat"] and back["value"].iloc[2] == -2.125


def lens_result() -> LensResult:
    rows, cols, k = 3, 4, 2
    rng = np.random.default_rng(0)
    probs = np.sort(rng.random((rows, cols, k)), axis=-1)[..., ::-1] / 2
    names = ["alpha", "beta", "gamma", "delta", "eps"]
    return LensResult(
        token_ids=[1, 2, 3, 4], tokens=["<s>", "The", " Eiffel", " Tower"], row_names=["embed", "0", "1"],
        row_hidden_index=[0, 1, 2], positions=list(range(cols)), top_ids=rng.integers(0, 5, (rows, cols, k)),
        top_probs=probs, top_tokens=[[[names[(r + c + i) % 5] for i in range(k)] for c in range(cols)]
                                     for r in range(rows)],
        entropy=rng.random((rows, cols)), kl_to_final=rng.random((rows, cols)), tracked_ids=[7],
        tracked_labels=[" Paris"], tracked_tokens=["▁Paris"], tracked_notes=["' Paris' → '▁Paris'"],
        tracked_probs=rng.random((rows, cols, 1)) / 3, tracked_ranks=rng.integers(0, 50, (rows, cols, 1)),
        self_check_max_abs_diff=1.5e-6)


def test_lens_html():
    result = lens_result()
    figures = [lens_heatmap(result, "top1"), tracked_lines(result, 3)]
    text = lens_html(result, figures, source={"model": "tiny:llama"}, created="t0")
    assert_offline(text, figures=2)
    assert "<title>Logit lens</title>" in text and "tiny:llama" in text
    assert "The Eiffel Tower" in text and "·Eiffel" in text and "Tracked: &#x27; Paris&#x27; → &#x27;▁Paris" in text
    assert "Self-check" in text and "1.5e-06" in text
    assert "gamma (" in text and "top1_prob" in text  # the grid and every cell (3 x 4 records)
    assert f"{float(result.top_probs[2, 1, 0]):.4g}" in text  # a number from the records table


def test_concept_html():
    coords = np.array([[0.0, 1.0], [1.0, 0.5], [0.25, 0.75]])
    fig = scatter_figure(coords, ["fr", "en", "fr"], ["chat", "cat", "chien"], "language", title="Animals")
    points = pd.DataFrame({"word": ["chat", "cat", "chien"], "language": ["fr", "en", "fr"],
                           "x": coords[:, 0], "y": coords[:, 1]})
    text = concept_html(fig, points, title="Animals at layer 5", notes=["PCA of resid_post"], created="t1")
    assert_offline(text, figures=1)
    assert "Animals at layer 5" in text and "PCA of resid_post" in text and "Points (3)" in text
    assert "<td>chien</td>" in text and "<td>0.75</td>" in text


def test_figure_html_generic():
    big = pd.DataFrame({"n": range(40)})
    text = figure_html(None, "A <title>", ["note & more"], {"Numbers": big}, created="t2")
    assert_offline(text, figures=0)
    assert "A &lt;title&gt;" in text and "note &amp; more" in text and "<details><summary>40 rows" in text
    assert file_name("feature", 12, "tiny sae/x", ext="csv") == "feature-12-tiny_sae_x.csv"


# --- the page ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def page_env(monkeypatch, feature_cache):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(feature_cache))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield feature_cache
    torch.set_num_threads(before)


def _open(query: dict) -> AppTest:
    """The features page opened by a link (its first run, as a browser opening /sae-features?...)."""
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.switch_page("pages/features.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _live(cache) -> int:
    from engine.features.read import Dashboard

    dash = Dashboard.open(cache / "dashboards" / "tiny-sae-dash")
    return int(dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY count DESC LIMIT 1").iloc[0, 0])


def _downloads(at) -> dict[str, object]:
    return {b.proto.label: b.proto for b in at.get("download_button")}


@pytest.fixture
def deferred(monkeypatch) -> dict:
    """The callables of deferred downloads by file id (AppTest drops its media file manager after a run)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    seen = {}
    original = MediaFileManager.add_deferred

    def record(self, data_callable, *args, **kwargs):
        file_id = original(self, data_callable, *args, **kwargs)
        seen[file_id] = data_callable
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    return seen


def test_feature_page_offers_the_downloads(page_env, deferred):
    live = _live(page_env)
    at = _open({"dashboard": "tiny-sae-dash", "feature": str(live)})
    buttons = _downloads(at)
    assert {"Download HTML", "CSV", "Parquet"} <= set(buttons)
    assert buttons["Download HTML"].HasField("deferred_file_id")  # made on click, not on every rerun
    def click(proto):  # what a click on the button downloads
        return deferred[proto.deferred_file_id]()

    text = click(buttons["Download HTML"])
    assert_offline(text, figures=1)
    assert f"Feature #{live}" in text and "tiny-sae-dash" in text and 'class="le-context"' in text
    csv = click(buttons["CSV"])
    assert csv.splitlines()[0].startswith("rank,act,doc,pos,token,context")
    at.selectbox(key="feature_export_table").set_value("logits").run()
    logits = pd.read_parquet(io.BytesIO(click(_downloads(at)["Parquet"])))
    assert list(logits.columns) == ["sign", "rank", "token_id", "token", "value"] and len(logits)


def test_links_carry_the_view(page_env):
    live = _live(page_env)
    at = _open({"dashboard": "tiny-sae-dash", "feature": str(live), "tab": "list", "q": "o", "sort": "max_act",
                "order": "asc", "dense": "show", "min_max": "0.5", "map": "pca", "map_color": "cosine"})
    assert not at.error, [e.value for e in at.error]
    state = at.session_state
    assert state["features_tab"] == "Feature list" and state["features_sae"] == "tiny-sae-dash"
    assert at.text_input(key="features_search").value == "o"
    assert at.selectbox(key="features_sort").value == "max activation"
    assert at.toggle(key="features_desc").value is False and at.checkbox(key="features_hide_dense").value is False
    assert at.number_input(key="features_min_max").value == 0.5
    assert at.radio(key="map_method").value == "pca" and at.radio(key="map_color").value.startswith("cosine")
    table = at.dataframe(key="features_table").value
    assert list(table["max_act"]) == sorted(table["max_act"]) and (table["max_act"] >= 0.5).all()
    assert table["link"].iloc[0].startswith("?model=tiny%3Allama&dashboard=tiny-sae-dash&sae=tiny-sae&feature=")
    params = {k: at.query_params[k] for k in at.query_params}
    flat = {k: (v[0] if isinstance(v, list) else v) for k, v in params.items()}
    assert {"dashboard": "tiny-sae-dash", "feature": str(live), "tab": "list", "q": "o", "sort": "max_act",
            "order": "asc", "dense": "show", "min_max": "0.5", "map": "pca", "map_color": "cosine"}.items() \
        <= flat.items()
    # back to defaults: those parameters leave the URL
    at.toggle(key="features_desc").set_value(True).run()
    at.text_input(key="features_search").input("").run()
    flat = {k: (v[0] if isinstance(v, list) else v) for k, v in ((k, at.query_params[k]) for k in at.query_params)}
    assert "order" not in flat and "q" not in flat and flat["sort"] == "max_act"


def test_bad_link_values_fall_back(page_env):
    at = _open({"sae": "tiny-sae", "tab": "nope", "sort": "detection", "min_max": "-3", "order": "sideways"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["features_tab"] == "Feature"
    assert at.selectbox(key="features_sort").value == "density"  # no scores on this dashboard
    assert at.number_input(key="features_min_max").value == 0.0 and at.toggle(key="features_desc").value is True
