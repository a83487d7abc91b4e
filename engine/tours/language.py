"""Tours on languages: latent English (Wendler et al., 2024) and tongue vs thought (Dumas et al., 2024).

Both read translation prompts (``Français: "chien" - 中文: "狗"`` lines) through the engine's existing
measurements: :func:`engine.lens.latent_language.run_latent_language` and
:func:`engine.interventions.demos.tongue_thought`.
"""
from __future__ import annotations

import numpy as np

from engine.data.prompt_sets import LANGUAGES
from engine.interventions.demos import tongue_thought
from engine.lens.latent_language import LatentLanguageError, run_latent_language
from engine.tours.base import (
    TourError,
    TourResult,
    TourStep,
    bands_text,
    layer_bands,
    probability,
    timed,
    within,
)

LATENT_PAPER = "Wendler et al. (2024), Do Llamas Work in English? On the Latent Language of Multilingual Transformers"
TONGUE_PAPER = "Dumas et al. (2024), Separating Tongue from Thought: Activation Patching Reveals Language-Agnostic " \
               "Concept Representations in Transformers"


FLOOR = 0.01  # a probability below this is not a candidate the lens "prefers"


def _check_languages(*codes: str) -> None:
    for code in codes:
        if code not in LANGUAGES:
            raise TourError(f"Unknown language '{code}'; choose from {', '.join(LANGUAGES)}.")


# --- tour 1: latent English -------------------------------------------------------------------
def _latent_verdict(layers: list[str], english: np.ndarray, target: np.ndarray, tgt_name: str
                    ) -> tuple[bool, str, list[tuple]]:
    ahead = (english > target) & (english >= FLOOR)  # ahead where English is a real candidate, not 1e-6 vs 1e-8
    bands = layer_bands(layers, ahead)
    middle = ahead[1:-1]  # neither the embeddings nor the last layer
    ends_in_target = target[-1] > english[-1]
    matches = bool(middle.any()) and bool(ends_in_target)
    if matches:
        reason = (f"English leads {tgt_name} at layers {bands_text(bands)} and {tgt_name} wins at the last layer "
                  f"({target[-1]:.3f} vs {english[-1]:.3f}), the paper's pattern.")
    elif not middle.any():
        reason = (f"English never leads {tgt_name} with P(English) ≥ {FLOOR:.0%} in a middle layer of this model on "
                  "these prompts.")
    else:
        reason = (f"English leads at layers {bands_text(bands)} but still leads at the last layer "
                  f"({english[-1]:.3f} vs {target[-1]:.3f}): no switch to {tgt_name}.")
    return matches, reason, bands


def _latent_failed(lm, source: str, target: str, exc: Exception) -> TourResult:
    text = (f"No {LANGUAGES[source]} → {LANGUAGES[target]} prompt can be read out on {lm.name}: the measurement "
            f"needs answers that are a single token for this tokenizer. The engine said: {exc} "
            "Try another target language.")
    return TourResult("latent_english", "Do Llamas work in English?", LATENT_PAPER, lm.name,
                      {"source": source, "target": target}, [TourStep("No usable prompts", text)],
                      matches_paper=None, reason="no single-token answers for this tokenizer, nothing measured")


