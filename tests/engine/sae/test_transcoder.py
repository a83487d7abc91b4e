"""Transcoders on a tiny model: splicing (read one site, replace another), evaluation, attach checks, training."""
from __future__ import annotations

import json

import pytest
import torch

from engine.sae.attach import Splice, attach_warning, check_attachable, resolve_splice
from engine.sae.base import SAE, SAECompatibilityError, SAEConfig
from engine.sae.evaluation import evaluate_on_store, evaluate_with_model
from engine.sae.io import load_sae
from engine.sae.splice import replace_site, splice_sae
from engine.sae.train_data import ActivationSource
from engine.sae.training import SAETrainConfig, SAETrainError, train_sae

TEXTS = [f"Document {i}: the cat sat on the mat while the dog barked at number {i * 7}." for i in range(40)]
LAYER = 1


def transcoder(arch: str, d_in: int, d_sae: int, d_out: int, site: str = "mlp_hidden", layer: int = LAYER,
               out_site: str = "mlp_out", out_layer: int = LAYER) -> SAE:
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, d_out=d_out, apply_b_dec_to_input=False,
                         metadata={"hook_name": f"blocks.{layer}.{'mlp.hook_post' if site == 'mlp_hidden' else 'hook_' + site}",
                                   "hook_name_out": f"blocks.{out_layer}.hook_{out_site}", "model_name": "tiny-llama"}))


def down_proj(lm) -> torch.Tensor:
    """The MLP output projection of layer 1 as ``[d_model, d_ffn]``: mlp_out = mlp_hidden @ W.T exactly."""
    return lm.anatomy.mlp_out_proj(LAYER).weight.detach()


def relu_oracle(lm) -> SAE:
    """A ReLU transcoder that computes the down projection exactly: relu(y) - relu(-y) = y."""
    W = down_proj(lm)
    d_model, d_ffn = W.shape
    tc = transcoder("transcoder", d_ffn, 2 * d_model, d_model)
    with torch.no_grad():
        tc.W_enc.copy_(torch.cat([W.T, -W.T], dim=1))
        tc.W_dec.copy_(torch.cat([torch.eye(d_model), -torch.eye(d_model)], dim=0))
    return tc


def skip_oracle(lm) -> SAE:
    """A skip transcoder whose skip path is the down projection and whose sparse part decodes to nothing."""
    W = down_proj(lm)
    d_model, d_ffn = W.shape
    tc = transcoder("skip_transcoder", d_ffn, 16, d_model)
    with torch.no_grad():
        tc.W_enc.normal_()
        tc.W_skip.copy_(W)
    return tc


@pytest.mark.parametrize("make", [relu_oracle, skip_oracle])
def test_exact_oracle_transcoder_reproduces_clean_loss(tiny_llama, make):
    tc = make(tiny_llama)
    assert resolve_splice(tc, tiny_llama.anatomy) == Splice("mlp_hidden", LAYER, "mlp_out", LAYER)
    report = evaluate_with_model(tc, tiny_llama, TEXTS[:6], batch_size=3)
    ce = report["ce"]
    assert ce["spliced"] == pytest.approx(ce["clean"], abs=1e-5)
    assert abs(ce["zero_ablated"] - ce["clean"]) > 1e-3  # the splice matters (a random model may even improve)
    assert ce["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert report["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert (report["site"], report["site_out"]) == ("mlp_hidden", "mlp_out")
    assert report["sae"]["transcoder"] and report["sae"]["site_out"] == "mlp_out"


def test_splice_reads_resid_mid_and_replaces_mlp_out_like_a_manual_patch(tiny_llama):
    from engine.core.capture import capture

    torch.manual_seed(0)
    d = tiny_llama.d_model
    tc = transcoder("jumprelu_transcoder", d, 48, d, site="resid_mid")
    with torch.no_grad():
        for param in tc.parameters():
            param.normal_(0, 0.3)
        tc.threshold.uniform_(0, 0.5)
    anatomy = tiny_llama.anatomy
    splice = resolve_splice(tc, anatomy)
    assert splice == Splice("resid_mid", LAYER, "mlp_out", LAYER)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])

    def hook_count():  # transformers may keep output-recording hooks of its own
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_llama.model.modules())

    before = hook_count()
    clean, clean_out = capture(anatomy, ids, sites={"resid_mid": [LAYER]}, stop_early=False)
    with torch.no_grad():
        target = tc(clean["resid_mid"][0, :, 1:])  # [1, 6, d]: what mlp_out must become after position 0
        with splice_sae(anatomy, tc, splice):
            spliced = tiny_llama.model(ids).logits
        with replace_site(anatomy, "mlp_out", LAYER, lambda hidden: target):
            manual = tiny_llama.model(ids).logits
    assert torch.allclose(spliced, manual, atol=1e-5)
    assert torch.allclose(spliced[0, 0], clean_out.logits[0, 0], atol=1e-5)  # position 0 untouched
    assert not torch.allclose(spliced[0, 1:], clean_out.logits[0, 1:], atol=1e-3)
    assert hook_count() == before


