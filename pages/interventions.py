"""Interventions: steer, ablate, clamp and patch, with before/after views (generation, Δ-lens, dose-response,
patching sweeps and the "Separating tongue from thought" demo)."""
from __future__ import annotations

import json

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
from components.session import cache_key, current_model, get_model_by_key, model_key, show_user_error
from engine.core.errors import UserError
from engine.core.sites import EDIT_SITES
from engine.data.prompt_sets import CONCEPTS, LANGUAGES
from engine.features.read import corpus_means, find_dashboard
from engine.interventions.demos import tongue_thought
from engine.interventions.directions import feature_unit, mean_difference_direction, probe_direction
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
from engine.sae.io import list_saes

OPS = {"steer": "Steer (add α × direction)", "ablate_features": "Ablate SAE features",
       "clamp_feature": "Clamp an SAE feature", "ablate_neurons": "Ablate MLP neurons",
       "ablate_heads": "Ablate attention heads", "patch": "Patch from a source prompt"}
DIRECTIONS = ["Difference of means", "Probe", "SAE feature"]
DEFAULT_A = "I love this movie, it is wonderful\nWhat a great and happy day\nThis is excellent work"
DEFAULT_B = "I hate this movie, it is terrible\nWhat an awful and sad day\nThis is dreadful work"


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
def _generate(key: tuple, model_id: str, prompt: str, specs_json: str, n: int, sample: bool, seed: int):
    return generate_compare(get_model_by_key(key), prompt, load_specs(json.loads(specs_json)),
                            max_new_tokens=n, sample=sample, seed=seed)


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


def _build_spec(lm, key, mid) -> Intervention:
    """Turn the builder's widgets into one intervention spec."""
    state = st.session_state
    op, layer = state["iv_op"], int(state["iv_layer"])
    positions = _ints(state.get("iv_positions", ""), "Positions")
    site = state.get("iv_site", "resid_post")
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
        return steer(layer, direction, float(state["iv_alpha"]), site, positions)
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


def _mean_source(folder: str) -> str:
    """Which mean 'mean' ablation will use (manifests only: no table is read on a rerun)."""
    try:
        entry = find_dashboard(folder)
    except UserError as exc:
        return str(exc)
    if entry is None:
        return "Means over this prompt's tokens: no dashboards of this SAE are built yet (Jobs page)."
    return f"Means over {int(entry['manifest'].get('n_rows', 0)):,} corpus tokens (dashboards '{entry['name']}')."


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
        how = st.radio("Direction from", DIRECTIONS, horizontal=True, key="iv_dir_source")
        if how == "SAE feature":
            st.selectbox("SAE", saes or [""], key="iv_sae", format_func=lambda s: s.split("/")[-1] or "(none)")
            feature_picker("Feature", "iv_feature", st.session_state.get("iv_sae") or "", lm)
            st.caption("α is in units of the feature's typical max activation on built-in texts.")
        else:
            a, b = st.columns(2)
            a.text_area("Prompt set A (one per line)", key="iv_set_a", height=100)
            b.text_area("Prompt set B (one per line)", key="iv_set_b", height=100)
            st.caption("Direction = mean(A) − mean(B) of the last-token activation (Probe: a logistic-regression "
                       "axis scaled to the same gap); α = 1 moves a B prompt to A's mean.")
        st.number_input("α", step=0.5, key="iv_alpha", format="%.3f")
    elif op in ("ablate_features", "clamp_feature"):
        st.selectbox("SAE", saes or [""], key="iv_sae", format_func=lambda s: s.split("/")[-1] or "(none)")
        st.text_input("Features (comma-separated)", key="iv_features")
        features_caption("iv_features", st.session_state.get("iv_sae") or "", lm, single=op == "clamp_feature")
        if op == "clamp_feature":
            st.number_input("Clamp to", key="iv_value", step=1.0)
        else:
            st.radio("Ablate to", ["zero", "mean"], horizontal=True, key="iv_mode",
                     help="mean: the feature's mean activation over every token of its dashboard's corpus when "
                          "dashboards of this SAE are built (Jobs page), otherwise over this prompt's tokens "
                          "(BOS excluded)")
            if st.session_state.get("iv_mode") == "mean" and st.session_state.get("iv_sae"):
                st.caption(_mean_source(st.session_state["iv_sae"]))
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
    if st.button("Add intervention", key="iv_add"):
        try:
            spec = _build_spec(lm, key, mid)
            compile_interventions(lm, [spec], len(lm.tokenizer(st.session_state["iv_prompt"])["input_ids"]))
            st.session_state["iv_specs"].append(spec.to_json())
        except UserError as exc:
            show_user_error(exc)


