"""On-disk activation store: sharded safetensors plus a JSON manifest.

Layout of a store folder::

    manifest.json          what the store holds (model, weights hash, sites, layers, dtype, corpus, ...)
                           and the list of shards with row counts, byte sizes and sha256 checksums
    shard_00000.safetensors
    shard_00001.safetensors
    ...

Each shard holds, for every captured (site, layer), a ``[rows, width]`` tensor named
``"<site>.<layer>"`` (e.g. ``"resid_post.6"``) in the store dtype, and per row ``token_ids``,
``doc_ids`` (index of the document in the corpus) and ``positions`` (position in its context
window; position 0 is the BOS / first token, which consumers usually skip).

Documents are tokenized, cut into windows of ``context_length`` tokens (each window starts with
the tokenizer's special prefix, e.g. BOS), batched with right padding and run through the model
once per batch; only real tokens are stored. Shards and the manifest are written atomically
(temp file + ``os.replace``) and the manifest is rewritten after every shard, so an interrupted
run resumes after the last complete shard; a shard whose checksum does not match is rebuilt.
In float16 stores, values beyond fp16's range (Gemma's BOS row reaches ~1e5) are clamped to
±65504 and counted in the manifest (``n_clamped``); choose bfloat16 to keep them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from engine import __version__
from engine.core.capture import capture, pad_batch
from engine.core.errors import UserError
from engine.core.fileio import atomic_write_json, sha256_file, temp_path
from engine.core.sites import SITES, normalize_sites

STORE_FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SITE_ALIASES = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
SHARD_BYTES = 256 * 2**20  # target size of one shard
META_TENSORS = ("token_ids", "doc_ids", "positions")

Progress = Callable[[float, str], None]


class StoreError(UserError):
    pass


# --- keys and paths -----------------------------------------------------------------------
def activations_root() -> Path:
    from engine.core.models import cache_root

    return cache_root() / "activations"


def normalize_store_sites(sites: Iterable[str] | str) -> list[str]:
    """``"resid"`` / ``["resid_post", "mlp"]`` -> validated canonical site names, in the given order."""
    names = [sites] if isinstance(sites, str) else list(sites)
    out = []
    for name in names:
        for part in str(name).split(","):
            part = SITE_ALIASES.get(part.strip(), part.strip())
            if not part:
                continue
            if part not in SITES:
                raise StoreError(f"Unknown site '{part}'; choose from resid, {', '.join(SITES)}.")
            if part not in out:
                out.append(part)
    if not out:
        raise StoreError("No site was chosen; pick at least one, e.g. resid_post.")
    return out


def normalize_layers(layers: str | Iterable[int], n_layers: int) -> list[int]:
    """``"all"``, ``"0,3,5"``, ``"2-6"`` or a list of ints -> sorted, validated layer indices."""
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text in ("all", ""):
            return list(range(n_layers))
        chosen: set[int] = set()
        try:
            for part in text.split(","):
                if "-" in part.strip()[1:]:
                    lo, hi = part.split("-", 1)
                    chosen.update(range(int(lo), int(hi) + 1))
                elif part.strip():
                    chosen.add(int(part))
        except ValueError as exc:
            raise StoreError(f"Layers '{layers}' are not understood; write 'all', '3,5,7' or '2-6'.") from exc
        layers = chosen
    result = sorted({int(i) for i in layers})
    if not result:
        raise StoreError("No layer was chosen; pick at least one.")
    bad = [i for i in result if not 0 <= i < n_layers]
    if bad:
        raise StoreError(f"Layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}.")
    return result


def store_key(weights_hash: str, sites: Sequence[str], layers: Sequence[int], corpus_hash: str,
              context_length: int, dtype: str) -> str:
    ident = json.dumps({"weights": weights_hash, "sites": list(sites), "layers": list(layers),
                        "corpus": corpus_hash, "context_length": context_length, "dtype": dtype,
                        "format": STORE_FORMAT, "code": __version__}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def default_store_dir(lm, corpus_spec: str, sites=("resid_post",), layers="all", context_length: int = 128,
                      dtype: str = "float16") -> Path:
    """``cache_root()/activations/<model>-<key>``: the folder a capture with these settings uses."""
    from engine.data.corpora import corpus_hash

    site_list = normalize_store_sites(sites)
    layer_list = normalize_layers(layers, lm.n_layers)
    key = store_key(lm.weights_hash, site_list, layer_list, corpus_hash(corpus_spec), context_length, dtype)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in lm.name)[-40:].strip("-.") or "model"
    return activations_root() / f"{slug}-{key}"


# --- small file helpers -------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# --- windows ------------------------------------------------------------------------------
def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before a text (e.g. ``[bos]``); ``[]`` for tokenizers like GPT-2's."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return list(with_special[: len(with_special) - len(without)])
    return []


def iter_windows(tokenizer, texts: Iterable[str], context_length: int, max_tokens: int
                 ) -> Iterator[tuple[int, list[int], bool]]:
    """``(doc_id, token ids, truncated)`` per context window, until ``max_tokens`` tokens in total.

    Every window starts with the tokenizer's special prefix; the last window is cut so that the
    total is exactly ``max_tokens`` (``truncated`` is then True) unless the corpus runs out first.
    """
    prefix = special_prefix(tokenizer)
    body = context_length - len(prefix)
    if body < 1:
        raise StoreError(f"The context length {context_length} leaves no room for text; use at least 16.")
    total = 0
    for doc, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            window = prefix + list(ids[start:start + body])
            truncated = total + len(window) > max_tokens
            if truncated:
                window = window[: max_tokens - total]
            total += len(window)
            yield doc, window, truncated
            if total >= max_tokens:
                return


# --- building -----------------------------------------------------------------------------
def _settings(lm, sites, layers, context_length, dtype, corpus_spec, corpus_digest) -> dict:
    return {"format": STORE_FORMAT, "code_version": __version__, "model": lm.name, "weights_hash": lm.weights_hash,
            "d_model": lm.d_model, "model_layers": lm.n_layers, "sites": sites, "layers": layers, "dtype": dtype,
            "context_length": context_length, "corpus": corpus_spec, "corpus_hash": corpus_digest,
            "special_prefix": special_prefix(lm.tokenizer)}


_MATCH_KEYS = ("format", "weights_hash", "sites", "layers", "dtype", "context_length", "corpus_hash")


def _usable_shards(out: Path, manifest: dict, progress: Progress | None) -> list[dict]:
    """The leading shards of an earlier run whose files verify; later ones are dropped for rebuilding."""
    good = []
    for index, shard in enumerate(manifest.get("shards", [])):
        file = out / shard["file"]
        if progress:
            progress(0.0, f"checking shard {index + 1} of {len(manifest['shards'])}")
        if not file.is_file() or file.stat().st_size != shard["bytes"] or sha256_file(file) != shard["sha256"]:
            break
        good.append(shard)
    return good


def build_store(lm, texts: Iterable[str], out: str | Path | None, *, layers="all", sites=("resid_post",),
                max_tokens: int, context_length: int = 128, batch_size: int = 8, dtype: str = "float16",
                corpus_spec: str = "", progress: Progress | None = None,
                shard_tokens: int | None = None) -> ActivationStore:
    """Capture activations of ``texts`` into a store folder and return it opened.

    Resumable: if ``out`` already holds a store with the same settings, verified shards are kept
    and the run continues after the last good one (a complete store with at least ``max_tokens``
    tokens is returned as is; a smaller one is extended). A folder holding a store with other
    settings is refused. ``shard_tokens`` overrides the rows per shard (default: ~256 MB shards).
    ``texts`` must yield the same documents in the same order on every run (all corpora do).
    """
    from engine.data.corpora import corpus_hash

    if dtype not in DTYPES:
        raise StoreError(f"Unknown store dtype '{dtype}'; choose from {', '.join(DTYPES)}.")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise StoreError(f"max_tokens must be a positive number of tokens, not {max_tokens!r}.")
    if context_length < 2:
        raise StoreError("The context length must be at least 2 tokens.")
    if lm.context_length and context_length > lm.context_length:
        raise StoreError(f"The context length {context_length} exceeds the model's limit of {lm.context_length}.")
    if batch_size < 1:
        raise StoreError("The batch size must be at least 1.")
    site_list = normalize_store_sites(sites)
    layer_list = normalize_layers(layers, lm.n_layers)
    normalize_sites({s: layer_list for s in site_list}, lm.n_layers)
    digest = corpus_hash(corpus_spec) if corpus_spec else hashlib.sha256(b"unnamed corpus").hexdigest()
    out = Path(out) if out is not None else default_store_dir(lm, corpus_spec, site_list, layer_list,
                                                              context_length, dtype)
    settings = _settings(lm, site_list, layer_list, context_length, dtype, corpus_spec, digest)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)

    shards: list[dict] = []
    widths: dict[str, int] = {}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = None
        if old is not None:
            differs = [k for k in _MATCH_KEYS if old.get(k) != settings[k]]
            if differs:
                raise StoreError(f"The folder '{out}' already holds a store with a different {differs[0]}; choose "
                                 "another output folder or delete that store.")
            shards = _usable_shards(out, old, progress)
            intact = len(shards) == len(old.get("shards", []))
            if intact and old.get("complete") and (old.get("n_tokens", 0) >= max_tokens or old.get("exhausted")):
                return ActivationStore.open(out)
            widths = old.get("widths", {}) if shards else {}
            if shards and shards[-1].get("truncated"):
                shards.pop()  # its last window was cut short for the old max_tokens; redo it
    rows_done = sum(s["rows"] for s in shards)
    windows_done = shards[-1]["windows_end"] if shards else 0
    for file in out.glob("shard_*.safetensors"):
        if file.name not in {s["file"] for s in shards}:
            file.unlink()

    store_dtype = DTYPES[dtype]
    per_row = max(1, len(layer_list)) * sum(widths.values() or [lm.d_model] * len(site_list)) * \
        torch.finfo(store_dtype).bits // 8
    rows_per_shard = shard_tokens or max(context_length, SHARD_BYTES // per_row)
    names = [f"{site}.{layer}" for site in site_list for layer in layer_list]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    started = time.time()

    def write_manifest(complete: bool, exhausted: bool = False) -> None:
        n_tokens = sum(s["rows"] for s in shards)
        atomic_write_json(manifest_path, {**settings, "widths": widths, "n_tokens": n_tokens, "max_tokens": max_tokens,
                                     "complete": complete, "exhausted": exhausted,
                                     "n_windows": shards[-1]["windows_end"] if shards else 0,
                                     "shard_tokens": rows_per_shard, "shards": shards,
                                     "n_clamped": sum(s.get("n_clamped", 0) for s in shards),
                                     "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    clamped = {"n": sum(s.get("n_clamped", 0) for s in shards)}
    buffer: dict[str, list[torch.Tensor]] = {name: [] for name in (*names, *META_TENSORS)}
    buffered = {"rows": 0, "windows": 0, "truncated": False}

    def flush() -> None:
        from safetensors.torch import save_file

        if buffered["rows"] == 0:
            return
        tensors = {name: torch.cat(parts).contiguous() for name, parts in buffer.items()}
        file = out / shard_name(len(shards))
        tmp = temp_path(file)
        # one metadata key only: safetensors writes metadata in hash-map order, and equal shards should be equal bytes
        save_file(tensors, str(tmp), metadata={"format": f"latent-explorer-activations/{STORE_FORMAT}"})
        size, sha = tmp.stat().st_size, sha256_file(tmp)
        os.replace(tmp, file)
        shards.append({"file": file.name, "rows": buffered["rows"], "bytes": size, "sha256": sha,
                       "windows_end": (shards[-1]["windows_end"] if shards else windows_done) + buffered["windows"],
                       "truncated": buffered["truncated"],
                       "n_clamped": clamped["n"] - sum(s.get("n_clamped", 0) for s in shards)})
        write_manifest(complete=False)
        for parts in buffer.values():
            parts.clear()
        buffered.update(rows=0, windows=0, truncated=False)

    windows = itertools.islice(iter_windows(lm.tokenizer, texts, context_length, max_tokens), windows_done, None)
    rows_total = rows_done
    for batch in _batched(windows, batch_size):
        input_ids, mask = pad_batch([ids for _, ids, _ in batch], pad)
        width = input_ids.shape[1]
        with lm.lock:
            captured, _ = capture(lm.anatomy, input_ids, mask, sites={s: layer_list for s in site_list})
        real = mask.bool()
        real_dev = real.to(lm.device)
        for site in site_list:
            picked = captured[site][:, real_dev]  # [layers, n_real, width]
            if store_dtype == torch.float16:  # e.g. Gemma's BOS row exceeds fp16's range: clamp, count, say so
                limit = torch.finfo(torch.float16).max
                clamped["n"] += int((picked.abs() > limit).sum())
                picked = picked.clamp(-limit, limit)
            picked = picked.to(store_dtype).cpu()
            widths[site] = int(picked.shape[-1])
            for j, layer in enumerate(layer_list):
                buffer[f"{site}.{layer}"].append(picked[j])
        lengths = mask.sum(1)
        buffer["token_ids"].append(input_ids[real].to(torch.int32))
        buffer["doc_ids"].append(torch.repeat_interleave(torch.tensor([d for d, _, _ in batch]), lengths))
        buffer["positions"].append(torch.arange(width).expand(len(batch), width)[real].to(torch.int32))
        n_real = int(real.sum())
        buffered["rows"] += n_real
        buffered["windows"] += len(batch)
        buffered["truncated"] = buffered["truncated"] or batch[-1][2]
        rows_total += n_real
        if progress:
            rate = (rows_total - rows_done) / max(time.time() - started, 1e-6)
            progress(min(rows_total / max_tokens, 1.0), f"{rows_total:,} of {max_tokens:,} tokens ({rate:,.0f} tok/s)")
        if buffered["rows"] >= rows_per_shard:
            flush()
    flush()
    if not shards:
        raise StoreError("The corpus produced no tokens; give a corpus with some text.")
    write_manifest(complete=True, exhausted=sum(s["rows"] for s in shards) < max_tokens)
    return ActivationStore.open(out)


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


# --- reading ------------------------------------------------------------------------------
_REQUIRED = ("format", "model", "weights_hash", "sites", "layers", "dtype", "context_length", "shards", "widths",
             "n_tokens", "d_model")


class ActivationStore:
    """A store folder opened for reading; see the module docstring for the layout."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)])
        self._handles: dict[int, object] = {}
        self._meta: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- opening and checking --
    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False) -> ActivationStore:
        """Open a store, checking its manifest and that every shard exists with the recorded size."""
        path = Path(path).expanduser()
        file = path / MANIFEST
        if not file.is_file():
            raise StoreError(f"'{path}' is not an activation store (no {MANIFEST}); capture one first.")
        try:
            manifest = json.loads(file.read_text())
        except ValueError as exc:
            raise StoreError(f"The manifest of '{path}' is corrupt (not JSON); delete the store and capture again.") \
                from exc
        missing = [key for key in _REQUIRED if key not in manifest]
        if missing:
            raise StoreError(f"The manifest of '{path}' lacks '{missing[0]}'; delete the store and capture again.")
        if manifest["format"] != STORE_FORMAT:
            raise StoreError(f"The store '{path}' has format {manifest['format']}, this version reads format "
                             f"{STORE_FORMAT}; capture it again.")
        if not manifest.get("complete") and not allow_incomplete:
            raise StoreError(f"The store '{path}' is incomplete ({manifest['n_tokens']:,} tokens so far); run the "
                             "same capture again to resume it.")
        for shard in manifest["shards"]:
            shard_file = path / shard["file"]
            if not shard_file.is_file():
                raise StoreError(f"Shard '{shard['file']}' of the store '{path}' is missing; run the capture again "
                                 "to rebuild it.")
            if shard_file.stat().st_size != shard["bytes"]:
                raise StoreError(f"Shard '{shard['file']}' of the store '{path}' is corrupt (its size differs from "
                                 "the manifest); run the capture again to rebuild it.")
        return cls(path, manifest)

    def verify(self, progress: Progress | None = None) -> list[str]:
        """Check every shard against the manifest (existence, size, sha256, tensor names and shapes)."""
        from safetensors import safe_open

        problems = []
        shards = self.manifest["shards"]
        for index, shard in enumerate(shards):
            if progress:
                progress(index / max(len(shards), 1), f"verifying {shard['file']}")
            file = self.path / shard["file"]
            if not file.is_file():
                problems.append(f"{shard['file']}: missing")
                continue
            if file.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['file']}: size {file.stat().st_size} instead of {shard['bytes']} (truncated)")
                continue
            if sha256_file(file) != shard["sha256"]:
                problems.append(f"{shard['file']}: checksum mismatch (corrupt)")
                continue
            try:
                with safe_open(str(file), framework="pt") as handle:
                    keys = set(handle.keys())
                    for name in (*self.tensor_names, *META_TENSORS):
                        if name not in keys:
                            problems.append(f"{shard['file']}: tensor '{name}' missing")
                            continue
                        shape = handle.get_slice(name).get_shape()
                        if shape[0] != shard["rows"]:
                            problems.append(f"{shard['file']}: tensor '{name}' has {shape[0]} rows, "
                                            f"manifest says {shard['rows']}")
            except Exception as exc:  # a file that is not safetensors raises various errors
                problems.append(f"{shard['file']}: unreadable ({type(exc).__name__})")
        if int(self._rows.sum()) != self.n_tokens:
            problems.append(f"manifest: shards hold {int(self._rows.sum())} rows, n_tokens says {self.n_tokens}")
        if progress:
            progress(1.0, "verified")
        return problems

    def check_model(self, lm) -> None:
        """Raise :class:`StoreError` unless ``lm`` is the model this store was captured from."""
        if lm.weights_hash != self.weights_hash:
            raise StoreError(f"This store was captured from '{self.model_name}', not from the loaded model "
                             f"'{lm.name}'; load that model or choose another store.")

    # -- attributes --
    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.manifest["layers"]]

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"])

    @property
    def weights_hash(self) -> str:
        return str(self.manifest["weights_hash"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def tensor_names(self) -> list[str]:
        return [f"{site}.{layer}" for site in self.sites for layer in self.layers]

    def width(self, site: str) -> int:
        return int(self.manifest["widths"].get(site, self.d_model))

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model_name!r}, tokens={self.n_tokens}, "
                f"sites={self.sites}, layers={self.layers})")

    # -- low-level access --
    def _name(self, site: str, layer: int) -> str:
        site = SITE_ALIASES.get(site, site)
        if site not in self.sites:
            raise StoreError(f"This store has no site '{site}'; it holds {', '.join(self.sites)}.")
        if int(layer) not in self.layers:
            raise StoreError(f"This store has no layer {layer}; it holds layers {_ranges(self.layers)}.")
        return f"{site}.{int(layer)}"

    def _handle(self, index: int):
        from safetensors import safe_open

        with self._lock:
            if index not in self._handles:
                file = self.path / self.manifest["shards"][index]["file"]
                try:
                    handle = safe_open(str(file), framework="pt")
                    rows = {handle.get_slice(n).get_shape()[0] for n in (*self.tensor_names, *META_TENSORS)}
                except Exception as exc:
                    raise StoreError(f"Shard '{file.name}' of the store '{self.path}' cannot be read "
                                     f"({type(exc).__name__}); run the capture again to rebuild it.") from exc
                if rows != {int(self._rows[index])}:
                    raise StoreError(f"Shard '{file.name}' of the store '{self.path}' does not match the manifest; "
                                     "run the capture again to rebuild it.")
                self._handles[index] = handle
            return self._handles[index]

    def _meta_tensor(self, name: str) -> torch.Tensor:
        if name not in self._meta:
            parts = [self._handle(i).get_tensor(name) for i in range(len(self._rows))]
            self._meta[name] = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
        return self._meta[name]

    def token_ids(self) -> torch.Tensor:
        return self._meta_tensor("token_ids")

    def doc_ids(self) -> torch.Tensor:
        return self._meta_tensor("doc_ids")

    def positions(self) -> torch.Tensor:
        return self._meta_tensor("positions")

    # -- random access --
    def read(self, site: str, layer: int, rows: torch.Tensor | slice | Sequence[int],
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of one (site, layer) by global row index, in the order given: ``[len(rows), width]``."""
        name = self._name(site, layer)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_tokens)
            if step == 1:
                return self._read_range(name, start, stop).to(dtype)
            rows = torch.arange(start, stop, step)
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_tokens):
            raise StoreError(f"Row {int(index.max()) if int(index.max()) >= self.n_tokens else int(index.min())} "
                             f"is outside this store (0..{self.n_tokens - 1}).")
        out = torch.empty((index.numel(), self.width(name.split(".")[0])), dtype=dtype)
        shard_of = np.searchsorted(self._starts, index.numpy(), side="right") - 1
        for shard in np.unique(shard_of):
            where = torch.from_numpy(np.nonzero(shard_of == shard)[0])
            local = index[where] - int(self._starts[shard])
            lo, hi = int(local.min()), int(local.max()) + 1
            block = self._handle(int(shard)).get_slice(name)[lo:hi]
            out[where] = block[local - lo].to(dtype)
        return out

    def _read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        parts = []
        for shard in range(len(self._rows)):
            lo, hi = max(start, int(self._starts[shard])), min(stop, int(self._starts[shard + 1]))
            if lo < hi:
                offset = int(self._starts[shard])
                parts.append(self._handle(shard).get_slice(name)[lo - offset:hi - offset])
        if not parts:
            return torch.empty((0, self.width(name.split(".")[0])), dtype=self.dtype)
        return torch.cat(parts)

    def context(self, row: int, before: int = 10, after: int = 3) -> tuple[list[int], int]:
        """Token ids around ``row`` within its context window, and the index of ``row`` in that list."""
        if not 0 <= row < self.n_tokens:
            raise StoreError(f"Row {row} is outside this store (0..{self.n_tokens - 1}).")
        positions, tokens = self.positions(), self.token_ids()
        start = row - min(before, int(positions[row]))
        stop = row + 1
        while stop < self.n_tokens and stop - row <= after and int(positions[stop]) == int(positions[stop - 1]) + 1:
            stop += 1
        return tokens[start:stop].tolist(), row - start

    # -- streaming --
    def iter_batches(self, site: str, layer: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     skip_first_position: bool = True, dtype: torch.dtype = torch.float32,
                     drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Stream ``[batch_size, width]`` tensors of one (site, layer), one shard in memory at a time.

        ``shuffle`` permutes the shard order and the rows inside each shard (seeded); rows at
        position 0 (BOS, huge norm) are left out unless ``skip_first_position`` is False.
        """
        if batch_size < 1:
            raise StoreError("The batch size must be at least 1.")
        name = self._name(site, layer)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self._rows), generator=generator).tolist() if shuffle else range(len(self._rows))
        carry: torch.Tensor | None = None
        for shard in order:
            handle = self._handle(shard)
            block = handle.get_tensor(name)
            if skip_first_position:
                block = block[handle.get_tensor("positions") != 0]
            if shuffle:
                block = block[torch.randperm(block.shape[0], generator=generator)]
            if carry is not None and carry.shape[0]:
                block = torch.cat([carry, block])
            full = block.shape[0] // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield block[start:start + batch_size].to(dtype)
            carry = block[full:]
        if carry is not None and carry.shape[0] and not drop_last:
            yield carry.to(dtype)

    def sample_rows(self, n: int, seed: int = 0, skip_first_position: bool = True) -> torch.Tensor:
        """Up to ``n`` distinct global row ids, drawn uniformly (seeded), sorted."""
        candidates = torch.arange(self.n_tokens)
        if skip_first_position:
            candidates = candidates[self.positions() != 0]
        if candidates.numel() <= n:
            return candidates
        generator = torch.Generator().manual_seed(seed)
        return candidates[torch.randperm(candidates.numel(), generator=generator)[:n]].sort().values


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


