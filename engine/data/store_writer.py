"""Writing activation stores: capture a corpus into shards, resume an interrupted capture, extend a store.

Documents are cut into windows of ``context_length`` tokens (:func:`engine.data.windows.iter_windows`,
each window starts with the tokenizer's special prefix, e.g. BOS), batched with right padding and run
through the model once per batch; only real tokens are stored.

Crash safety (a capture may be killed at any moment, also with SIGKILL):

- a shard is written to a temporary file unique to its writer (:func:`engine.core.fileio.temp_path`) and
  moved into place when whole; ``manifest.json`` is rewritten atomically only after that, so the
  manifest only ever lists finished shards;
- a run never deletes or rewrites a shard the manifest lists as intact: it appends new shards (a shard
  whose checksum does not match is rebuilt); a window the previous run cut short at ``max_tokens`` is
  computed again whole and only its missing rows go into the next new shard;
- extending a complete store keeps it readable (``complete``) at every step: a killed extension leaves
  the store as it was plus the new shards finished so far, and running the capture again continues;
- a writer never deletes temporary files it did not create; one writer at a time per folder (a second
  one gets a :class:`~engine.data.store.StoreError`).

In float16 stores, values beyond fp16's range (Gemma's BOS row reaches ~1e5) are clamped to ±65504 (in
float32, so a bfloat16 model's values are clamped exactly) and counted in the manifest (``n_clamped``);
choose bfloat16 to keep them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine import __version__
from engine.core.capture import capture, pad_batch
from engine.core.devices import DTYPES, oom_guard
from engine.core.fileio import atomic_write, atomic_write_json, sha256_file
from engine.core.progress import Progress, report
from engine.core.sites import normalize_sites
from engine.data.store import (
    MANIFEST,
    META_TENSORS,
    STORE_DTYPES,
    STORE_FORMAT,
    ActivationStore,
    StoreError,
    activations_root,
    normalize_layers,
    normalize_store_sites,
    shard_name,
)
from engine.data.store_admin import intact_shards
from engine.data.windows import Window, iter_windows, special_prefix

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

SHARD_BYTES = 256 * 2**20  # target size of one shard
FP16_MAX = torch.finfo(torch.float16).max
_MATCH_KEYS = ("format", "weights_hash", "sites", "layers", "dtype", "context_length", "corpus_hash")


# --- where a capture goes ---------------------------------------------------------------------
def store_key(weights_hash: str, sites: Sequence[str], layers: Sequence[int], corpus_hash: str,
              context_length: int, dtype: str) -> str:
    ident = json.dumps({"weights": weights_hash, "sites": list(sites), "layers": list(layers),
                        "corpus": corpus_hash, "context_length": context_length, "dtype": dtype,
                        "format": STORE_FORMAT, "code": __version__}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def default_store_dir(lm: LoadedModel, corpus_spec: str, sites: str | Iterable[str] = ("resid_post",),
                      layers: str | Iterable[int] = "all", context_length: int = 128,
                      dtype: str = "float16") -> Path:
    """``cache_root()/activations/<model>-<key>``: the folder a capture with these settings uses."""
    from engine.data.corpora import corpus_hash

    site_list = normalize_store_sites(sites)
    layer_list = normalize_layers(layers, lm.n_layers)
    key = store_key(lm.weights_hash, site_list, layer_list, corpus_hash(corpus_spec), context_length, dtype)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in lm.name)[-40:].strip("-.") or "model"
    return activations_root() / f"{slug}-{key}"


# --- checks and settings ----------------------------------------------------------------------
def _check_request(lm: LoadedModel, max_tokens: int, context_length: int, batch_size: int, dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise StoreError(f"Unknown store dtype '{dtype}'; choose from {', '.join(STORE_DTYPES)}.")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise StoreError(f"max_tokens must be a positive number of tokens, not {max_tokens!r}.")
    if context_length < 2:
        raise StoreError("The context length must be at least 2 tokens.")
    if lm.context_length and context_length > lm.context_length:
        raise StoreError(f"The context length {context_length} exceeds the model's limit of {lm.context_length}.")
    if batch_size < 1:
        raise StoreError("The batch size must be at least 1.")
    if context_length - len(special_prefix(lm.tokenizer)) < 1:
        raise StoreError(f"The context length {context_length} leaves no room for text; use at least 16.")


def _settings(lm: LoadedModel, sites: list[str], layers: list[int], context_length: int, dtype: str,
              corpus_spec: str) -> dict:
    from engine.data.corpora import corpus_hash

    digest = corpus_hash(corpus_spec) if corpus_spec else hashlib.sha256(b"unnamed corpus").hexdigest()
    return {"format": STORE_FORMAT, "code_version": __version__, "model": lm.name, "weights_hash": lm.weights_hash,
            "d_model": lm.d_model, "model_layers": lm.n_layers, "sites": sites, "layers": layers, "dtype": dtype,
            "context_length": context_length, "corpus": corpus_spec, "corpus_hash": digest,
            "special_prefix": special_prefix(lm.tokenizer)}


@contextmanager
def _one_writer(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the store folder (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"Another capture is writing to '{folder}' right now; wait for it to finish (starting "
                             "the same capture again afterwards resumes or extends it).") from None
        yield
    finally:
        os.close(fd)


# --- where the previous run stopped -----------------------------------------------------------
@dataclass
class _Resume:
    shards: list[dict] = field(default_factory=list)  # intact shards kept as they are
    widths: dict[str, int] = field(default_factory=dict)
    start_window: int = 0       # first window to run through the model (the start of a batch of the last run)
    skip_rows: int = 0          # rows at the start of that stream that are already stored
    readable: bool = False      # the store was complete and intact: it stays complete while it grows
    finished: bool = False      # nothing to do: the store already holds what was asked for
    dropped: bool = False       # damaged shards were left out of the manifest


def _first_position(file: Path) -> int:
    """Position of a shard's first row in its window (> 0: the shard continues a window begun before it)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return int(handle.get_slice("positions")[:1][0])


