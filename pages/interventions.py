"""Interventions: steer, ablate, clamp and patch, with before/after views (generation, Δ-lens, dose-response,
patching sweeps and the "Separating tongue from thought" demo).

Only the open tab computes (``st.tabs(on_change="rerun")``), each view is cached by strings (model key, prompt,
interventions JSON, the view's settings), and the view's state lives in the URL (:mod:`components.links`), so a
link reproduces it; the intervention list and long prompts travel as share ids.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from components.autointerp_ui import feature_picker, features_caption
from components.intervention_plots import (
    DELTA_METRICS,
    delta_lens_heatmap,
    dose_response_figure,
    generation_diff_html,
    sweep_heatmap,
    tongue_thought_figure,
)
from components.links import sync_query_params
from components.session import cache_key, current_model, get_model_by_key, model_key, show_user_error
from engine.core.errors import UserError
from engine.core.sites import EDIT_SITES
from engine.data.prompt_sets import CONCEPTS, LANGUAGES
from engine.features.read import corpus_means, find_dashboard
from engine.interventions.demos import tongue_thought
from engine.interventions.directions import feature_unit, load_sae_cached, mean_difference_direction, probe_direction
from engine.interventions.edits import compile_interventions
from engine.interventions.generation import compare_next_token, delta_lens, dose_response, generate_compare
from engine.interventions.specs import (
    Intervention,
    ablate_features,
    ablate_heads,
    ablate_neurons,
    clamp_feature,
    load_specs,
    patch,
    save_specs,
    steer,
    steer_sae_feature,
)
from engine.interventions.sweeps import patch_sweep
from engine.lens.tokens import continuation
from engine.sae.io import list_saes
from engine.serving import NotAllowed, current_policy

OPS = {"steer": "Steer (add α × direction)", "ablate_features": "Ablate SAE features",
       "clamp_feature": "Clamp an SAE feature", "ablate_neurons": "Ablate MLP neurons",
       "ablate_heads": "Ablate attention heads", "patch": "Patch from a source prompt"}
DIRECTIONS = ["Difference of means", "Probe", "SAE feature"]
TABS = ["Next token & generation", "Δ-lens", "Dose-response", "Patching sweep", "Tongue vs thought"]

# The default steering example, measured on the embedded Gemma 3 270M: a French-minus-English direction from five
# parallel sentences, added at every position of resid_post at layer 5 of 18 (the same depth on other models).
# On "I think this movie is", P(' très') is 0.000 clean, jumps when the output language flips near α = 0.6 and then
# rises steadily (0.071 at α = 0.75, 0.088 at 1, 0.131 at 1.5, 0.155 at 2) before falling off; at α = 1.5 the
# greedy continuation is fluent French (" unoriginal. Il ne peut pas être très facile de voir ...").
DEFAULT_PROMPT = "I think this movie is"
DEFAULT_NAME_A, DEFAULT_NAME_B = "French", "English"
DEFAULT_A = "Le chat dort sur le canapé\nIl fait beau aujourd'hui\nJe voudrais un café, s'il vous plaît\n" \
            "Nous allons à la plage demain\nMa sœur lit un livre"
DEFAULT_B = "The cat sleeps on the sofa\nThe weather is nice today\nI would like a coffee, please\n" \
            "We are going to the beach tomorrow\nMy sister is reading a book"
DEFAULT_DEPTH, DEFAULT_ALPHA = 5 / 18, 1.5
DEFAULT_DOSE_TOKEN, DEFAULT_TRACK = " très", " très, a"

# page state that a link reproduces (components.links): key -> default
LINK_STATE = {
    "iv_prompt": DEFAULT_PROMPT, "iv_specs": None, "iv_tab": TABS[0],
    "gen_n": 12, "gen_sample": False, "gen_seed": 0,
    "dl_track": DEFAULT_TRACK, "dl_metric": "tracked_prob", "dl_which": 0,
    "dose_pick": 0, "dose_range": (-1.0, 3.0), "dose_steps": 17, "dose_token": DEFAULT_DOSE_TOKEN,
    "sweep_source": "The capital of France is", "sweep_target": "The capital of Poland is",
    "sweep_token": " Paris", "sweep_token_b": " Warsaw", "sweep_metric": "prob", "sweep_kind": "layer_position",
    "sweep_site": "resid_post",
    "tt_a": "dog", "tt_s_in": "de", "tt_s_out": "fr", "tt_b": "water", "tt_t_in": "es", "tt_t_out": "zh",
}
LINK_LONG = {"iv_prompt", "iv_specs", "sweep_source", "sweep_target"}
CONCEPT_NAMES = sorted(c["concept"] for c in CONCEPTS)
LINK_OPTIONS = {"iv_tab": TABS, "gen_n": range(1, 129), "gen_seed": range(0, 10**6 + 1), "dose_steps": range(3, 42),
                "dl_metric": list(DELTA_METRICS), "sweep_metric": ["prob", "logit_diff"],
                "sweep_kind": ["layer_position", "layer_layer"], "sweep_site": list(EDIT_SITES),
                "tt_a": CONCEPT_NAMES, "tt_b": CONCEPT_NAMES, **{k: list(LANGUAGES) for k in
                                                                ("tt_s_in", "tt_s_out", "tt_t_in", "tt_t_out")}}


# --- cached engine calls (string keys only) -----------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=32)
def _direction(key: tuple, model_id: str, how: str, a: tuple[str, ...], b: tuple[str, ...], layer: int,
               site: str) -> list[float]:
    lm = get_model_by_key(key)
    fn = probe_direction if how == "Probe" else mean_difference_direction
    return fn(lm, list(a), list(b), layer, site)


@st.cache_data(show_spinner=False, max_entries=32)
def _unit(key: tuple, model_id: str, folder: str, feature: int) -> float:
    return feature_unit(get_model_by_key(key), folder, feature)


@st.cache_data(show_spinner=False, max_entries=32)
def _next_token(key: tuple, model_id: str, prompt: str, specs_json: str) -> dict:
    return compare_next_token(get_model_by_key(key), prompt, load_specs(json.loads(specs_json)))


@st.cache_data(show_spinner=False, max_entries=32)
def _generate_clean(key: tuple, model_id: str, prompt: str, n: int, sample: bool, seed: int) -> list[int]:
    """The clean continuation alone: it does not change when interventions are added or removed."""
    return generate_compare(get_model_by_key(key), prompt, [], max_new_tokens=n, sample=sample, seed=seed).clean_ids


@st.cache_data(show_spinner=False, max_entries=32)
def _generate(key: tuple, model_id: str, prompt: str, specs_json: str, n: int, sample: bool, seed: int):
    clean = _generate_clean(key, model_id, prompt, n, sample, seed)
    return generate_compare(get_model_by_key(key), prompt, load_specs(json.loads(specs_json)),
                            max_new_tokens=n, sample=sample, seed=seed, clean_ids=clean)


@st.cache_data(show_spinner=False, max_entries=16)
def _delta_lens(key: tuple, model_id: str, prompt: str, specs_json: str, track: tuple[str, ...]):
    positions = None
    lm = get_model_by_key(key)
    n = len(lm.tokenizer(prompt)["input_ids"])
    if n > 40:
        positions = list(range(n - 40, n))
    return delta_lens(lm, prompt, load_specs(json.loads(specs_json)), track=list(track), positions=positions)


@st.cache_data(show_spinner=False, max_entries=16)
def _dose(key: tuple, model_id: str, prompt: str, spec_json: str, alphas: tuple[float, ...], token: str):
    spec = Intervention.from_json(json.loads(spec_json))
    return dose_response(get_model_by_key(key), prompt, spec, list(alphas), token)


@st.cache_data(show_spinner=False, max_entries=16)
def _sweep(key: tuple, model_id: str, source: str, target: str, token: str, kind: str, metric: str,
           token_b: str | None, site: str):
    return patch_sweep(get_model_by_key(key), source, target, token, kind=kind, metric=metric, token_b=token_b,
                       site=site)


@st.cache_data(show_spinner=False, max_entries=16)
def _tongue(key: tuple, model_id: str, a: str, b: str, s_in: str, s_out: str, t_in: str, t_out: str):
    return tongue_thought(get_model_by_key(key), a, b, s_in, s_out, t_in, t_out)


# --- helpers -----------------------------------------------------------------------------------
def _ints(text: str, what: str) -> list[int] | None:
    """'1, 2, -1' -> [1, 2, -1]; '' -> None."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return None
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{what} must be whole numbers separated by commas (e.g. 3, 7, -1).") from None


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _token_note(lm, word: str, what: str, context: str | None = None) -> None:
    """Say which token a word is measured by when it is several tokens (the engine follows the first)."""
    if not word:
        return
    try:
        found = continuation(lm.tokenizer, context or "", word)
    except ValueError:
        return
    if len(found.ids) > 1:
        st.caption(f":material/info: {what} {word!r} is {len(found.ids)} tokens "
                   f"({' '.join(repr(p) for p in found.pieces)}); using the first: {found.pieces[0]!r}.")


