"""Fixtures for autointerp: tiny dashboards (one with features that fire exactly on "Paris" / "London"), the fake
OpenAI-compatible server of :mod:`fakes` and a backend pointed at it."""
from __future__ import annotations

import pytest
import torch

from engine.data.store_writer import build_store
from engine.features.build import DashboardConfig, build_dashboards
from engine.features.read import Dashboard
from engine.sae.base import SAE, SAEConfig
from engine.sae.io import save_sae
from tests.engine.autointerp.fakes import API_KEY, KEY_ENV, FakeServer

PARIS_TEXTS = []
for i in range(48):
    kind = i % 4
    PARIS_TEXTS.append([f"We flew to Paris in spring number {i}.", f"The train to London left at {i} sharp.",
                        f"Paris is large, she said on day {i}.", f"A quick brown fox {i} jumps over a dog."][kind])
PLAIN_TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, then {i * 7} cats sat on mats."
               for i in range(24)]
CONFIG = DashboardConfig(top_k=10, n_bins=16, n_intervals=4, samples_per_interval=3, batch_size=128, n_logits=5,
                         n_neighbours=3, device="cpu")


# --- dashboards ----------------------------------------------------------------------------------
def _detector(embedding: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Encoder column and bias that give exactly 1.0 on this embedding and fire only on near-parallel inputs."""
    norm2 = float(embedding.pow(2).sum())
    return embedding * 10.0 / norm2, -9.0


@pytest.fixture(scope="session")
def paris(tmp_path_factory):
    """A dashboard of an SAE at resid_pre 0 (= the token embedding): feature 0 fires exactly on the token
    "Paris", feature 1 on "London", features 2..7 are random. Returns ``(dashboard, tokenizer, lm, sae)``."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny, make_tokenizer

    tokenizer = make_tokenizer(extra_tokens=("Paris", "London"))
    model, tok = build_tiny("llama", tokenizer)
    lm = from_model(model, tok, name="tiny-paris")
    root = tmp_path_factory.mktemp("paris")
    store = build_store(lm, iter(PARIS_TEXTS), root / "store", layers=[0], sites=["resid_pre"], max_tokens=4000,
                        context_length=32, batch_size=16, dtype="float32")
    embed = model.get_input_embeddings().weight.detach()
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=8, architecture="standard",
                        metadata={"hook_name": "blocks.0.hook_resid_pre", "model_name": "tiny-paris"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
        sae.W_dec.normal_()
        sae.W_enc.normal_().mul_(3.0 / float(embed.norm(dim=1).mean()))
        sae.b_enc.fill_(-4.0)
        for f, word in enumerate(("Paris", "London")):
            column, bias = _detector(embed[tok.convert_tokens_to_ids(word)])
            sae.W_enc[:, f] = column
            sae.b_enc[f] = bias
    sae_dir = save_sae(sae, root / "sae")
    out = build_dashboards(sae_dir, store.path, lm, root / "dash", config=CONFIG)
    dash = Dashboard.open(out)
    top = dash.query("SELECT feature, token_id FROM top_examples WHERE feature < 2")
    assert set(top[top["feature"] == 0]["token_id"]) == {tok.convert_tokens_to_ids("Paris")}
    assert set(top[top["feature"] == 1]["token_id"]) == {tok.convert_tokens_to_ids("London")}
    return dash, tok, lm, sae


@pytest.fixture(scope="session")
def plain_dashboard(tmp_path_factory):
    """A dashboard of a random SAE on the plain ``tiny:llama`` (its tokenizer comes from the manifest)."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama")
    lm = from_model(model, tok, name="tiny:llama")
    root = tmp_path_factory.mktemp("plain")
    store = build_store(lm, iter(PLAIN_TEXTS), root / "store", layers=[1], max_tokens=2000, context_length=32,
                        batch_size=8, dtype="float32")
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=12, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.05)
        sae.b_enc.sub_(0.5)
        sae.b_enc[-1] = -1000.0  # one dead feature
    sae_dir = save_sae(sae, root / "sae")
    return build_dashboards(sae_dir, store.path, lm, root / "dash", config=CONFIG)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def backend(server):
    from engine.autointerp.backends import OpenAICompatibleBackend

    return OpenAICompatibleBackend(server.url, "rule-model", KEY_ENV, concurrency=4, timeout=5.0, retries=3,
                                   backoff=0.01)
