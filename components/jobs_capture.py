"""Jobs page sections: capture activations into a store (as a job), and manage existing stores.

``render_capture_section()`` submits a (resumable) capture job and returns at once; the job list and
the sidebar show its progress and the store appears in the table below when it is done.
``render_stores_section()`` lists the stores under ``cache/activations`` with their size and
manifest, and verifies or deletes one (not while a job writes it).
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from components.jobs_ui import model_params, show_session_job
from components.session import progress_to, show_user_error, submit_within_limits
from engine.core.errors import UserError
from engine.core.sites import SITES
from engine.serving import current_policy

CORPORA = {"builtin": "built-in English (Python standard library docstrings)",
           "builtin-multilingual": "built-in multilingual word lists (7 languages)",
           "path": "a .txt file, a folder of .txt files or a .jsonl file",
           "hf": "a Hugging Face dataset (needs the network)"}


PATH_PLACEHOLDER = "data/texts, data/notes.txt, cache/corpora/data.jsonl"


def roots_help() -> str:
    from engine.core.paths import data_roots

    return ("A path under the data folders (" + ", ".join(str(root) for root in data_roots()) + "); a relative path "
            "starts at the project folder, e.g. data/... or cache/....")


def _corpus_spec() -> str:
    kinds = [k for k in CORPORA if k != "hf" or current_policy().allow_hub_downloads]
    kind = st.selectbox("Corpus", kinds, format_func=CORPORA.get, key="capture_corpus_kind")
    if kind == "path":
        return st.text_input("Path on this machine", key="capture_corpus_path", placeholder=PATH_PLACEHOLDER,
                             help=roots_help()).strip()
    if kind == "hf":
        name = st.text_input("Dataset name", key="capture_corpus_hf", placeholder="roneneldan/TinyStories").strip()
        return f"hf:{name}" if name else ""
    return kind


def _anchored(spec: str) -> str:
    """A relative corpus path starts at the project folder (where data/ and cache/ are), not the server's cwd."""
    from pathlib import Path

    from engine.core.paths import REPO_ROOT
    from engine.data.corpora import BUILTIN

    if not spec or spec in BUILTIN or spec.startswith(("hf:", "~")) or Path(spec).is_absolute():
        return spec
    return str(REPO_ROOT / spec)


def checked_corpus(corpus: str) -> str | None:
    """The corpus a UI job may read, checked at submit without reading any text: the serving policy (no
    ``hf:`` downloads in demo mode), then the data roots (always in the UI), file kinds and size limits.
    Returns the spec to submit (a local path resolved), or None after showing the one-sentence reason; what
    a folder skipped is shown as a warning."""
    from engine.data.corpora import check_corpus

    try:
        spec = current_policy().check_corpus(_anchored(corpus.strip()))
        found = check_corpus(spec, enforce_roots=True)
    except UserError as exc:
        show_user_error(exc)
        return None
    if found.note():
        st.warning(found.note())
    return str(found.path) if found.path is not None else found.spec


def with_enforced_roots(kind: str, params: dict) -> dict:
    """Ask the job to keep its corpus under the data roots when it reads it, if the kind takes that parameter."""
    from engine.jobs.spec import get_kind

    if get_kind(kind).param("enforce_roots") is not None:
        params["enforce_roots"] = True
    return params


