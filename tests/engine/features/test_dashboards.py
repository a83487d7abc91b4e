"""Feature dashboards: one streaming pass equals brute force; logit effects; bad input; CLI; results that
leave the device (no shared SAE moved, no half-precision tensor handed to numpy)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from engine.core.errors import UserError
from engine.data.store_writer import build_store
from engine.features.accumulate import FeatureAccumulator, ceil_log2
from engine.features.build import DashboardConfig, build_dashboards
from engine.features.decoder import decoder_neighbours, residual_directions
from engine.features.feature_map import decoder_cosines, feature_map
from engine.features.folder import DashboardError, write_parquet
from engine.features.read import Dashboard, corpus_means, list_dashboards
from engine.features.text import text_activations
from engine.sae.base import SAE, SAEConfig
from engine.sae.io import save_sae

D_SAE = 48
TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, then {i * 7} cats sat on mats."
         for i in range(30)]


def make_sae(arch: str = "standard", seed: int = 0, layer: int = 1, d_in: int = 32, model: str = "tiny:llama",
             k: int | None = None) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=D_SAE, architecture=arch, k=k if arch == "topk" else None,
                        metadata={"hook_name": f"blocks.{layer}.hook_resid_post", "model_name": model}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.05)
        sae.b_enc.sub_(0.5)  # sparse-ish: most features off most of the time
    return sae


@pytest.fixture(scope="module")
def lm():
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama")
    return from_model(model, tok, name="tiny:llama")


@pytest.fixture(scope="module")
def store_dir(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    build_store(lm, iter(TEXTS), out, layers=[1], max_tokens=3000, context_length=32, batch_size=8,
                dtype="float32")
    return out


@pytest.fixture(scope="module")
def built(lm, store_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    sae_dir = save_sae(make_sae(), root / "sae")
    config = DashboardConfig(top_k=7, n_bins=16, n_intervals=5, samples_per_interval=3, batch_size=97,
                             n_logits=6, n_neighbours=4, device="cpu")
    out = build_dashboards(sae_dir, store_dir, lm, root / "dash", config=config)
    return Dashboard.open(out, sae_dir), sae_dir, config


def brute_force(dash: Dashboard):
    store = dash.store()
    rows = torch.nonzero(store.positions() != 0).squeeze(1)
    with torch.no_grad():
        acts = dash.sae().encode(store.read("resid_post", 1, rows))
    return rows, acts


def test_counts_max_topk_and_histograms_equal_brute_force(built):
    dash, _, config = built
    rows, acts = brute_force(dash)
    table = dash.query("SELECT * FROM features ORDER BY feature")
    assert len(table) == D_SAE and dash.manifest["n_rows"] == rows.numel()
    assert (acts > 0).any(0).sum() > D_SAE // 2  # the test SAE really fires
    top = dash.query("SELECT feature, rank, row, act FROM top_examples ORDER BY feature, rank")
    hist = dash.query("SELECT feature, bin, lo, hi, count FROM histograms ORDER BY feature, bin")
    for f in range(D_SAE):
        column = acts[:, f]
        positive = column[column > 0]
        assert int(table["count"][f]) == positive.numel()
        assert math.isclose(float(table["density"][f]), positive.numel() / rows.numel(), rel_tol=1e-9)
        assert bool(table["dead"][f]) == (positive.numel() == 0)
        if positive.numel() == 0:
            assert f not in set(top["feature"]) and f not in set(hist["feature"])
            continue
        assert float(table["max_act"][f]) == pytest.approx(float(positive.max()), rel=1e-6)
        assert float(table["mean_act"][f]) == pytest.approx(float(positive.mean()), rel=1e-5)
        # top-k: same values in the same order, and the rows hold those values
        expected = column.topk(min(config.top_k, positive.numel())).values
        mine = top[top["feature"] == f]
        assert torch.allclose(torch.tensor(mine["act"].to_numpy()), expected, rtol=1e-6)
        row_to_index = {int(r): i for i, r in enumerate(rows)}
        got = torch.tensor([float(column[row_to_index[int(r)]]) for r in mine["row"]])
        assert torch.allclose(got, expected, rtol=1e-6)
        # histogram: equal-width bins on [0, 2**ceil(log2(max))], computed here with numpy-free plain math
        upper = 2.0 ** math.ceil(math.log2(float(positive.max())))
        counts = [0] * config.n_bins
        for value in positive.tolist():
            counts[min(int(value / upper * config.n_bins), config.n_bins - 1)] += 1
        mine = hist[hist["feature"] == f]
        assert dict(zip(mine["bin"].tolist(), mine["count"].tolist())) == {b: c for b, c in enumerate(counts) if c}
        assert float(mine["hi"].max()) <= upper * (1 + 1e-6)


def test_interval_samples_fall_in_their_intervals(built):
    dash, _, config = built
    rows, acts = brute_force(dash)
    samples = dash.query("SELECT * FROM intervals ORDER BY feature, interval, rank")
    assert len(samples) > D_SAE
    table = dash.query("SELECT feature, max_act FROM features").set_index("feature")["max_act"]
    row_to_index = {int(r): i for i, r in enumerate(rows)}
    for record in samples.itertuples():
        top = float(table[record.feature])
        lo, hi = record.interval * top / config.n_intervals, (record.interval + 1) * top / config.n_intervals
        assert lo - 1e-6 <= record.act <= hi + 1e-6 and record.lo == pytest.approx(lo, rel=1e-5)
        assert float(acts[row_to_index[int(record.row)], record.feature]) == pytest.approx(record.act, rel=1e-6)
    per_group = samples.groupby(["feature", "interval"]).size()
    assert per_group.max() <= config.samples_per_interval
    # an interval with at least S activations in the data gets S samples (the top interval always has the max)
    for f in range(D_SAE):
        positive = acts[:, f][acts[:, f] > 0]
        if positive.numel():
            assert (f, config.n_intervals - 1) in per_group.index


def test_accumulator_folds_bins_when_the_range_grows():
    acc = FeatureAccumulator(2, top_k=3, n_bins=8, reservoir=2)
    acc.update(torch.tensor([[0.3, 0.0], [0.2, 0.0]]), torch.tensor([0, 1]))
    assert int(ceil_log2(torch.tensor([0.3]))) == -1 and int(acc.exp[0]) == -1
    acc.update(torch.tensor([[5.0, 1.0], [0.1, 0.0]]), torch.tensor([2, 3]))  # range 0.5 -> 8: folds 4 times
    assert int(acc.exp[0]) == 3 and int(acc.exp[1]) == 0
    assert acc.hist[0].tolist() == [3, 0, 0, 0, 0, 1, 0, 0]
    assert acc.hist[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert acc.top_val[0].tolist() == pytest.approx([5.0, 0.3, 0.2]) and acc.top_row[0].tolist() == [2, 0, 1]
    live = torch.isfinite(acc.res_key[:8])  # feature 0's reservoirs: 2 of {0.3, 0.2, 0.1} in bin 0, 5.0 in bin 5
    assert live.sum(1).tolist() == [2, 0, 0, 0, 0, 1, 0, 0]
    assert set(acc.res_row[0][live[0]].tolist()) <= {0, 1, 3} and acc.res_row[5][0] == 2


def test_logit_effects_equal_a_direct_computation(built, lm):
    dash, _, _ = built
    sae = dash.sae()
    norm, head = lm.anatomy.final_norm, lm.anatomy.unembed
    eps = norm.variance_epsilon
    logits = dash.query("SELECT feature, sign, rank, token_id, value FROM logits ORDER BY feature, sign, rank")
    for f in (0, 5, D_SAE - 1):
        v = sae.W_dec[f].detach()
        with torch.no_grad():  # the model's own norm and head, undoing only the per-token 1/rms scale
            direct = head(norm(v[None]) * torch.sqrt(v.pow(2).mean() + eps))[0]
        mine = logits[logits["feature"] == f]
        up, down = mine[mine["sign"] == "+"], mine[mine["sign"] == "-"]
        expected_up, expected_down = direct.topk(len(up)), direct.topk(len(down), largest=False)
        assert up["token_id"].tolist() == expected_up.indices.tolist()
        assert torch.allclose(torch.tensor(up["value"].to_numpy()), expected_up.values, rtol=1e-4, atol=1e-4)
        assert down["token_id"].tolist() == expected_down.indices.tolist()
        assert torch.allclose(torch.tensor(down["value"].to_numpy()), expected_down.values, rtol=1e-4, atol=1e-4)


def test_neighbours_and_feature_page_data(built, lm):
    dash, _, _ = built
    ids, cos = decoder_neighbours(dash.sae().W_dec, n=4, chunk=5)
    unit = torch.nn.functional.normalize(dash.sae().W_dec.detach(), dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2)
    assert torch.equal(ids, sims.topk(4, dim=1).indices) and torch.allclose(cos, sims.topk(4, dim=1).values)
    page = dash.feature(3)
    assert list(page["neighbours"]["neighbour"]) == ids[3].tolist()
    live = int(dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY density DESC LIMIT 1").iloc[0, 0])
    page = dash.feature(live)
    contexts = dash.contexts(live, page["top"]["row"].tolist()[:3], lm.tokenizer)
    assert len(contexts) == min(3, len(page["top"]))
    for ctx, act in zip(contexts, page["top"]["act"]):
        assert ctx["acts"][ctx["focus"]] == pytest.approx(act, rel=1e-5)  # the highlighted token is the example
    table = dash.feature_table(hide_dense=False, sort="max_act")
    assert list(table["max_act"]) == sorted(table["max_act"], reverse=True)
    word = table["act_tokens"][0].split(" | ")[0]
    assert live in set(dash.feature_table(hide_dense=False, search=str(live))["feature"])
    assert all(word.lower() in (a + t + b).lower() for a, t, b in
               dash.feature_table(hide_dense=False, search=word)[["act_tokens", "top_logits", "bottom_logits"]]
               .itertuples(index=False))
    tokens, acts = text_activations(lm, dash.sae(), "resid_post", 1, "the quick brown fox")
    assert len(tokens) == acts.shape[0] == len("the quick brown fox") and acts.shape[1] == D_SAE


def test_bad_input_gives_one_clear_sentence(built, lm, store_dir, tmp_path):
    dash, sae_dir, _ = built
    with pytest.raises(DashboardError, match="does not exist"):
        dash.feature(D_SAE)
    with pytest.raises(DashboardError, match="does not exist"):
        dash.feature(-1)
    other = save_sae(make_sae(seed=5), tmp_path / "other")
    with pytest.raises(DashboardError, match="another SAE"):
        Dashboard.open(dash.path, other)
    wrong_layer = save_sae(make_sae(layer=2), tmp_path / "wrong_layer")
    with pytest.raises(DashboardError, match="layer 2"):
        build_dashboards(wrong_layer, store_dir, lm, tmp_path / "d1")
    wrong_model = save_sae(make_sae(model="gpt2"), tmp_path / "wrong_model")
    with pytest.raises(DashboardError, match="gpt2"):
        build_dashboards(wrong_model, store_dir, lm, tmp_path / "d2")
    wrong_width = save_sae(make_sae(d_in=16), tmp_path / "wrong_width")
    with pytest.raises(DashboardError, match="d_in=16"):
        build_dashboards(wrong_width, store_dir, lm, tmp_path / "d3")
    # a store whose only token is a BOS row (position 0, never encoded) has nothing to encode
    empty = tmp_path / "empty"
    build_store(lm, iter(TEXTS), empty, layers=[1], max_tokens=1, context_length=32, dtype="float32")
    with pytest.raises(DashboardError, match="no tokens"):
        build_dashboards(sae_dir, empty, lm, tmp_path / "d4")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d4").exists()  # nothing half-written


def test_cached_and_listed_and_cli(built, lm, store_dir, tmp_path, monkeypatch, capsys):
    dash, sae_dir, config = built
    stamp = (dash.path / "manifest.json").stat().st_mtime_ns
    again = build_dashboards(sae_dir, store_dir, lm, dash.path, config=config)
    assert again == dash.path and (dash.path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [d["name"] for d in list_dashboards(dash.path.parent)] == [dash.path.name]
    assert list_dashboards(dash.path.parent, weights_hash="nope") == []

    import engine.core.models
    from engine.cli.common import main

    monkeypatch.setattr(engine.core.models, "load_model", lambda *a, **k: lm)
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))  # the command runs as a job in this cache
    out = tmp_path / "cli"
    code = main(["dashboards", "--sae", str(sae_dir), "--store", str(store_dir), "--out", str(out), "--top-k", "5",
                 "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["path"] == str(out) and payload["features"] == D_SAE
    assert Dashboard.open(out).query("SELECT max(rank) AS r FROM top_examples").iloc[0, 0] <= 4
    assert main(["dashboards", "--sae", str(tmp_path / "missing"), "--store", str(store_dir)]) == 2


def test_cli_captures_a_corpus_on_the_fly(built, lm, tmp_path, monkeypatch, capsys):
    """--corpus captures only the SAE's site and layer into a resumable store, then builds from it."""
    _, sae_dir, _ = built
    import engine.core.models
    from engine.cli.common import main
    from engine.data.store import ActivationStore

    monkeypatch.setattr(engine.core.models, "load_model", lambda *a, **k: lm)
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS[:40]))
    args = ["dashboards", "--sae", str(sae_dir), "--corpus", str(corpus), "--tokens", "600",
            "--context-length", "32", "--top-k", "5", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["features"] == D_SAE and payload["tokens"] > 500  # the store's rows minus each window's first
    stores = list((tmp_path / "cache" / "activations").iterdir())
    assert len(stores) == 1
    store = ActivationStore.open(stores[0])
    assert store.sites == ["resid_post"] and store.layers == [1] and store.n_tokens >= 600
    shards = {p.name: p.stat().st_mtime_ns for p in stores[0].glob("shard_*")}
    assert main([*args, "--out", str(tmp_path / "b")]) == 0   # the second run reuses the captured store
    assert {p.name: p.stat().st_mtime_ns for p in stores[0].glob("shard_*")} == shards
    capsys.readouterr()
    assert main(["dashboards", "--sae", str(sae_dir)]) == 2   # neither --store nor --corpus
    assert "either --store" in capsys.readouterr().err


def test_corpus_means_for_mean_ablation(built, tmp_path):
    """Per-feature mean over every token of the store (zeros included), found by the SAE's content hash."""
    dash, sae_dir, _ = built
    _, acts = brute_force(dash)
    features = [3, 0, 17]
    got = corpus_means(sae_dir, features, root=dash.path.parent)
    assert got["tokens"] == acts.shape[0] and got["dashboard"] == dash.path.name
    np.testing.assert_allclose(got["means"], acts[:, features].double().mean(0).numpy(), rtol=1e-5, atol=1e-7)
    other = save_sae(make_sae(seed=5), tmp_path / "other-sae")
    assert corpus_means(other, features, root=dash.path.parent) is None  # no dashboard of that SAE
    with pytest.raises(UserError, match="not in the dashboard"):
        corpus_means(sae_dir, [D_SAE + 3], root=dash.path.parent)


def test_cooccurrence_equals_brute_force(built):
    """Pair counts from the sparse per-batch products equal counting on the dense activations; the
    ranking is by Jaccard index of firing tokens, self excluded."""
    dash, _, config = built
    assert dash.manifest["cooccurrence"] is True
    _, acts = brute_force(dash)
    fired = (acts > 0).double()
    together = fired.T @ fired
    count = together.diagonal()
    union = count[:, None] + count[None, :] - together
    jaccard = torch.where(together > 0, together / union.clamp(min=1), torch.zeros_like(together))
    jaccard.fill_diagonal_(-1)
    table = dash.query("SELECT feature, rank, other, jaccard, together FROM cooccurrence ORDER BY feature, rank")
    assert len(table) > D_SAE  # most features have partners
    for f in range(D_SAE):
        mine = table[table.feature == f]
        expected = jaccard[f][jaccard[f] > 0].sort(descending=True).values[:config.n_cooccur]
        np.testing.assert_allclose(mine["jaccard"].to_numpy(), expected.numpy(), rtol=1e-5)
        for other, value, both in zip(mine["other"], mine["jaccard"], mine["together"]):
            assert math.isclose(float(jaccard[f, other]), value, rel_tol=1e-5) and int(together[f, other]) == both
    page = dash.feature(int(table.feature.iloc[0]))
    assert list(page["cooccurring"].columns) == ["rank", "other", "jaccard", "together", "act_tokens"]


def test_cooccurrence_can_be_turned_off(lm, store_dir, tmp_path):
    sae_dir = save_sae(make_sae(), tmp_path / "sae")
    out = build_dashboards(sae_dir, store_dir, lm, tmp_path / "dash",
                           config=DashboardConfig(n_cooccur=0, batch_size=256, device="cpu"))
    dash = Dashboard.open(out)
    assert dash.manifest["cooccurrence"] is False and len(dash.feature(0)["cooccurring"]) == 0
    with pytest.raises(UserError, match="n_cooccur"):
        DashboardConfig(n_cooccur=-1).check()


# --- results leave the device through to_host; a shared SAE is never moved or cast (issue 13) ---------------
@pytest.fixture(scope="module")
def lm_bf16():
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama")
    return from_model(model.to(torch.bfloat16), tok, name="tiny:llama-bf16", check=False)


def _parameters(module: torch.nn.Module) -> dict:
    return {name: (p.dtype, p.device, p.data_ptr()) for name, p in module.named_parameters()}


def test_text_activations_leave_the_cached_sae_alone(built, lm, lm_bf16, monkeypatch):
    """On a GPU, text_activations moved the dashboard's cached SAE to the model's device in place, so
    Dashboard.contexts then multiplied CPU rows by CUDA weights. Here the model is bfloat16 and the cached SAE
    float32; any in-place conversion of the SAE (``.to``/``.cuda``/``.half`` all go through ``_apply``) fails."""
    dash, _, _ = built
    sae = dash.sae()
    before = _parameters(sae)

    def no_in_place_conversion(*args, **kwargs):
        raise AssertionError("the shared SAE was moved or cast in place")

    with monkeypatch.context() as patch:
        patch.setattr(type(sae), "_apply", no_in_place_conversion)
        tokens, acts = text_activations(lm_bf16, sae, "resid_post", 1, "the quick brown fox")
    assert _parameters(sae) == before and dash.sae() is sae
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"
    assert acts.numpy().shape == (len(tokens), D_SAE) == (len("the quick brown fox"), D_SAE)
    # the same activations as encoding the bfloat16 model's hidden states directly
    from engine.core.capture import capture

    ids = lm_bf16.tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    hidden = capture(lm_bf16.anatomy, ids, sites={"resid_post": [1]})[0]["resid_post"][0, 0, -len(tokens):]
    with torch.no_grad():
        assert torch.allclose(acts, sae.encode(hidden.float()), atol=1e-6)
    # the dashboard still works with its SAE afterwards
    live = int(dash.query("SELECT feature FROM features WHERE NOT dead ORDER BY density DESC LIMIT 1").iloc[0, 0])
    rows = dash.feature(live)["top"]["row"].tolist()[:2]
    assert len(dash.contexts(live, rows, lm.tokenizer)) == len(rows)


def test_a_bf16_sae_gives_float32_results(built, lm):
    """Activations of a half-precision SAE come back as float32 host tensors that numpy can take."""
    dash, _, _ = built
    sae = copy.deepcopy(dash.sae()).to(torch.bfloat16)
    tokens, acts = text_activations(lm, sae, "resid_post", 1, "the lazy dog")
    assert acts.dtype == torch.float32 and acts.numpy().shape == (len(tokens), D_SAE)
    assert all(p.dtype == torch.bfloat16 for p in sae.parameters())
    # a dashboard whose SAE is half precision: contexts, the map and cosines still leave the device as float32
    half = Dashboard.open(dash.path)
    half._sae = sae
    live = int(half.query("SELECT feature FROM features WHERE NOT dead LIMIT 1").iloc[0, 0])
    contexts = half.contexts(live, half.feature(live)["top"]["row"].tolist()[:1], lm.tokenizer)
    assert all(isinstance(a, float) for a in contexts[0]["acts"])
    cosines = decoder_cosines(half, 3)
    assert len(cosines) == D_SAE and cosines[3] == pytest.approx(1.0, abs=1e-2)


def test_tables_take_half_precision_tensors(tmp_path):
    import pandas as pd

    write_parquet({"x": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "n": torch.arange(2)}, tmp_path / "t.parquet")
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table["x"].dtype == np.float32 and table["x"].tolist() == [1.5, -2.0] and table["n"].tolist() == [0, 1]


def test_feature_map_and_cosines(built, tmp_path):
    dash, _, _ = built
    copy_dir = tmp_path / "dash"
    copy_dir.mkdir()
    for file in dash.path.iterdir():  # a copy: the map file is written into the dashboard folder
        (copy_dir / file.name).write_bytes(file.read_bytes())
    other = Dashboard.open(copy_dir)
    coords = feature_map(other, "pca")
    assert list(coords.columns) == ["feature", "x", "y"] and len(coords) == D_SAE
    assert coords["x"].dtype == np.float32 and (copy_dir / "map_pca.parquet").is_file()
    assert feature_map(other, "pca").equals(coords)  # read back from the cache
    unit = torch.nn.functional.normalize(other.sae().W_dec.detach(), dim=1)
    np.testing.assert_allclose(decoder_cosines(other, 5), (unit @ unit[5]).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(DashboardError, match="does not exist"):
        decoder_cosines(other, D_SAE)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mlp_hidden_directions_go_through_the_output_projection(arch):
    """GPT-2's Conv1D stores [in, out], Llama's Linear [out, in]: both map d_mlp directions to d_model."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny(arch)
    anatomy = from_model(model, tok, name=f"tiny:{arch}", check=False).anatomy
    proj = anatomy.mlp_out_proj(0)
    d_mlp = proj.weight.shape[0] if arch == "gpt2" else proj.weight.shape[1]
    W_dec = torch.randn(5, d_mlp)
    with torch.no_grad():
        bias = proj(torch.zeros(1, d_mlp))
        expected = proj(W_dec) - bias
    assert torch.allclose(residual_directions(anatomy, W_dec, "mlp_hidden", 0), expected, atol=1e-4)
    resid = torch.randn(5, anatomy.d_model)
    assert torch.equal(residual_directions(anatomy, resid, "resid_post", 0), resid)  # already residual directions


def test_a_transcoders_logit_effects_come_from_its_output_side(lm, tmp_path):
    """A transcoder reading the MLP's hidden activation (wide) and writing mlp_out: its decoder rows live in the
    residual stream, so the logit effects are W_dec (no trip through the MLP's output projection)."""
    from engine.core.sites import site_width
    from engine.features.decoder import logit_effects

    d_ff = site_width(lm.anatomy, "mlp_hidden", 1)
    store = tmp_path / "store"
    build_store(lm, iter(TEXTS), store, layers=[1], sites=("mlp_hidden",), max_tokens=800, context_length=32,
                dtype="float32")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_ff, d_sae=D_SAE, d_out=lm.d_model, architecture="transcoder",
                        apply_b_dec_to_input=False,
                        metadata={"hook_name": "blocks.1.mlp.hook_post", "hook_name_out": "blocks.1.hook_mlp_out",
                                  "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.05)
    sae_dir = save_sae(sae, tmp_path / "transcoder")
    path = build_dashboards(sae_dir, store, lm, tmp_path / "dash",
                            config=DashboardConfig(n_logits=3, n_cooccur=0, device="cpu"))
    expected = logit_effects(lm.anatomy, sae.W_dec, "mlp_out", 1, n=3)["top_ids"]  # [d_sae, 3]
    got = Dashboard.open(path, sae_dir).query(
        "SELECT feature, rank, token_id FROM logits WHERE sign = '+' ORDER BY feature, rank")
    assert got["token_id"].to_numpy().reshape(D_SAE, 3).tolist() == expected.tolist()