def test_attach_checks_and_warnings(tiny_llama):
    anatomy = tiny_llama.anatomy
    tc = relu_oracle(tiny_llama)
    with pytest.raises(SAECompatibilityError, match="transcoder"):
        check_attachable(tc, anatomy)
    with pytest.raises(SAECompatibilityError, match="computes after"):
        resolve_splice(tc, anatomy, out_site="mlp_out", out_layer=0)
    with pytest.raises(SAECompatibilityError, match="d_out=32, but mlp_hidden at layer 2 .* width 64"):
        resolve_splice(tc, anatomy, "mlp_hidden", 0, "mlp_hidden", 2)
    with pytest.raises(SAECompatibilityError, match="cannot write the site 'resid_mid'"):
        resolve_splice(tc, anatomy, "mlp_hidden", 0, "resid_mid", 2)
    with pytest.raises(SAECompatibilityError, match="d_in=64"):
        resolve_splice(tc, anatomy, site="resid_post")
    assert attach_warning(tc, "mlp_hidden", LAYER, "mlp_out", LAYER) is None
    assert "layer 2" in attach_warning(tc, "mlp_hidden", 2, "mlp_out", 2)
    assert "replaces resid_post" in attach_warning(tc, "mlp_hidden", LAYER, "resid_post", 2)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="standard", metadata={"hook_name": "blocks.1.hook_resid_post"}))
    assert attach_warning(sae, "resid_post", 1) is None
    assert "trained on resid_post at layer 1 but is attached to attn_out at layer 2" in attach_warning(sae, "attn_out", 2)
    sae.cfg.metadata.clear()
    assert "names no usable hook" in attach_warning(sae, "resid_post", 1)


# --- training -------------------------------------------------------------------------------------
@pytest.fixture
def two_site_store(tiny_llama, tmp_path):
    store_writer = pytest.importorskip("engine.data.store_writer")
    return store_writer.build_store(tiny_llama, TEXTS[:30], tmp_path / "store", layers=[LAYER],
                                    sites=("mlp_hidden", "mlp_out"), max_tokens=1500, context_length=32,
                                    dtype="float32", corpus_spec="")


def test_paired_store_batches_are_aligned(tiny_llama, two_site_store):
    W = down_proj(tiny_llama)
    source = ActivationSource(two_site_store, "mlp_hidden", LAYER, 100, 3, "mlp_out", LAYER)
    assert (source.d_in, source.d_out, source.paired) == (64, 32, True)
    seen = 0
    for epoch, _, x, y in source.batches():
        if epoch > 1:
            break
        assert torch.allclose(x @ W.T, y, atol=1e-3, rtol=1e-4)
        seen += x.shape[0]
    assert seen > 2 * 1000