def _resume_point(out: Path, shards: list[dict]) -> tuple[int, int]:
    """``(window, rows)``: run the model again from ``window`` on; its first ``rows`` rows are stored already."""
    last = shards[-1]
    if "resume_window" in last:
        return int(last["resume_window"]), int(last["resume_skip"])
    if last.get("truncated"):  # written before resume points were recorded: redo the last shard's windows
        first = _first_position(out / last["file"])
        previous_end = int(shards[-2]["windows_end"]) if len(shards) > 1 else 0
        return (previous_end - 1 if first > 0 else previous_end), first + int(last["rows"])
    return int(last["windows_end"]), 0


def _previous_run(out: Path, settings: dict, max_tokens: int, progress: Progress | None) -> _Resume:
    path = out / MANIFEST
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        old = None
    if old is None:
        return _Resume()
    differs = [k for k in _MATCH_KEYS if old.get(k) != settings[k]]
    if differs:
        raise StoreError(f"The folder '{out}' already holds a store with a different {differs[0]}; choose "
                         "another output folder or delete that store.")
    if old.get("parts") and not old.get("complete"):  # finished parts need not be a prefix of the corpus
        raise StoreError(f"The folder '{out}' holds an unfinished sharded capture; finish it on Ray (the same job "
                         "with --ray) or choose another output folder.")
    shards = intact_shards(out, old, progress)
    intact = len(shards) == len(old.get("shards", []))
    resume = _Resume(shards=shards, widths=old.get("widths", {}) if shards else {},
                     readable=bool(intact and old.get("complete")), dropped=not intact)
    if resume.readable and (old.get("n_tokens", 0) >= max_tokens or old.get("exhausted")):
        resume.finished = True
    elif shards:
        resume.start_window, resume.skip_rows = _resume_point(out, shards)
    return resume


# --- shards and the manifest ------------------------------------------------------------------
@dataclass
class _Batch:
    """What one batch adds: tensors of its stored rows (``[rows, width]`` activations, ``[rows]`` metadata)."""

    tensors: dict[str, torch.Tensor]
    widths: dict[str, int]
    rows: int                   # rows stored from this batch
    windows_end: int            # index after the last window with a stored row
    truncated: bool             # that window was not stored whole
    clamped: int                # values clamped to the float16 range
    resume: tuple[int, int]     # where a later run continues: (window, rows of it on already stored)