def _need_token(word: str, field: str) -> str:
    if not word:
        raise UserError(f"The '{field}' field is empty: type the token to measure (spaces matter, e.g. ' Paris').")
    return word


def _direction_label(how: str, layer: int, site: str, direction: list[float]) -> str:
    state = st.session_state
    a = state.get("iv_name_a", "").strip() or "A"
    b = state.get("iv_name_b", "").strip() or "B"
    norm = float(np.linalg.norm(direction))
    what = f"mean({a}) − mean({b})" if how != "Probe" else f"probe {a} vs {b} (scaled to the mean gap)"
    return (f"{what} of the last-token {site} at layer {layer}, ‖d‖ = {norm:.3g} "
            f"(α = 1 moves the mean of {b} to the mean of {a})")


def _sae_placement_warning() -> str | None:
    """A sentence when the builder would attach the chosen SAE at a site or layer other than its config's."""
    from engine.sae.attach import attach_warning

    state = st.session_state
    uses_sae = state.get("iv_op") in ("ablate_features", "clamp_feature") or (
        state.get("iv_op") == "steer" and state.get("iv_dir_source") == "SAE feature")
    folder = state.get("iv_sae") or ""
    if not uses_sae or not folder:
        return None
    try:
        sae = load_sae_cached(folder)
    except UserError:
        return None  # the builder reports the unreadable SAE itself
    return attach_warning(sae, state.get("iv_site", "resid_post"), int(state["iv_layer"]))


