"""Linked views lens <-> features: lens rows to sites, features active at a lens position (equal to
text_activations), one feature's activation per position, and a decoder direction read through the lens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.capture import capture
from engine.features.folder import DashboardError
from engine.features.here import (
    dashboards_at,
    direction_reading,
    feature_activations,
    feature_direction,
    feature_reading,
    features_here,
    parse_feature_ref,
    resolve_feature_ref,
    row_sites,
)
from engine.features.text import text_activations
from engine.lens.logit import PromptError
from engine.sae.base import SAE, SAEConfig

DTYPES = [torch.float32, torch.bfloat16]
PROMPT = "the quick brown fox"
D_SAE = 64


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "bfloat16"])
def lm(request):
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny("llama")
    return from_model(model.to(request.param), tok, name="tiny:llama", check=request.param == torch.float32)


def make_sae(arch: str = "standard", layer: int = 1, normalize: str = "none", seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=D_SAE, architecture=arch, k=4 if arch == "topk" else None,
                        normalize_activations=normalize,
                        metadata={"hook_name": f"blocks.{layer}.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.W_enc.mul_(0.1)
    return sae


def _entry(name: str, site: str, layer: int, weights_hash: str = "h", d_sae: int = D_SAE) -> dict:
    return {"name": name, "manifest": {"site": site, "layer": layer, "weights_hash": weights_hash, "d_sae": d_sae,
                                       "model": "tiny:other"}}


# --- rows, links ---------------------------------------------------------------------------------------
def test_lens_rows_map_to_the_residual_sites_they_show():
    assert row_sites("embed") == (("resid_pre", 0),)
    assert row_sites("3") == (("resid_post", 3), ("resid_pre", 4))
    assert row_sites("3.attn") == (("resid_mid", 3),)
    assert row_sites("x.attn") == () and row_sites("layer") == ()
    entries = [_entry("post1", "resid_post", 1), _entry("pre2", "resid_pre", 2), _entry("mid1", "resid_mid", 1),
               _entry("mlp1", "mlp_out", 1), _entry("pre0", "resid_pre", 0)]
    assert [e["name"] for e in dashboards_at(entries, "1")] == ["post1", "pre2"]
    assert [e["name"] for e in dashboards_at(entries, "1.attn")] == ["mid1"]
    assert [e["name"] for e in dashboards_at(entries, "embed")] == ["pre0"]
    assert dashboards_at(entries, "2") == []


def test_feature_links_parse_and_resolve_with_one_sentence_each():
    assert parse_feature_ref("my:dash:12") == ("my:dash", 12)
    for bad in ("dash", "dash:", ":3", "dash:x", "dash:-1"):
        with pytest.raises(DashboardError, match="<dashboard>:<feature id>"):
            parse_feature_ref(bad)
    entries = [_entry("mine", "resid_post", 1, "h"), _entry("theirs", "resid_post", 1, "other")]
    entry, feature = resolve_feature_ref("mine:5", "h", "tiny:llama", entries)
    assert entry["name"] == "mine" and feature == 5
    with pytest.raises(DashboardError, match="no feature dashboard named 'nope'"):
        resolve_feature_ref("nope:1", "h", "tiny:llama", entries)
    with pytest.raises(DashboardError, match="belongs to the model 'tiny:other'"):
        resolve_feature_ref("theirs:1", "h", "tiny:llama", entries)
    with pytest.raises(DashboardError, match=f"features 0..{D_SAE - 1}"):
        resolve_feature_ref(f"mine:{D_SAE}", "h", "tiny:llama", entries)


# --- features active at a position --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_features_here_equal_text_activations_sorted(lm, arch):
    sae = make_sae(arch)
    n = len(lm.tokenizer(PROMPT)["input_ids"])
    positions = list(range(n))
    found = features_here(lm, sae, "resid_post", 1, PROMPT, positions, k=D_SAE)
    tokens, acts = text_activations(lm, sae, "resid_post", 1, PROMPT)
    skip = n - len(tokens)
    assert skip == 1 and found.read.tolist() == [False] + [True] * (n - 1)  # <bos> is not read
    assert found.at(0) == []
    fired = 0
    for p in positions[skip:]:
        row = acts[p - skip].numpy()
        order = [int(f) for f in np.argsort(-row, kind="stable") if row[f] > 0]
        got = found.at(p)
        assert [f for f, _ in got] == order, p
        np.testing.assert_allclose([a for _, a in got], row[order], rtol=1e-5, atol=1e-6)
        fired += len(order)
    assert fired > 0
    if arch == "topk":
        assert max(len(found.at(p)) for p in positions) <= 4
    top3 = features_here(lm, sae, "resid_post", 1, PROMPT, [n - 1, 2], k=3)  # a subset, in the order asked
    assert top3.ids.shape == (2, 3)
    for p in (n - 1, 2):  # encoded as a batch of two rows: the same features, activations up to rounding
        assert [f for f, _ in top3.at(p)] == [f for f, _ in found.at(p)][:3]
        np.testing.assert_allclose([a for _, a in top3.at(p)], [a for _, a in found.at(p)][:3], rtol=1e-5)


def test_feature_activations_follow_the_feature_column(lm):
    sae = make_sae()
    tokens, acts = text_activations(lm, sae, "resid_post", 1, PROMPT)
    feature = int(acts.sum(0).argmax())
    column = feature_activations(lm, sae, "resid_post", 1, PROMPT, feature, range(len(tokens) + 1))
    assert column.dtype == np.float32 and np.isnan(column[0])
    np.testing.assert_allclose(column[1:], acts[:, feature].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(DashboardError, match="does not exist"):
        feature_activations(lm, sae, "resid_post", 1, PROMPT, D_SAE, [1])
    with pytest.raises(PromptError, match="Position 99 is not in the prompt"):
        features_here(lm, sae, "resid_post", 1, PROMPT, [99])


# --- a direction through the lens ---------------------------------------------------------------------
def _clean_resid(lm, ids: list[int], site: str, layer: int) -> torch.Tensor:
    got, _ = capture(lm.anatomy, torch.tensor([ids]), sites={site: [layer]})
    return got[site][0, 0, -1]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_direction_reading_at_its_own_row_is_the_lens_of_the_shifted_residual(lm, layer):
    torch.manual_seed(1)
    direction = torch.randn(32) * 3
    position, k = 5, 6
    reading = direction_reading(lm, PROMPT, position, "resid_post", layer, direction, k=k)
    assert reading.rows == [str(i) for i in range(layer, 3)]
    assert reading.ids.shape == reading.rises.shape == (3 - layer, k)
    assert np.isfinite(reading.rises).all() and (np.diff(reading.rises, axis=1) <= 0).all()
    assert reading.norm == pytest.approx(float(direction.norm()), rel=1e-5)
    # the first row is the edited site itself: its rise is exactly lens(h + d) - lens(h) at that position
    ids = lm.tokenizer(PROMPT)["input_ids"][:position + 1]
    h = _clean_resid(lm, ids, "resid_post", layer)
    shifted = (h.float() + direction).to(h.dtype)
    with torch.no_grad():
        logp = torch.log_softmax(lm.anatomy.logits(torch.stack([h, shifted])).float(), dim=-1)
    rise = (logp[1] - logp[0]).numpy()
    tol = 1e-4 if lm.dtype == torch.float32 else 0.1
    np.testing.assert_allclose(reading.rises[0], rise[reading.ids[0]], atol=tol)
    assert reading.rises[0, 0] >= np.sort(rise)[-1] - tol
    assert reading.before[0] == lm.tokenizer.decode([int(logp[0].argmax())])
    # the lens reads the direction: the top rise follows the unembedding of the (normed) direction, not noise
    assert reading.rises[0, 0] > 0.5


def test_zero_direction_changes_nothing(lm):
    reading = direction_reading(lm, PROMPT, 4, "resid_post", 1, torch.zeros(32), k=5)
    assert reading.rises.shape == (2, 5)
    np.testing.assert_allclose(reading.rises, 0.0, atol=1e-5)
    assert reading.before == reading.after
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())  # hooks removed


def test_direction_reading_rows_and_bad_input(lm):
    reading = direction_reading(lm, PROMPT, 3, "resid_pre", 0, torch.ones(32), k=2)
    assert reading.rows == ["embed", "0", "1", "2"]  # the edited residual (the embedding) first
    assert (reading.site, reading.layer) == ("resid_pre", 0)
    assert direction_reading(lm, PROMPT, 3, "mlp_out", 2, torch.ones(32), k=2).rows == ["2"]
    with pytest.raises(PromptError, match="Position 40"):
        direction_reading(lm, PROMPT, 40, "resid_post", 1, torch.ones(32))
    with pytest.raises(DashboardError, match="width 32"):
        direction_reading(lm, PROMPT, 3, "resid_post", 1, torch.ones(31))
    with pytest.raises(DashboardError, match="cannot be added at 'resid_mid'"):
        direction_reading(lm, PROMPT, 3, "resid_mid", 1, torch.ones(32))
    with pytest.raises(DashboardError, match="Layer 7 does not exist"):
        direction_reading(lm, PROMPT, 3, "resid_post", 7, torch.ones(32))


def test_feature_reading_adds_the_decoder_row_at_the_given_activation(lm):
    sae = make_sae()
    direct = direction_reading(lm, PROMPT, 6, "resid_post", 1, sae.W_dec[7].detach() * 2.5, k=4)
    via = feature_reading(lm, sae, 7, 2.5, PROMPT, 6, k=4)
    assert via.rows == direct.rows == ["1", "2"]
    np.testing.assert_array_equal(via.ids, direct.ids)
    np.testing.assert_allclose(via.rises, direct.rises, atol=1e-6)
    with pytest.raises(DashboardError, match="does not exist"):
        feature_reading(lm, sae, D_SAE, 1.0, PROMPT, 6)


def test_feature_direction_undoes_the_sae_normalisation():
    plain = make_sae()
    assert torch.equal(feature_direction(plain, 3, 2.0), plain.W_dec[3].detach() * 2.0)
    scaled = make_sae(normalize="expected_average_only_in")
    scaled.cfg.norm_scaling_factor = 4.0
    assert torch.allclose(feature_direction(scaled, 3, 2.0), scaled.W_dec[3].detach() * 2.0 / 4.0)
    per_token = feature_direction(make_sae(normalize="constant_norm_rescale"), 3, 2.0)
    x = torch.randn(32)
    coeff = 32 ** 0.5 / x.norm()
    assert callable(per_token) and torch.allclose(per_token(x), make_sae().W_dec[3].detach() * 2.0 / coeff)
