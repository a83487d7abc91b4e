"""Words next to feature ids: cheap labels, explanations and their scores; feature search; the "Explain features"
form; SAE-feature pickers that show labels.

Widgets and cached reads only. Labels are built on a dashboard's first open (one duckdb query over its tables:
about 0.1 s for 2,048 features), every other read is keyed on the tables' modification times. Explaining and
scoring never run in the script thread: the form builds a job spec and hands it to the job runner
(``components.jobs_ui.submit_job``), or shows the equivalent ``python -m engine explain`` command.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import streamlit as st

from components.feature_views import feature_name, feature_words, score_text
from components.session import show_user_error
from engine.autointerp.explain import COLUMNS as EXPLANATION_COLUMNS
from engine.autointerp.explain import read_explanations
from engine.autointerp.labels import build_labels, labels_dict
from engine.autointerp.scoring import COLUMNS as SCORE_TABLE_COLUMNS
from engine.autointerp.scoring import read_scores
from engine.autointerp.search import features_like_text, search_text
from engine.autointerp.tables import EXPLANATIONS, LABELS, SCORES
from engine.core.errors import UserError

try:  # the job runner's UI (another module); without it the form shows the CLI command instead
    from components.jobs_ui import submit_job
except ImportError:
    submit_job = None

DEFAULT_LOCAL = "smollm2-135m"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_MODEL = "gpt-4o-mini"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
BACKENDS = {"local": "Local model", "openai": "OpenAI-compatible endpoint"}
WHICH = {"first": "First N of the list", "selected": "These features", "all": "All live features"}
FIND_MODES = {"words": "Words in labels and explanations", "like": "Features like this text"}
PICKER_MAX = 8192  # larger SAEs keep a number input: a selectbox sends every option on each rerun
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ExplainFormError(UserError):
    pass


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


# --- labels -----------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=32)
def _labels(path: str, stamp: float, mtime_ns: int, _tokenizer) -> tuple[dict[int, str], str]:
    """``({feature: label}, error)``; builds ``labels.parquet`` first when it is missing or older than the build."""
    try:
        if _tokenizer is not None and mtime_ns < int(stamp * 1e9):
            build_labels(path, _tokenizer)
        return dict(labels_dict(path)), ""
    except Exception as exc:  # labels only decorate ids: a failure must not take the page down
        return {}, f"No feature labels for this dashboard ({type(exc).__name__}: {exc})."


def feature_labels(path: str, stamp: float, tokenizer=None) -> dict[int, str]:
    """``{feature: label}`` of a dashboard folder (``stamp``: its manifest's mtime). With ``tokenizer`` (the
    dashboard's model's) a missing or outdated ``labels.parquet`` is built first; without, only read."""
    mtime = _mtime_ns(Path(path) / LABELS)
    building = tokenizer is not None and mtime < int(stamp * 1e9)
    with st.spinner("Labelling features (once per dashboard)…") if building else nullcontext():
        labels, error = _labels(path, stamp, mtime, tokenizer)
    if error:
        st.caption(error)
    return labels


# --- explanations and scores ---------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=32)
def _words(path: str, stamps: tuple[int, int]) -> pd.DataFrame:
    return feature_words(read_explanations(path), read_scores(path))


def words_stamp(path: str) -> tuple[int, int, int]:
    """Modification times of the explanations, scores and labels tables (0 when absent)."""
    folder = Path(path)
    return _mtime_ns(folder / EXPLANATIONS), _mtime_ns(folder / SCORES), _mtime_ns(folder / LABELS)


def explained(path: str) -> pd.DataFrame:
    """One row per explained or scored feature (see :func:`components.feature_views.feature_words`)."""
    try:
        return _words(path, words_stamp(path)[:2])
    except Exception as exc:  # a damaged table must not take the browser down: say so, show no explanations
        st.caption(f"The explanations or scores next to this dashboard cannot be read ({type(exc).__name__}: "
                   f"{exc}); explain the features again to rewrite them.")
        return feature_words(_empty(EXPLANATION_COLUMNS), _empty(SCORE_TABLE_COLUMNS))


def _escape(text: str) -> str:
    """Model-written text shown as plain words (markdown marks escaped)."""
    return re.sub(r"([\\`*_{}\[\]<>#|~$])", r"\\\1", " ".join(str(text).split()))


def explanation_block(feature: int, words: pd.DataFrame, path: str) -> None:
    """The feature page's explanation (with its explainer) and its detection and fuzzing scores."""
    row = words[words["feature"] == int(feature)]
    if row.empty or not str(row.iloc[0]["explanation"]).strip():
        st.caption(f"No explanation yet: use **Explain features** on the Feature list tab, or run "
                   f"`{explain_command(path, [int(feature)])}`.")
        return
    r = row.iloc[0]
    st.markdown(f"**Explanation:** {_escape(r['explanation'])}")
    has_scores = not (pd.isna(r["detection"]) and pd.isna(r["fuzzing"]))
    notes = [f"by `{r['explainer']}`"] if r["explainer"] else []
    if has_scores and r["scored_by"] and r["scored_by"] != r["explainer"]:
        notes.append(f"scores are of `{r['scored_by']}`'s explanation")
    notes += [f"{name} {int(n)} trials" for name, n in (("detection", r["detection_n"]), ("fuzzing", r["fuzzing_n"]))
              if has_scores and not pd.isna(n)]
    if not has_scores:
        reason = str(r.get("score_error") or "").strip()
        st.caption(" · ".join(notes + [f"not scored: {_escape(reason)}" if reason else "not scored yet"]))
        return
    cols = st.columns(4)
    cols[0].metric("Detection", score_text(r["detection"], None), help=(
        f"Balanced accuracy of a scorer told only the explanation, asked whether held-out texts make the feature "
        f"fire: {score_text(r['detection'], r['detection_n'])}. 0.5 is chance, 1 perfect."))
    cols[1].metric("Fuzzing", score_text(r["fuzzing"], None), help=(
        f"Balanced accuracy of the scorer picking the truly activating tokens from randomly marked ones: "
        f"{score_text(r['fuzzing'], r['fuzzing_n'])}. 0.5 is chance, 1 perfect."))
    aucs = [f"{name} {float(r[f'{name}_auc']):.2f}" for name in ("detection", "fuzzing")
            if not pd.isna(r.get(f"{name}_auc"))]
    if aucs:
        notes.append("ROC AUC of the scorer's yes-minus-no logit: " + ", ".join(aucs) + " (0.5 is chance; does not "
                     "depend on where the scorer puts its threshold)")
    cols[2].caption(" · ".join(notes))


