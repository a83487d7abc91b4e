"""On-disk activation store, read side: sharded safetensors plus a JSON manifest.

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

The manifest lists only finished shards, so a reader never sees a half-written one. Writing, resuming
and extending a store: :mod:`engine.data.store_writer`; verifying and deleting: :mod:`engine.data.store_admin`.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.devices import DTYPES
from engine.core.errors import UserError
from engine.core.progress import Progress
from engine.core.sites import SITES

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

STORE_FORMAT = 1
MANIFEST = "manifest.json"
STORE_DTYPES = ("float16", "bfloat16", "float32")  # what activations may be stored as (keys of core DTYPES)
SITE_ALIASES = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
META_TENSORS = ("token_ids", "doc_ids", "positions")
REQUIRED_KEYS = ("format", "model", "weights_hash", "sites", "layers", "dtype", "context_length", "shards", "widths",
                 "n_tokens", "d_model")


class StoreError(UserError):
    pass


# --- names and paths ------------------------------------------------------------------------
def activations_root() -> Path:
    from engine.core.models import cache_root

    return cache_root() / "activations"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


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


def _parse_layers(text: str) -> set[int]:
    chosen: set[int] = set()
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            lo, hi = part.split("-", 1)
            chosen.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            chosen.add(int(part))
    return chosen


def normalize_layers(layers: str | Iterable[int], n_layers: int) -> list[int]:
    """``"all"``, ``"0,3,5"``, ``"2-6"`` or a list of ints -> sorted, validated layer indices."""
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text in ("all", ""):
            return list(range(n_layers))
        try:
            layers = _parse_layers(text)
        except ValueError as exc:
            raise StoreError(f"Layers '{layers}' are not understood; write 'all', '3,5,7' or '2-6'.") from exc
    result = sorted({int(i) for i in layers})
    if not result:
        raise StoreError("No layer was chosen; pick at least one.")
    bad = [i for i in result if not 0 <= i < n_layers]
    if bad:
        raise StoreError(f"Layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}.")
    return result


# --- the manifest -----------------------------------------------------------------------------
def read_manifest(path: str | Path, *, allow_incomplete: bool = False) -> dict:
    """The manifest of the store folder ``path``, checked: JSON, required keys, format, completeness."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"'{path}' is not an activation store (no {MANIFEST}); capture one first.")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as exc:
        raise StoreError(f"The manifest of '{path}' is corrupt (not JSON); delete the store and capture again.") \
            from exc
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise StoreError(f"The manifest of '{path}' lacks '{missing[0]}'; delete the store and capture again.")
    if manifest["format"] != STORE_FORMAT:
        raise StoreError(f"The store '{path}' has format {manifest['format']}, this version reads format "
                         f"{STORE_FORMAT}; capture it again.")
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(f"The store '{path}' is incomplete ({manifest['n_tokens']:,} tokens so far); run the "
                         "same capture again to resume it.")
    return manifest


def check_shard_files(path: Path, manifest: dict) -> None:
    """Every shard of the manifest exists with its recorded size (cheap; checksums: ``verify``)."""
    for shard in manifest["shards"]:
        shard_file = path / shard["file"]
        if not shard_file.is_file():
            raise StoreError(f"Shard '{shard['file']}' of the store '{path}' is missing; run the capture again "
                             "to rebuild it.")
        if shard_file.stat().st_size != shard["bytes"]:
            raise StoreError(f"Shard '{shard['file']}' of the store '{path}' is corrupt (its size differs from "
                             "the manifest); run the capture again to rebuild it.")


# --- reading ----------------------------------------------------------------------------------
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
        manifest = read_manifest(path, allow_incomplete=allow_incomplete)
        check_shard_files(path, manifest)
        return cls(path, manifest)

    def verify(self, progress: Progress | None = None) -> list[str]:
        """Check every shard against the manifest (existence, size, sha256, tensor names and shapes)."""
        from engine.data.store_admin import verify_store

        return verify_store(self, progress)

    def check_model(self, lm: LoadedModel) -> None:
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

    @property
    def n_shards(self) -> int:
        return len(self._rows)

    def shard_rows(self, index: int) -> int:
        return int(self._rows[index])

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
        """``[n_tokens]`` long."""
        return self._meta_tensor("token_ids")

    def doc_ids(self) -> torch.Tensor:
        """``[n_tokens]`` long: the index of each row's document in the corpus."""
        return self._meta_tensor("doc_ids")

    def positions(self) -> torch.Tensor:
        """``[n_tokens]`` long: each row's position in its context window."""
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


# --- finding stores ---------------------------------------------------------------------------
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