def _build_spec(lm, key, mid) -> Intervention:
    """Turn the builder's widgets into one intervention spec."""
    state = st.session_state
    op, layer = state["iv_op"], int(state["iv_layer"])
    positions = _ints(state.get("iv_positions", ""), "Positions")
    site = state.get("iv_site", "resid_post")
    warning = _sae_placement_warning()
    if warning and not state.get("iv_sae_anyway"):
        raise UserError(f"{warning} Tick 'Use it here anyway' to add it all the same.")
    if op == "steer":
        how = state.get("iv_dir_source", DIRECTIONS[0])
        if how == "SAE feature":
            folder, feature = state.get("iv_sae") or "", int(state.get("iv_feature", 0))
            if not folder:
                raise UserError("No SAE is available for this model; train one on the Jobs page or pick another "
                                "direction source.")
            unit = _unit(key, mid, folder, feature)
            return steer_sae_feature(folder, feature, float(state["iv_alpha"]), layer, site, positions, unit)
        direction = _direction(key, mid, how, _lines(state["iv_set_a"]), _lines(state["iv_set_b"]), layer, site)
        spec = steer(layer, direction, float(state["iv_alpha"]), site, positions)
        spec.params["label"] = _direction_label(how, layer, site, direction)
        return spec
    if op in ("ablate_features", "clamp_feature"):
        folder = state.get("iv_sae") or ""
        if not folder:
            raise UserError("No SAE is available for this model; train one on the Jobs page first.")
        features = _ints(state.get("iv_features", ""), "Features") or []
        if op == "clamp_feature":
            if len(features) != 1:
                raise UserError("Give exactly one feature to clamp.")
            return clamp_feature(folder, features[0], float(state["iv_value"]), layer, site, positions)
        mode = state.get("iv_mode", "zero")
        reference = corpus_means(folder, features) if mode == "mean" else None
        return ablate_features(folder, features, layer, site, mode, positions,
                               means=reference["means"] if reference else None)
    if op == "ablate_neurons":
        return ablate_neurons(layer, _ints(state.get("iv_neurons", ""), "Neurons") or [],
                              state.get("iv_mode", "zero"), positions)
    if op == "ablate_heads":
        return ablate_heads(layer, list(state.get("iv_heads") or []), positions)
    return patch(state["iv_source"], layer, positions or [-1], site, int(state.get("iv_source_layer", layer)),
                 _ints(state.get("iv_source_positions", ""), "Source positions"))


