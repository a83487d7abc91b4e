"""Explaining end to end against the local HTTP server: the job, failures kept per feature, resume, cancel."""
from __future__ import annotations

import pandas as pd

from engine.autointerp.explain import COLUMNS, explain_features, read_explanations
from engine.autointerp.jobs import JOB_KINDS, explain_job
from engine.autointerp.prompts import EXPLAINER_SYSTEM
from engine.autointerp.tables import EXPLANATIONS
from engine.features.read import Dashboard
from tests.engine.autointerp.fakes import KEY_ENV


def live(folder) -> list[int]:
    return Dashboard.open(folder).query("SELECT feature FROM features WHERE NOT dead ORDER BY feature")[
        "feature"].tolist()


def spec(server, **extra) -> dict:
    return {"kind": "openai", "base_url": server.url, "model": "rule-model", "api_key_env": KEY_ENV,
            "backoff": 0.01, "concurrency": 3, "batch_size": 4, **extra}


def test_explain_job_end_to_end_and_rerun_skips(plain_dashboard, server, tmp_path):
    seen = []
    result = explain_job({"dashboard": str(plain_dashboard), "backend": spec(server), "out_dir": str(tmp_path)},
                         progress=lambda f, m: seen.append(f))
    features = live(plain_dashboard)
    assert len(features) >= 4 and result["explained"] == len(features) and result["failed"] == 0
    table = pd.read_parquet(tmp_path / EXPLANATIONS)
    assert list(table.columns) == list(COLUMNS) and table["feature"].tolist() == features
    assert table["explanation"].str.startswith("the word").all() and (table["error"] == "").all()
    assert table["explainer"].unique().tolist() == [f"openai:rule-model@{server.url.split('/')[2]}"]
    assert table["prompt_hash"].str.len().eq(16).all() and table["time"].str.endswith("Z").all()
    assert seen == sorted(seen) and seen[-1] == 1.0
    asked = server.count(EXPLAINER_SYSTEM)
    again = explain_job({"dashboard": str(plain_dashboard), "backend": spec(server), "out_dir": str(tmp_path)})
    assert again["skipped"] == len(features) and again["explained"] == 0 and server.count(EXPLAINER_SYSTEM) == asked
    assert set(JOB_KINDS) == {"explain", "score", "labels"}


def test_failures_are_kept_per_feature_and_only_they_are_retried(plain_dashboard, server, tmp_path):
    features = live(plain_dashboard)[:6]
    server.faults.extend(["garbage", "empty", "nochoices"])  # three of the first requests misbehave
    from engine.autointerp.backends import backend_from_spec

    backend = backend_from_spec(spec(server, concurrency=1, batch_size=10))
    first = explain_features(plain_dashboard, backend, features, out_dir=tmp_path)
    assert first["failed"] == 3 and first["explained"] == 3
    table = pd.read_parquet(tmp_path / EXPLANATIONS).set_index("feature")
    failed = table[table["error"] != ""]
    assert sorted(failed.index) == features[:3]
    reasons = " ".join(failed["error"])
    assert "not JSON" in reasons and "no choices" in reasons and "held no explanation" in reasons
    assert (failed["explanation"] == "").all() and (table.loc[features[3:], "explanation"] != "").all()
    assert read_explanations(tmp_path)["feature"].tolist() == features[3:]  # successful ones only
    asked = server.count(EXPLAINER_SYSTEM)
    second = explain_features(plain_dashboard, backend, features, out_dir=tmp_path)
    assert second == {**second, "explained": 3, "failed": 0, "skipped": 3}
    assert server.count(EXPLAINER_SYSTEM) == asked + 3
    assert (pd.read_parquet(tmp_path / EXPLANATIONS)["error"] == "").all()


def test_cancel_between_batches_keeps_finished_work_and_resumes(plain_dashboard, server, tmp_path):
    from engine.autointerp.backends import backend_from_spec

    backend = backend_from_spec(spec(server, batch_size=2))
    calls = []
    stopped = explain_features(plain_dashboard, backend, out_dir=tmp_path,
                               should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert stopped["stopped"] and stopped["explained"] == 4
    assert len(pd.read_parquet(tmp_path / EXPLANATIONS)) == 4
    rest = explain_features(plain_dashboard, backend, out_dir=tmp_path)
    assert not rest["stopped"] and rest["skipped"] == 4 and rest["explained"] == len(live(plain_dashboard)) - 4


def test_a_second_explainer_adds_rows_and_the_newest_success_is_read(plain_dashboard, server, tmp_path):
    from engine.autointerp.backends import backend_from_spec

    features = live(plain_dashboard)[:2]
    explain_features(plain_dashboard, backend_from_spec(spec(server)), features, out_dir=tmp_path)
    other = backend_from_spec(spec(server, model="other-model"))
    explain_features(plain_dashboard, other, features, out_dir=tmp_path)
    table = pd.read_parquet(tmp_path / EXPLANATIONS)
    assert len(table) == 4 and table["explainer"].nunique() == 2
    assert len(read_explanations(tmp_path)) == 2
    assert read_explanations(tmp_path, other.name)["explainer"].unique().tolist() == [other.name]


def test_explaining_a_feature_that_never_fired_fails_with_a_reason(plain_dashboard, server, tmp_path):
    from engine.autointerp.backends import backend_from_spec

    dead = Dashboard.open(plain_dashboard).query("SELECT feature FROM features WHERE dead")["feature"].tolist()
    assert 11 in dead
    result = explain_features(plain_dashboard, backend_from_spec(spec(server)), [11], out_dir=tmp_path)
    assert result["failed"] == 1 and server.count(EXPLAINER_SYSTEM) == 0
    assert "never fired" in pd.read_parquet(tmp_path / EXPLANATIONS)["error"].iloc[0]