def render_capture_section(lm) -> None:
    """Pick model (sidebar), corpus, layers, sites and size; submit a capture job."""
    st.subheader("Capture activations")
    st.caption("Runs the corpus through the model once and stores every real token's activations as sharded "
               "safetensors under cache/activations, as a job that goes on when you leave this page. Starting the "
               "same capture again resumes it, or extends it when you ask for more tokens.")
    corpus = _corpus_spec()
    cols = st.columns([3, 3])
    all_layers = cols[0].checkbox("All layers", value=True, key="capture_all_layers")
    layers = list(range(lm.n_layers)) if all_layers else cols[0].multiselect(
        "Layers", list(range(lm.n_layers)), default=[lm.n_layers // 2], key="capture_layers")
    sites = cols[1].multiselect("Sites", SITES, default=["resid_post"], key="capture_sites")
    cols = st.columns(4)
    max_tokens = cols[0].number_input("Tokens", 100, 10 ** 9, 20_000, step=10_000, key="capture_tokens")
    context = cols[1].number_input("Context length", 8, 8192, 128, step=32, key="capture_context")
    batch = cols[2].number_input("Batch size", 1, 1024, 8, key="capture_batch")
    dtype = cols[3].selectbox("Stored as", ["float16", "bfloat16", "float32"], key="capture_dtype")
    width = sum(lm.d_model for _ in sites) * max(len(layers), 1)
    estimate = int(max_tokens) * width * (4 if dtype == "float32" else 2)
    st.caption(f"About {estimate / 2**20:,.0f} MiB on disk ({int(max_tokens):,} tokens × {len(layers)} layers × "
               f"{len(sites)} sites × {lm.d_model} dims).")
    if st.button("Start capture", type="primary", key="capture_start"):
        checked = checked_corpus(corpus)
        if checked is not None:
            params = {**model_params(), "corpus": checked, "sites": list(sites),
                      "layers": "all" if all_layers else list(layers), "max_tokens": int(max_tokens),
                      "context_length": int(context), "batch_size": int(batch), "store_dtype": dtype}
            submit_within_limits({"kind": "capture", "params": with_enforced_roots("capture", params)}, "capture",
                                 "the store appears in the table below when it is done.")
    show_session_job("capture")


def _in_use(path: str) -> str | None:
    """The job (or process) writing a store folder right now, if any."""
    from filelock import Timeout

    from engine.jobs.state import lock_holder, output_lock

    lock = output_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return lock_holder(path).get("job", "another process")
    lock.release()
    return None


def _summary(entry: dict) -> dict:
    manifest = entry["manifest"] or {}
    layers = manifest.get("layers", [])
    return {"store": entry["name"], "model": manifest.get("model", "?"), "corpus": manifest.get("corpus", ""),
            "tokens": manifest.get("n_tokens", 0), "layers": f"{layers[0]}..{layers[-1]}" if layers else "",
            "sites": ", ".join(manifest.get("sites", [])), "dtype": manifest.get("dtype", ""),
            "MiB": round(entry["size_bytes"] / 2**20, 1),
            "state": entry["error"] or ("complete" if entry["complete"] else "incomplete (resume by capturing again)")}


def render_stores_section(lm) -> None:
    """Table of stores; per store its manifest, a verify button and a delete button."""
    from engine.data.store import ActivationStore, list_stores
    from engine.data.store_admin import delete_store

    st.subheader("Activation stores")
    entries = list_stores()
    if not entries:
        st.info("No activation store yet.")
        return
    st.dataframe(pd.DataFrame([_summary(e) for e in entries]), hide_index=True, width="stretch")
    names = [e["name"] for e in entries]
    name = st.selectbox("Store", names, key="stores_pick")
    entry = entries[names.index(name)]
    with st.expander("Manifest", expanded=False):
        manifest = dict(entry["manifest"] or {})
        shards = manifest.pop("shards", [])
        st.json(manifest, expanded=False)
        st.caption(f"{len(shards)} shards; the manifest file is {entry['path']}/manifest.json")
        st.download_button("Download manifest.json", json.dumps(entry["manifest"], indent=1).encode(),
                           file_name=f"{name}-manifest.json", key="stores_manifest_download")
    cols = st.columns([1, 2, 1])
    if cols[0].button("Verify", key="stores_verify"):
        try:
            bar = st.progress(0.0)
            problems = ActivationStore.open(entry["path"], allow_incomplete=True).verify(
                progress=progress_to(bar))
        except UserError as exc:
            show_user_error(exc)
        else:
            if problems:
                st.error("Problems: " + "; ".join(problems) + ". Capture again with the same settings to rebuild.")
            else:
                st.success("Every shard matches its checksum in the manifest.")
    confirm = cols[1].checkbox(f"Yes, delete {name}", key="stores_confirm")
    if cols[2].button("Delete", disabled=not confirm, key="stores_delete"):
        holder = _in_use(entry["path"])
        try:
            if holder:
                raise UserError(f"Job {holder} is writing this store; cancel it first, then delete.")
            delete_store(entry["path"])
        except UserError as exc:
            show_user_error(exc)
        else:
            st.session_state.pop("stores_confirm", None)
            st.rerun()
