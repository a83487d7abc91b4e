"""Past one device: a model split by an accelerate device map gives the same answers as the undivided model.

On a CPU machine the split offloads some modules to disk: their weights sit on the ``meta`` device between
forward passes and accelerate's hooks load them and move inputs, so every hook path (capture, the lens read-out
through an offloaded final norm / head, steering, ablation, SAE clamping and splicing, patching with the
replayed clean prefix, dashboards) runs through the same cross-device code as a multi-GPU split. Each path must
equal the undivided model (max |difference| below ``ATOL``; in practice 0 on a CPU).

Also here: ``--device-map`` parsing and its one-sentence errors, the out-of-memory guard and ``budget_rows``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.core.capture import capture
from engine.core.devices import (
    DeviceError,
    MemoryBudgetError,
    budget_rows,
    module_device,
    module_tensor,
    oom_guard,
    parse_device_map,
)
from engine.core.errors import UserError
from engine.core.models import ModelLoadError, load_model
from engine.core.sites import SITES

ATOL = 1e-5
PROMPT = "The cat sat on the mat"
OTHER = "The dog sat on the rug"  # same token count as PROMPT (byte-level tokenizer)
MAPS = {
    # the brief's split: layers 1 and 2 offloaded to disk, the head and final norm computed on the CPU
    "layers_on_disk": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                       "model.layers.2": "disk", "lm_head": "cpu"},
    # embedding, a middle layer, the final norm and the head on disk: the lens reads out through offloaded modules
    "head_on_disk": {"model.embed_tokens": "disk", "model.layers.1": "disk", "model.norm": "disk",
                     "lm_head": "disk"},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Llama saved as a Hugging Face folder (what a device map is loaded from)."""
    from engine.core.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny("llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def whole(folder):
    return load_model(str(folder))


@pytest.fixture(scope="module", params=list(MAPS))
def split(request, folder, tmp_path_factory):
    return load_model(str(folder), device_map=MAPS[request.param], offload_folder=tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def sae_folder(whole, tmp_path_factory):
    from engine.sae.base import SAE, SAEConfig

    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=whole.d_model, d_sae=64, architecture="standard",
                        metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny:llama"}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 0.3)
    return str(sae.save(tmp_path_factory.mktemp("sae") / "tiny-sae"))


def max_diff(a, b) -> float:
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max()) if a.size else 0.0


def _ids(lm, text=PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


# --- loading -------------------------------------------------------------------------------------
def test_split_model_records_its_map_and_really_offloads(split):
    assert split.device_map is not None and "disk" in split.device_map.values()
    assert split.device == torch.device("cpu")  # the input embedding's execution device, also when offloaded
    assert split.describe()["device_map"] == split.device_map
    assert split.self_check_max_abs_diff <= 1e-4
    offloaded = [name for name, device in split.device_map.items() if device == "disk"]
    module = split.model.get_submodule(offloaded[0])
    assert all(p.device.type == "meta" for p in module.parameters())  # weights live on disk between passes
    assert module_device(module) == torch.device("cpu")
    weight = module_tensor(split.model.get_submodule("model.layers.1.mlp.down_proj"))
    assert weight.device.type == "cpu" and weight.abs().sum() > 0  # read back from the offload folder


def test_split_logits_equal_the_undivided_model(whole, split):
    with torch.inference_mode():
        assert max_diff(whole.model(_ids(whole)).logits, split.model(_ids(split)).logits) < ATOL


def test_tiny_spec_takes_a_device_map(tmp_path):
    whole = load_model("tiny:llama")
    split = load_model("tiny:llama", device_map={"model.layers.1": "disk", "lm_head": "disk"},
                       offload_folder=tmp_path)
    assert split.device_map["model.layers.1"] == "disk" and split.device_map["model.embed_tokens"] == "cpu"
    with torch.inference_mode():
        assert max_diff(whole.model(_ids(whole)).logits, split.model(_ids(split)).logits) < ATOL
    assert load_model("tiny:llama", device_map="balanced").device_map == {"": "cpu"}  # a CPU box: one device


# --- every hook path -----------------------------------------------------------------------------
def test_capture_every_site(whole, split):
    sites = {site: "all" for site in SITES}
    a, out_a = capture(whole.anatomy, _ids(whole), sites=sites, stop_early=False)
    b, out_b = capture(split.anatomy, _ids(split), sites=sites, stop_early=False)
    for site in SITES:
        assert b[site].device == split.device
        assert max_diff(a[site], b[site]) < ATOL, site
    assert max_diff(out_a.logits, out_b.logits) < ATOL
    early, _ = capture(split.anatomy, _ids(split), sites={"resid_post": [1]})  # stops inside the split
    assert max_diff(early["resid_post"], a["resid_post"][1:2]) < ATOL


def test_lens(whole, split):
    from engine.lens.logit import lens_stats, run_lens

    a = run_lens(whole, PROMPT, track=[" m", "a"], sublayers=True)
    b = run_lens(split, PROMPT, track=[" m", "a"], sublayers=True)
    assert b.self_check_max_abs_diff < 1e-4
    assert np.array_equal(a.top_ids, b.top_ids)
    for name in ("top_probs", "entropy", "kl_to_final", "tracked_probs"):
        assert max_diff(getattr(a, name), getattr(b, name)) < ATOL, name
    assert np.array_equal(a.tracked_ranks, b.tracked_ranks)
    resid = capture(split.anatomy, _ids(split), sites={"resid_post": "all"}, stop_early=False)[0]["resid_post"][:, 0]
    stats = lens_stats(split.anatomy, resid, tracked_ids=[40])  # through the offloaded norm/head directly
    reference = lens_stats(whole.anatomy, resid, tracked_ids=[40])
    assert all(max_diff(stats[k], reference[k]) < ATOL for k in stats)
    assert max_diff(split.anatomy.logits(resid[-1]), whole.anatomy.logits(resid[-1])) < ATOL


def test_steering_ablation_clamping_patching(whole, split, sae_folder):
    from engine.interventions.generation import compare_next_token, dose_response, generate_compare
    from engine.interventions.hooks import run_with
    from engine.interventions.specs import (
        ablate_features,
        ablate_heads,
        ablate_neurons,
        clamp_feature,
        patch,
        steer,
        steer_sae_feature,
    )

    torch.manual_seed(0)
    direction = torch.randn(whole.d_model).tolist()
    cases = {
        "steer": [steer(1, direction, 4.0, positions=[2, 3])],
        "steer_resid_pre_on_disk_layer": [steer(2, direction, 3.0, site="resid_pre")],
        "ablate": [ablate_neurons(1, [1, 5], mode="mean"), ablate_heads(2, [1])],
        "clamp_sae": [clamp_feature(sae_folder, 3, 5.0, layer=1), ablate_features(sae_folder, [1, 2], layer=1)],
        "steer_sae": [steer_sae_feature(sae_folder, 7, 2.0, layer=1)],
        "patch": [patch(OTHER, 1, [3]), patch(OTHER, 2, [-1], source_layer=0)],
    }
    for name, specs in cases.items():
        assert max_diff(run_with(whole, PROMPT, specs), run_with(split, PROMPT, specs)) < ATOL, name
    specs = cases["steer"]
    a, b = compare_next_token(whole, PROMPT, specs), compare_next_token(split, PROMPT, specs)
    assert abs(a["kl"] - b["kl"]) < ATOL and [t["id"] for t in a["intervened"]] == [t["id"] for t in b["intervened"]]
    a, b = generate_compare(whole, PROMPT, specs, 4), generate_compare(split, PROMPT, specs, 4)
    assert a.intervened_ids == b.intervened_ids
    a = dose_response(whole, PROMPT, steer(1, direction, 1.0), [0.0, 1.0, 3.0], " m")
    b = dose_response(split, PROMPT, steer(1, direction, 1.0), [0.0, 1.0, 3.0], " m")
    assert max_diff(a.target_prob, b.target_prob) < ATOL and max_diff(a.kl_to_clean, b.kl_to_clean) < ATOL


def test_patching_sweeps(whole, split):
    from engine.interventions.sweeps import patch_sweep, run_row_patches

    for kwargs in ({"batch_size": 5}, {"site": "mlp_out", "batch_size": 4},
                   {"kind": "layer_layer", "metric": "logit_diff", "token_b": "r"}):
        a = patch_sweep(whole, OTHER, PROMPT, "m", **kwargs)
        b = patch_sweep(split, OTHER, PROMPT, "m", **kwargs)
        assert a.values.std() > 0 and max_diff(a.values, b.values) < ATOL, kwargs
        assert all("forward" not in layer.__dict__ or layer.__dict__["forward"].__class__.__name__ == "partial"
                   for layer in split.anatomy.layers)  # the replay swapped accelerate's wrapper back
    ids = _ids(split)[0].tolist()
    layers = torch.tensor([0, 2, 1])
    values = torch.zeros(3, split.d_model)
    kept = run_row_patches(split, ids, "resid_post", layers, torch.tensor([1, 2, 3]), values,
                           measure=lambda logits: logits[:, :2])
    assert kept.shape == (3, 2)  # only what the metric needs is kept per patched row, never [R, V]


def test_sae_splice(whole, split, sae_folder):
    from engine.sae.attach import resolve_splice
    from engine.sae.io import load_sae
    from engine.sae.splice import splice_sae

    sae = load_sae(sae_folder)
    outputs = []
    for lm in (whole, split):
        with splice_sae(lm.anatomy, sae, resolve_splice(sae, lm.anatomy)), torch.inference_mode():
            outputs.append(lm.model(_ids(lm)).logits)
    assert max_diff(*outputs) < ATOL
    with torch.inference_mode():
        assert max_diff(outputs[1], split.model(_ids(split)).logits) > 1e-3  # the splice did change the output


def test_dashboard_paths(whole, split, sae_folder):
    from engine.features.decoder import logit_effects, norm_gain
    from engine.features.text import text_activations
    from engine.sae.io import load_sae

    sae = load_sae(sae_folder)
    words_a, acts_a = text_activations(whole, sae, "resid_post", 1, PROMPT)
    words_b, acts_b = text_activations(split, sae, "resid_post", 1, PROMPT)
    assert words_a == words_b and acts_b.dtype == torch.float32 and max_diff(acts_a, acts_b) < ATOL
    for site, W_dec in (("resid_post", sae.W_dec), ("mlp_hidden", torch.linspace(-1, 1, 8 * 64).reshape(8, 64))):
        a = logit_effects(whole.anatomy, W_dec, site, 1, n=5)
        b = logit_effects(split.anatomy, W_dec, site, 1, n=5)  # head and down_proj read back when offloaded
        assert all(torch.equal(a[k], b[k]) if "ids" in k else max_diff(a[k], b[k]) < ATOL for k in a), site
    gains = [norm_gain(lm.anatomy, lm.d_model, "cpu")[0] for lm in (whole, split)]
    assert max_diff(*gains) < ATOL


def test_store_capture_and_sae_evaluation(whole, split, sae_folder, tmp_path):
    from engine.data.store_writer import build_store
    from engine.sae.evaluation import evaluate_with_model
    from engine.sae.io import load_sae

    texts = [f"Text {i} is about cats, dogs and the weather." for i in range(6)]
    stores = [build_store(lm, texts, tmp_path / name, layers=[0, 2], sites=("resid_post", "mlp_out"), max_tokens=120,
                          context_length=24, dtype="float32") for name, lm in (("a", whole), ("b", split))]
    for site, layer in (("resid_post", 0), ("mlp_out", 2)):
        assert max_diff(stores[0].read(site, layer, slice(0, 100)), stores[1].read(site, layer, slice(0, 100))) < ATOL
    sae = load_sae(sae_folder)
    a = evaluate_with_model(sae, whole, texts, max_tokens=100, context_length=24)
    b = evaluate_with_model(sae, split, texts, max_tokens=100, context_length=24)
    for key in ("clean", "spliced", "zero_ablated"):
        assert abs(a["ce"][key] - b["ce"][key]) < ATOL, key


# --- settings and their sentences ------------------------------------------------------------------
@pytest.mark.parametrize("device_map, message", [
    ({"model.layers.1": "cuda:3"}, "not usable here"),
    ({"layers.1": "cpu"}, "did you mean 'model.layers.1'"),
    ({"model.decoder": "cpu"}, "not a module of this model"),
    ('{"model.layers.1": "disk"', "not valid JSON"),
    ("fastest", "neither auto, balanced"),
    ('["model.layers.1"]', "neither auto, balanced"),
    ({"model.layers.1": "meta"}, "use 'cuda:N', 'cpu' or 'disk'"),
    ({"model.layers.1": 2.5}, "use 'cuda:N', 'cpu' or 'disk'"),
])
def test_bad_device_maps_fail_with_one_sentence(folder, device_map, message):
    if "cuda:3" in str(device_map) and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), device_map=device_map)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match=message.split("'")[0]):
        load_model("tiny:llama", device_map=device_map)