# --- managing stores ----------------------------------------------------------------------
def list_stores(root: str | Path | None = None, *, complete: bool = False,
                weights_hash: str | None = None) -> list[dict]:
    """Every store folder under ``root`` (default ``cache/activations``), newest first; with ``complete``
    only finished stores, with ``weights_hash`` only one model's.

    Each entry: ``path``, ``name``, ``manifest`` (dict or None), ``size_bytes``, ``complete``, ``error``.
    """
    root = Path(root) if root is not None else activations_root()
    if not root.is_dir():
        return []
    entries = []
    for folder in root.iterdir():
        if not folder.is_dir() or not (folder / MANIFEST).is_file():
            continue
        entry = {"path": str(folder), "name": folder.name, "manifest": None, "complete": False, "error": None,
                 "size_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
                 "mtime": (folder / MANIFEST).stat().st_mtime}
        try:
            entry["manifest"] = json.loads((folder / MANIFEST).read_text())
            entry["complete"] = bool(entry["manifest"].get("complete"))
        except ValueError:
            entry["error"] = "manifest is not valid JSON"
        if complete and not (entry["complete"] and entry["manifest"]):
            continue
        if weights_hash and (entry["manifest"] or {}).get("weights_hash") != weights_hash:
            continue
        entries.append(entry)
    return sorted(entries, key=lambda e: -e["mtime"])


def delete_store(path: str | Path) -> None:
    """Delete a store folder (refuses folders that are not stores)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise StoreError(f"'{path}' is not an activation store (no {MANIFEST}); nothing was deleted.")
    unexpected = [f.name for f in path.iterdir()
                  if not (f.name == MANIFEST or f.name.startswith("shard_") or f.name.endswith(".tmp"))]
    if unexpected:
        raise StoreError(f"'{path}' holds files that are not part of a store ({unexpected[0]}); delete it by hand.")
    shutil.rmtree(path)
