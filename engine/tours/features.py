"""Tour: one SAE feature end to end (contexts, logit effects, steering), found by a rule, not a hard-coded id.

The rule, over the newest dashboard built for the loaded model's weights: among live, non-dense features
with at least ``MIN_EXAMPLES`` top examples, keep those with a coherent top-token set on both sides:

- *reads* one word: at least ``READ_COHERENCE`` of its top examples sit on the same token (compared case- and
  space-insensitively), and that token is a word (it has a letter and two characters or more);
- *writes* one word: at least ``WRITE_COHERENCE`` of the five tokens it promotes most through the unembedding
  share a stem (their first four letters, case and accents folded: "album", "Album", "álbum", "albums");

then rank them by density-penalised max activation, ``max activation × log10(1 / density)``.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter

from engine.features.read import Dashboard, list_dashboards
from engine.interventions.generation import dose_response
from engine.interventions.specs import steer_sae_feature
from engine.tours.base import TourError, TourResult, TourStep, nonnegative, probability, timed, within

FEATURE_PAPER = "Templeton et al. (2024), Scaling Monosemanticity: Extracting Interpretable Features from Claude 3 " \
                "Sonnet (and Bricken et al., 2023, Towards Monosemanticity)"
MIN_EXAMPLES = 10
READ_COHERENCE = 0.5
WRITE_COHERENCE = 0.6
MIN_WORD_CHARS = 2
ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)
STEER_FLOOR = 0.01  # steering "works" when the promoted token reaches this probability and 10x its clean value
STEER_PROMPT = "I looked out of the window and saw"
BUILD_HELP = ("Build them with the demo job on the Jobs page ('sae_demo': capture the built-in corpus, train a small "
              "TopK SAE and build its dashboards; minutes on a CPU), or from a shell: `python -m engine sae demo` "
              "then `python -m engine dashboards --sae <the SAE folder> --corpus builtin`.")


def _stem(token: str) -> str | None:
    folded = unicodedata.normalize("NFKD", token.strip().casefold())
    letters = "".join(ch for ch in folded if ch.isalnum())
    return letters[:4] if len(letters) >= 3 else None


def _is_word(token: str) -> bool:
    return len(token) >= MIN_WORD_CHARS and any(ch.isalpha() for ch in token)


def _shared(items: list) -> tuple[object, float]:
    """The most common non-empty item and its share of all items."""
    counts = Counter(item for item in items if item)
    if not counts or not items:
        return None, 0.0
    item, count = counts.most_common(1)[0]
    return item, count / len(items)


def _per_feature(frame, column: str, convert) -> dict[int, list]:
    out: dict[int, list] = {}
    for feature, value in zip(frame["feature"].astype(int), frame[column]):
        out.setdefault(int(feature), []).append(convert(value))
    return out


def ranked_features(dash: Dashboard, tokenizer) -> list[dict]:
    """Candidate features by the rule in the module docstring, best first (with score and both coherences)."""
    stats = dash.query("SELECT feature, density, max_act FROM features WHERE NOT dead AND NOT dense "
                       "AND density > 0 AND max_act > 0")
    examples = dash.query("SELECT feature, token_id FROM top_examples ORDER BY feature, rank")
    promoted = dash.query("SELECT feature, token FROM logits WHERE sign = '+' AND rank < 5 ORDER BY feature, rank")
    ids = sorted({int(i) for i in examples["token_id"]})
    words = dict(zip(ids, (w.strip().lower() for w in tokenizer.batch_decode([[i] for i in ids])))) if ids else {}
    reads = _per_feature(examples, "token_id", lambda i: words[int(i)])
    writes = _per_feature(promoted, "token", lambda t: _stem(str(t)))
    ranked = []
    for feature, density, max_act in zip(stats["feature"].astype(int), stats["density"], stats["max_act"]):
        found = reads.get(int(feature), [])
        if len(found) < MIN_EXAMPLES:
            continue
        token, read = _shared(found)
        stem, write = _shared(writes.get(int(feature), []))
        if read < READ_COHERENCE or not _is_word(str(token)) or write < WRITE_COHERENCE:
            continue
        ranked.append({"feature": int(feature), "density": float(density), "max_act": float(max_act),
                       "coherence": read, "write_coherence": write, "token": str(token), "stem": str(stem),
                       "score": float(max_act) * math.log10(1.0 / float(density))})
    return sorted(ranked, key=lambda r: (-r["score"], r["feature"]))


def _no_dashboards(lm, reason: str) -> TourResult:
    return TourResult("features", "One feature, end to end", FEATURE_PAPER, lm.name, {},
                      [TourStep("No feature dashboards", f"{reason} {BUILD_HELP}")],
                      matches_paper=None, reason=reason)


def _explore(lm, dash: Dashboard, pick: dict) -> dict:
    """Contexts, logit effects and a steering sweep of one feature."""
    feature = pick["feature"]
    info = dash.feature(feature)
    top = info["top"].head(5)
    contexts = dash.contexts(feature, [int(r) for r in top["row"]], lm.tokenizer)
    logits = info["logits"]
    promoted = logits[logits["sign"] == "+"].sort_values("rank")
    token = str(promoted["token"].iloc[0])
    spec = steer_sae_feature(dash.manifest["sae_path"], feature, 1.0, dash.layer, site=dash.site,
                             unit=pick["max_act"])
    dose = dose_response(lm, STEER_PROMPT, spec, ALPHAS, token)
    return {"contexts": contexts, "logits": logits.to_dict("list"), "token": token, "dose": dose.to_json(),
            "promoted": [str(t) for t in promoted["token"].head(5)]}


@timed
def run_feature(lm, rank: int = 0) -> TourResult:
    """The ``rank``-th feature by the rule above, on the newest dashboard of this model's weights."""
    if rank < 0:
        raise TourError("The rank must be 0 (the best feature) or more.")
    entries = list_dashboards(weights_hash=lm.weights_hash)
    if not entries:
        return _no_dashboards(lm, f"No feature dashboards exist for {lm.name}.")
    dash = Dashboard.open(entries[0]["path"])
    ranked = ranked_features(dash, lm.tokenizer)
    if len(ranked) <= rank:
        return _no_dashboards(lm, f"The dashboard '{entries[0]['name']}' has {len(ranked)} feature(s) whose top "
                                  f"examples and promoted tokens are coherent (the rule needs ≥ {MIN_EXAMPLES} "
                                  f"examples, ≥ {READ_COHERENCE:.0%} on one word and ≥ {WRITE_COHERENCE:.0%} of its "
                                  f"top-5 promoted tokens on one stem), fewer than rank {rank} + 1.")
    pick = ranked[rank]
    seen = _explore(lm, dash, pick)
    probs = seen["dose"]["target_prob"]
    clean = seen["dose"]["clean_prob"]
    best = max(range(len(probs)), key=probs.__getitem__)
    gain = probs[best] / max(clean, 1e-30)
    matches = probs[best] >= STEER_FLOOR and gain >= 10.0
    word = seen["token"].strip()
    reason = (f"it reads '{pick['token']}' ({pick['coherence']:.0%} of its top examples) and writes '{word}'; "
              f"steering moves P('{word}') from {clean:.3g} to at most {probs[best]:.3g} (α = {ALPHAS[best]:g}, "
              f"{gain:.3g}×)" + ("." if matches else f", {'below' if probs[best] < STEER_FLOOR else 'less than 10× above'} "
                                 f"what would show the feature driving the output."))
    steps = [
        TourStep("Finding a feature",
                 f"Dashboard '{entries[0]['name']}' ({dash.d_sae} features at {dash.site} layer {dash.layer}). "
                 f"Rule: features that fire mostly on one word and mostly promote one word stem, ranked by max "
                 f"activation × log10(1/density). Rank {rank}: feature {pick['feature']} (max activation {pick['max_act']:.3g}, "
                 f"fires on {100 * pick['density']:.3g} % of tokens, {len(ranked)} candidates).", "contexts"),
        TourStep("What it reads and what it writes",
                 f"{pick['coherence']:.0%} of its top examples are on '{pick['token']}'. Through the unembedding "
                 f"its decoder direction promotes {', '.join(repr(t.strip()) for t in seen['promoted'])} "
                 f"({pick['write_coherence']:.0%} of them start with '{pick['stem']}').", "logits"),
        TourStep("Steering with it",
                 f"Adding the feature's direction to '{STEER_PROMPT}' at layer {dash.layer}, scaled by α × its max "
                 f"activation: P('{seen['token'].strip()}') goes {' → '.join(f'{p:.3g}' for p in probs)} for α = "
                 f"{', '.join(f'{a:g}' for a in ALPHAS)}.", "dose"),
        TourStep("Verdict", ("Interpretable and steerable: " if matches else "Interpretable, but not steerable here: ")
                 + reason
                 + " Try this: the next feature by the same rule."),
    ]
    return TourResult(
        "features", "One feature, end to end", FEATURE_PAPER, lm.name, {"rank": rank}, steps,
        figures={"contexts": {"kind": "contexts", "contexts": seen["contexts"], "feature": pick["feature"]},
                 "logits": {"kind": "logits", "logits": seen["logits"]},
                 "dose": {"kind": "dose", **seen["dose"]}},
        checks=[probability("P(token) under steering", probs + [clean]),
                nonnegative("KL to clean", seen["dose"]["kl_to_clean"]),
                probability("coherences and density", [pick["coherence"], pick["write_coherence"], pick["density"]]),
                within("max activation", [pick["max_act"]], 0.0, float("inf"))],
        matches_paper=matches, reason=reason,
        measured={"feature": pick["feature"], "token": pick["token"], "coherence": pick["coherence"],
                  "write_coherence": pick["write_coherence"], "stem": pick["stem"],
                  "density": pick["density"], "max_act": pick["max_act"], "steer_token": seen["token"],
                  "steer_probs": probs, "clean_prob": clean, "dashboard": entries[0]["name"]})
