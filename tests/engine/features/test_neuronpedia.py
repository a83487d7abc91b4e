"""Neuronpedia export and import: a tiny build round-trips through the batch files; the files are gzipped JSON lines
with Neuronpedia's field names; bad exports give one sentence; the CLI."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from engine.core.errors import UserError
from engine.data.store_writer import build_store
from engine.features.build import DashboardConfig, build_dashboards
from engine.features.feature_map import feature_map
from engine.features.neuronpedia import (
    ImportedDashboard,
    NeuronpediaError,
    export_neuronpedia,
    import_neuronpedia,
    open_dashboard,
)
from engine.features.read import Dashboard, list_dashboards
from engine.sae.io import save_sae
from tests.engine.features.test_dashboards import D_SAE, TEXTS, make_sae

BEFORE, AFTER = 6, 3
FEATURE_FIELDS = ("modelId", "layer", "index", "maxActApprox", "frac_nonzero", "freq_hist_data_bar_heights",
                  "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                  "pos_str", "pos_values", "neg_str", "neg_values", "topkCosSimIndices", "topkCosSimValues")
ACTIVATION_FIELDS = ("id", "modelId", "layer", "index", "tokens", "values", "maxValue", "maxValueTokenIndex",
                     "minValue", "binMin", "binMax", "qualifyingTokenIndex")


@pytest.fixture(scope="module")
def lm():
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama")
    return from_model(model, tok, name="tiny:llama")


@pytest.fixture(scope="module")
def trip(lm, tmp_path_factory):
    """(original dashboard, export source folder, imported dashboard)."""
    root = tmp_path_factory.mktemp("np")
    build_store(lm, iter(TEXTS), root / "store", layers=[1], max_tokens=1500, context_length=32, batch_size=8,
                dtype="float32")
    sae_dir = save_sae(make_sae(), root / "sae")
    config = DashboardConfig(top_k=5, n_bins=16, n_intervals=4, samples_per_interval=2, batch_size=97, n_logits=6,
                             n_neighbours=4, device="cpu")
    dash = Dashboard.open(build_dashboards(sae_dir, root / "store", lm, root / "dash", config=config))
    source = export_neuronpedia(dash.path, root / "export", lm.tokenizer, features_per_batch=10, before=BEFORE,
                                after=AFTER)
    imported = open_dashboard(import_neuronpedia(root / "export", root / "dashboards" / "imported"))
    return dash, source, imported


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max()) if a.size else 0.0


def test_round_trip_gives_the_same_dashboard(trip, lm):
    dash, _, imp = trip
    assert isinstance(imp, ImportedDashboard) and imp.manifest["source"] == "neuronpedia"
    assert "density" in imp.manifest["approximate"] and imp.d_sae == D_SAE
    assert (imp.site, imp.layer, imp.manifest["n_rows"]) == (dash.site, dash.layer, dash.manifest["n_rows"])
    diffs = {}
    order = "ORDER BY feature"
    a, b = dash.query(f"SELECT * FROM features {order}"), imp.query(f"SELECT * FROM features {order}")
    diffs["max_act"] = _max_diff(a["max_act"], b["max_act"])
    diffs["density"] = _max_diff(a["density"], b["density"])
    assert a["count"].tolist() == b["count"].tolist() and a["dead"].tolist() == b["dead"].tolist()
    assert a["top_logits"].tolist() == b["top_logits"].tolist()
    assert a["bottom_logits"].tolist() == b["bottom_logits"].tolist()
    assert a["act_tokens"].tolist() == b["act_tokens"].tolist()
    keys = "feature, sign, rank"
    a, b = (d.query(f"SELECT {keys}, token, value FROM logits ORDER BY {keys}") for d in (dash, imp))
    assert a[["feature", "sign", "rank", "token"]].equals(b[["feature", "sign", "rank", "token"]])
    diffs["logits"] = _max_diff(a["value"], b["value"])
    a, b = (d.query("SELECT feature, rank, neighbour, cosine FROM neighbours ORDER BY feature, rank") for d in (dash, imp))
    assert a[["feature", "rank", "neighbour"]].equals(b[["feature", "rank", "neighbour"]])
    diffs["cosine"] = _max_diff(a["cosine"], b["cosine"])
    a, b = (d.query("SELECT feature, bin, lo, hi, count FROM histograms ORDER BY feature, bin") for d in (dash, imp))
    assert a[["feature", "bin", "count"]].equals(b[["feature", "bin", "count"]])
    diffs["histogram edges"] = max(_max_diff(a["lo"], b["lo"]), _max_diff(a["hi"], b["hi"]))
    a, b = (d.query("SELECT feature, interval, rank, lo, hi, act FROM intervals ORDER BY feature, interval, rank")
            for d in (dash, imp))
    assert a[["feature", "interval", "rank"]].equals(b[["feature", "interval", "rank"]])
    diffs["interval acts"] = max(_max_diff(a[c], b[c]) for c in ("lo", "hi", "act"))
    # top examples: the same activations, and the same token windows with the same values on every token
    diffs["top acts"] = diffs["window values"] = 0.0
    for f in range(D_SAE):
        mine, theirs = dash.feature(f)["top"], imp.feature(f)["top"]
        assert mine["rank"].tolist() == theirs["rank"].tolist()
        diffs["top acts"] = max(diffs["top acts"], _max_diff(mine["act"], theirs["act"]))
        want = dash.contexts(f, mine["row"].tolist(), lm.tokenizer, before=BEFORE, after=AFTER)
        got = imp.contexts(f, theirs["row"].tolist(), before=BEFORE, after=AFTER)
        for w, g in zip(want, got, strict=True):
            assert w["tokens"] == g["tokens"] and w["focus"] == g["focus"]
            diffs["window values"] = max(diffs["window values"], _max_diff(w["acts"], g["acts"]))
    print("round-trip max differences:", diffs)
    assert max(diffs.values()) < 1e-5
    assert sum(len(dash.feature(f)["top"]) for f in range(D_SAE)) > D_SAE  # the SAE fires: the test is not empty


def test_imported_dashboard_serves_the_feature_page(trip):
    dash, _, imp = trip
    live = int(imp.query("SELECT feature FROM features WHERE NOT dead ORDER BY density DESC LIMIT 1").iloc[0, 0])
    page = imp.feature(live)
    assert len(page["top"]) and len(page["logits"]) and len(page["neighbours"]) and len(page["histogram"])
    assert len(page["cooccurring"]) == 0  # present but empty
    short = imp.contexts(live, page["top"]["row"].tolist()[:1])  # the page's default window: 10 before, 4 after
    assert short[0]["acts"][short[0]["focus"]] == pytest.approx(float(page["top"]["act"].iloc[0]), rel=1e-6)
    assert imp.summary()["features"] == D_SAE and imp.feature_table(hide_dense=False)["feature"].size
    assert [e["name"] for e in list_dashboards(imp.path.parent)] == ["imported"]
    with pytest.raises(NeuronpediaError, match="without SAE weights"):
        feature_map(imp, "pca")
    with pytest.raises(NeuronpediaError, match="not an example"):
        imp.contexts(live, [10**6])
    with pytest.raises(NeuronpediaError, match="imported from Neuronpedia"):
        export_neuronpedia(imp, imp.path.parent / "again", None)
    assert type(open_dashboard(dash.path)) is Dashboard


def test_export_files_are_gzipped_json_lines_with_neuronpedia_fields(trip):
    dash, source, _ = trip
    assert source.parent.name == "tiny-llama" and source.name == "1-res-le-48"
    assert {p.name for p in source.iterdir()} == {"features", "activations", "model.jsonl", "source.jsonl",
                                                   "sourceset.jsonl", "release.jsonl"}
    names = sorted(p.name for p in (source / "features").iterdir())
    assert names == sorted(p.name for p in (source / "activations").iterdir()) == [f"batch-{i}.jsonl.gz"
                                                                                    for i in range(5)]
    features, activations = [], []
    for folder, into in (("features", features), ("activations", activations)):
        for path in sorted((source / folder).iterdir()):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                into += [json.loads(line) for line in handle]
    assert [r["index"] for r in features] == [str(f) for f in range(D_SAE)]
    for record in features:
        assert set(FEATURE_FIELDS) <= set(record) and record["layer"] == "1-res-le-48"
        assert record["modelId"] == "tiny-llama" and record["logits_hist_data_bar_heights"] == []
        assert len(record["pos_str"]) == len(record["pos_values"]) == 6
        assert len(record["freq_hist_data_bar_heights"]) in (0, 16)
    top = [r for r in activations if r["binMin"] == -1]
    assert len(top) == int(dash.query("SELECT count(*) FROM top_examples").iloc[0, 0])
    assert len(activations) - len(top) == int(dash.query("SELECT count(*) FROM intervals").iloc[0, 0])
    for record in activations:
        assert set(ACTIVATION_FIELDS) <= set(record) and len(record["tokens"]) == len(record["values"])
        assert record["values"][record["maxValueTokenIndex"]] == record["maxValue"] == max(record["values"])
        assert len(record["tokens"]) <= BEFORE + AFTER + 1
    assert len({r["id"] for r in activations}) == len(activations)
    for name in ("model", "source", "sourceset", "release"):
        lines = (source / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1 and isinstance(json.loads(lines[0]), dict)
    assert json.loads((source / "source.jsonl").read_text())["id"] == "1-res-le-48"


def _gz(path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def _feature(index=0, **extra) -> str:
    return json.dumps({"modelId": "m", "layer": "3-res-x", "index": index, "frac_nonzero": 0.1, "maxActApprox": 2.0,
                       **extra})


def _activation(index=0, **extra) -> str:
    return json.dumps({"modelId": "m", "layer": "3-res-x", "index": index, "tokens": ["a", "b"],
                       "values": [0.5, 2.0], **extra})


@pytest.mark.parametrize("features, activations, message", [
    (None, None, "does not exist"),
    ([], None, "holds no features/batch"),
    ([""], None, "holds no feature records"),
    (b"not gzip at all", None, "not a valid gzip file"),
    ("cut", None, "not a valid gzip file"),
    ([_feature(), _feature(1)[:-9]], None, "Line 2 of features/batch-0.jsonl.gz is not valid JSON"),
    (["[1, 2]"], None, "a list, not a JSON object"),
    ([_feature(frac_nonzero="often")], None, "'frac_nonzero' must be a number, not a string"),
    ([_feature(index=-1)], None, "'index' must be a feature number"),
    ([_feature(index=True)], None, "'index' must be a feature number, not a boolean"),
    ([_feature(pos_str=["a"], pos_values=[1.0, 2.0])], None, "different lengths"),
    ([_feature(topkCosSimIndices=[1.5], topkCosSimValues=[0.3])], None, "list of feature numbers, not a number"),
    ([_feature(), _feature()], None, "appears twice"),
    ([_feature(), _feature(1, layer="4-res-x")], None, "mixes layer"),
    ([_feature()], [_activation(tokens="ab")], "'tokens' must be a list of strings, not a string"),
    ([_feature()], [_activation(values=[1.0])], "same length"),
    ([_feature()], [_activation(qualifyingTokenIndex=5)], "token index below 2"),
    ([_feature()], [_activation(index=7)], "feature 7 has examples but no record"),
])
def test_bad_exports_give_one_sentence(tmp_path, features, activations, message):
    export = tmp_path / "export"
    if features is not None:
        (export / "features").mkdir(parents=True)
    if isinstance(features, bytes):
        (export / "features" / "batch-0.jsonl.gz").write_bytes(features)
    elif features == "cut":  # a gzip stream cut in the middle
        _gz(export / "features" / "batch-0.jsonl.gz", [_feature(i) for i in range(200)])
        data = (export / "features" / "batch-0.jsonl.gz").read_bytes()
        (export / "features" / "batch-0.jsonl.gz").write_bytes(data[:len(data) // 2])
    elif features:
        _gz(export / "features" / "batch-0.jsonl.gz", features)
    if activations:
        _gz(export / "activations" / "batch-0.jsonl.gz", activations)
    with pytest.raises(NeuronpediaError, match=message) as info:
        import_neuronpedia(export, tmp_path / "out")
    text = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in text and text.endswith(".")
    assert not (tmp_path / "out" / "manifest.json").exists() and not list(tmp_path.glob("out/.*.tmp"))


def test_a_minimal_neuronpedia_export_imports(tmp_path):
    """Neuronpedia's own shape: no metadata, quantile bins of unequal width, no qualifyingTokenIndex, gaps in ids."""
    root = tmp_path / "exports" / "gpt2-small" / "8-att-kk"
    _gz(root / "features" / "batch-0.jsonl.gz", [
        _feature(0, layer="8-att-kk", freq_hist_data_bar_heights=[3, 1], freq_hist_data_bar_values=[0.5, 1.5],
                 pos_str=[" cat"], pos_values=[1.2], topkCosSimIndices=[0, 4], topkCosSimValues=[1.0, 0.5]),
        _feature(4, layer="8-att-kk", frac_nonzero=0.0)])
    _gz(root / "activations" / "batch-0.jsonl.gz", [
        _activation(0, layer="8-att-kk", maxValueTokenIndex=1),
        _activation(0, layer="8-att-kk", binMin=0.0, binMax=0.3, values=[0.2, 0.0]),
        _activation(0, layer="8-att-kk", binMin=0.3, binMax=1.0, values=[0.0, 0.9])])
    dash = open_dashboard(import_neuronpedia(tmp_path / "exports", tmp_path / "out"))
    assert (dash.d_sae, dash.site, dash.layer, dash.manifest["n_rows"]) == (5, "attn_out", 8, 0)
    page = dash.feature(0)
    assert page["top"]["act"].tolist() == [2.0] and page["neighbours"]["neighbour"].tolist() == [4]
    assert page["intervals"]["interval"].tolist() == [1, 0] and page["stats"]["mean_act"] == pytest.approx(0.75)
    assert dash.feature(2)["stats"]["dead"] and dash.feature(4)["stats"]["dead"]
    assert dash.contexts(0, page["top"]["row"].tolist())[0] == {"row": 0, "tokens": ["a", "b"], "acts": [0.5, 2.0],
                                                                "focus": 1}
    _gz(tmp_path / "exports" / "gpt2-small" / "9-att-kk" / "features" / "batch-0.jsonl.gz", [_feature()])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuronpediaError, match="no Neuronpedia export"):
        import_neuronpedia(tmp_path / "empty", tmp_path / "out2")
    with pytest.raises(NeuronpediaError, match="holds 2 exported sources"):
        import_neuronpedia(tmp_path / "exports", tmp_path / "out2")