def direction_note(raw: dict) -> str | None:
    """Which direction a steering spec adds (its label, or the SAE feature), for captions."""
    if raw.get("op") != "steer":
        return None
    p = raw.get("params") or {}
    if "sae" in p:
        return (f"decoder row of SAE feature {p.get('feature')} ({str(p['sae']).split('/')[-1]}), "
                f"α in units of {float(p.get('unit', 1.0)):.3g}")
    if p.get("label"):
        return str(p["label"])
    norm = float(np.linalg.norm(p.get("direction") or [0.0]))
    return f"a given direction at {raw.get('site')} layer {raw.get('layer')}, ‖d‖ = {norm:.3g}"


def _mean_source(folder: str) -> str:
    """Which mean 'mean' ablation will use (manifests only: no table is read on a rerun)."""
    try:
        entry = find_dashboard(folder)
    except UserError as exc:
        return str(exc)
    if entry is None:
        return "Means over this prompt's tokens: no dashboards of this SAE are built yet (Jobs page)."
    return f"Means over {int(entry['manifest'].get('n_rows', 0)):,} corpus tokens (dashboards '{entry['name']}')."


def _steer_inputs(lm, saes: list[str]) -> None:
    how = st.radio("Direction from", DIRECTIONS, horizontal=True, key="iv_dir_source")
    if how == "SAE feature":
        st.selectbox("SAE", saes or [""], key="iv_sae", format_func=lambda s: s.split("/")[-1] or "(none)")
        feature_picker("Feature", "iv_feature", st.session_state.get("iv_sae") or "", lm)
        st.caption("α is in units of the feature's typical max activation on built-in texts.")
    else:
        a, b = st.columns(2)
        a.text_input("Name of set A", key="iv_name_a")
        b.text_input("Name of set B", key="iv_name_b")
        a.text_area("Prompt set A (one per line)", key="iv_set_a", height=100)
        b.text_area("Prompt set B (one per line)", key="iv_set_b", height=100)
        st.caption("Direction = mean(A) − mean(B) of the last-token activation (Probe: a logistic-regression "
                   "axis scaled to the same gap); α = 1 moves a B prompt to A's mean.")
    st.number_input("α", step=0.5, key="iv_alpha", format="%.3f")


def _sae_inputs(lm, op: str, saes: list[str]) -> None:
    st.selectbox("SAE", saes or [""], key="iv_sae", format_func=lambda s: s.split("/")[-1] or "(none)")
    st.text_input("Features (comma-separated)", key="iv_features")
    features_caption("iv_features", st.session_state.get("iv_sae") or "", lm, single=op == "clamp_feature")
    if op == "clamp_feature":
        st.number_input("Clamp to", key="iv_value", step=1.0)
        return
    st.radio("Ablate to", ["zero", "mean"], horizontal=True, key="iv_mode",
             help="mean: the feature's mean activation over every token of its dashboard's corpus when "
                  "dashboards of this SAE are built (Jobs page), otherwise over this prompt's tokens "
                  "(BOS excluded)")
    if st.session_state.get("iv_mode") == "mean" and st.session_state.get("iv_sae"):
        st.caption(_mean_source(st.session_state["iv_sae"]))


def _builder(lm, key, mid) -> None:
    n_layers = lm.n_layers
    c1, c2, c3 = st.columns([2, 1, 2])
    op = c1.selectbox("Operation", list(OPS), format_func=OPS.get, key="iv_op")
    c2.selectbox("Layer", list(range(n_layers)), key="iv_layer")
    c3.text_input("Positions (comma-separated, -1 = last; empty = all)", key="iv_positions")
    if op in ("steer", "ablate_features", "clamp_feature", "patch"):
        st.selectbox("Site", list(EDIT_SITES), key="iv_site")
    saes = [str(p) for p in list_saes()]
    if op == "steer":
        _steer_inputs(lm, saes)
    elif op in ("ablate_features", "clamp_feature"):
        _sae_inputs(lm, op, saes)
    elif op == "ablate_neurons":
        st.text_input("Neurons (comma-separated)", key="iv_neurons")
        st.radio("Ablate to", ["zero", "mean"], horizontal=True, key="iv_mode")
    elif op == "ablate_heads":
        st.multiselect("Heads", list(range(lm.anatomy.n_heads)), key="iv_heads")
    else:
        st.text_area("Source prompt", key="iv_source", height=70)
        s1, s2 = st.columns(2)
        s1.selectbox("Source layer", list(range(n_layers)), key="iv_source_layer")
        s2.text_input("Source positions (default: same as target)", key="iv_source_positions")
    warning = _sae_placement_warning()
    if warning:
        st.warning(warning)
        st.checkbox("Use it here anyway", key="iv_sae_anyway")
    if st.button("Add intervention", key="iv_add"):
        try:
            spec = _build_spec(lm, key, mid)
            compile_interventions(lm, [spec], len(lm.tokenizer(st.session_state["iv_prompt"])["input_ids"]))
        except UserError as exc:
            show_user_error(exc)
        else:
            st.session_state["iv_specs"].append(spec.to_json())
            st.rerun()  # the list above and the link show the new intervention