@timed
def run_latent_english(lm, source: str = "fr", target: str = "zh", max_items: int = 48) -> TourResult:
    """P(answer in the target language) vs P(the English word) per layer, logit lens, on few-shot translations."""
    _check_languages(source, target)
    if source == target:
        raise TourError("Pick two different languages.")
    try:
        result = run_latent_language(lm, source, target, max_items=max_items)
    except LatentLanguageError as exc:
        return _latent_failed(lm, source, target, exc)
    summary = result.summary()
    layers = summary["layers"]
    english = np.asarray(summary["english"]["mean"])
    target_p = np.asarray(summary["target_language"]["mean"])
    src_name, tgt_name = LANGUAGES[source], LANGUAGES[target]
    matches, reason, bands = _latent_verdict(layers, english, target_p, tgt_name)
    n, items = len(result.concepts), summary["items"]
    i_en, i_tg = int(english.argmax()), int(target_p.argmax())
    behind = np.nonzero(target_p <= english)[0]
    last_behind = int(behind[-1]) if len(behind) else -1
    if last_behind == len(layers) - 1:
        takeover = f"is still behind English at the last layer, ending at {target_p[-1]:.3f}"
    else:
        takeover = f"stays ahead from layer {layers[last_behind + 1]} on, ending at {target_p[-1]:.3f}"
    steps = [
        TourStep("The experiment",
                 f"{n} few-shot translation prompts from {src_name} to {tgt_name} (the first {n} of the "
                 f"{items['kept']} concepts whose {tgt_name} answer is one token for this tokenizer; "
                 f"{items['total'] - items['kept']} of {items['total']} were left out). At every layer the logit lens "
                 f"reads, at the open quote, the probability of the {tgt_name} answer and of the same concept's "
                 "English word.", "latent"),
        TourStep("What this model does",
                 f"English is ahead of {tgt_name} (with P(English) ≥ {FLOOR:.0%}) at layers {bands_text(bands)}. "
                 f"P(English) peaks at "
                 f"{english[i_en]:.3f} (layer {layers[i_en]}); P({tgt_name}) peaks at {target_p[i_tg]:.3f} "
                 f"(layer {layers[i_tg]}) and {takeover}.",
                 "latent"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Does not match the paper: ") + reason
                 + " Try this: another source or target language."),
    ]
    return TourResult(
        "latent_english", "Do Llamas work in English?", LATENT_PAPER, lm.name,
        {"source": source, "target": target, "max_items": max_items}, steps,
        figures={"latent": {"kind": "latent_language", "summary": summary, "target_name": tgt_name}},
        checks=[probability("P(target) per layer", target_p), probability("P(English) per layer", english),
                probability("band low", summary["english"]["lo"] + summary["target_language"]["lo"]),
                probability("band high", summary["english"]["hi"] + summary["target_language"]["hi"]),
                within("items", [n], 1, items["total"])],
        matches_paper=matches, reason=reason,
        measured={"english_ahead_layers": [list(b) for b in bands], "peak_english": float(english[i_en]),
                  "peak_english_layer": layers[i_en], "peak_target": float(target_p[i_tg]),
                  "peak_target_layer": layers[i_tg], "final_target": float(target_p[-1]),
                  "final_english": float(english[-1]), "items": n})


# --- tour 7: tongue vs thought ----------------------------------------------------------------
PAIRS = (("water", "dog"), ("tree", "milk"), ("dog", "water"), ("cat", "fire"), ("house", "moon"))
SOURCE_IN, SOURCE_OUT, TARGET_IN = "fr", "de", "es"


def _pair_effect(curves: dict[str, np.ndarray], tgt: str, src: str, floor: float = 0.01) -> list[bool]:
    """Per layer: the patched concept in the target's language is the most likely of the four words (and ≥ floor)."""
    a_tgt = curves[f"A in {tgt}"]
    others = np.stack([curves[f"A in {src}"], curves[f"B in {tgt}"], curves[f"B in {src}"]])
    return list((a_tgt > others.max(0)) & (a_tgt >= floor))