# --- search -------------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=64)
def _search(path: str, stamp: tuple[int, int, int], query: str, limit: int) -> pd.DataFrame:
    return search_text(path, query, limit)


@st.cache_data(show_spinner=False, max_entries=32)
def _like(path: str, stamp: float, words: tuple[int, int, int], model: str, text: str, limit: int, _lm,
          _sae) -> pd.DataFrame:
    return features_like_text(_lm, _sae, text, limit, build_dir=path, rank_by="relative")


def _hits_table(hits: pd.DataFrame, mode: str, labels: dict[int, str]) -> pd.DataFrame:
    keep = ["feature", "score"] if mode == "words" else ["feature", "relative", "activation", "tokens_fired"]
    out = hits[keep].copy()
    out["label"] = [labels.get(int(f)) or (lab if isinstance(lab, str) else "")
                    for f, lab in zip(hits["feature"], hits.get("label", [""] * len(hits)))]
    explanation = hits["explanation"].fillna("") if "explanation" in hits else pd.Series([""] * len(hits))
    if (explanation != "").any():
        out["explanation"] = explanation.to_numpy()
    return out


def search_panel(path: str, stamp: float, *, lm, model: str, sae: Callable[[], object], labels: dict[int, str],
                 open_feature: Callable[[int], None], limit: int = 20) -> None:
    """Find features by the words of their labels and explanations (BM25) or by a text they should fire on
    (the model and the SAE encode it); selecting a row opens that feature."""
    cols = st.columns([5, 3])
    query = cols[0].text_input("Find features", key="features_find",
                               placeholder="words from labels and explanations, or a text the features fire on")
    mode = cols[1].radio("Match", list(FIND_MODES), key="features_find_mode", format_func=FIND_MODES.get,
                         horizontal=True)
    if not query.strip():
        return
    try:
        if mode == "words":
            hits = _search(path, words_stamp(path), query, limit)
            note = f"{len(hits):,} features match (ranked by {hits.attrs.get('method', 'bm25').upper()})"
        else:
            with st.spinner("Encoding the text with the model and the SAE…"):
                hits = _like(path, stamp, words_stamp(path), model, query, limit, lm, sae())
            note = (f"{len(hits):,} features the SAE finds in the text, ranked by activation relative to each "
                    "feature's maximum")
    except UserError as exc:
        show_user_error(exc)
        return
    if hits.empty:
        st.caption("No feature matches; try other words, or **Features like this text**.")
        return
    event = st.dataframe(_hits_table(hits, mode, labels), hide_index=True, on_select="rerun",
                         selection_mode="single-row", key="features_find_results",
                         column_config={"score": st.column_config.NumberColumn("score", format="%.2f"),
                                        "relative": st.column_config.NumberColumn("relative", format="%.2f"),
                                        "activation": st.column_config.NumberColumn("activation", format="%.3g")})
    st.caption(f"{note}; select a row to open the feature on the Feature tab.")
    selected = event.selection.rows if event is not None else []
    marker = (tuple(selected), query, mode)
    if selected and st.session_state.get("_features_find_pick") != marker:
        st.session_state["_features_find_pick"] = marker
        open_feature(int(hits["feature"].iloc[selected[0]]))
        st.rerun()