def test_transcoder_trains_from_a_two_site_store(tiny_llama, two_site_store, tmp_path):
    config = SAETrainConfig(architecture="skip_transcoder", d_sae=64, batch_size=128, total_tokens=6000, lr=1e-2,
                            l1_coefficient=0.1, warmup_steps=5, log_every=5)
    result = train_sae(two_site_store, tmp_path / "tc", site="mlp_hidden", layer=LAYER, target_site="mlp_out",
                       config=config)
    assert result.history[-1]["explained_variance"] > 0.9
    tc = load_sae(tmp_path / "tc")
    assert tc.architecture == "skip_transcoder" and (tc.d_in, tc.d_out) == (64, 32)
    assert tc.cfg.hook_name == "blocks.1.mlp.hook_post" and tc.cfg.hook_name_out == "blocks.1.hook_mlp_out"
    assert tc.input_site() == ("mlp_hidden", LAYER) and tc.output_site() == ("mlp_out", LAYER)
    on_store = evaluate_on_store(tc, two_site_store)
    assert on_store["explained_variance"] > 0.9 and on_store["site_out"] == "mlp_out"
    report = evaluate_with_model(tc, tiny_llama, TEXTS[30:], context_length=32)
    assert report["ce"]["recovered"] > 0.5
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == 32


def test_plain_transcoder_learns_from_pairs_and_loads_in_saelens(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 24, 10
    mapping = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5
    xs = torch.randn(4096, d_in, generator=g).relu()
    pairs = [(x, x @ mapping + 0.2) for x in xs.split(256)]
    config = SAETrainConfig(architecture="transcoder", d_sae=96, batch_size=256, total_tokens=40_000, lr=1e-2,
                            l1_coefficient=0.05, warmup_steps=5, log_every=10)
    result = train_sae(pairs, tmp_path / "tc", config=config, hook_name="blocks.0.hook_resid_mid",
                       metadata={"hook_name_out": "blocks.0.hook_mlp_out"})
    assert result.history[-1]["explained_variance"] > 0.8
    x = xs[:64]
    with torch.no_grad():
        assert float((result.sae(x) - (x @ mapping + 0.2)).pow(2).mean()) < 0.2 * float((x @ mapping).var())
    sae_lens = pytest.importorskip("sae_lens")
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    with torch.no_grad():
        assert float((lens(x) - load_sae(tmp_path / "tc")(x)).abs().max()) <= 1e-5


def test_transcoder_training_input_errors(two_site_store):
    with pytest.raises(SAETrainError, match="target_site"):
        train_sae(two_site_store, None, site="mlp_hidden", layer=LAYER,
                  config=SAETrainConfig(architecture="transcoder"))
    with pytest.raises(SAETrainError, match="trains a transcoder"):
        train_sae(two_site_store, None, site="mlp_hidden", layer=LAYER, target_site="mlp_out")
    with pytest.raises(SAETrainError, match="no site 'resid_post'"):
        train_sae(two_site_store, None, site="mlp_hidden", layer=LAYER, target_site="resid_post",
                  config=SAETrainConfig(architecture="transcoder"))
    with pytest.raises(SAETrainError, match="rows"):
        train_sae([(torch.zeros(4, 3), torch.zeros(5, 2))], None, config=SAETrainConfig(architecture="transcoder"))


def test_cli_trains_and_evaluates_a_transcoder(two_site_store, tmp_path, capsys, monkeypatch):
    import engine.cli.common as cli
    from engine.cli.common import main

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["engine.cli.sae"])
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))  # train runs as a job in this cache
    out = tmp_path / "cli-tc"
    assert main(["sae", "train", "--store", str(two_site_store.path), "--site", "mlp_hidden", "--layer", "1",
                 "--arch", "skip_transcoder", "--target-site", "mlp_out", "--width", "32", "--batch-size", "128",
                 "--tokens", "1024", "--warmup", "2", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] >= 1024
    assert main(["sae", "eval", "--sae", str(out), "--store", str(two_site_store.path), "--no-ce", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["site"], report["site_out"], report["layer_out"]) == ("mlp_hidden", "mlp_out", 1)
    assert "warning" not in captured.err
    assert main(["sae", "info", "--sae", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transcoder"] and info["d_out"] == 32 and info["site_out"] == "mlp_out"
    assert main(["sae", "train", "--store", str(two_site_store.path), "--site", "mlp_hidden", "--layer", "1",
                 "--arch", "transcoder"]) == 2
    assert "--target-site" in capsys.readouterr().err