def _init_state(lm) -> list[str]:
    """Builder defaults, and the intervention list: the link's, else the default steering example."""
    layer = min(round(DEFAULT_DEPTH * lm.n_layers), lm.n_layers - 1)
    defaults = {"iv_op": "steer", "iv_layer": layer, "iv_positions": "", "iv_site": "resid_post",
                "iv_dir_source": DIRECTIONS[0], "iv_set_a": DEFAULT_A, "iv_set_b": DEFAULT_B,
                "iv_name_a": DEFAULT_NAME_A, "iv_name_b": DEFAULT_NAME_B, "iv_alpha": DEFAULT_ALPHA,
                "iv_features": "0", "iv_value": 5.0, "iv_mode": "zero", "iv_neurons": "0", "iv_heads": [0],
                "iv_source": "I think this book is", "iv_source_layer": 0, "iv_source_positions": "",
                "iv_feature": 0}
    for name, value in defaults.items():
        st.session_state.setdefault(name, value)
    st.session_state["iv_layer"] = min(int(st.session_state["iv_layer"]), lm.n_layers - 1)
    problems = []
    raw = st.session_state.get("iv_specs")
    if raw is not None:
        try:
            st.session_state["iv_specs"] = save_specs(load_specs(raw))
            return problems
        except (UserError, ValueError, TypeError) as exc:
            problems.append(f"The link's intervention list is not valid ({exc}); the default example is shown.")
    st.session_state["iv_specs"] = []  # start with one steering example so every view has something to show
    try:
        st.session_state["iv_specs"].append(_build_spec(lm, model_key(), cache_key(lm)).to_json())
    except UserError:
        pass
    return problems


# --- the views (only the open tab runs) -----------------------------------------------------------
def _next_token_view(key, mid, prompt: str, specs: list[dict], specs_json: str) -> None:
    if not specs:
        st.info("Add an intervention to compare runs with and without it.")
        return
    nxt = _next_token(key, mid, prompt, specs_json)
    st.caption(f"KL(clean ‖ intervened) at the next token: {nxt['kl']:.4g} nats")
    left, right = st.columns(2)
    left.markdown("**Clean** (no intervention): next-token top 10")
    left.dataframe(pd.DataFrame(nxt["clean"]), hide_index=True, width="stretch", key="iv_clean_table")
    right.markdown(f"**Intervened** ({len(specs)} intervention{'s' if len(specs) > 1 else ''}): next-token top 10")
    right.dataframe(pd.DataFrame(nxt["intervened"]), hide_index=True, width="stretch", key="iv_hit_table")
    g1, g2, g3 = st.columns(3)
    g1.number_input("New tokens", 1, 128, key="gen_n")
    g2.toggle("Sample (fixed seed)", key="gen_sample")
    g3.number_input("Seed", 0, 10**6, key="gen_seed")
    with st.spinner("Generating with and without…"):
        gen = _generate(key, mid, prompt, specs_json, int(st.session_state["gen_n"]),
                        bool(st.session_state["gen_sample"]), int(st.session_state["gen_seed"]))
    st.markdown(generation_diff_html(gen), unsafe_allow_html=True)
    st.caption("Highlighted tokens differ between the two runs" + (
        f"; first divergence at generated token {gen.first_divergence}." if gen.first_divergence is not None
        else "; the two generations are identical."))


