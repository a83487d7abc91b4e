"""AppTest: the interventions page on a tiny random Llama (no download)."""
from __future__ import annotations

import json

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
TABS = ["Next token & generation", "Δ-lens", "Dose-response", "Patching sweep", "Tongue vs thought"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _page(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.run()
    at.switch_page("pages/interventions.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _open(at: AppTest, tab: str) -> AppTest:
    at.session_state["iv_tab"] = tab
    at.run()
    assert not at.exception, at.exception
    return at


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _title(figure: dict) -> str:
    return figure["layout"].get("title", {}).get("text", "")


def _params(at: AppTest) -> dict[str, str]:
    return {name: at.query_params[name][-1] if isinstance(at.query_params[name], list) else at.query_params[name]
            for name in at.query_params}


def test_interventions_page_views_and_bad_input():
    at = _page()
    assert not at.error, [e.value for e in at.error]
    assert len(at.session_state["iv_specs"]) == 1 and at.session_state["iv_specs"][0]["op"] == "steer"
    # the first tab: clean and intervened tables, labelled, and the generation diff; no other view computed
    assert any(md.value.startswith("**Clean**") for md in at.markdown)
    assert any(md.value.startswith("**Intervened**") for md in at.markdown)
    assert len(at.dataframe) == 2
    assert any("clean" in md.value and "intervened" in md.value for md in at.markdown)  # the generation diff
    assert any("mean(French) − mean(English)" in c.value and "layer" in c.value for c in at.caption)
    assert _figures(at) == []

    figures = {tab: _figures(_open(at, tab)) for tab in TABS[1:]}
    assert all(len(found) == 1 for found in figures.values()), {t: len(f) for t, f in figures.items()}
    sweep = figures["Patching sweep"][0]
    assert "after patching" in _title(sweep)
    heat = sweep["data"][0]
    assert heat["type"] == "heatmap" and len(heat["colorbar"]["ticktext"]) == 2
    assert heat["colorbar"]["ticktext"][0].startswith("target")
    tongue = figures["Tongue vs thought"][0]
    assert sum(1 for trace in tongue["data"] if trace.get("showlegend") is not False) == 4
    assert tongue["layout"]["legend"]["orientation"] == "v"  # beside the plot, clear of the title
    dose = figures["Dose-response"][0]
    assert dose["data"][0]["name"].startswith("P(")

    # an ablation on top of the steering, then the sweep switched to layer -> layer
    at.selectbox(key="iv_op").set_value("ablate_heads").run()
    at.multiselect(key="iv_heads").set_value([1, 3]).run()
    at.button(key="iv_add").click().run()
    assert not at.exception and [s["op"] for s in at.session_state["iv_specs"]] == ["steer", "ablate_heads"]
    _open(at, "Patching sweep").radio(key="sweep_kind").set_value("layer_layer").run()
    sweep = next(f for f in _figures(at) if "after patching" in _title(f))
    assert sweep["layout"]["xaxis"]["title"]["text"] == "source layer"

    # bad input: one clear message, the page keeps working
    at.selectbox(key="iv_op").set_value("patch").run()
    at.text_input(key="iv_positions").set_value("99").run()
    at.button(key="iv_add").click().run()
    assert not at.exception
    assert any("beyond the prompt" in e.value for e in at.error)
    assert len(at.session_state["iv_specs"]) == 2
    at.radio(key="sweep_kind").set_value("layer_position").run()
    at.text_input(key="sweep_target").set_value("short").run()
    assert any("same token length" in e.value for e in at.error)
    assert not at.exception

    # removing the first intervention keeps the second
    at.button(key="iv_remove_0").click().run()
    assert not at.exception and [s["op"] for s in at.session_state["iv_specs"]] == ["ablate_heads"]


def test_a_cleared_token_names_the_empty_field_and_multi_token_words_say_which_token():
    at = _open(_page(), "Patching sweep")
    at.text_input(key="sweep_token").set_value("").run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == ["The 'Token' field is empty: type the token to measure (spaces "
                                           "matter, e.g. ' Paris')."]
    at.radio(key="sweep_metric").set_value("logit_diff").run()
    assert not at.exception and any("'Token' field is empty" in e.value for e in at.error)
    assert not any("second token" in e.value for e in at.error)  # it used to blame the other field
    at.text_input(key="sweep_token").set_value(" Paris").run()
    at.text_input(key="sweep_token_b").set_value("").run()
    assert not at.exception and any("'minus token' field is empty" in e.value for e in at.error)

    # the tiny tokenizer spells words letter by letter: a word is several tokens, and the page says which is used
    at.text_input(key="sweep_token_b").set_value(" Warsaw").run()
    notes = [c.value for c in at.caption if "using the first" in c.value]
    assert any("' Paris' is" in n and "tokens" in n for n in notes), notes
    assert any("' Warsaw' is" in n for n in notes), notes
    _open(at, "Dose-response").text_input(key="dose_token").set_value(" great").run()
    assert any("Target token ' great' is" in c.value and "using the first" in c.value for c in at.caption)
    at.text_input(key="dose_token").set_value("").run()
    assert not at.exception and any("'Target token' field is empty" in e.value for e in at.error)
    _open(at, "Δ-lens").text_input(key="dl_track").set_value(" great").run()
    assert any("Tracked token ' great' is" in c.value for c in at.caption)


def test_only_the_open_tab_computes(monkeypatch):
    """Each view's engine call runs only while its tab is open (and once per input, then from the cache)."""
    import engine.interventions.demos as demos
    import engine.interventions.generation as generation
    import engine.interventions.sweeps as sweeps

    calls: dict[str, int] = {}

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((generation, "compare_next_token"), (generation, "generate_compare"),
                         (generation, "delta_lens"), (generation, "dose_response"), (sweeps, "patch_sweep"),
                         (demos, "tongue_thought")):
        counted(module, name)
    st.cache_data.clear()
    at = _page()
    assert calls == {"compare_next_token": 1, "generate_compare": 2}  # the clean continuation, then with the edits
    at.run()
    assert calls == {"compare_next_token": 1, "generate_compare": 2}  # a rerun comes from the cache
    expected = dict(calls)
    for tab, name in zip(TABS[1:], ["delta_lens", "dose_response", "patch_sweep", "tongue_thought"]):
        _open(at, tab)
        expected[name] = 1
        assert calls == expected, (tab, calls)
    # adding an intervention recomputes the open view only
    at.selectbox(key="iv_op").set_value("ablate_heads").run()
    at.button(key="iv_add").click().run()
    assert not at.exception and len(at.session_state["iv_specs"]) == 2
    assert calls == expected, calls  # the tongue-vs-thought view does not depend on the interventions
    _open(at, "Δ-lens")
    expected["delta_lens"] = 2
    assert calls == expected, calls
    _open(at, TABS[0])  # the clean continuation comes from the cache: one call for the intervened run
    expected["compare_next_token"], expected["generate_compare"] = 2, 3
    assert calls == expected, calls


def test_state_round_trips_through_query_params():
    query = {"iv_prompt": "The weather today is", "iv_tab": "Patching sweep", "sweep_kind": "layer_layer",
             "sweep_token": " Rome", "sweep_metric": "logit_diff", "sweep_token_b": " Paris", "gen_n": "5",
             "tt_a": "cat", "dose_range": "[-2.0,3.0]"}
    at = _page(query)
    assert not at.error and not at.warning, [w.value for w in at.warning]
    state = at.session_state
    assert state["iv_prompt"] == "The weather today is" and state["iv_tab"] == "Patching sweep"
    assert state["gen_n"] == 5 and state["tt_a"] == "cat" and state["dose_range"] == (-2.0, 3.0)
    sweep = _figures(at)[0]
    assert _title(sweep).startswith("logit diff(·Rome − ·Paris)")
    assert sweep["layout"]["xaxis"]["title"]["text"] == "source layer"
    params = _params(at)
    for name, value in query.items():
        assert params[name] == value, name
    assert "sweep_site" not in params  # defaults stay out of the link
    assert "s_iv_specs" in params  # the steering example travels as a share id

    # a change goes into the link, and the link opens the same view in a new session
    at.selectbox(key="sweep_site").set_value("attn_out").run()
    assert _params(at)["sweep_site"] == "attn_out"
    at.session_state["iv_tab"] = "Tongue vs thought"
    at.run()
    assert _params(at)["iv_tab"] == "Tongue vs thought"
    assert _params(at)["sweep_site"] == "attn_out"  # the hidden tab's settings stay in the link
    again = _page(_params(at))
    assert not again.warning, [w.value for w in again.warning]
    assert _params(again) == _params(at)
    for name in ("iv_prompt", "iv_tab", "gen_n", "tt_a", "iv_specs"):
        assert again.session_state[name] == at.session_state[name], name
    assert _figures(again) == _figures(at) and len(_figures(at)) == 1
    for view in (at, again):  # back on the sweep tab, its settings are still there
        _open(view, "Patching sweep")
        assert view.session_state["sweep_site"] == "attn_out" and view.session_state["sweep_kind"] == "layer_layer"
    assert _figures(again) == _figures(at) and "attn_out" in _title(_figures(at)[0])

    # a value that is not one of the choices: one sentence, the default is used
    odd = _page({"iv_tab": "Nope", "gen_n": "many", "gen_seed": "-3", "tt_a": "unicorn"})
    assert odd.session_state["iv_tab"] == TABS[0] and odd.session_state["gen_n"] == 12
    assert odd.session_state["gen_seed"] == 0
    assert len(odd.warning) == 4 and all(w.value.count(". ") == 0 for w in odd.warning), odd.warning
    wide = _page({"iv_tab": "Dose-response", "dose_range": "[50,-50]", "gen_n": "500"})
    assert wide.session_state["dose_range"] == (-20.0, 20.0) and wide.session_state["gen_n"] == 12
    assert len(wide.warning) == 1 and len(_figures(wide)) == 1


def test_a_long_intervention_list_and_a_long_prompt_go_through_share_ids(tmp_path):
    at = _page()
    at.selectbox(key="iv_op").set_value("ablate_heads").run()
    at.button(key="iv_add").click().run()
    long_prompt = "Once upon a time, " * 20 + "there was a"
    at.text_area(key="iv_prompt").set_value(long_prompt).run()
    assert not at.exception, at.exception
    params = _params(at)
    assert "iv_specs" not in params and "iv_prompt" not in params
    sid, pid = params["s_iv_specs"], params["s_iv_prompt"]
    assert len(sid) == len(pid) == 16 and all(c in "0123456789abcdef" for c in sid + pid)
    stored = json.loads((tmp_path / "cache" / "shares" / f"{sid}.json").read_text())["payload"]
    assert stored == at.session_state["iv_specs"] and len(stored) == 2
    assert len("".join(f"{k}={v}&" for k, v in params.items())) < 400  # the URL stays short

    fresh = _page({"s_iv_specs": sid, "s_iv_prompt": pid})
    assert not fresh.warning and not fresh.error, [w.value for w in fresh.warning]
    assert fresh.session_state["iv_specs"] == stored
    assert fresh.session_state["iv_prompt"] == long_prompt


@pytest.mark.parametrize("bad, says", [("../../etc/passwd", "not a share id"),
                                       ("0123456789abcdef", "not stored on this server")])
def test_a_bad_share_id_gives_one_sentence(bad, says):
    at = _page({"s_iv_specs": bad})
    assert not at.exception and not at.error, [e.value for e in at.error]
    messages = [w.value for w in at.warning]
    assert len(messages) == 1 and says in messages[0] and messages[0].count(". ") == 0, messages
    assert len(at.session_state["iv_specs"]) == 1 and at.session_state["iv_specs"][0]["op"] == "steer"  # default
    assert _params(at)["s_iv_specs"] != bad  # the link now holds the list shown


def test_mean_ablation_uses_the_dashboards_corpus_means(tmp_path):
    """With dashboards of the chosen SAE built, 'mean' ablation takes each feature's corpus mean."""
    from engine.core.models import load_model
    from engine.data.store_writer import build_store
    from engine.features.build import DashboardConfig, build_dashboards
    from engine.features.read import corpus_means
    from engine.sae.io import save_sae
    from tests.engine.features.test_dashboards import TEXTS, make_sae

    lm = load_model("tiny:llama")
    cache = tmp_path / "cache"
    store = build_store(lm, iter(TEXTS), cache / "activations" / "s", layers=[1], max_tokens=800, context_length=32)
    sae_dir = save_sae(make_sae(), cache / "saes" / "tiny-sae")
    build_dashboards(sae_dir, store.path, lm, None, config=DashboardConfig(batch_size=128, device="cpu"))
    expected = corpus_means(sae_dir, [3])

    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/interventions.py")
    at.run()
    at.selectbox(key="iv_op").set_value("ablate_features").run()
    at.selectbox(key="iv_sae").set_value(str(sae_dir)).run()
    at.text_input(key="iv_features").set_value("3").run()
    at.radio(key="iv_mode").set_value("mean").run()
    assert any("corpus tokens" in c.value for c in at.caption), [c.value for c in at.caption]
    at.button(key="iv_add").click().run()
    assert not at.exception, at.exception
    added = at.session_state["iv_specs"][-1]
    assert added["op"] == "ablate_features" and added["params"]["means"] == expected["means"]


def test_an_sae_at_another_layer_is_warned_and_needs_use_anyway(tmp_path, monkeypatch):
    """An SAE trained at layer 1 attached at layer 2: a warning, the add is refused until 'Use it here anyway'."""
    from engine.sae.io import save_sae
    from tests.engine.features.test_dashboards import make_sae

    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    sae_dir = save_sae(make_sae(layer=1), tmp_path / "cache" / "saes" / "tiny-sae")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/interventions.py")
    at.run()
    at.selectbox(key="iv_op").set_value("ablate_features").run()
    at.selectbox(key="iv_sae").set_value(str(sae_dir)).run()
    at.text_input(key="iv_features").set_value("3").run()
    at.selectbox(key="iv_layer").set_value(1).run()
    assert not any("trained on" in w.value for w in at.warning)
    at.selectbox(key="iv_layer").set_value(2).run()
    assert any("trained on resid_post at layer 1" in w.value for w in at.warning)
    before = len(at.session_state["iv_specs"])
    at.button(key="iv_add").click().run()
    assert any("Use it here anyway" in e.value for e in at.error)
    assert len(at.session_state["iv_specs"]) == before
    at.checkbox(key="iv_sae_anyway").check().run()
    at.button(key="iv_add").click().run()
    assert not at.exception, at.exception
    assert len(at.session_state["iv_specs"]) == before + 1 and at.session_state["iv_specs"][-1]["layer"] == 2
