"""Tour: logit lens vs tuned lens (Belrose et al., 2023), KL to the model's final distribution per layer.

With a tuned lens trained for the loaded model (:func:`engine.lens.tuned.list_lenses`) both lenses read the
same texts; without one the tour shows the logit lens alone and says how to train a lens. Training runs as a
``train_tuned_lens`` job: :func:`tuned_lens_job_spec` is the hook the Jobs page (or any runner) submits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.lens.logit import run_lens
from engine.lens.tuned import TunedLens, TunedLensError, list_lenses
from engine.tours.base import TourError, TourResult, TourStep, bands_text, layer_bands, nonnegative, timed

LENS_PAPER = "Belrose et al. (2023), Eliciting Latent Predictions from Transformers with the Tuned Lens"

TEXTS = {
    "prose": "The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships that "
             "passed in the night never knew his name.",
    "code": "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n    return total / "
            "len(values)\n",
    "french": "Le petit village se trouve au bord de la mer, et chaque matin les pêcheurs partent avant le lever "
              "du soleil.",
}


def tuned_lens_job_spec(model: str, steps: int = 200, corpus: str = "builtin", **config) -> dict:
    """The job that trains a tuned lens for ``model`` (submit it with ``engine.jobs.make_runner().submit``)."""
    return {"kind": "train_tuned_lens",
            "params": {"model": model, "corpus": corpus, "config": {"steps": int(steps), **config}}}


def _kl_per_layer(lm, text: str, lens: TunedLens | None) -> tuple[list[str], np.ndarray]:
    """Mean KL(final ‖ lens) over the text's positions (the first, BOS-like, position left out)."""
    result = run_lens(lm, text, top_k=1, transform=lens, lens_name="tuned" if lens is not None else "logit")
    kl = result.kl_to_final[:, 1:] if result.kl_to_final.shape[1] > 1 else result.kl_to_final
    return result.row_names, kl.mean(1)


def _load_lens(lm) -> tuple[TunedLens | None, str]:
    for folder in list_lenses(lm):
        try:
            return TunedLens.load(folder, lm), str(folder)
        except TunedLensError:
            continue
    return None, ""


def _logit_only_steps(lm, rows: list[str], kl: np.ndarray, text_name: str) -> list[TourStep]:
    below = np.nonzero(kl < 1.0)[0]
    first = rows[int(below[0])] if len(below) else None
    return [
        TourStep("The experiment",
                 f"The logit lens reads every layer of {lm.name} through the model's own final norm and unembedding. "
                 f"On the {text_name} text we measure, per layer, the KL divergence from the model's final "
                 "next-token distribution to the lens's (0 = the lens already predicts what the model will say).",
                 "kl"),
        TourStep("What this model does",
                 f"KL is {kl[0]:.2f} nats at the embeddings and {kl[len(kl) // 2]:.2f} at layer {rows[len(kl) // 2]}; "
                 + (f"it first drops below 1 nat at layer {first}." if first is not None else
                    "it stays above 1 nat until the last layer."), "kl"),
        TourStep("No tuned lens yet",
                 "There is no tuned lens for this model, so only the logit lens is shown. Train one from the Jobs "
                 "page (a 'train_tuned_lens' job; a few minutes on a CPU) and run this tour again to compare."),
    ]


@timed
def run_lens_comparison(lm, text: str = "prose") -> TourResult:
    """KL to the final distribution per layer for the logit lens and, when one exists, the tuned lens."""
    if text not in TEXTS:
        raise TourError(f"Unknown text '{text}'; choose from {', '.join(TEXTS)}.")
    rows, logit_kl = _kl_per_layer(lm, TEXTS[text], None)
    lens, folder = _load_lens(lm)
    curves = {"logit lens": logit_kl.tolist()}
    figure = {"kind": "kl_curves", "layers": rows, "curves": curves}
    checks = [nonnegative("logit-lens KL per layer", logit_kl)]
    if lens is None:
        return TourResult("lens_comparison", "Logit lens vs tuned lens", LENS_PAPER, lm.name, {"text": text},
                          _logit_only_steps(lm, rows, logit_kl, text), figures={"kl": figure}, checks=checks,
                          matches_paper=None, reason="no tuned lens for this model, so there is nothing to compare",
                          measured={"logit_kl": logit_kl.tolist(), "tuned_lens": None})
    _, tuned_kl = _kl_per_layer(lm, TEXTS[text], lens)
    curves["tuned lens"] = tuned_kl.tolist()
    inner = slice(0, len(rows) - 1)  # the last row is the model's own output: KL 0 for both
    better = tuned_kl[inner] < logit_kl[inner]
    share = float(better.mean())
    matches = share >= 0.9
    reason = (f"the tuned lens is closer to the final distribution at {int(better.sum())} of {int(better.size)} layers "
              f"(mean KL {tuned_kl[inner].mean():.2f} vs {logit_kl[inner].mean():.2f} nats).")
    worse = layer_bands(rows[inner], list(~better))
    steps = [
        TourStep("The experiment",
                 f"Two lenses read every layer of {lm.name} on the {text} text: the logit lens (the final norm and "
                 f"unembedding applied as they are) and the tuned lens in {Path(folder).name} (one learned affine "
                 "map per layer first). Per layer: KL from the model's final next-token distribution to each lens's.",
                 "kl"),
        TourStep("What this model does",
                 f"At the embeddings KL is {logit_kl[0]:.2f} (logit) vs {tuned_kl[0]:.2f} (tuned) nats; at layer "
                 f"{rows[len(rows) // 2]} {logit_kl[len(rows) // 2]:.2f} vs {tuned_kl[len(rows) // 2]:.2f}. "
                 f"The tuned lens is not better at layers {bands_text(worse)}.", "kl"),
        TourStep("Verdict", ("Matches the paper: " if matches else "Does not match the paper: ") + reason
                 + " Try this: another text."),
    ]
    return TourResult(
        "lens_comparison", "Logit lens vs tuned lens", LENS_PAPER, lm.name, {"text": text}, steps,
        figures={"kl": figure}, checks=checks + [nonnegative("tuned-lens KL per layer", tuned_kl)],
        matches_paper=matches, reason=reason,
        measured={"logit_kl": logit_kl.tolist(), "tuned_kl": tuned_kl.tolist(), "tuned_better_share": share,
                  "tuned_lens": folder})