# --- the explain form ------------------------------------------------------------------------------------
def compact_ranges(features: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"`` (the CLI's ``--features`` syntax)."""
    ids = sorted({int(f) for f in features})
    parts: list[str] = []
    start = prev = None
    for f in ids + [None]:
        if start is not None and (f is None or f != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if f is not None and start is None:
            start = f
        prev = f
    return ",".join(parts)


def parse_ranges(text: str, d_sae: int) -> list[int]:
    """``"0-3, 7"`` -> ``[0, 1, 2, 3, 7]``, each id checked against the SAE's width."""
    out: list[int] = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            ids = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise ExplainFormError(f"'{part}' is not a feature id or range; write e.g. 0-9, 15.") from None
        out += list(ids)
    if not out:
        raise ExplainFormError("Name at least one feature, e.g. 0-9, 15.")
    bad = next((f for f in out if not 0 <= f < d_sae), None)
    if bad is not None:
        raise ExplainFormError(f"Feature {bad} does not exist: this SAE has features 0..{d_sae - 1}.")
    return list(dict.fromkeys(out))


def backend_spec(kind: str, *, local_model: str = DEFAULT_LOCAL, base_url: str = "", api_model: str = "",
                 api_key_env: str = DEFAULT_KEY_ENV) -> dict:
    """The backend part of a job spec (never a key: an endpoint names the environment variable holding it)."""
    if kind == "local":
        if not (local_model or "").strip():
            raise ExplainFormError("Name the local chat model (for example smollm2-135m).")
        return {"kind": "local", "model": local_model.strip()}
    url = (base_url or "").strip()
    if not re.match(r"^https?://[^/\s?#@]+(/[^\s?#]*)?$", url):
        raise ExplainFormError(f"'{url}' is not an http(s) base URL without credentials or a query; give the "
                               "endpoint's base URL such as https://api.openai.com/v1.")
    if not (api_model or "").strip():
        raise ExplainFormError("Name the model the endpoint should run (for example gpt-4o-mini).")
    env = (api_key_env or "").strip()
    if env and not ENV_NAME.match(env):
        raise ExplainFormError("Give the NAME of the environment variable that holds the API key (for example "
                               "OPENAI_API_KEY), not the key itself: keys are never stored.")
    return {"kind": "openai", "base_url": url, "model": api_model.strip(), "api_key_env": env or None}


def explain_spec(dashboard: str, backend: dict, features: Sequence[int] | None, kind: str = "explain") -> dict:
    """``{"kind": "explain" | "score", "params": {"dashboard", "backend", ["features"]}}``; no ``features``
    means every live feature (explain) or every explained one (score)."""
    params: dict = {"dashboard": str(Path(dashboard).resolve()), "backend": dict(backend)}
    if features is not None:
        params["features"] = [int(f) for f in features]
    return {"kind": kind, "params": params}


def cli_command(spec: dict) -> str:
    """The ``python -m engine explain|score ...`` command that does what the job spec does."""
    params, backend = spec["params"], spec["params"]["backend"]
    args = ["python", "-m", "engine", spec["kind"], "--dashboard", params["dashboard"]]
    if params.get("features") is not None:
        args += ["--features", compact_ranges(params["features"])]
    if backend["kind"] == "local":
        args += ["--local", backend["model"]]
    else:
        args += ["--base-url", backend["base_url"], "--api-model", backend["model"], "--api-key-env",
                 backend.get("api_key_env") or ""]
    return " ".join(shlex.quote(a) for a in args)


def explain_command(path: str, features: Sequence[int] | None) -> str:
    return cli_command(explain_spec(path, backend_spec("local"), features))


def _submit(spec: dict) -> None:
    runner = globals().get("submit_job")
    n = len(spec["params"]["features"]) if "features" in spec["params"] else None
    what = f"{n:,} features" if n is not None else "every feature"
    if runner is None:
        st.warning("The job runner is not available here; run this in a terminal instead (the page shows the "
                   "results once the tables are written):")
        st.code(cli_command(spec), language="bash")
        return
    job = runner(spec, slot=spec["kind"], where=f"the {spec['kind']} results for {what} on this page, as they are "
                 "written")
    if job is not None:
        st.caption(f"Same as `{cli_command(spec)}`")


def _backend_widgets() -> dict:
    kind = st.radio("Explainer", list(BACKENDS), key="ai_backend", format_func=BACKENDS.get, horizontal=True)
    if kind == "local":
        model = st.text_input("Local chat model", value=DEFAULT_LOCAL, key="ai_local",
                              help="an embedded name, a Hugging Face id or a model folder; runs in the job's "
                                   "process")
        return backend_spec("local", local_model=model)
    cols = st.columns([3, 2, 2])
    url = cols[0].text_input("Base URL", value=DEFAULT_BASE_URL, key="ai_base_url")
    model = cols[1].text_input("Model", value=DEFAULT_API_MODEL, key="ai_api_model")
    env = cols[2].text_input("API key environment variable", value=DEFAULT_KEY_ENV, key="ai_api_key_env",
                             help="the NAME of the variable holding the key, read by the job; never the key "
                                  "itself. Empty: no Authorization header (a local server).")
    name = env.strip()
    if name and ENV_NAME.match(name):
        st.caption(f"`{name}` is {'set' if os.environ.get(name, '').strip() else '**not set**'} in this server's "
                   "environment" + ("" if os.environ.get(name, "").strip() else
                                    "; export it in the shell that starts Latent Explorer, or the job will fail."))
    return backend_spec("openai", base_url=url, api_model=model, api_key_env=env)


def _chosen_features(listed: Sequence[int], current: int | None, d_sae: int) -> list[int] | None:
    which = st.radio("Features to explain", list(WHICH), key="ai_which", format_func=WHICH.get, horizontal=True)
    if which == "first":
        n = st.number_input("N", min_value=1, max_value=100_000, value=20, step=10, key="ai_first",
                            help="the first N rows of the feature list above, as sorted and filtered")
        if not listed:
            raise ExplainFormError("The feature list above is empty; loosen its filters or choose other features.")
        return [int(f) for f in listed[: int(n)]]
    if which == "selected":
        if "ai_features" not in st.session_state:
            st.session_state["ai_features"] = str(int(current)) if current is not None else "0-9"
        text = st.text_input("Features", key="ai_features", help="ids and ranges, e.g. 0-9, 15")
        return parse_ranges(text, d_sae)
    return None


def explain_panel(path: str, d_sae: int, listed: Sequence[int], current: int | None) -> None:
    """The "Explain features" form: a backend, the features, and Start (explain) or Score; submits a job."""
    with st.expander("Explain features with a language model", expanded=False):
        st.caption("Explanations and their detection / fuzzing scores are written next to the dashboard "
                   "(explanations.parquet, scores.parquet) by a background job; features already done with the "
                   "same explainer are skipped.")
        try:
            backend = _backend_widgets()
            features = _chosen_features(listed, current, d_sae)
        except UserError as exc:
            show_user_error(exc)
            backend = features = None
        cols = st.columns([1, 1, 3])
        start = cols[0].button("Start explaining", key="ai_start", type="primary", disabled=backend is None)
        score = cols[1].button("Score explanations", key="ai_score", disabled=backend is None,
                               help="detection and fuzzing scores of the explanations of these features, with "
                                    "the same backend as the scorer")
        if backend is not None and (start or score):
            _submit(explain_spec(path, backend, features, "explain" if start else "score"))


# --- SAE-feature pickers (interventions) -------------------------------------------------------------------
def _sae_dashboard(sae_dir: str) -> dict | None:
    """The newest dashboard of this SAE (manifests only; the weights' hash is memoised by the engine)."""
    from engine.features.read import find_dashboard

    try:
        return find_dashboard(sae_dir)
    except UserError:
        return None


def sae_feature_labels(sae_dir: str, lm) -> tuple[dict[int, str], int | None]:
    """``({feature: label}, d_sae)`` from the newest dashboard of this SAE (``({}, None)`` without one); labels
    are built when missing and the dashboard is of ``lm``'s model."""
    if not sae_dir:
        return {}, None
    entry = _sae_dashboard(sae_dir)
    if entry is None:
        return {}, None
    manifest = entry["manifest"]
    tokenizer = lm.tokenizer if manifest.get("weights_hash") == getattr(lm, "weights_hash", None) else None
    return feature_labels(entry["path"], entry["mtime"], tokenizer), int(manifest["d_sae"])


def feature_picker(label: str, key: str, sae_dir: str, lm) -> None:
    """One SAE feature: a selectbox ``#id · label`` when the SAE has dashboards (and at most
    :data:`PICKER_MAX` features), else a number input with the label under it."""
    labels, d_sae = sae_feature_labels(sae_dir, lm)
    state = st.session_state
    kind = "select" if d_sae is not None and d_sae <= PICKER_MAX else "number"
    memo = f"_{key}_picker"  # (kind, value) of the last run: a widget of another type starts from its default
    last_kind, last_value = state.get(memo, (kind, state.get(key)))
    if last_kind != kind:
        state[key] = last_value
    if kind == "select" and not 0 <= int(state.get(key) or 0) < d_sae:
        state[key] = 0
    if kind == "select":
        value = st.selectbox(label, list(range(d_sae)), key=key, help="type a word to find features by their label",
                             format_func=lambda f: feature_name(f, labels.get(f)))
    else:
        value = st.number_input(label, min_value=0, step=1, key=key)
        if labels:
            st.caption(feature_name(int(value), labels.get(int(value))))
    state[memo] = (kind, value)


def _add_feature(list_key: str, pick_key: str, single: bool) -> None:
    picked = st.session_state.get(pick_key)
    if picked is None:
        return
    current = [p.strip() for p in str(st.session_state.get(list_key, "")).split(",") if p.strip()]
    chosen = [str(int(picked))] if single else list(dict.fromkeys(current + [str(int(picked))]))
    st.session_state[list_key] = ", ".join(chosen)
    st.session_state[pick_key] = None


def features_caption(list_key: str, sae_dir: str, lm, *, single: bool = False) -> None:
    """Labels of the features typed in ``list_key`` (comma-separated ids), and a labelled picker that adds one."""
    labels, d_sae = sae_feature_labels(sae_dir, lm)
    if d_sae is None:
        return
    ids = []
    for part in str(st.session_state.get(list_key, "")).split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            continue
    named = [feature_name(f, labels.get(f), 36) for f in ids if 0 <= f < d_sae]
    if named:
        st.caption("; ".join(named))
    if d_sae <= PICKER_MAX and labels:
        pick_key = f"{list_key}_pick"
        st.selectbox("Set the feature by label" if single else "Add a feature by label", list(range(d_sae)),
                     index=None, key=pick_key, format_func=lambda f: feature_name(f, labels.get(f)),
                     placeholder="type a word to find features", on_change=_add_feature,
                     args=(list_key, pick_key, single))