def _delta_lens_view(lm, key, mid, prompt: str, specs: list[dict], specs_json: str) -> None:
    st.text_input("Tracked tokens (comma-separated, spaces matter)", key="dl_track")
    track = tuple(t for t in st.session_state["dl_track"].split(",") if t.strip())
    for word in track:
        _token_note(lm, word, "Tracked token", prompt)
    metrics = [m for m in DELTA_METRICS if track or m != "tracked_prob"]
    if st.session_state.get("dl_metric") not in metrics:
        st.session_state["dl_metric"] = metrics[0]
    metric = st.selectbox("Δ of", metrics, format_func=DELTA_METRICS.get, key="dl_metric")
    if not specs:
        st.info("Add an intervention to see how it changes the lens.")
        return
    clean, hit = _delta_lens(key, mid, prompt, specs_json, track)
    which = 0
    if metric == "tracked_prob" and len(track) > 1:
        if not 0 <= int(st.session_state.get("dl_which", 0)) < len(track):
            st.session_state["dl_which"] = 0
        which = st.selectbox("Tracked token", range(len(track)), format_func=lambda t: repr(track[t]),
                             key="dl_which")
    st.plotly_chart(delta_lens_heatmap(clean, hit, metric, which), width="stretch", key="dl_chart")
    st.caption("Intervened minus clean logit lens; each cell shows the intervened run's top-1 token.")


def _dose_view(lm, key, mid, prompt: str, specs: list[dict]) -> None:
    steering = [(i, raw) for i, raw in enumerate(specs) if raw["op"] == "steer"]
    if not steering:
        st.info("Add a steering intervention to sweep its α.")
        return
    if not 0 <= int(st.session_state.get("dose_pick", 0)) < len(steering):
        st.session_state["dose_pick"] = 0
    pick = st.selectbox("Steering intervention", range(len(steering)), key="dose_pick",
                        format_func=lambda j: Intervention.from_json(steering[j][1]).describe())
    st.caption(f"Direction: {direction_note(steering[pick][1])}.")
    lo, hi = sorted(min(max(float(v), -20.0), 20.0) for v in st.session_state["dose_range"])
    st.session_state["dose_range"] = (lo, hi)  # a link's range, kept inside the slider's bounds
    c1, c2, c3 = st.columns(3)
    lo, hi = c1.slider("α range", -20.0, 20.0, key="dose_range")
    steps = c2.number_input("Steps", 3, 41, key="dose_steps")
    token = c3.text_input("Target token", key="dose_token")
    _token_note(lm, token, "Target token")
    alphas = tuple(lo + (hi - lo) * k / (int(steps) - 1) for k in range(int(steps)))
    dose = _dose(key, mid, prompt, json.dumps(steering[pick][1]), alphas, _need_token(token, "Target token"))
    st.plotly_chart(dose_response_figure(dose), width="stretch", key="dose_chart")


def _sweep_view(lm, key, mid) -> None:
    state = st.session_state
    c1, c2 = st.columns(2)
    c1.text_input("Source prompt (activations are taken from here)", key="sweep_source")
    c2.text_input("Target prompt (patched into)", key="sweep_target")
    c1, c2, c3, c4 = st.columns(4)
    c1.radio("Sweep", ["layer_position", "layer_layer"], key="sweep_kind",
             format_func={"layer_position": "layer × position",
                          "layer_layer": "source layer → target layer (last token)"}.get)
    c2.selectbox("Site", list(EDIT_SITES), key="sweep_site")
    c3.radio("Metric", ["prob", "logit_diff"], key="sweep_metric",
             format_func={"prob": "P(token)", "logit_diff": "logit difference"}.get)
    c4.text_input("Token", key="sweep_token")
    diff = state["sweep_metric"] == "logit_diff"
    if diff:
        c4.text_input("minus token", key="sweep_token_b")
    _token_note(lm, state["sweep_token"], "Token")
    if diff:
        _token_note(lm, state["sweep_token_b"], "Minus token")
    token = _need_token(state["sweep_token"], "Token")
    token_b = _need_token(state["sweep_token_b"], "minus token") if diff else None
    with st.spinner("Patching (batched)…"):
        sweep = _sweep(key, mid, state["sweep_source"], state["sweep_target"], token, state["sweep_kind"],
                       state["sweep_metric"], token_b, state["sweep_site"])
    st.plotly_chart(sweep_heatmap(sweep), width="stretch", key="sweep_chart")
    st.caption("Each cell: the target run with ONE activation replaced by the source's (batched: many patched "
               "copies of the target in one forward pass). Colour bar ticks mark the unpatched target and the "
               "source run.")
    frame = pd.DataFrame(sweep.values, index=sweep.row_labels, columns=sweep.col_labels)
    st.download_button("Download sweep (CSV)", frame.to_csv(), "patching-sweep.csv", "text/csv")