class _ShardWriter:
    """Buffers captured rows, writes them as new shards and commits the manifest after each one."""

    def __init__(self, out: Path, settings: dict, resume: _Resume, names: list[str], max_tokens: int,
                 rows_per_shard: int):
        self.out, self.settings, self.max_tokens, self.rows_per_shard = out, settings, max_tokens, rows_per_shard
        self.shards = list(resume.shards)
        self.widths = dict(resume.widths)
        self.readable = resume.readable
        self.buffer: dict[str, list[torch.Tensor]] = {name: [] for name in (*names, *META_TENSORS)}
        self.pending: list[_Batch] = []

    @property
    def n_tokens(self) -> int:
        """Rows in committed shards."""
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def n_buffered(self) -> int:
        return sum(b.rows for b in self.pending)

    def add(self, batch: _Batch) -> None:
        self.widths.update(batch.widths)
        for name, tensor in batch.tensors.items():
            self.buffer[name].append(tensor)
        self.pending.append(batch)
        if self.n_buffered >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.n_buffered == 0:
            return
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.buffer.items()}
        file = self.out / shard_name(len(self.shards))
        written: dict = {}

        def write(tmp: Path) -> None:
            # one metadata key only: safetensors writes metadata in hash-map order, and equal shards should be
            # equal bytes
            save_file(tensors, str(tmp), metadata={"format": f"latent-explorer-activations/{STORE_FORMAT}"})
            written.update(bytes=tmp.stat().st_size, sha256=sha256_file(tmp))

        atomic_write(file, write)  # the shard is whole on disk before the manifest names it
        last = self.pending[-1]
        self.shards.append({"file": file.name, "rows": self.n_buffered, "bytes": written["bytes"],
                            "sha256": written["sha256"], "windows_end": last.windows_end,
                            "truncated": last.truncated, "n_clamped": sum(b.clamped for b in self.pending),
                            "resume_window": last.resume[0], "resume_skip": last.resume[1]})
        self.commit(complete=self.readable)
        for parts in self.buffer.values():
            parts.clear()
        self.pending.clear()

    def commit(self, complete: bool, exhausted: bool = False) -> None:
        atomic_write_json(self.out / MANIFEST, {
            **self.settings, "widths": self.widths, "n_tokens": self.n_tokens, "max_tokens": self.max_tokens,
            "complete": complete, "exhausted": exhausted,
            "n_windows": self.shards[-1]["windows_end"] if self.shards else 0,
            "shard_tokens": self.rows_per_shard, "shards": self.shards,
            "n_clamped": sum(s.get("n_clamped", 0) for s in self.shards),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


# --- capturing ---------------------------------------------------------------------------------
def clamp_to_fp16(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Clamp to float16's finite range in float32 and count the values that were beyond it.

    In bfloat16, 65504 itself rounds to 65536, so clamping there would leave values that become inf
    in float16; upcasting first makes every value beyond ±65504 exactly ±65504.
    """
    wide = values.float()
    n = int((wide.abs() > FP16_MAX).sum())
    return (wide.clamp(-FP16_MAX, FP16_MAX) if n else wide), n


def _stored_mask(mask: torch.Tensor, skip: int, room: int) -> torch.Tensor:
    """``[B, T]`` bool: the real tokens after the first ``skip`` (already stored), at most ``room`` of them,
    counted in storage order (window by window)."""
    keep = mask.bool().clone()
    flat = keep.view(-1)
    real = flat.nonzero()[:, 0]
    flat[real[:skip]] = False
    flat[real[skip + room:]] = False
    return keep


def _capture_batch(lm: LoadedModel, windows: list[Window], first_window: int, sites: list[str], layers: list[int],
                   store_dtype: torch.dtype, skip: int, room: int) -> _Batch:
    """Run one batch of windows through the model and keep the rows to store (see :func:`_stored_mask`).

    The whole batch is always computed, also windows whose rows are not stored, so each row's value is
    the same whichever run stores it (a store extended later equals one captured in one go).
    """
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids, mask = pad_batch([w.ids for w in windows], pad)                 # [B, T]
    width = input_ids.shape[1]
    with lm.lock, oom_guard("the capture batch_size or context_length", doing="capturing activations"):
        captured, _ = capture(lm.anatomy, input_ids, mask, sites={s: layers for s in sites})
    keep = _stored_mask(mask, skip, room)
    keep_dev = keep.to(lm.device)
    tensors, widths, clamped = {}, {}, 0
    for site in sites:
        picked = captured[site][:, keep_dev]                                     # [layers, rows, width]
        if store_dtype == torch.float16:  # e.g. Gemma's BOS row exceeds fp16's range: clamp, count, say so
            picked, n = clamp_to_fp16(picked)
            clamped += n
        picked = picked.to(store_dtype).cpu()
        widths[site] = int(picked.shape[-1])
        for j, layer in enumerate(layers):
            tensors[f"{site}.{layer}"] = picked[j]
    per_window = keep.sum(1)                                                     # [B] stored rows per window
    tensors["token_ids"] = input_ids[keep].to(torch.int32)
    tensors["doc_ids"] = torch.repeat_interleave(torch.tensor([w.doc for w in windows]), per_window)
    tensors["positions"] = torch.arange(width).expand(len(windows), width)[keep].to(torch.int32)
    rows = int(per_window.sum())
    stored = per_window.nonzero()[:, 0]
    last = int(stored[-1]) if len(stored) else -1
    full = mask.sum(1)
    truncated = bool(last >= 0 and keep[last].nonzero()[-1, 0] + 1 < full[last])
    real = int(full.sum())
    done = skip + rows >= real  # every real row of the batch is stored now: the next run starts after it
    resume = (first_window + len(windows), 0) if done else (first_window, skip + rows)
    return _Batch(tensors, widths, rows, first_window + last + 1 if last >= 0 else first_window, truncated,
                  clamped, resume)


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def _rows_per_shard(lm: LoadedModel, resume: _Resume, sites: list[str], layers: list[int], dtype: str,
                    context_length: int,
                    shard_tokens: int | None) -> int:
    per_row = max(1, len(layers)) * sum(resume.widths.values() or [lm.d_model] * len(sites)) * \
        torch.finfo(DTYPES[dtype]).bits // 8
    return shard_tokens or max(context_length, SHARD_BYTES // per_row)


def build_store(lm: LoadedModel, texts: Iterable[str], out: str | Path | None, *,
                layers: str | Iterable[int] = "all", sites: str | Iterable[str] = ("resid_post",),
                max_tokens: int, context_length: int = 128, batch_size: int = 8, dtype: str = "float16",
                corpus_spec: str = "", progress: Progress | None = None,
                shard_tokens: int | None = None, window_range: tuple[int, int | None] | None = None
                ) -> ActivationStore:
    """Capture activations of ``texts`` into a store folder and return it opened.

    Resumable: if ``out`` already holds a store with the same settings, verified shards are kept
    and the run continues after the last good one (a complete store with at least ``max_tokens``
    tokens is returned as is; a smaller one is extended with new shards). A folder holding a store with
    other settings is refused. ``shard_tokens`` overrides the rows per shard (default: ~256 MB shards).
    ``texts`` must yield the same documents in the same order on every run (all corpora do).
    ``window_range=(start, stop)``: capture only windows ``start`` to ``stop`` (None: to the end) of the
    corpus, at most ``max_tokens`` rows (one part of a sharded capture, :mod:`engine.data.store_parts`);
    ``start`` should be a multiple of ``batch_size`` so batches, and so values, equal a single run's.
    """
    _check_request(lm, max_tokens, context_length, batch_size, dtype)
    site_list = normalize_store_sites(sites)
    layer_list = normalize_layers(layers, lm.n_layers)
    normalize_sites({s: layer_list for s in site_list}, lm.n_layers)
    out = Path(out) if out is not None else default_store_dir(lm, corpus_spec, site_list, layer_list,
                                                              context_length, dtype)
    settings = _settings(lm, site_list, layer_list, context_length, dtype, corpus_spec)
    out.mkdir(parents=True, exist_ok=True)
    with _one_writer(out):
        resume = _previous_run(out, settings, max_tokens, progress)
        if resume.finished:
            return ActivationStore.open(out)
        names = [f"{site}.{layer}" for site in site_list for layer in layer_list]
        writer = _ShardWriter(out, settings, resume, names, max_tokens,
                              _rows_per_shard(lm, resume, site_list, layer_list, dtype, context_length, shard_tokens))
        if resume.dropped:  # damaged shards: the manifest names only the intact ones from now on
            writer.commit(complete=False)
        _capture_into(lm, texts, writer, resume, site_list, layer_list, DTYPES[dtype], context_length, batch_size,
                      progress, window_range)
        writer.flush()
        if not writer.shards:
            raise StoreError("The corpus produced no tokens; give a corpus with some text.")
        writer.commit(complete=True, exhausted=writer.n_tokens < max_tokens)
    return ActivationStore.open(out)


def _capture_into(lm: LoadedModel, texts: Iterable[str], writer: _ShardWriter, resume: _Resume, sites: list[str],
                  layers: list[int], store_dtype: torch.dtype, context_length: int, batch_size: int,
                  progress: Progress | None, window_range: tuple[int, int | None] | None = None) -> None:
    """Batches of windows from ``resume.start_window`` on (and inside ``window_range``), until ``max_tokens``
    rows are stored."""
    max_tokens = writer.max_tokens
    low, high = window_range or (0, None)
    first_window = max(resume.start_window, low)
    skip = resume.skip_rows if first_window == resume.start_window else 0
    windows = itertools.islice(iter_windows(lm.tokenizer, texts, context_length), first_window, high)
    rows_done = writer.n_tokens
    if rows_done >= max_tokens:  # an interrupted capture that already holds enough rows: just finish it
        return
    started = time.time()
    for batch in _batched(windows, batch_size):
        room = max_tokens - writer.n_tokens - writer.n_buffered
        captured = _capture_batch(lm, batch, first_window, sites, layers, store_dtype, skip, room)
        writer.add(captured)
        first_window += len(batch)
        skip = max(0, skip - sum(len(w.ids) for w in batch))
        stored = writer.n_tokens + writer.n_buffered
        rate = (stored - rows_done) / max(time.time() - started, 1e-6)
        report(progress, stored / max_tokens, f"{stored:,} of {max_tokens:,} tokens ({rate:,.0f} tok/s)")
        if stored >= max_tokens:
            return