def test_cli_export_and_import(trip, lm, tmp_path, monkeypatch, capsys):
    import engine.cli.common as common
    import engine.core.models

    dash, _, _ = trip
    if "engine.cli.neuronpedia" not in common.COMMAND_MODULES:
        monkeypatch.setattr(common, "COMMAND_MODULES", [*common.COMMAND_MODULES, "engine.cli.neuronpedia"])
    monkeypatch.setattr(engine.core.models, "load_model", lambda *a, **k: lm)
    code = common.main(["neuronpedia", "export", "--dashboards", str(dash.path), "--out", str(tmp_path / "e"),
                        "--batch-features", "30", "--source-set", "res-test", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["path"] == str(tmp_path / "e" / "tiny-llama" / "1-res-test") and payload["batches"] == 2
    assert common.main(["neuronpedia", "import", "--export", str(tmp_path / "e"), "--out", str(tmp_path / "d"),
                        "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == D_SAE
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    assert common.main(["neuronpedia", "import", "--export", str(tmp_path / "e" / "tiny-llama" / "1-res-test")]) == 0
    assert [e["name"] for e in list_dashboards()] == ["neuronpedia-1-res-test"]
    assert common.main(["neuronpedia", "import", "--export", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert common.main(["neuronpedia", "export", "--dashboards", str(dash.path), "--out", str(tmp_path / "f"),
                        "--source-set", "bad set!"]) == 2
    assert "may only hold" in capsys.readouterr().err