def _tongue_view(lm, key, mid) -> None:
    st.markdown("Patch the **last-token latent** of a source translation prompt (concept A, output language X) "
                "into a target prompt (concept B, output language Y), one layer at a time, and watch whether the "
                "output follows the source's *concept* (A in Y) or also its *language* (A in X).")
    langs = list(LANGUAGES)
    c1, c2, c3 = st.columns(3)
    a = c1.selectbox("Concept A (source)", CONCEPT_NAMES, key="tt_a")
    s_in = c2.selectbox("Source input language", langs, key="tt_s_in")
    s_out = c3.selectbox("X: source output language", langs, key="tt_s_out")
    b = c1.selectbox("Concept B (target)", CONCEPT_NAMES, key="tt_b")
    t_in = c2.selectbox("Target input language", langs, key="tt_t_in")
    t_out = c3.selectbox("Y: target output language", langs, key="tt_t_out")
    tt = _tongue(key, mid, a, b, s_in, s_out, t_in, t_out)
    st.plotly_chart(tongue_thought_figure(tt), width="stretch", key="tt_chart")
    for label, word in tt.tokens.items():
        _token_note(lm, word, f"{label}:")
    table = pd.DataFrame({label: values for label, values in tt.curves.items()}, index=tt.layers)
    st.dataframe(table.style.format("{:.4f}"), width="stretch")
    with st.expander("Prompts"):
        st.code(tt.source_prompt, language=None)
        st.code(tt.target_prompt, language=None)


def _intervention_list(specs: list[dict]) -> None:
    st.markdown(f"**Active interventions ({len(specs)})**, applied together in one forward pass")
    for i, raw in enumerate(list(specs)):
        c1, c2 = st.columns([8, 1])
        c1.code(Intervention.from_json(raw).describe(), language=None)
        note = direction_note(raw)
        if note:
            c1.caption(f"Direction: {note}.")
        if c2.button("Remove", key=f"iv_remove_{i}"):
            specs.pop(i)
            st.rerun()
    d1, d2 = st.columns(2)
    d1.download_button("Download interventions (JSON)", json.dumps(specs), "interventions.json", "application/json")
    uploaded = d2.file_uploader("Load interventions (JSON)", type=["json"], key="iv_upload")
    if uploaded is not None and st.session_state.get("iv_uploaded") != uploaded.file_id:
        try:
            current_policy().check_upload(uploaded.size)  # the serving policy's cap, before the bytes are read
            st.session_state["iv_specs"] = save_specs(load_specs(json.loads(uploaded.getvalue())))
            st.session_state["iv_uploaded"] = uploaded.file_id
            st.rerun()
        except NotAllowed as exc:
            st.error(str(exc))
        except (ValueError, UserError) as exc:
            st.error(f"That file holds no interventions: {exc}")


# --- page --------------------------------------------------------------------------------------
st.title("Interventions: steer, ablate, patch")
lm = current_model()
key, mid = model_key(), cache_key(lm)
problems = sync_query_params(LINK_STATE, LINK_LONG, options=LINK_OPTIONS)
problems += _init_state(lm)
problems += sync_query_params(LINK_STATE, LINK_LONG, options=LINK_OPTIONS)  # the default example, built just now
for problem in dict.fromkeys(problems):  # once each (both calls can report a share that is too large)
    st.warning(problem)
st.caption("The address bar holds this view (prompt, interventions, tab and settings): copy it to share the view.")

st.text_area("Prompt", key="iv_prompt", height=70)
prompt = st.session_state["iv_prompt"]
with st.expander("Add an intervention", expanded=not st.session_state["iv_specs"]):
    _builder(lm, key, mid)

specs = st.session_state["iv_specs"]
_intervention_list(specs)
specs_json = json.dumps(specs)

tabs = st.tabs(TABS, key="iv_tab", on_change="rerun")
views = [lambda: _next_token_view(key, mid, prompt, specs, specs_json),
         lambda: _delta_lens_view(lm, key, mid, prompt, specs, specs_json),
         lambda: _dose_view(lm, key, mid, prompt, specs),
         lambda: _sweep_view(lm, key, mid),
         lambda: _tongue_view(lm, key, mid)]
for tab, view in zip(tabs, views):
    with tab:
        if tab.open:  # only the open tab computes
            try:
                view()
            except UserError as exc:
                show_user_error(exc)
