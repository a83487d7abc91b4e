"""Every engine path on an accelerator (and dtype) against the CPU in float32: ``make gpu-check``.

    python benchmarks/gpu_check.py                          # embedded models, --device cuda --dtype bfloat16
    python benchmarks/gpu_check.py --device cpu --dtype bfloat16 --model tiny:llama   # dry run on any machine

Each model is loaded twice: the reference on the CPU in float32 and the model under test on ``--device`` in
``--dtype``. Every check runs one engine path on both and compares the answers within the tolerances in
:data:`TOL` (agreement rates must reach their limit, differences stay below theirs); the table shows each
measure, its limit and ok / FAIL / skip with a reason. The exit status is 1 when any check failed.

Checks: load (self-check), capture, lens, tuned lens (trained on the device, read out on both), steering,
ablation, patching sweeps, latent language, activation store, SAE training and evaluation, dashboards, feature
search, and a device map (on a GPU: the upper half of the layers on the CPU, a real cross-device split; on a
CPU: a middle layer offloaded to disk). Engine modules are imported inside each check and looked up among
their known homes, so a module that moved makes that check skip with a note instead of stopping the run.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

EMBEDDED_MODELS = ("gemma-3-270m", "smollm2-135m")
# Tolerances of the model under test (bfloat16 on a GPU) against the float32 CPU reference. Probabilities are
# absolute, "rel" values are fractions of the reference's norm, KL and cross-entropy in nats.
TOL = {
    "top1_agreement": 0.85,     # lens: share of (layer, position) cells with the same top-1 token
    "final_top1_agreement": 0.9,  # lens: the same at the last layer (the model's own prediction)
    "near_tie": 0.1,            # lens: reference prob. of its own top-1 minus its prob. of the tested top-1
    "prob_p99": 0.1,            # lens: 99th percentile over cells of |difference| of the top-1 probability
    "prob": 0.35,               # lens: the same, worst cell (a peaked intermediate layer can swap its top two)
    "entropy_mean": 0.1,        # lens: mean |difference| of the entropy
    "capture_rel": 0.1,         # capture / store: 99th percentile over tokens of ||a - b|| / ||a|| (not position 0)
    "capture_rel_max": 0.35,    # capture / store: the same, worst token (small-norm tokens amplify rounding)
    "next_kl": 0.1,             # steering / ablation: KL(reference edited || tested edited), last position
    "effect_kl": 0.15,          # |KL(clean -> edited) reference - tested| / max(KL reference, 1) - a relative error
    "patch_prob": 0.05,         # patching sweep: max |difference| of a cell's probability
    "patch_logit": 0.1,         # patching sweep: max |difference| of a cell's logit difference / the cells' range
    "tuned_kl": 0.1,            # tuned lens: max |difference| of the held-out KL per layer
    "latent_prob": 0.05,        # latent language: max |difference| of a layer's mean probability
    "ev": 0.05,                 # SAE evaluation: |difference| of the explained variance
    "ce_rel": 0.05,             # SAE evaluation: |difference| of a cross-entropy / reference cross-entropy
    "l0_rel": 0.1,              # SAE evaluation: relative difference of L0
    "max_act_rel": 0.1,         # dashboards: median over live features of the relative max-activation difference
    "density": 0.02,            # dashboards: max |difference| of a feature's firing density
    "logit_top1": 0.9,          # dashboards: share of features with the same top logit token
    "search_overlap": 0.6,      # feature search: overlap of the top-10 features
    "split_exact": 1e-4,        # device map on one device type (CPU + disk): max |difference| from the whole model
}
PROMPTS = ["The capital of France is Paris, and the capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "Le chat est assis sur le tapis. The cat is sitting on the"]


class Skip(Exception):
    """A check cannot run here (a missing package, a moved module, a model without the needed tokens)."""


@dataclass
class Measure:
    name: str
    value: float
    limit: float | None = None
    at_least: bool = False  # True: value must reach the limit; False: stay at or below it

    @property
    def passed(self) -> bool:
        if self.limit is None:
            return True
        if not math.isfinite(self.value):
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit


@dataclass
class Outcome:
    check: str
    status: str = "ok"
    seconds: float = 0.0
    note: str = ""
    measures: list[Measure] = field(default_factory=list)


class Checker:
    """Collects the measures of one check."""

    def __init__(self) -> None:
        self.measures: list[Measure] = []
        self.notes: list[str] = []

    def at_most(self, name: str, value, limit: float) -> None:
        self.measures.append(Measure(name, float(value), float(limit)))

    def at_least(self, name: str, value, limit: float) -> None:
        self.measures.append(Measure(name, float(value), float(limit), at_least=True))

    def info(self, name: str, value) -> None:
        self.measures.append(Measure(name, float(value)))

    def note(self, text: str) -> None:
        self.notes.append(text)


def find(name: str, *modules: str):
    """``name`` from the first of ``modules`` that has it (engine modules are still being moved around)."""
    for module in modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise Skip(f"{name} was not found in {', '.join(modules)}")


@dataclass
class Context:
    args: argparse.Namespace
    model: str
    ref: object          # LoadedModel, CPU float32
    test: object         # LoadedModel, --device / --dtype
    work: Path
    texts: list[str]
    stores: dict = field(default_factory=dict)  # "ref" / "test" -> store folder
    sae_dir: Path | None = None

    @property
    def mid(self) -> int:
        return self.ref.n_layers // 2

    @property
    def small(self) -> bool:
        return self.model.startswith("tiny:") or self.args.quick


# --- helpers -------------------------------------------------------------------------------------
def host(tensor) -> np.ndarray:
    from engine.core.devices import to_host

    return to_host(tensor, torch.float64).numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor, float)


def token_rel_errors(a, b, skip_first: bool = True) -> np.ndarray:
    """``||a - b|| / ||a||`` per token vector (last axis); position 0 (BOS, huge norm) left out."""
    a, b = host(a), host(b)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    norm = np.linalg.norm(a, axis=-1)
    keep = norm > 1e-6 * max(norm.max(), 1e-30)
    if skip_first and len(keep) > 1:
        keep[0] = False
    return np.linalg.norm(a - b, axis=-1)[keep] / norm[keep] if keep.any() else np.zeros(1)


def measure_rel_errors(c: Checker, label: str, errors: np.ndarray) -> None:
    c.at_most(f"{label} rel. error p99", np.percentile(errors, 99), TOL["capture_rel"])
    c.at_most(f"{label} rel. error max", errors.max(), TOL["capture_rel_max"])


def next_token_stats(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> tuple[float, float]:
    """``(KL(ref || test), top-1 agrees)`` of two ``[V]`` logit vectors."""
    from engine.core.numerics import kl_from_logits

    a, b = ref_logits.float().cpu(), test_logits.float().cpu()
    return float(kl_from_logits(a, b)), float(int(a.argmax()) == int(b.argmax()))


def direction_for(lm, layer: int, scale: float = 4.0) -> list[float]:
    """A fixed random direction as long as ``scale`` times the median residual norm at ``layer``."""
    from engine.core.capture import capture

    ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]])
    resid = capture(lm.anatomy, ids, sites={"resid_post": [layer]})[0]["resid_post"][0, 0, 1:]
    norm = float(resid.float().norm(dim=-1).median())
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(lm.d_model, generator=generator)
    return (vector / vector.norm() * norm * scale).tolist()


# --- checks --------------------------------------------------------------------------------------
def check_load(ctx: Context, c: Checker) -> None:
    from engine.core.selfcheck import tolerance

    c.at_most("self-check (test, logit units)", ctx.test.self_check_max_abs_diff, tolerance(ctx.test.dtype))
    c.at_most("self-check (reference)", ctx.ref.self_check_max_abs_diff, tolerance(ctx.ref.dtype))
    c.info("layers", ctx.test.n_layers)
    c.note(f"{ctx.test.describe()['architecture']} on {ctx.test.device} in {ctx.test.dtype}")


def check_capture(ctx: Context, c: Checker) -> None:
    capture = find("capture", "engine.core.capture")
    available_sites = find("available_sites", "engine.core.sites")
    sites = available_sites(ctx.ref.anatomy)
    ids = torch.tensor([ctx.ref.tokenizer(PROMPTS[0])["input_ids"]])
    got_ref, _ = capture(ctx.ref.anatomy, ids, sites={s: "all" for s in sites}, stop_early=False)
    got, _ = capture(ctx.test.anatomy, ids, sites={s: "all" for s in sites}, stop_early=False)
    for site in sites:
        if got[site].dtype != ctx.test.dtype or got[site].device != ctx.test.device:
            raise AssertionError(f"{site} came back as {got[site].dtype} on {got[site].device}")
        errors = np.concatenate([token_rel_errors(got_ref[site][i], got[site][i]) for i in range(len(got[site]))])
        measure_rel_errors(c, site, errors)


def _lens_near_tie(ref, prompt: str, test_top1: np.ndarray) -> float:
    """Max over cells of (reference prob. of its top-1) - (reference prob. of the tested top-1)."""
    capture = find("capture", "engine.core.capture")
    lens_stats = find("lens_stats", "engine.lens.logit")
    ids = torch.tensor([ref.tokenizer(prompt)["input_ids"]])
    got, _ = capture(ref.anatomy, ids, sites={"resid_pre": [0], "resid_post": "all"}, stop_early=False)
    resid = torch.cat([got["resid_pre"], got["resid_post"]])[:, 0]  # [rows, T, d]
    unique = sorted({int(i) for i in test_top1.reshape(-1)})
    stats = lens_stats(ref.anatomy, resid, top_k=1, tracked_ids=unique)
    column = {token: j for j, token in enumerate(unique)}
    index = np.vectorize(column.get)(test_top1)
    chosen = np.take_along_axis(stats["t_probs"].numpy(), index[..., None], axis=-1)[..., 0]
    return float((stats["top_probs"][..., 0].numpy() - chosen).max())


def check_lens(ctx: Context, c: Checker) -> None:
    from engine.core.selfcheck import tolerance

    run_lens = find("run_lens", "engine.lens.logit")
    agree, final, near, prob, entropy = [], [], [], [], []
    for prompt in PROMPTS:
        a, b = run_lens(ctx.ref, prompt, top_k=3), run_lens(ctx.test, prompt, top_k=3)
        if b.top_probs.dtype != np.float32 or not np.isfinite(b.entropy).all():
            raise AssertionError(f"lens results came back as {b.top_probs.dtype} / not finite")
        agree.append(a.top_ids[..., 0] == b.top_ids[..., 0])
        final.append(a.top_ids[-1, :, 0] == b.top_ids[-1, :, 0])
        near.append(_lens_near_tie(ctx.ref, prompt, b.top_ids[..., 0]))
        prob.append(np.abs(a.top_probs[..., 0] - b.top_probs[..., 0]).reshape(-1))
        entropy.append(np.abs(a.entropy - b.entropy).mean())
        c.at_most(f"self-check '{prompt[:12]}...'", b.self_check_max_abs_diff, tolerance(ctx.test.dtype))
    c.at_least("top-1 agreement", np.concatenate([x.reshape(-1) for x in agree]).mean(), TOL["top1_agreement"])
    c.at_least("last-layer top-1 agreement", np.concatenate(final).mean(), TOL["final_top1_agreement"])
    c.at_most("near-tie gap", max(near), TOL["near_tie"])
    c.at_most("p99 |d top-1 prob|", np.percentile(np.concatenate(prob), 99), TOL["prob_p99"])
    c.at_most("max |d top-1 prob|", np.concatenate(prob).max(), TOL["prob"])
    c.at_most("mean |d entropy|", float(np.mean(entropy)), TOL["entropy_mean"])


def check_tuned_lens(ctx: Context, c: Checker) -> None:
    train = find("train_tuned_lens", "engine.lens.tuned_train", "engine.lens.tuned")
    config_cls = find("LensTrainConfig", "engine.lens.tuned_train", "engine.lens.tuned")
    compare = find("compare_lenses", "engine.lens.compare", "engine.lens.tuned")
    seq = 32 if ctx.small else 64
    config = config_cls(steps=40 if ctx.small else 60, batch_size=4, seq_len=seq, lr=0.05 if ctx.small else None,
                        heldout_fraction=0.25, checkpoint_every=10**6)
    result = train(ctx.test, ctx.texts, None, config)
    losses = [float(x) for x in result.losses]
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError("the tuned-lens training loss is not finite")
    c.at_most("last / first loss", np.mean(losses[-5:]) / max(np.mean(losses[:5]), 1e-12), 1.0)
    lens_cpu = copy.deepcopy(result.lens).to("cpu", torch.float32)
    tokens = 128 if ctx.small else 256  # the CPU reference reads every layer through the full head
    a = compare(ctx.ref, lens_cpu, ctx.texts, max_tokens=tokens, seq_len=seq, heldout_fraction=0.25)
    b = compare(ctx.test, result.lens, ctx.texts, max_tokens=tokens, seq_len=seq, heldout_fraction=0.25)
    c.at_most("max |d KL tuned| per layer", np.abs(np.asarray(a.kl_tuned) - np.asarray(b.kl_tuned)).max(),
              TOL["tuned_kl"])
    c.at_most("max |d KL logit| per layer", np.abs(np.asarray(a.kl_logit) - np.asarray(b.kl_logit)).max(),
              TOL["tuned_kl"])
    c.at_most("tuned / logit KL (test)", np.mean(b.kl_tuned[:-1]) / max(np.mean(b.kl_logit[:-1]), 1e-12), 1.0)


def _edit_check(ctx: Context, c: Checker, make_specs: Callable) -> None:
    run_with = find("run_with", "engine.interventions.hooks")
    kls, agree, effect = [], [], []
    for prompt in PROMPTS:
        specs_ref, specs_test = make_specs(ctx.ref), make_specs(ctx.test)
        clean_a, clean_b = run_with(ctx.ref, prompt, [])[-1], run_with(ctx.test, prompt, [])[-1]
        hit_a, hit_b = run_with(ctx.ref, prompt, specs_ref)[-1], run_with(ctx.test, prompt, specs_test)[-1]
        if hit_b.dtype != torch.float32:
            raise AssertionError(f"intervened logits came back as {hit_b.dtype}")
        kl, same = next_token_stats(hit_a, hit_b)
        kls.append(kl)
        agree.append(same)
        moved_a, moved_b = next_token_stats(clean_a, hit_a)[0], next_token_stats(clean_b, hit_b)[0]
        effect.append(abs(moved_a - moved_b) / max(moved_a, 1.0))
    c.at_most("KL(ref edited || test edited)", max(kls), TOL["next_kl"])
    c.info("edited top-1 agreement", float(np.mean(agree)))
    c.at_most("rel. error of the edit's KL", max(effect), TOL["effect_kl"])


def check_steering(ctx: Context, c: Checker) -> None:
    steer = find("steer", "engine.interventions.specs")
    direction = direction_for(ctx.ref, ctx.mid)
    _edit_check(ctx, c, lambda lm: [steer(ctx.mid, direction, 1.0)])


def check_ablation(ctx: Context, c: Checker) -> None:
    ablate_neurons = find("ablate_neurons", "engine.interventions.specs")
    ablate_heads = find("ablate_heads", "engine.interventions.specs")
    if not (ctx.ref.anatomy.has_mlp and ctx.ref.anatomy.has_attention):
        raise Skip("the model has no MLP or attention sub-modules")
    _edit_check(ctx, c, lambda lm: [ablate_neurons(ctx.mid, list(range(32)), mode="mean"),
                                    ablate_heads(ctx.mid, [0, 1])])


def check_patching(ctx: Context, c: Checker) -> None:
    patch_sweep = find("patch_sweep", "engine.interventions.sweeps")
    tok = ctx.ref.tokenizer
    target = tok("The Eiffel Tower is in the city of")["input_ids"]
    source = list(target)
    source[-4] = tok(" Colosseum", add_special_tokens=False)["input_ids"][0]  # same length, one token swapped
    for kind, extra in (("layer_position", {}), ("layer_layer", {"metric": "logit_diff", "token_b": " Rome"})):
        a = patch_sweep(ctx.ref, source, target, " Paris", kind=kind, **extra)
        b = patch_sweep(ctx.test, source, target, " Paris", kind=kind, batch_size=32, **extra)
        if b.values.dtype != np.float32:
            raise AssertionError(f"sweep values came back as {b.values.dtype}")
        diff = np.abs(a.values - b.values).max()
        if kind == "layer_layer":  # a logit difference: relative to the range the cells span
            spread = float(a.values.max() - a.values.min())
            c.info("layer x layer max |d logit diff|", diff)
            c.at_most("layer x layer |d| / range", diff / max(spread, 1.0), TOL["patch_logit"])
        else:
            c.at_most("layer x position max |d prob|", diff, TOL["patch_prob"])


def check_latent_language(ctx: Context, c: Checker) -> None:
    run = find("run_latent_language", "engine.lens.latent_language")
    error = find("LatentLanguageError", "engine.lens.latent_language")
    try:
        a = run(ctx.ref, "fr", "zh", n_shots=3, max_items=24, batch_size=8)
    except error as exc:
        raise Skip(str(exc)[:120]) from None
    b = run(ctx.test, "fr", "zh", n_shots=3, max_items=24, batch_size=8)
    for name in ("target_probs", "english_probs"):
        mean_a, mean_b = np.asarray(getattr(a, name)).mean(0), np.asarray(getattr(b, name)).mean(0)
        c.at_most(f"max |d mean {name}|", np.abs(mean_a - mean_b).max(), TOL["latent_prob"])


def check_store(ctx: Context, c: Checker) -> None:
    build_store = find("build_store", "engine.data.store_writer", "engine.data.store")
    tokens = 1024 if ctx.small else 2048
    layers = sorted({ctx.mid, ctx.ref.n_layers - 1})
    stores = {}
    for key, lm in (("ref", ctx.ref), ("test", ctx.test)):
        out = ctx.work / f"store-{key}"
        shutil.rmtree(out, ignore_errors=True)
        stores[key] = build_store(lm, ctx.texts, out, layers=layers, sites=("resid_post",), max_tokens=tokens,
                                  context_length=64, batch_size=8, dtype="float32")
        ctx.stores[key] = out
    a, b = stores["ref"], stores["test"]
    if a.n_tokens != b.n_tokens or not torch.equal(a.token_ids(), b.token_ids()):
        raise AssertionError(f"the stores hold different tokens ({a.n_tokens} vs {b.n_tokens})")
    c.info("tokens", a.n_tokens)
    positions = a.positions()
    for layer in layers:
        rows = a.read("resid_post", layer, slice(0, a.n_tokens))[positions != 0]
        other = b.read("resid_post", layer, slice(0, b.n_tokens))[positions != 0]
        measure_rel_errors(c, f"layer {layer}", token_rel_errors(rows, other, skip_first=False))


def _eval_report(ctx: Context, lm, sae) -> dict:
    evaluate = find("evaluate_with_model", "engine.sae.evaluation")
    texts = ctx.texts[len(ctx.texts) // 2:]
    return evaluate(sae, lm, texts, max_tokens=256 if ctx.small else 512, context_length=64, batch_size=4)


def check_sae(ctx: Context, c: Checker) -> None:
    if "test" not in ctx.stores:
        raise Skip("needs the store check")
    open_store = find("ActivationStore", "engine.data.store").open
    train_sae = find("train_sae", "engine.sae.training")
    config_cls = find("SAETrainConfig", "engine.sae.training")
    store = open_store(ctx.stores["test"])
    config = config_cls(architecture="topk", d_sae=4 * ctx.ref.d_model, k=16, batch_size=256,
                        total_tokens=8 * store.n_tokens, warmup_steps=10, init_sample_tokens=512, log_every=10,
                        checkpoint_every=10**6, device=ctx.args.device, b_dec_init="mean")
    out = ctx.work / "sae"
    shutil.rmtree(out, ignore_errors=True)
    result = train_sae(store, out, site="resid_post", layer=ctx.mid, config=config,
                       model_name=ctx.model, resume=False)
    ctx.sae_dir = Path(result.path or out)
    last = result.history[-1] if result.history else {}
    c.info("training explained variance", last.get("explained_variance", float("nan")))
    load_sae = find("load_sae", "engine.sae.io")
    a = _eval_report(ctx, ctx.ref, load_sae(ctx.sae_dir))
    b = _eval_report(ctx, ctx.test, load_sae(ctx.sae_dir))
    c.at_most("|d explained variance|", abs(a["explained_variance"] - b["explained_variance"]), TOL["ev"])
    c.at_most("rel. d L0", abs(a["l0"] - b["l0"]) / max(a["l0"], 1e-6), TOL["l0_rel"])
    for key in ("clean", "spliced", "zero_ablated"):
        c.at_most(f"rel. d CE {key}", abs(a["ce"][key] - b["ce"][key]) / max(abs(a["ce"][key]), 1e-6),
                  TOL["ce_rel"])


def check_dashboards(ctx: Context, c: Checker) -> None:
    import pandas as pd

    if ctx.sae_dir is None or len(ctx.stores) < 2:
        raise Skip("needs the store and SAE checks")
    build = find("build_dashboards", "engine.features.build", "engine.features")
    config_cls = find("DashboardConfig", "engine.features.build", "engine.features")
    tables = {}
    for key, lm, device in (("ref", ctx.ref, "cpu"), ("test", ctx.test, ctx.args.device)):
        out = ctx.work / f"dashboards-{key}"
        build(ctx.sae_dir, ctx.stores[key], lm, out, config=config_cls(top_k=10, batch_size=1024, device=device),
              force=True)
        tables[key] = pd.read_parquet(out / "features.parquet").sort_values("feature").reset_index(drop=True)
    a, b = tables["ref"], tables["test"]
    live = (a["max_act"] > 0) & (b["max_act"] > 0)
    rel = (a["max_act"][live] - b["max_act"][live]).abs() / a["max_act"][live]
    c.info("live features", int(live.sum()))
    c.at_most("median rel. d max activation", float(rel.median()) if live.any() else 0.0, TOL["max_act_rel"])
    c.at_most("max |d density|", float((a["density"] - b["density"]).abs().max()), TOL["density"])
    first = [s.split(" | ")[0] for s in a["top_logits"]], [s.split(" | ")[0] for s in b["top_logits"]]
    c.at_least("top logit token agreement", float(np.mean([x == y for x, y in zip(*first)])), TOL["logit_top1"])


def check_feature_search(ctx: Context, c: Checker) -> None:
    if ctx.sae_dir is None:
        raise Skip("needs the SAE check")
    search = find("features_like_text", "engine.autointerp.search", "engine.features.search")
    load_sae = find("load_sae", "engine.sae.io")
    overlaps = []
    for prompt in PROMPTS:
        a = search(ctx.ref, load_sae(ctx.sae_dir), prompt, limit=10)
        b = search(ctx.test, load_sae(ctx.sae_dir, device=ctx.test.device), prompt, limit=10)
        top_a, top_b = set(a["feature"].tolist()), set(b["feature"].tolist())
        overlaps.append(len(top_a & top_b) / max(len(top_a), 1))
    c.at_least("min top-10 overlap", min(overlaps), TOL["search_overlap"])


def _split_map(ctx: Context) -> tuple[dict, bool]:
    """``(device map, exact)``: on a GPU the upper half of the layers on the CPU; elsewhere a middle layer on disk."""
    path = ctx.test.anatomy.layers_path
    n = ctx.test.n_layers
    if ctx.test.device.type == "cuda":
        return {f"{path}.{i}": "cpu" for i in range(n // 2, n)}, False
    return {f"{path}.{ctx.mid}": "disk"}, True


def check_device_map(ctx: Context, c: Checker) -> None:
    from engine.core.models import load_model

    run_lens = find("run_lens", "engine.lens.logit")
    run_with = find("run_with", "engine.interventions.hooks")
    steer = find("steer", "engine.interventions.specs")
    patch_sweep = find("patch_sweep", "engine.interventions.sweeps")
    device_map, exact = _split_map(ctx)
    split = load_model(ctx.model, device=ctx.args.device, dtype=ctx.args.dtype, device_map=device_map,
                       offload_folder=ctx.work / "offload")
    c.note(f"split over {sorted(set(split.device_map.values()))}")
    whole = ctx.test if exact else ctx.ref  # a CPU/GPU mix computes in two kernels' bfloat16: compare to float32
    limit = TOL["split_exact"]
    a, b = run_lens(whole, PROMPTS[0], top_k=3), run_lens(split, PROMPTS[0], top_k=3)
    if exact:
        c.at_most("lens max |d prob|", np.abs(a.top_probs - b.top_probs).max(), limit)
    else:
        c.at_least("lens last-layer top-1 agreement", (a.top_ids[-1, :, 0] == b.top_ids[-1, :, 0]).mean(),
                   TOL["final_top1_agreement"])
        c.at_most("lens max |d top-1 prob|", np.abs(a.top_probs[..., 0] - b.top_probs[..., 0]).max(), TOL["prob"])
    specs = [steer(ctx.mid, direction_for(ctx.ref, ctx.mid), 1.0)]
    kl, _ = next_token_stats(run_with(whole, PROMPTS[1], specs)[-1], run_with(split, PROMPTS[1], specs)[-1])
    c.at_most("steered KL(whole || split)", kl, limit if exact else TOL["next_kl"])
    ids = split.tokenizer("The Eiffel Tower is in the city of")["input_ids"]
    other = list(ids)
    other[-4] = ids[1]
    a, b = patch_sweep(whole, other, ids, " Paris"), patch_sweep(split, other, ids, " Paris", batch_size=16)
    c.at_most("patching max |d prob|", np.abs(a.values - b.values).max(), limit if exact else TOL["patch_prob"])
    if ctx.sae_dir is not None:
        _splice_measure(ctx, c, whole, split, limit if exact else TOL["next_kl"])


def _splice_measure(ctx: Context, c: Checker, whole, split, limit: float) -> None:
    load_sae = find("load_sae", "engine.sae.io")
    resolve_splice = find("resolve_splice", "engine.sae.attach")
    splice_sae = find("splice_sae", "engine.sae.splice")
    last = []
    for lm in (whole, split):
        sae = load_sae(ctx.sae_dir, device=lm.device)
        ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]], device=lm.device)
        with splice_sae(lm.anatomy, sae, resolve_splice(sae, lm.anatomy)), torch.inference_mode():
            last.append(lm.model(input_ids=ids).logits[0, -1])
    c.at_most("SAE-spliced KL(whole || split)", next_token_stats(*last)[0], limit)


CHECKS: dict[str, Callable[[Context, Checker], None]] = {
    "load": check_load, "capture": check_capture, "lens": check_lens, "tuned_lens": check_tuned_lens,
    "steering": check_steering, "ablation": check_ablation, "patching": check_patching,
    "latent_language": check_latent_language, "store": check_store, "sae": check_sae,
    "dashboards": check_dashboards, "feature_search": check_feature_search, "device_map": check_device_map,
}


# --- running and reporting ------------------------------------------------------------------------
def run_check(name: str, ctx: Context) -> Outcome:
    checker = Checker()
    started = time.perf_counter()
    outcome = Outcome(name)
    try:
        CHECKS[name](ctx, checker)
        failed = [m.name for m in checker.measures if not m.passed]
        if failed:
            outcome.status, checker.notes = "FAIL", [f"beyond tolerance: {', '.join(failed)}"] + checker.notes
    except Skip as exc:
        outcome.status, checker.notes = "skip", [str(exc)]
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table, the run goes on
        outcome.status = "FAIL"
        where = traceback.extract_tb(exc.__traceback__)[-1]
        checker.notes = [f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''} "
                         f"({Path(where.filename).name}:{where.lineno})"]
    outcome.seconds = time.perf_counter() - started
    outcome.measures, outcome.note = checker.measures, "; ".join(checker.notes)
    return outcome


def print_table(model: str, args, outcomes: list[Outcome]) -> None:
    print(f"\n== {model}: {args.device} {args.dtype} vs cpu float32 ==")
    print(f"{'check':<16} {'status':<6} {'s':>6}  {'measure':<38} {'value':>11} {'limit':>11}")
    for outcome in outcomes:
        lines = outcome.measures or [None]
        for i, m in enumerate(lines):
            head = (f"{outcome.check:<16} {outcome.status:<6} {outcome.seconds:>6.1f}" if i == 0
                    else f"{'':<16} {'':<6} {'':>6}")
            if m is None:
                print(f"{head}  {'-':<38}")
                continue
            limit = "" if m.limit is None else ((">= " if m.at_least else "<= ") + f"{m.limit:.3g}")
            flag = "" if m.passed else "  <- FAIL"
            print(f"{head}  {m.name[:38]:<38} {m.value:>11.4g} {limit:>11}{flag}")
        if outcome.note:
            print(f"{'':<16} {'':<6} {'':>6}  note: {outcome.note}")


def load_pair(model: str, args) -> tuple:
    from engine.core.models import load_model

    ref = load_model(model, device="cpu", dtype="float32")
    test = load_model(model, device=args.device, dtype=args.dtype)
    return ref, test


def builtin_texts(n: int) -> list[str]:
    iter_texts = find("iter_texts", "engine.data.corpora")
    texts = []
    for text in iter_texts("builtin"):
        texts.append(text[:4000])
        if len(texts) >= n:
            break
    return texts


def check_model(model: str, args, work: Path) -> list[Outcome]:
    started = time.perf_counter()
    try:
        ref, test = load_pair(model, args)
    except Exception as exc:  # noqa: BLE001
        return [Outcome("load", "FAIL", time.perf_counter() - started, f"{type(exc).__name__}: {exc}")]
    folder = work / model.replace(":", "-").replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    small = model.startswith("tiny:") or args.quick
    ctx = Context(args, model, ref, test, folder, builtin_texts(24 if small else 96))
    names = [n for n in CHECKS if not args.only or n in args.only]
    outcomes = []
    for name in names:
        torch.manual_seed(0)
        outcome = run_check(name, ctx)
        if name == "load":
            outcome.seconds += time.perf_counter() - started - outcome.seconds
        outcomes.append(outcome)
        print(f"  {name}: {outcome.status} ({outcome.seconds:.1f} s)", file=sys.stderr, flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=",".join(EMBEDDED_MODELS),
                        help=f"comma-separated model specs (default: the embedded {', '.join(EMBEDDED_MODELS)})")
    parser.add_argument("--device", default="cuda", help="device under test (default cuda)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype under test (default bfloat16)")
    parser.add_argument("--only", default="", help=f"comma-separated checks among {', '.join(CHECKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller token budgets")
    parser.add_argument("--work", default=None, help="folder for stores, SAEs and dashboards (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks: {', '.join(unknown)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but this machine has no usable GPU (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = {}
    for model in [m.strip() for m in args.model.split(",") if m.strip()]:
        print(f"checking {model} ...", file=sys.stderr, flush=True)
        outcomes = check_model(model, args, work)
        print_table(model, args, outcomes)
        results[model] = outcomes
    failed = [f"{model}:{o.check}" for model, outs in results.items() for o in outs if o.status == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks ok or skipped'} "
          f"(tolerances: see TOL in {Path(__file__).name})")
    if args.json:
        Path(args.json).write_text(json.dumps({m: [{**o.__dict__, "measures": [m_.__dict__ for m_ in o.measures]}
                                                   for o in outs] for m, outs in results.items()}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