@timed
def run_tongue_thought(lm, target_out: str = "zh", pairs: tuple = PAIRS) -> TourResult:
    """Patch the last-token latent of a French→German prompt about A into a Spanish→``target_out`` prompt about B."""
    _check_languages(target_out)
    if target_out in (SOURCE_IN, SOURCE_OUT):
        raise TourError(f"Pick an output language other than {LANGUAGES[SOURCE_IN]} and {LANGUAGES[SOURCE_OUT]}.")
    runs = [tongue_thought(lm, a, b, SOURCE_IN, SOURCE_OUT, TARGET_IN, target_out) for a, b in pairs]
    layers = runs[0].layers
    labels = list(runs[0].curves)
    per_pair = [{k: np.asarray(v) for k, v in run.curves.items()} for run in runs]
    mean = {k: np.mean([p[k] for p in per_pair], 0) for k in labels}
    baseline = {k: float(np.mean([run.baselines["target"][k] for run in runs])) for k in labels}
    tgt, src = target_out, SOURCE_OUT
    moved = [_pair_effect(p, tgt, src) for p in per_pair]
    shown = [i for i, m in enumerate(moved) if any(m)]
    carried = (mean[f"A in {src}"] > mean[f"B in {tgt}"]) & (mean[f"A in {src}"] >= 0.01)
    held = np.nonzero(~carried)[0]  # the source's answer leads from the layer after the last one where it does not
    swap = int(held[-1]) + 1 if len(held) else 0
    swap_layer = layers[swap] if swap < len(layers) else None
    peak = int(mean[f"A in {tgt}"].argmax())
    tgt_name, src_name = LANGUAGES[tgt], LANGUAGES[src]
    matches = len(shown) * 2 > len(pairs)
    best_at = {i: max((k for k, ok in enumerate(moved[i]) if ok), key=lambda k: per_pair[i][f"A in {tgt}"][k])
               for i in shown}  # the strongest layer where the concept moved and the language stayed
    detail = "; ".join(f"{pairs[i][0]}→{pairs[i][1]} at layer {layers[k]} (P = {per_pair[i][f'A in {tgt}'][k]:.2f})"
                       for i, k in best_at.items())
    reason = (f"{len(shown)} of {len(pairs)} concept pairs have a layer where the patched concept comes out in "
              f"{tgt_name} as the most likely of the four words" + (f" ({detail})." if shown else "."))
    swap_text = (f"From layer {swap_layer} on, patching replaces B by the {src_name} answer (mean P(A in {src_name}) "
                 f"{mean[f'A in {src}'][swap]:.2f} there, {mean[f'A in {src}'][-1]:.2f} at the last layer): late "
                 "latents carry the output language along with the concept."
                 if swap_layer is not None else f"The {src_name} answer does not take over at the last layers.")
    steps = [
        TourStep("The experiment",
                 f"For {len(pairs)} concept pairs (A, B) we take the last-token latent of a {LANGUAGES[SOURCE_IN]}→"
                 f"{src_name} prompt about A and write it, one layer at a time, into a {LANGUAGES[TARGET_IN]}→"
                 f"{tgt_name} prompt about B. If the latent holds the concept but not the output language, the "
                 f"model should then say A in {tgt_name}.", "mean"),
        TourStep("What this model does",
                 f"Averaged over the pairs, P(A in {tgt_name}) peaks at {mean[f'A in {tgt}'][peak]:.3f} when "
                 f"patching layer {layers[peak]} (unpatched: {baseline[f'A in {tgt}']:.3f}); unpatched, the model "
                 f"says B in {tgt_name} with P = {baseline[f'B in {tgt}']:.3f}. " + swap_text, "mean"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Only partly like the paper: " if shown
                             else "Does not match the paper: ") + reason
                 + f" Try this: another output language than {tgt_name}.", "pairs"),
    ]
    return TourResult(
        "tongue_thought", "Tongue vs thought", TONGUE_PAPER, lm.name, {"target_out": target_out}, steps,
        figures={"mean": {"kind": "tongue_thought", "layers": layers, "curves": {k: v.tolist() for k, v in mean.items()},
                          "baselines": {"target": baseline}, "tokens": {k: f"mean of {len(pairs)} pairs" for k in labels},
                          "names": {k: k.replace(f" in {tgt}", f" in {tgt_name}").replace(f" in {src}", f" in {src_name}")
                                    for k in labels}},
                 "pairs": {"kind": "pair_table", "rows": [
                     {"pair": f"{a}→{b}", "best layer": layers[int(p[f'A in {tgt}'].argmax())],
                      f"max P(A in {tgt_name})": float(p[f"A in {tgt}"].max()),
                      f"P(A in {src_name}) there": float(p[f"A in {src}"][int(p[f'A in {tgt}'].argmax())]),
                      "concept moved, language stayed": bool(any(m))}
                     for (a, b), p, m in zip(pairs, per_pair, moved)]}},
        checks=[probability(f"mean {k} per layer", v) for k, v in mean.items()]
        + [probability("unpatched baselines", list(baseline.values()))],
        matches_paper=matches, reason=reason,
        measured={"pairs_showing_effect": len(shown), "pairs": len(pairs), "peak_mean_a_in_target": float(
            mean[f"A in {tgt}"][peak]), "peak_layer": layers[peak], "swap_layer": swap_layer,
            "per_pair_max": {f"{a}→{b}": float(p[f"A in {tgt}"].max()) for (a, b), p in zip(pairs, per_pair)}})
