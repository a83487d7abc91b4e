"""Linked views from concept space on tiny models: a token placed in a fitted projection lands on the cloud's own point,
the lens of a selection's mean reproduces the model's logits, the features of a selection equal direct SAE encodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.geometry.projections as P
import engine.geometry.selection as SEL
from engine.core.errors import UserError
from engine.data.corpora import PromptSet

TEXTS = ["The cat sat on the mat", "Paris is in France", "dogs bark", "a quiet river at night", "seven", "red apple",
         "the moon is bright tonight", "we walk home", "snow falls", "tea or coffee?"]
PSET = PromptSet("toy", "", TEXTS, {"kind": [str(i % 3) for i in range(len(TEXTS))]})
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module", params=[(arch, dtype) for arch in ("llama", "gemma3") for dtype in DTYPES],
                ids=lambda p: "-".join(p))
def lm(request):
    """Llama, and Gemma 3 (norms on each branch, a soft-capped head), in float32 and bfloat16."""
    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    arch, dtype = request.param
    model, tok = build_tiny(arch, seed=2)
    return from_model(model.to(getattr(torch, dtype)), tok, name=f"tiny-{arch}-{dtype}")


def _tol(lm, coords: np.ndarray) -> float:
    """Batched (padded) and single forward passes agree to float32 rounding, or to bfloat16's 8 bits."""
    return float(np.abs(coords).max()) * (1e-4 if lm.dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_token_of_a_prompt_in_the_set_lands_on_its_own_point(lm, normalize, dims):
    cloud = P.prompt_cloud(lm, PSET, positions="last")
    layer = 1
    drawn = P.project(cloud.at(layer), "pca", dims, normalize=normalize)  # what the page draws
    projector = SEL.fit_projector(cloud.at(layer), "pca", dims, normalize=normalize)
    assert np.allclose(projector.coords, drawn, atol=1e-5 * np.abs(drawn).max())
    for i in (1, 3, 6):
        point = SEL.token_point(lm, TEXTS[i], -1, "resid_post", layer)
        assert point.position == point.n_tokens - 1 and point.token == TEXTS[i][-1]
        xy = projector.transform(point.vector)[0]
        assert np.abs(xy - drawn[i]).max() < _tol(lm, drawn), (xy, drawn[i])
        distances = np.linalg.norm(drawn - xy, axis=1)
        assert int(distances.argmin()) == i  # and not on top of some other point
    other = projector.transform(SEL.token_point(lm, "completely different words", -1, "resid_post", layer).vector)
    assert np.linalg.norm(drawn - other[0], axis=1).min() > _tol(lm, drawn)


def test_a_token_in_an_every_token_cloud_and_an_aligned_projection(lm):
    cloud = P.prompt_cloud(lm, PSET, positions="all")  # BOS left out: point k of text 0 is position k + 1
    point = SEL.token_point(lm, TEXTS[0], 4, "resid_post", 2)
    assert point.token == TEXTS[0][3] and point.label == f"your token {TEXTS[0][3]!r} (position 4)"
    projector = SEL.fit_projector(cloud.at(2), "pca", 2)
    xy = projector.transform(point.vector)[0]
    assert np.abs(xy - projector.coords[3]).max() < _tol(lm, projector.coords)
    # an aligned layer is a similarity transform of the raw one: the token moves with it
    previous = P.project(cloud.at(1), "pca", 2)
    aligned = P.procrustes_align(projector.coords, previous)
    start, matrix, end = P.procrustes_fit(projector.coords, aligned)
    moved = (projector.transform(cloud.at(2)[:5]) - start) @ matrix + end
    assert np.allclose(moved, aligned[:5], atol=1e-3 * np.abs(aligned).max())


def test_umap_places_the_reduced_centred_point(monkeypatch):
    """A linear stand-in for UMAP (the real one compiles for a minute): the point reaches ``transform`` through the
    same normalisation, centring and PCA-50 as the cloud reached ``fit_transform``, so it lands on its own point."""
    import umap

    seen = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, data):
            seen["fit"] = data.shape
            return data[:, : seen["n_components"]] * 2.0

        def transform(self, data):
            seen["transform"] = data.shape
            return data[:, : seen["n_components"]] * 2.0

    monkeypatch.setattr(umap, "UMAP", FakeUMAP)
    X = np.random.default_rng(0).normal(size=(80, 120)).astype(np.float32) * 3 + 1
    projector = SEL.fit_projector(X, "umap", 2, normalize=True, seed=3)
    assert np.array_equal(projector.coords, P.project(X, "umap", 2, normalize=True, seed=3))
    assert seen["fit"] == (80, 50) and seen["random_state"] == 3
    placed = projector.transform(X[[5, 9]])
    assert seen["transform"] == (2, 50) and np.allclose(placed, projector.coords[[5, 9]], atol=1e-4)


