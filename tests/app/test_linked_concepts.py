"""AppTest: the concept page's linked views on tiny:llama: a token placed by a link (the lens page's "where this token
sits in concept space"), a selection from a link with the lens of its mean and the SAE features most active on it, and
one sentence for each bad input."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
DAYS = {"concept_set": "days", "concept_layer": "1"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, feature_cache):
    import engine.geometry.projections

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(feature_cache))  # a dashboard of resid_post layer 1
    monkeypatch.setattr(engine.geometry.projections, "warm_up_umap", lambda *a, **k: None)


def _open(params: dict[str, str]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": "tiny:llama", **params})
    at.run()
    at.switch_page("pages/concepts.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _scatter(at) -> dict:
    return next(f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                if "layer" in f["layout"].get("title", {}).get("text", "") and "Logit lens" not in
                f["layout"]["title"]["text"])


def _values(array) -> list:
    if isinstance(array, dict):  # Plotly >= 6 sends arrays as base64 {"dtype", "bdata"}
        import base64

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def _point(fig: dict, index: int) -> list[float]:
    """The drawn coordinates of cloud point ``index`` (found through its customdata)."""
    for trace in fig["data"]:
        for k, data in enumerate(trace.get("customdata") or []):
            if data == [index]:
                return [_values(trace["x"])[k], _values(trace["y"])[k]]
    raise AssertionError(f"point {index} is not drawn")


def _star(fig: dict) -> dict | None:
    return next((t for t in fig["data"] if t.get("name", "").startswith("★ your token")), None)


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


@pytest.mark.parametrize("align", ["false", "true"])
def test_a_link_places_the_token_on_its_own_point(align):
    """'Wednesday' is point 2 of the days set: its last token, placed by a link, lands on the cloud's point 2."""
    at = _open({**DAYS, "concept_align": align, "concept_point_prompt": "Wednesday", "concept_point_pos": "-1"})
    assert not _errors(at)
    fig = _scatter(at)
    star = _star(fig)
    assert star is not None and star["name"] == "★ your token 'y' (position 9)", star and star["name"]
    xy = [_values(star["x"])[0], _values(star["y"])[0]]
    scale = max(abs(v) for trace in fig["data"] for v in _values(trace["x"]))
    assert np.allclose(xy, _point(fig, 2), atol=1e-4 * scale), (xy, _point(fig, 2))
    assert not np.allclose(xy, _point(fig, 3), atol=1e-2 * scale)
    assert any("your token 'y' (position 9)" in c.value for c in at.caption)

    at.button(key="concept_point_clear").click().run()
    assert not at.exception and _star(_scatter(at)) is None
    assert "concept_point_prompt" not in at.query_params and "concept_point_pos" not in at.query_params


def test_a_link_with_a_selection_shows_the_lens_and_the_features(feature_cache):
    from components.lens_plots import show_token
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny
    from engine.data.corpora import prompt_set
    from engine.features.read import Dashboard
    from engine.geometry.projections import prompt_cloud
    from engine.geometry.selection import selection_features, selection_lens

    chosen = [0, 7, 14, 21]  # Monday in four languages
    at = _open({**DAYS, "concept_sel": json.dumps(chosen)})
    assert not _errors(at), _errors(at)
    assert any("4 selected points" in m.value for m in at.markdown)
    assert "s_concept_sel" in at.query_params  # the selection goes into the link as a share
    marked = [t["customdata"][k][0] for t in _scatter(at)["data"] for k in t.get("selectedpoints") or []]
    assert sorted(marked) == chosen  # drawn as Plotly's own selection

    model, tok = build_tiny("llama")  # the app's tiny:llama
    lm = from_model(model, tok, name="tiny:llama")
    cloud = prompt_cloud(lm, prompt_set("days"))
    lens = selection_lens(lm, cloud, chosen, top_k=5)
    figure = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                  if "Logit lens of the mean of 4" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    heat = figure["data"][0]
    assert np.allclose(np.ravel(_values(heat["z"])), lens.top_probs.ravel(), atol=1e-6)
    assert heat["text"][-1][0] == show_token(lens.top_tokens[-1][0], 9)

    table = next(m.value for m in at.markdown if m.value.startswith("| feature |"))
    links = re.findall(r"\[#(\d+)\]\((sae-features\?[^)]*)\)", table)
    dash = Dashboard.open(feature_cache / "dashboards" / "tiny-sae-dash")
    expected = selection_features(dash.sae(), cloud.at(1)[chosen], top_n=15)
    assert [int(f) for f, _ in links] == expected.features
    assert all("dashboard=tiny-sae-dash" in url and url.endswith(f"feature={f}") for f, url in links)
    assert f"| {expected.fires_on[0]} of 4 |" in table

    at.button(key="concept_sel_clear").click().run()
    assert not at.exception and "s_concept_sel" not in at.query_params
    assert not any("selected points" in m.value for m in at.markdown)


