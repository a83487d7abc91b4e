"""AppTest: the lens page <-> feature browser links on a tiny Llama with a tiny SAE dashboard at resid_post L1.

A lens cell on layer 1 lists the features active there (equal to the engine's ranking), each linking to its
feature page; "Show on my prompt" on a feature page opens the lens with the feature's strip over the heatmap and
its decoder direction read per layer; a bad ``lens_feature`` is one sentence."""
from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
PROMPT = "the quick brown fox"
DASH = "tiny-sae-dash"  # built by tests/app/test_features_page.py:build_feature_fixture at resid_post layer 1


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, feature_cache):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(feature_cache))


@pytest.fixture(scope="module")
def engine_side(feature_cache):
    """The model and the dashboard's SAE as the app builds them (tiny:llama is the same model every time)."""
    from engine.core.models import load_model
    from engine.features.read import Dashboard

    return load_model("tiny:llama"), Dashboard.open(feature_cache / "dashboards" / DASH)


def _lens(params: dict[str, str]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": "tiny:llama", **params})
    at.run()
    assert not at.exception, at.exception
    return at


def _link_buttons(at) -> dict[str, str]:
    return {b.proto.label: b.proto.url for b in at.get("link_button")}


def _values(array) -> list:
    if isinstance(array, dict):  # Plotly >= 6 sends arrays as base64 {"dtype", "bdata"}
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def _strip(at) -> dict | None:
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    return next((t for t in fig["data"] if t.get("name") == "feature strip"), None)


def test_a_lens_cell_lists_the_features_active_there(engine_side):
    from engine.features.here import features_here

    lm, dash = engine_side
    n = len(lm.tokenizer(PROMPT)["input_ids"])
    at = _lens({"lens_prompt": PROMPT, "lens_cell_row": "1", "lens_cell_pos": "5"})
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe(key="lens_here_table").value
    expected = features_here(lm, dash.sae(), "resid_post", 1, PROMPT, list(range(n))).at(5)
    assert len(expected) > 0
    assert table["feature"].tolist() == [f for f, _ in expected]
    np.testing.assert_allclose(table["activation"].to_numpy(), [a for _, a in expected], rtol=1e-5)
    assert table["label"].map(bool).all()  # every feature has a label (cheap label or top tokens)
    page = urlparse(table["page"].iloc[0])
    assert page.path == "sae-features"  # app.py's url path of the feature browser
    assert parse_qs(page.query) == {"model": ["tiny:llama"], "dashboard": [DASH], "sae": ["tiny-sae"],
                                    "feature": [str(expected[0][0])]}
    concept = urlparse(_link_buttons(at)["Where this token sits in concept space"])
    assert concept.path == "concept-space"
    assert parse_qs(concept.query) == {"model": ["tiny:llama"], "concept_layer": ["1"],
                                       "concept_point_prompt": [PROMPT], "concept_point_pos": ["5"]}
    # a layer no SAE reads: one line that says which site and how to get an SAE there
    at.selectbox(key="lens_cell_row").set_value("0").run()
    assert not at.exception
    assert not [d for d in at.dataframe if "feature" in d.value.columns]
    note = " ".join(c.value for c in at.caption)
    assert "No SAE of tiny:llama reads layer 0 (resid_post at layer 0 or resid_pre at layer 1)" in note
    assert "Dashboards exist for resid_post L1" in note
    # the <bos> position has no features
    at.selectbox(key="lens_cell_row").set_value("1").run()
    at.selectbox(key="lens_cell_pos").set_value(0).run()
    assert not at.exception and "special token '<bos>'" in " ".join(c.value for c in at.caption)


def _show_on_prompt_url(feature: int) -> str:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": "tiny:llama", "dashboard": DASH, "feature": str(feature), "test": PROMPT})
    at.run()
    at.switch_page("pages/features.py")
    at.run()
    assert not at.exception, at.exception
    return _link_buttons(at)["Show on my prompt"]


def test_show_on_my_prompt_opens_the_lens_with_the_feature(engine_side):
    from engine.features.here import feature_activations, feature_reading

    lm, dash = engine_side
    feature = int(dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY count DESC LIMIT 1").iloc[0, 0])
    url = urlparse(_show_on_prompt_url(feature))
    params = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert url.path == "./" and params == {"model": "tiny:llama", "lens_prompt": PROMPT,
                                           "lens_feature": f"{DASH}:{feature}"}
    at = _lens(params)
    assert not at.error, [e.value for e in at.error]
    assert at.query_params["lens_feature"] == f"{DASH}:{feature}"  # kept in the link
    strip = _strip(at)
    assert strip is not None and strip["yaxis"] == "y2"
    n = len(lm.tokenizer(PROMPT)["input_ids"])
    expected = feature_activations(lm, dash.sae(), "resid_post", 1, PROMPT, feature, range(n))
    shown = np.array([np.nan if v is None else v for v in _values(strip["z"][0])], dtype=float)
    np.testing.assert_allclose(shown, expected, rtol=1e-5, equal_nan=True)
    max_act = float(dash.feature(feature)["stats"]["max_act"])
    assert strip["zmax"] == pytest.approx(max(max_act, np.nanmax(expected)), rel=1e-6)
    # the decoder direction's reading, per layer from the SAE's layer, at the selected (last) position
    reading = next(d.value for d in at.dataframe if "top-1 before" in d.value.columns)
    assert reading["layer"].tolist() == ["1", "2"]
    direct = feature_reading(lm, dash.sae(), feature, max_act, PROMPT, n - 1, k=6)
    first = [cell.rsplit(" (", 1) for cell in reading.iloc[0][[f"rise {j}" for j in range(1, 7)]]]
    np.testing.assert_allclose([float(v.rstrip(")")) for _, v in first], direct.rises[0], atol=0.006)
    # another position moves the reading there; hiding the feature clears the link
    at.selectbox(key="lens_cell_pos").set_value(3).run()
    assert not at.exception and "position 3" in " ".join(m.value for m in at.markdown)
    at.button(key="lens_feature_hide").click().run()
    assert not at.exception and _strip(at) is None and "lens_feature" not in at.query_params


@pytest.mark.parametrize("ref, model, message", [
    ("nope:3", "tiny:llama", "There is no feature dashboard named 'nope' here"),
    (f"{DASH}:999", "tiny:llama", f"Feature 999 does not exist: the dashboard '{DASH}' has features 0..255."),
    ("just-words", "tiny:llama", "is not of the form <dashboard>:<feature id>"),
    (f"{DASH}:3", "tiny:gpt2", f"The dashboard '{DASH}' belongs to the model 'tiny:llama', not to the current model"),
])
def test_a_bad_lens_feature_is_one_sentence(ref, model, message):
    at = _lens({"lens_prompt": PROMPT, "lens_feature": ref, "model": model})
    assert len(at.error) == 1 and message in at.error[0].value, [e.value for e in at.error]
    assert _strip(at) is None and at.get("plotly_chart")  # the lens itself still works
    at.button(key="lens_feature_clear").click().run()
    assert not at.exception and not at.error and "lens_feature" not in at.query_params


def test_several_saes_at_one_layer_get_a_choice_kept_in_the_link(feature_cache, engine_side):
    import shutil

    from engine.features.here import features_here

    lm, dash = engine_side
    original = feature_cache / "dashboards" / DASH
    copy = feature_cache / "dashboards" / "second-dash"
    shutil.copytree(original, copy)
    try:
        at = _lens({"lens_prompt": PROMPT, "lens_cell_row": "1", "lens_cell_pos": "6"})
        box = at.selectbox(key="lens_here")
        assert sorted(box.options) == [f"tiny-sae · resid_post L1 · 256 features · {name}"
                                       for name in ("second-dash", DASH)]  # two builds of one SAE: named
        assert at.query_params["lens_here"] == box.value
        other = next(name for name in (DASH, "second-dash") if name != box.value)
        box.set_value(other).run()
        assert not at.exception and at.query_params["lens_here"] == other
        table = at.dataframe(key="lens_here_table").value
        n = len(lm.tokenizer(PROMPT)["input_ids"])
        expected = features_here(lm, dash.sae(), "resid_post", 1, PROMPT, list(range(n))).at(6)
        assert table["feature"].tolist() == [f for f, _ in expected]
        assert all(f"dashboard={other}&" in link for link in table["page"])
    finally:
        shutil.rmtree(copy)


def test_a_long_prompt_goes_into_the_concept_link_as_a_share(engine_side):
    from engine.core import shares
    from engine.features.here import features_here

    lm, dash = engine_side
    prompt = "the lazy dog sleeps. " * 16  # 336 characters: longer than a link keeps (components.links.LONG_CHARS)
    n = len(lm.tokenizer(prompt)["input_ids"])
    at = _lens({"lens_prompt": prompt, "lens_cell_row": "1"})  # a 40-position window at the end; the last one
    assert not at.error, [e.value for e in at.error]
    concept = parse_qs(urlparse(_link_buttons(at)["Where this token sits in concept space"]).query)
    assert "concept_point_prompt" not in concept and concept["concept_point_pos"] == [str(n - 1)]
    assert shares.get(concept["s_concept_point_prompt"][0]) == prompt
    expected = features_here(lm, dash.sae(), "resid_post", 1, prompt, [n - 1]).at(n - 1)
    assert at.dataframe(key="lens_here_table").value["feature"].tolist() == [f for f, _ in expected]