def test_mean_lens_of_one_point_is_the_models_next_token(lm):
    cloud = P.prompt_cloud(lm, PSET, positions="last")
    k = 5
    for i in (1, 4):
        lens = SEL.selection_lens(lm, cloud, [i], top_k=k)
        assert lens.layers == cloud.layers and lens.top_ids.shape == (len(cloud.layers), k)
        with torch.inference_mode():
            ids = torch.tensor([lm.tokenizer(TEXTS[i])["input_ids"]])
            logits = lm.model(ids).logits[0, -1].float()
        top = logits.topk(k)
        if lm.dtype == torch.float32:
            assert lens.top_ids[-1].tolist() == top.indices.tolist()
        else:  # bfloat16 logits tie often, and ties come in either order: the lens's tokens carry the top logits
            assert logits[lens.top_ids[-1]].tolist() == top.values.tolist()
        assert np.allclose(lens.top_probs[-1], torch.softmax(logits, -1)[lens.top_ids[-1]].numpy(),
                           atol=1e-4 if lm.dtype == torch.float32 else 3e-2)
        assert np.isfinite(lens.entropy).all() and (lens.top_probs.sum(1) <= 1 + 1e-5).all()
        assert lens.records()[0] == {"layer": 0, "rank": 1, "token": lens.top_tokens[0][0],
                                     "id": int(lens.top_ids[0, 0]), "prob": float(lens.top_probs[0, 0])}


def test_mean_lens_reads_the_mean_of_the_selection(lm):
    cloud = P.prompt_cloud(lm, PSET, positions="last")
    chosen = [0, 2, 7]
    lens = SEL.selection_lens(lm, cloud, chosen, top_k=4)
    mean = torch.from_numpy(cloud.at(1)[chosen].astype(np.float64).mean(0)).to(lm.dtype)
    with torch.inference_mode():
        logits = lm.anatomy.logits(mean[None]).float()[0]
    assert lens.top_ids[1].tolist() == logits.topk(4).indices.tolist()
    single = [SEL.selection_lens(lm, cloud, [i], top_k=4).top_ids[1].tolist() for i in chosen]
    assert any(ids != lens.top_ids[1].tolist() for ids in single)  # the mean is not just one of its points
    assert SEL.selection_lens(lm, cloud, [7, 2, 0, 2], top_k=4).top_ids.tolist() == lens.top_ids.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_features_equal_direct_encodes(dtype):
    from engine.sae.base import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    sae = sae.to(getattr(torch, dtype))
    X = np.random.default_rng(1).normal(size=(11, 16)).astype(np.float32)
    found = SEL.selection_features(sae, X, top_n=10, batch_size=4)  # three batches
    with torch.inference_mode():
        acts = sae.encode(torch.from_numpy(X).to(sae.W_enc.dtype)).float()
        on_mean = sae.encode(torch.from_numpy(X.astype(np.float64).mean(0, keepdims=True)).to(sae.W_enc.dtype))
    mean = acts.double().mean(0)
    order = torch.argsort(mean, descending=True, stable=True)[:10]
    assert found.features == order.tolist() and found.n_points == 11
    assert np.allclose(found.mean_act, mean[order].numpy(), rtol=1e-6, atol=1e-6)
    assert found.fires_on == (acts > 0).sum(0)[order].tolist()
    assert np.allclose(found.max_act, acts.max(0).values[order].numpy())
    assert np.allclose(found.on_mean, on_mean[0].float()[order].numpy())
    assert all(a >= b for a, b in zip(found.mean_act, found.mean_act[1:])) and min(found.fires_on) >= 1
    one = SEL.selection_features(sae, X[3:4], top_n=64)
    assert sorted(one.features) == sorted((acts[3] > 0).nonzero().flatten().tolist())  # exactly the k active ones
    assert one.fires_on == [1] * len(one.features)


def test_bad_inputs_give_one_sentence(lm):
    cloud = P.prompt_cloud(lm, PSET, positions="last")
    with pytest.raises(SEL.SelectionError, match=r"Position 40 is not in the prompt: it has 10 tokens"):
        SEL.token_point(lm, "dogs bark", 40, "resid_post", 1)
    with pytest.raises(SEL.SelectionError, match="Position -11"):
        SEL.token_point(lm, "dogs bark", -11, "resid_post", 1)
    with pytest.raises(UserError, match="empty"):
        SEL.token_point(lm, "   ", 0, "resid_post", 1)
    with pytest.raises(SEL.SelectionError, match="Layer 9 does not exist"):
        SEL.token_point(lm, "dogs bark", 0, "resid_post", 9)
    with pytest.raises(SEL.SelectionError, match="Nothing is selected"):
        SEL.selection_lens(lm, cloud, [], top_k=3)
    with pytest.raises(SEL.SelectionError, match="names point 10, but this cloud has points 0..9"):
        SEL.selection_lens(lm, cloud, [1, 10], top_k=3)
    mlp = P.prompt_cloud(lm, PSET, site="mlp_out", positions="last")
    with pytest.raises(SEL.SelectionError, match="reads the residual stream"):
        SEL.selection_lens(lm, mlp, [1], top_k=3)
    projector = SEL.fit_projector(cloud.at(0), "pca", 2)
    with pytest.raises(SEL.SelectionError, match="width 8"):
        projector.transform(np.zeros(8))
    from engine.sae.base import SAE, SAEConfig

    with pytest.raises(SEL.SelectionError, match="width 16"):
        SEL.selection_features(SAE(SAEConfig(d_in=16, d_sae=8, k=2)), cloud.at(0)[:2])