def test_a_layer_without_a_dashboard_says_so():
    at = _open({**DAYS, "concept_layer": "0", "concept_sel": "[1, 2]"})
    assert not _errors(at)
    assert any("No SAE feature dashboard of tiny:llama reads resid_post at layer 0" in i.value for i in at.info)
    assert any("Logit lens of the mean of 2" in json.loads(c.proto.spec)["layout"]["title"]["text"]
               for c in at.get("plotly_chart"))


@pytest.mark.parametrize("params, sentence", [
    ({"concept_point_prompt": "Monday", "concept_point_pos": "99"},
     "Position 99 is not in the prompt: it has 7 tokens (positions 0..6)."),
    ({"concept_point_prompt": "Monday", "concept_point_pos": "-8"}, "Position -8 is not in the prompt"),
    ({"concept_point_prompt": "Monday", "concept_point_pos": "1000000000"}, "Position 1000000000 is not in the"),
    ({"concept_point_pos": "3"}, "The link gives position 3 but no prompt"),
    ({"concept_point_prompt": "   "}, "The prompt is empty"),
    ({"concept_sel": "[3, 4000]"}, "The selection names point 4000, but this cloud has points 0..48; select again."),
])
def test_bad_inputs_give_one_sentence(params, sentence):
    at = _open({**DAYS, **params})
    assert len(_errors(at)) == 1 and _errors(at)[0].startswith(sentence), _errors(at)
    assert _star(_scatter(at)) is None  # the view itself is still drawn
    assert not any("selected points" in m.value for m in at.markdown)


def test_a_position_that_is_no_number_is_a_warning_and_the_last_token():
    at = _open({**DAYS, "concept_point_prompt": "Monday", "concept_point_pos": "two"})
    assert not _errors(at)
    assert [w.value for w in at.warning] == ["The link's value for 'concept_point_pos' is not valid here; the default "
                                             "is shown instead."]
    assert _star(_scatter(at))["name"] == "★ your token 'y' (position 6)"


def test_three_dimensions_with_a_token_and_a_selection():
    at = _open({**DAYS, "concept_dims": "3", "concept_point_prompt": "Wednesday", "concept_sel": "[0, 7]"})
    assert not _errors(at), _errors(at)
    fig = _scatter(at)
    star = _star(fig)
    assert star["type"] == "scatter3d" and star["name"] == "★ your token 'y' (position 9)"
    sizes = {data[0]: size for t in fig["data"] if t is not star
             for data, size in zip(t["customdata"], _values(t["marker"]["size"]))}
    assert sizes[0] == sizes[7] > sizes[1]  # no selection in 3-D: the selected points are drawn larger
    assert any("Logit lens of the mean of 2" in json.loads(c.proto.spec)["layout"]["title"]["text"]
               for c in at.get("plotly_chart"))


def test_umap_places_the_token_with_the_fitted_model(monkeypatch):
    """A linear stand-in for UMAP (the real one compiles for a minute): the page fits it once more and transforms the
    token with it, so the token lands on its own point exactly when the plumbing matches the cloud's."""
    import umap

    calls = []

    class FakeUMAP:
        def __init__(self, **kwargs):
            self.k = kwargs["n_components"]

        def fit_transform(self, data):
            calls.append("fit")
            return np.tanh(data[:, : self.k])

        def transform(self, data):
            calls.append("transform")
            return np.tanh(data[:, : self.k])

    monkeypatch.setattr(umap, "UMAP", FakeUMAP)
    at = _open({**DAYS, "concept_method": "umap", "concept_normalize": "true", "concept_point_prompt": "Wednesday"})
    assert not _errors(at), _errors(at)
    fig = _scatter(at)
    star = _star(fig)
    assert "UMAP" in fig["layout"]["title"]["text"] and "transform" in calls
    assert np.allclose([_values(star["x"])[0], _values(star["y"])[0]], _point(fig, 2), atol=1e-5)