def _init_state(lm) -> None:
    defaults = {"iv_prompt": "I think this movie is", "iv_op": "steer", "iv_layer": lm.n_layers // 2,
                "iv_positions": "", "iv_site": "resid_post", "iv_dir_source": DIRECTIONS[0], "iv_set_a": DEFAULT_A,
                "iv_set_b": DEFAULT_B, "iv_alpha": 4.0, "iv_features": "0", "iv_value": 5.0, "iv_mode": "zero",
                "iv_neurons": "0", "iv_heads": [0], "iv_source": "I think this book is", "iv_source_layer": 0,
                "iv_source_positions": "", "iv_feature": 0,
                "sweep_source": "The capital of France is", "sweep_target": "The capital of Poland is",
                "sweep_token": " Paris", "sweep_token_b": " Warsaw", "sweep_metric": "prob",
                "sweep_kind": "layer_position", "sweep_site": "resid_post", "dose_token": " great",
                "gen_n": 12, "gen_sample": False, "gen_seed": 0, "dl_track": " great, terrible"}
    for name, value in defaults.items():
        st.session_state.setdefault(name, value)
    st.session_state["iv_layer"] = min(int(st.session_state["iv_layer"]), lm.n_layers - 1)
    if "iv_specs" not in st.session_state:  # start with one steering example so every view has something to show
        st.session_state["iv_specs"] = []
        try:
            st.session_state["iv_specs"].append(_build_spec(lm, model_key(), cache_key(lm)).to_json())
        except UserError:
            pass


# --- page --------------------------------------------------------------------------------------
st.title("Interventions: steer, ablate, patch")
lm = current_model()
key, mid = model_key(), cache_key(lm)
_init_state(lm)

st.text_area("Prompt", key="iv_prompt", height=70)
prompt = st.session_state["iv_prompt"]
with st.expander("Add an intervention", expanded=not st.session_state["iv_specs"]):
    _builder(lm, key, mid)

specs = st.session_state["iv_specs"]
st.markdown(f"**Active interventions ({len(specs)})**, applied together in one forward pass")
for i, raw in enumerate(list(specs)):
    c1, c2 = st.columns([8, 1])
    c1.code(Intervention.from_json(raw).describe(), language=None)
    if c2.button("Remove", key=f"iv_remove_{i}"):
        specs.pop(i)
        st.rerun()
specs_json = json.dumps(specs)
d1, d2 = st.columns(2)
d1.download_button("Download interventions (JSON)", specs_json, "interventions.json", "application/json")
uploaded = d2.file_uploader("Load interventions (JSON)", type=["json"], key="iv_upload")
if uploaded is not None and st.session_state.get("iv_uploaded") != uploaded.file_id:
    try:
        st.session_state["iv_specs"] = save_specs(load_specs(json.loads(uploaded.getvalue())))
        st.session_state["iv_uploaded"] = uploaded.file_id
        st.rerun()
    except (ValueError, UserError) as exc:
        st.error(f"That file holds no interventions: {exc}")

tabs = st.tabs(["Next token & generation", "Δ-lens", "Dose-response", "Patching sweep", "Tongue vs thought"])

with tabs[0]:
    if not specs:
        st.info("Add an intervention to compare runs with and without it.")
    else:
        try:
            nxt = _next_token(key, mid, prompt, specs_json)
            st.caption(f"KL(clean ‖ intervened) at the next token: {nxt['kl']:.4g} nats")
            left, right = st.columns(2)
            left.dataframe(pd.DataFrame(nxt["clean"]), hide_index=True, width="stretch")
            right.dataframe(pd.DataFrame(nxt["intervened"]), hide_index=True, width="stretch")
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
        except UserError as exc:
            show_user_error(exc)

