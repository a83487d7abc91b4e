"""SAE training: recovery of known sparse directions, resume, store-based training, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from engine.sae.io import load_sae, load_sparsity
from engine.sae.training import SAETrainConfig, SAETrainError, geometric_median, train_sae


def synthetic(n: int, d: int = 32, m: int = 64, active: int = 3, seed: int = 12345):
    """Tokens made of ``active`` of ``m`` known unit directions with positive magnitudes, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    chosen = torch.rand(n, m, generator=g).argsort(dim=-1)[:, :active]
    codes = torch.zeros(n, m).scatter_(1, chosen, torch.rand(n, active, generator=g) + 0.5)
    return codes @ directions + 0.3, directions


def recovered(sae, directions: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions whose best-matching decoder row has cosine > threshold."""
    rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    return float(((directions @ rows.T).max(dim=1).values > threshold).float().mean())


@pytest.mark.parametrize("arch, extra, tokens", [("topk", {"k": 3}, 48_000),
                                                 ("standard", {"l1_coefficient": 1.0}, 96_000)])
def test_training_recovers_known_sparse_directions(arch, extra, tokens):
    data, directions = synthetic(24_000)
    config = SAETrainConfig(architecture=arch, d_sae=128, batch_size=128, total_tokens=tokens, lr=1e-2,
                         warmup_steps=20, log_every=20, **extra)
    result = train_sae(data, None, config=config)
    assert recovered(result.sae, directions) > 0.9
    final = result.history[-1]
    assert final["explained_variance"] > 0.85
    if arch == "topk":
        assert final["l0"] <= 3
    # the criterion is not trivially met: the same SAE before training recovers almost nothing
    untrained = train_sae(data, None, config=SAETrainConfig(architecture=arch, d_sae=128, batch_size=256,
                                                         total_tokens=256, lr=1e-9, **extra)).sae
    assert recovered(untrained, directions) < 0.2


def test_decoder_rows_unit_norm_and_folded_scale():
    data, _ = synthetic(4096)
    config = SAETrainConfig(d_sae=64, k=3, batch_size=256, total_tokens=4096, lr=1e-2)
    small = train_sae(data, None, config=config).sae
    big = train_sae(data * 50.0, None, config=config).sae  # the input scale is folded into the saved weights
    norms = big.W_dec.norm(dim=-1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)  # unit rows, divided by one scale
    assert big.cfg.normalize_activations == small.cfg.normalize_activations == "none"
    x = data[:512]
    assert torch.allclose(big.encode(x * 50.0), small.encode(x), atol=1e-3, rtol=1e-3)
    assert torch.allclose(big(x * 50.0) / 50.0, small(x), atol=1e-3, rtol=1e-3)


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 1.0
    assert points.mean(0).norm() > 10.0


def test_dead_latents_are_revived_by_aux_loss():
    data, directions = synthetic(24_000, m=128, active=3)

    def run(aux: float):
        config = SAETrainConfig(d_sae=128, k=3, batch_size=128, total_tokens=48_000, lr=3e-2, warmup_steps=10,
                             aux_k_coefficient=aux, dead_window_tokens=2048, log_every=25)
        result = train_sae(data, None, config=config)
        return result.history[-1]["dead_fraction"], recovered(result.sae, directions)

    (dead_aux, rec_aux), (dead_plain, rec_plain) = run(1 / 32), run(0.0)
    assert dead_aux < 0.75 * dead_plain
    assert rec_aux > rec_plain


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    data, _ = synthetic(4096)
    batches = list(data.split(256))
    config = SAETrainConfig(d_sae=64, k=3, batch_size=256, total_tokens=256 * 30, lr=1e-3, warmup_steps=5,
                         checkpoint_every=10, log_every=5, init_sample_tokens=512)
    full = train_sae(batches, tmp_path / "full", config=config)

    class Stop(Exception):
        pass

    def interrupt(record):
        if record["step"] == 25:
            raise Stop

    with pytest.raises(Stop):
        train_sae(batches, tmp_path / "resumed", config=config, on_metrics=interrupt)
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "cfg.json").exists()
    resumed = train_sae(batches, tmp_path / "resumed", config=config)
    assert resumed.resumed_from_step == 20
    assert resumed.steps == full.steps == 30
    for name, param in full.sae.named_parameters():
        assert torch.allclose(getattr(resumed.sae, name), param, atol=1e-6), name
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_bad_training_input():
    with pytest.raises(SAETrainError, match="topk' and 'standard"):
        train_sae([torch.zeros(4, 4)], None, config=SAETrainConfig(architecture="jumprelu"))
    with pytest.raises(SAETrainError, match="empty"):
        train_sae([], None)
    with pytest.raises(SAETrainError, match="2-D floating-point"):
        train_sae([torch.zeros(4, 4, dtype=torch.long)], None)
    with pytest.raises(SAETrainError, match="learning rate"):
        train_sae([torch.zeros(4, 4)], None, config=SAETrainConfig(lr=-1.0))


# --- with the activation store ------------------------------------------------------------------
TEXTS = [f"Document {i}: the cat sat on the mat while the dog barked at number {i * 7}." for i in range(40)]


@pytest.fixture
def tiny_store(tiny_llama, tmp_path):
    store_mod = pytest.importorskip("engine.data.store_writer")
    return store_mod.build_store(tiny_llama, TEXTS[:30], tmp_path / "store", layers=[1], max_tokens=1500,
                                 context_length=32, corpus_spec="")


def test_train_from_store_and_evaluate(tiny_llama, tiny_store, tmp_path):
    from engine.sae.attach import check_attachable
    from engine.sae.evaluation import evaluate_on_store, evaluate_with_model

    config = SAETrainConfig(d_sae=128, k=8, batch_size=128, total_tokens=3000, lr=1e-3, warmup_steps=5, log_every=5)
    result = train_sae(tiny_store, tmp_path / "sae", site="resid_post", layer=1, config=config)
    assert result.tokens >= 3000 > tiny_store.n_tokens  # more than one epoch
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.model_name == tiny_store.model_name
    assert check_attachable(sae, tiny_llama.anatomy) == ("resid_post", 1)
    assert load_sparsity(tmp_path / "sae").shape == (128,)
    log = json.loads((tmp_path / "sae" / "training_log.json").read_text())
    assert log[-1]["step"] == result.steps

    on_store = evaluate_on_store(sae, tiny_store)
    assert on_store["n_tokens"] == tiny_store.n_tokens - int((tiny_store.positions() == 0).sum())
    assert on_store["l0"] <= 8 and on_store["explained_variance"] > 0.2
    report = evaluate_with_model(sae, tiny_llama, TEXTS[30:], context_length=32)
    ce = report["ce"]
    assert ce["zero_ablated"] > ce["clean"]
    assert report["ce"]["recovered"] is not None


def test_store_site_and_layer_errors(tiny_store):
    with pytest.raises(SAETrainError, match="no layer 2"):
        train_sae(tiny_store, None, site="resid_post", layer=2)
    with pytest.raises(SAETrainError, match="no site"):
        train_sae(tiny_store, None, site="mlp_out", layer=1)
    with pytest.raises(SAETrainError, match="needs a site and a layer"):
        train_sae(tiny_store, None)


def test_cli_train_eval_info(tiny_store, tmp_path, capsys, monkeypatch):
    import engine.cli.common as cli
    from engine.cli.common import main

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["engine.cli.sae"])  # only this topic's parser
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))  # train runs as a job in this cache

    out = tmp_path / "cli-sae"
    code = main(["sae", "train", "--store", str(tiny_store.path), "--layer", "1", "--width", "64", "--k", "4",
                 "--batch-size", "128", "--tokens", "1024", "--warmup", "2", "--out", str(out), "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["tokens"] >= 1024 and (out / "cfg.json").is_file()
    assert main(["sae", "eval", "--sae", str(out), "--store", str(tiny_store.path), "--no-ce", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["l0"] <= 4 and report["ce"] is None and report["layer"] == 1
    assert main(["sae", "info", "--sae", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["d_sae"] == 64
    assert main(["sae", "eval", "--sae", str(tmp_path / "missing"), "--no-ce"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the jobs page section ----------------------------------------------------------------------
def test_jobs_section_trains_and_shows_report_card(tiny_llama, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    store_mod = pytest.importorskip("engine.data.store_writer")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    store_mod.build_store(tiny_llama, TEXTS[:30], tmp_path / "cache" / "activations" / "tiny", layers=[1, 2],
                          max_tokens=1200, context_length=32, corpus_spec="")
    script = tmp_path / "page.py"
    script.write_text("from components.jobs_sae import render_sae_training_section\n"
                      "render_sae_training_section()\n")
    at = AppTest.from_file(str(script), default_timeout=60).run()
    assert not at.exception
    at.number_input(key="sae_width").set_value(64)
    at.number_input(key="sae_tokens").set_value(2048)
    at.number_input(key="sae_batch").set_value(256)
    at.button(key="sae_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    from engine.jobs import wait_idle

    jobs = wait_idle(tmp_path / "cache" / "jobs", timeout=90)  # training runs as a job in a worker process
    assert [j.state for j in jobs] == ["done"], [j.error for j in jobs]
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    saved = list((tmp_path / "cache" / "saes").iterdir())
    assert len(saved) == 1 and (saved[0] / "cfg.json").is_file()
    assert load_sae(saved[0]).cfg.hook_name == "blocks.2.hook_resid_post"  # the middle of layers [1, 2]
    labels = [m.label for m in at.metric]
    assert "L0" in labels and "Explained variance" in labels and "Dead" in labels
    assert at.success and "Saved" in at.success[0].value