def test_parse_device_map():
    assert parse_device_map(None) is None and parse_device_map("  ") is None
    assert parse_device_map("auto") == "auto" and parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.1": "DISK", "lm_head": "cpu"}') == {"model.layers.1": "disk",
                                                                                 "lm_head": "cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no usable GPU"):
            parse_device_map({"model.layers.0": 0})  # accelerate's GPU numbers are cuda:N


def test_cli_device_map(folder, tmp_path, monkeypatch, capsys):
    from engine.cli.common import main

    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path))  # the default offload folder goes under the cache
    assert main(["lens", "--model", str(folder), "--prompt", "Hello world", "--top-k", "2", "--json",
                 "--device-map", json.dumps(MAPS["layers_on_disk"])]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"]["device_map"]["model.layers.1"] == "disk" and payload["self_check_max_abs_diff"] < 1e-4
    assert (tmp_path / "offload").is_dir()
    assert main(["lens", "--model", str(folder), "--prompt", "hi", "--device-map", '{"layers.9": "cpu"}']) == 2
    err = capsys.readouterr().err
    assert "error: The device map names 'layers.9'" in err and "Traceback" not in err


# --- memory budgets --------------------------------------------------------------------------------
def test_oom_guard_turns_out_of_memory_into_one_sentence():
    def cuda_oom():
        big = torch.ones(4)  # noqa: F841 (a tensor the failed frame holds)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.1 GiB total)")

    with pytest.raises(MemoryBudgetError) as info:
        with oom_guard("the sweep's batch size (batch_size)", "running the patching sweep"):
            cuda_oom()
    assert str(info.value) == ("Out of memory while running the patching sweep (it asked for 2.50 GiB more); "
                               "lower the sweep's batch size (batch_size).")
    assert isinstance(info.value, UserError) and info.value.__cause__ is None

    @oom_guard("batch_size", "encoding")
    def cpu_oom():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")

    with pytest.raises(MemoryBudgetError, match=r"^Out of memory while encoding \(it asked for 1024\.00 GiB more\); "
                                                r"lower batch_size\.$"):
        cpu_oom()
    with pytest.raises(MemoryBudgetError, match="lower max_tokens"):
        with oom_guard("max_tokens"):
            raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error passes through unchanged
        with oom_guard("batch_size"):
            raise RuntimeError("shape mismatch")
    with oom_guard("batch_size"):
        pass


def test_patch_sweep_out_of_memory_names_the_batch_size(whole, monkeypatch):
    import engine.interventions.sweeps as sweeps

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(sweeps, "forward_logits", exhausted)
    with pytest.raises(MemoryBudgetError, match=r"lower the sweep's batch size \(batch_size\)"):
        sweeps.run_row_patches(whole, _ids(whole)[0].tolist(), "resid_post", torch.tensor([0, 1]),
                               torch.tensor([1, 2]), torch.zeros(2, whole.d_model))


def test_budget_rows():
    assert budget_rows(1000, 10_000) == 10
    assert budget_rows(1000, 10) == 1  # at least one row, even over budget
    assert budget_rows(0, 10) == 10
    assert budget_rows(10, 10_000, total=7) == 7


def test_tied_embedding_and_head_stay_on_one_device(tmp_path):
    from engine.core.tiny import build_tiny

    model, tokenizer = build_tiny("gemma3")  # the head shares the input embedding's weight
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    whole = load_model(str(tmp_path / "model"))
    split = load_model(str(tmp_path / "model"), device_map={"lm_head": "disk"}, offload_folder=tmp_path / "off")
    assert split.device_map["model.embed_tokens"] == "disk"  # followed the head it is tied to
    with torch.inference_mode():
        assert max_diff(whole.model(_ids(whole)).logits, split.model(_ids(split)).logits) < ATOL
    with pytest.raises(ModelLoadError, match="share one weight .* must be on the same device"):
        load_model(str(tmp_path / "model"), device_map={"lm_head": "disk", "model.embed_tokens": "cpu"})


@pytest.mark.parametrize("vocab_subset", [None, 64])
def test_tuned_lens_training(whole, split, tmp_path, vocab_subset):
    """Tuned-lens training reads the head through offloaded modules (full vocabulary and a vocabulary subset)."""
    from engine.lens.tuned_train import LensTrainConfig, train_tuned_lens

    texts = [f"Text {i} is about cats, dogs and the weather in town." for i in range(12)]
    config = LensTrainConfig(steps=3, batch_size=2, seq_len=16, vocab_subset=vocab_subset, subset_windows=4,
                             heldout_fraction=0.0, checkpoint_every=10)
    results = [train_tuned_lens(lm, texts, tmp_path / name, config) for name, lm in (("a", whole), ("b", split))]
    assert max_diff(torch.tensor(results[0].losses), torch.tensor(results[1].losses)) < ATOL