with tabs[1]:
    st.text_input("Tracked tokens (comma-separated, spaces matter)", key="dl_track")
    track = tuple(t for t in st.session_state["dl_track"].split(",") if t.strip())
    metric = st.selectbox("Δ of", [m for m in DELTA_METRICS if track or m != "tracked_prob"],
                          format_func=DELTA_METRICS.get, key="dl_metric")
    if specs:
        try:
            clean, hit = _delta_lens(key, mid, prompt, specs_json, track)
            which = 0
            if metric == "tracked_prob" and len(track) > 1:
                which = st.selectbox("Tracked token", range(len(track)), format_func=lambda t: repr(track[t]),
                                     key="dl_which")
            st.plotly_chart(delta_lens_heatmap(clean, hit, metric, which), width="stretch", key="dl_chart")
            st.caption("Intervened minus clean logit lens; each cell shows the intervened run's top-1 token.")
        except UserError as exc:
            show_user_error(exc)

with tabs[2]:
    steering = [(i, raw) for i, raw in enumerate(specs) if raw["op"] == "steer"]
    if not steering:
        st.info("Add a steering intervention to sweep its α.")
    else:
        pick = st.selectbox("Steering intervention", range(len(steering)), key="dose_pick",
                            format_func=lambda j: Intervention.from_json(steering[j][1]).describe())
        c1, c2, c3 = st.columns(3)
        lo, hi = c1.slider("α range", -20.0, 20.0, (-8.0, 8.0), key="dose_range")
        steps = c2.number_input("Steps", 3, 41, 17, key="dose_steps")
        c3.text_input("Target token", key="dose_token")
        alphas = tuple(lo + (hi - lo) * k / (int(steps) - 1) for k in range(int(steps)))
        try:
            dose = _dose(key, mid, prompt, json.dumps(steering[pick][1]), alphas, st.session_state["dose_token"])
            st.plotly_chart(dose_response_figure(dose), width="stretch", key="dose_chart")
        except UserError as exc:
            show_user_error(exc)

with tabs[3]:
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
    if st.session_state["sweep_metric"] == "logit_diff":
        c4.text_input("minus token", key="sweep_token_b")
    try:
        with st.spinner("Patching (batched)…"):
                sweep = _sweep(key, mid, st.session_state["sweep_source"], st.session_state["sweep_target"],
                           st.session_state["sweep_token"], st.session_state["sweep_kind"],
                           st.session_state["sweep_metric"],
                           st.session_state["sweep_token_b"] if st.session_state["sweep_metric"] == "logit_diff"
                           else None, st.session_state["sweep_site"])
        st.plotly_chart(sweep_heatmap(sweep), width="stretch", key="sweep_chart")
        st.caption("Each cell: the target run with ONE activation replaced by the source's (batched: many patched "
                   "copies of the target in one forward pass). Colour bar ticks mark the unpatched target and the "
                   "source run.")
        frame = pd.DataFrame(sweep.values, index=sweep.row_labels, columns=sweep.col_labels)
        st.download_button("Download sweep (CSV)", frame.to_csv(), "patching-sweep.csv", "text/csv")
    except UserError as exc:
        show_user_error(exc)

with tabs[4]:
    st.markdown("Patch the **last-token latent** of a source translation prompt (concept A, output language X) "
                "into a target prompt (concept B, output language Y), one layer at a time, and watch whether the "
                "output follows the source's *concept* (A in Y) or also its *language* (A in X).")
    names = sorted(c["concept"] for c in CONCEPTS)
    langs = list(LANGUAGES)
    c1, c2, c3 = st.columns(3)
    a = c1.selectbox("Concept A (source)", names, index=names.index("dog"), key="tt_a")
    s_in = c2.selectbox("Source input language", langs, index=langs.index("de"), key="tt_s_in")
    s_out = c3.selectbox("X: source output language", langs, index=langs.index("fr"), key="tt_s_out")
    b = c1.selectbox("Concept B (target)", names, index=names.index("water"), key="tt_b")
    t_in = c2.selectbox("Target input language", langs, index=langs.index("es"), key="tt_t_in")
    t_out = c3.selectbox("Y: target output language", langs, index=langs.index("zh"), key="tt_t_out")
    try:
        tt = _tongue(key, mid, a, b, s_in, s_out, t_in, t_out)
        st.plotly_chart(tongue_thought_figure(tt), width="stretch", key="tt_chart")
        table = pd.DataFrame({label: values for label, values in tt.curves.items()}, index=tt.layers)
        st.dataframe(table.style.format("{:.4f}"), width="stretch")
        with st.expander("Prompts"):
            st.code(tt.source_prompt, language=None)
            st.code(tt.target_prompt, language=None)
    except UserError as exc:
        show_user_error(exc)
