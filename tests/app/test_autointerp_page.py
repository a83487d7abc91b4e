"""AppTest: labels, explanations, scores, search and the explain form on the SAE feature browser, and labelled
SAE-feature pickers on the interventions page (tiny random Llama, tiny SAE and store; no download, no LLM)."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
DASH = ("dashboards", "tiny-sae-dash")


@pytest.fixture(scope="module")
def ai_cache(feature_cache):
    return feature_cache


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, ai_cache):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(ai_cache))


def _folder(cache: Path) -> Path:
    return cache.joinpath(*DASH)


def _live(cache: Path, n: int = 2) -> list[int]:
    from engine.features.read import Dashboard

    dash = Dashboard.open(_folder(cache))
    return [int(f) for f in dash.query(f"SELECT feature FROM features WHERE NOT dead AND NOT dense "
                                       f"ORDER BY count DESC LIMIT {n}")["feature"]]


@pytest.fixture
def explained(ai_cache):
    """Explanations for two live features and scores (detection 0.9 and 0.4), removed afterwards."""
    folder = _folder(ai_cache)
    good, poor = _live(ai_cache)
    pd.DataFrame({"feature": [good, poor], "explanation": ["volcanoes erupting lava", "the letter q"],
                  "explainer": ["local:test", "local:test"], "prompt_hash": ["h", "h"],
                  "time": ["2026-01-01T00:00:00Z"] * 2, "error": ["", ""], "seconds": [0.1, 0.1]}
                 ).to_parquet(folder / "explanations.parquet", index=False)
    pd.DataFrame({"feature": [good, poor], "explainer": ["local:test"] * 2, "scorer": ["local:test"] * 2,
                  "explanation": ["volcanoes erupting lava", "the letter q"], "detection": [0.9, 0.4],
                  "detection_n": [20, 20], "fuzzing": [0.75, 0.5], "fuzzing_n": [16, 16], "invalid": [0, 0],
                  "prompt_hash": ["h", "h"], "time": ["2026-01-01T00:00:01Z"] * 2, "error": ["", ""],
                  "detection_auc": [0.8, float("nan")], "fuzzing_auc": [0.625, float("nan")]}
                 ).to_parquet(folder / "scores.parquet", index=False)
    yield good, poor
    for name in ("explanations.parquet", "scores.parquet"):
        (folder / name).unlink(missing_ok=True)


def _open(query: dict | None = None, page: str = "pages/features.py") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def _labels(cache: Path) -> dict[int, str]:
    from engine.autointerp.labels import labels_dict

    return labels_dict(_folder(cache))


def test_labels_are_built_on_first_open_and_shown_everywhere(ai_cache):
    (_folder(ai_cache) / "labels.parquet").unlink(missing_ok=True)
    live = _live(ai_cache, 1)[0]
    at = _open({"sae": "tiny-sae", "feature": str(live)})
    assert not at.error, [e.value for e in at.error]
    assert (_folder(ai_cache) / "labels.parquet").is_file()  # built on the first open
    labels = _labels(ai_cache)
    assert labels[live]
    # the feature list: a label column equal to labels.parquet
    table = at.dataframe(key="features_table").value
    assert "label" in table.columns
    assert all(label == labels[int(f)] for f, label in zip(table["feature"], table["label"]))
    assert (table["label"] != "").any()
    # the feature page's title, and the neighbour / fires-together buttons
    assert any(s.value == f"Feature #{live} — {labels[live]}" for s in at.subheader), [s.value for s in at.subheader]
    buttons = [b for b in at.button if str(b.key).startswith(("neighbour_", "cooccur_"))]
    named = [(b, labels[int(b.label.split(" · ")[0].lstrip("#"))].split(" · ")[0]) for b in buttons]
    named = [(b, first) for b, first in named if first]
    assert named  # some neighbours fire, so they have a label
    assert all(first.startswith(b.label.split(" · ", 2)[2].rstrip("…")) for b, first in named)
    # no explanation yet: the page says how to get one
    assert any("python -m engine explain" in c.value for c in at.caption)
    # what fires on my text: labelled features
    at.text_area(key="fires_text").input("the quick brown fox").run()
    ranked = at.dataframe(key="fires_ranked").value
    assert "label" in ranked.columns
    assert all(label == (labels[int(f)] or label) for f, label in zip(ranked["feature"], ranked["label"]))
    assert not at.exception and not at.error


def test_explanations_scores_and_the_min_detection_filter(ai_cache, explained):
    good, poor = explained
    at = _open({"sae": "tiny-sae", "feature": str(good)})
    assert not at.error, [e.value for e in at.error]
    text = " ".join(m.value for m in at.markdown)
    assert "volcanoes erupting lava" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Detection"] == "0.90" and metrics["Fuzzing"] == "0.75"
    captions = " ".join(c.value for c in at.caption)
    assert "local:test" in captions and "detection 20 trials" in captions and "fuzzing 16 trials" in captions
    assert "ROC AUC of the scorer's yes-minus-no logit: detection 0.80, fuzzing 0.62" in captions
    table = at.dataframe(key="features_table").value
    assert {"explanation", "detection", "fuzzing"} <= set(table.columns)
    row = table.set_index("feature").loc[good]
    assert row["explanation"] == "volcanoes erupting lava" and row["detection"] == pytest.approx(0.9)
    # the score filter keeps only the well-explained feature; sorting by score puts it first
    at.slider(key="features_min_detection").set_value(0.5).run()
    assert list(at.dataframe(key="features_table").value["feature"]) == [good]
    at.slider(key="features_min_detection").set_value(0.0).run()
    at.selectbox(key="features_sort").set_value("detection score").run()
    ordered = list(at.dataframe(key="features_table").value["feature"])
    assert ordered[:2] == [good, poor] and len(ordered) > 2
    # the poorly explained feature's page
    at.number_input(key="feature_id").set_value(poor).run()
    assert {m.label: m.value for m in at.metric}["Detection"] == "0.40"
    assert "ROC AUC" not in " ".join(c.value for c in at.caption)  # an endpoint's scores have no grade
    assert not at.exception and not at.error


def test_a_failed_score_shows_its_reason(ai_cache, explained):
    """A feature whose scoring failed (here: too few contexts to hold out) says why, not "not scored yet"; a newer
    successful score of another feature is unaffected."""
    good, poor = explained
    scores = _folder(ai_cache) / "scores.parquet"
    table = pd.read_parquet(scores)
    failed = table[table["feature"] == poor].assign(
        detection=float("nan"), detection_n=0, fuzzing=float("nan"), fuzzing_n=0, detection_auc=float("nan"),
        fuzzing_auc=float("nan"), error="No held-out activating contexts: the feature fired on too few contexts.")
    table[table["feature"] != poor].pipe(lambda kept: pd.concat([kept, failed])).to_parquet(scores, index=False)
    at = _open({"sae": "tiny-sae", "feature": str(poor)})
    captions = " ".join(c.value for c in at.caption)
    assert "not scored: No held-out activating contexts" in captions and "not scored yet" not in captions
    assert not {"Detection", "Fuzzing"} & {m.label for m in at.metric}  # no score tiles for a failed score
    at.number_input(key="feature_id").set_value(good).run()
    assert {m.label: m.value for m in at.metric}["Detection"] == "0.90"
    assert "not scored" not in " ".join(c.value for c in at.caption)
    assert not at.exception and not at.error


def test_search_by_a_label_word_and_an_explanation_word(ai_cache, explained):
    good, _ = explained
    at = _open()
    at.text_input(key="features_find").input("volcanoes").run()
    hits = at.dataframe(key="features_find_results").value
    assert list(hits["feature"])[:1] == [good] and hits["explanation"].iloc[0] == "volcanoes erupting lava"
    # a rare word of one feature's label finds that feature
    labels = _labels(ai_cache)
    docs = {f: set(re.findall(r"\w+", label.lower())) for f, label in labels.items() if label}
    frequency: dict[str, int] = {}
    for words in docs.values():
        for word in words:
            frequency[word] = frequency.get(word, 0) + 1
    word = min(frequency, key=lambda w: (frequency[w], w))
    wanted = {f for f, words in docs.items() if word in words}
    at.text_input(key="features_find").input(word).run()
    hits = at.dataframe(key="features_find_results").value
    assert wanted <= set(hits["feature"]) and "label" in hits.columns
    assert any("match" in c.value for c in at.caption)
    at.text_input(key="features_find").input("zzzzqqq").run()
    assert any("No feature matches" in c.value for c in at.caption)
    assert not at.exception and not at.error


def test_features_like_text_needs_no_explanation(ai_cache):
    at = _open()
    at.radio(key="features_find_mode").set_value("like").run()
    at.text_input(key="features_find").input("the lazy dog sleeps").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    hits = at.dataframe(key="features_find_results").value
    assert len(hits) > 0 and {"feature", "relative", "activation", "label"} <= set(hits.columns)
    assert list(hits["relative"]) == sorted(hits["relative"], reverse=True)


def test_explain_form_submits_a_job_spec_or_shows_the_command(ai_cache, monkeypatch):
    import components.autointerp_ui as ui

    folder = str(_folder(ai_cache).resolve())
    monkeypatch.setattr(ui, "submit_job", None)
    at = _open()
    listed = [int(f) for f in at.dataframe(key="features_table").value["feature"]]
    at.number_input(key="ai_first").set_value(3).run()
    at.button(key="ai_start").click().run()
    assert not at.exception and not at.error
    assert any("job runner is not available" in w.value for w in at.warning)
    command = at.code[0].value
    assert command.startswith("python -m engine explain --dashboard ") and "--local smollm2-135m" in command
    assert f"--features {ui.compact_ranges(listed[:3])}" in command

    submitted: list[dict] = []

    class Runner:  # the real submit_job path, with a runner that records instead of starting workers
        def submit(self, spec, rerun=False):
            submitted.append(spec)
            return types.SimpleNamespace(id=f"{spec['kind']}-abc", state="queued")

    import components.jobs_ui as jobs_ui

    monkeypatch.setattr(jobs_ui, "get_runner", lambda: Runner())
    monkeypatch.setattr(ui, "submit_job", jobs_ui.submit_job)
    at.button(key="ai_start").click().run()
    assert submitted[-1] == {"kind": "explain", "params": {"dashboard": folder, "features": listed[:3],
                                                          "backend": {"kind": "local", "model": "smollm2-135m"}}}
    assert any("explain-abc" in s.value for s in at.info)
    # an endpoint: the key's variable NAME travels, never a key; "all" sends no feature list
    at.radio(key="ai_backend").set_value("openai").run()
    at.text_input(key="ai_api_key_env").input("sk-abc123-secret").run()
    assert any("NAME of the environment variable" in e.value for e in at.error)
    assert at.button(key="ai_start").disabled
    at.text_input(key="ai_api_key_env").input("MY_KEY").run()
    at.radio(key="ai_which").set_value("all").run()
    at.button(key="ai_score").click().run()
    assert submitted[-1] == {"kind": "score", "params": {"dashboard": folder, "backend": {
        "kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "api_key_env": "MY_KEY"}}}
    # chosen features are checked against the SAE
    at.radio(key="ai_which").set_value("selected").run()
    at.text_input(key="ai_features").input("1-3, 999").run()
    assert any("Feature 999 does not exist" in e.value for e in at.error)
    assert not at.exception


def test_intervention_pickers_show_labels(ai_cache):
    labels = _labels(ai_cache)
    if not labels:
        from engine.autointerp.labels import build_labels

        build_labels(_folder(ai_cache))
        labels = _labels(ai_cache)
    sae_dir = str(ai_cache / "saes" / "tiny-sae")
    at = _open(page="pages/interventions.py")
    at.radio(key="iv_dir_source").set_value("SAE feature").run()
    at.selectbox(key="iv_sae").set_value(sae_dir).run()
    picker = at.selectbox(key="iv_feature")
    assert len(picker.options) == 256
    labelled = next(f for f in range(256) if labels.get(f))
    assert picker.options[labelled].startswith(f"#{labelled} · ")
    picker.set_value(labelled).run()
    at.button(key="iv_add").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["iv_specs"][-1]["params"]["feature"] == labelled
    # ablation: the typed ids get their labels, and a labelled picker adds one
    at.selectbox(key="iv_op").set_value("ablate_features").run()
    at.text_input(key="iv_features").set_value(str(labelled)).run()
    assert any(c.value.startswith(f"#{labelled} · ") for c in at.caption), [c.value for c in at.caption]
    other = next(f for f in range(labelled + 1, 256) if labels.get(f))
    at.selectbox(key="iv_features_pick").set_value(other).run()
    assert at.text_input(key="iv_features").value == f"{labelled}, {other}"
    assert not at.exception and not at.error


def test_a_damaged_explanations_table_is_one_sentence(ai_cache):
    path = _folder(ai_cache) / "explanations.parquet"
    path.write_bytes(b"not parquet")
    try:
        at = _open()
        assert not at.exception
        assert any("cannot be read" in c.value for c in at.caption)
        assert "label" in at.dataframe(key="features_table").value.columns
    finally:
        path.unlink(missing_ok=True)
