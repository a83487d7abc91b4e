"""Reading Neuronpedia exports: :func:`import_neuronpedia` turns one into a dashboard folder, :func:`open_dashboard`
opens it as an :class:`ImportedDashboard` (token windows from ``contexts.parquet``, no SAE or store).

The layout, which fields are read and which are approximate are described in :mod:`engine.features.neuronpedia`.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine import __version__
from engine.core.fileio import atomic_write_json, temp_path
from engine.core.progress import Progress, report
from engine.features.folder import DASHBOARD_FORMAT, MANIFEST, TABLES, DashboardError
from engine.features.read import Dashboard
from engine.sae.metrics import DEAD_DENSITY, DENSE_DENSITY

SOURCE = "neuronpedia"
CONTEXTS = "contexts.parquet"
SET_PREFIX = {"resid_post": "res", "resid_pre": "res_pre", "resid_mid": "res_mid", "attn_out": "att",
              "mlp_out": "mlp", "mlp_hidden": "mlp_hidden", "attn_heads": "att_z"}
APPROXIMATE = ["n_rows", "density", "count", "mean_act", "max_act", "histograms"]
_COLUMNS = {  # i int64, f float32, d float64, b bool, s string, S list of strings, F list of float32
    "features": "feature:i count:i density:d max_act:f mean_act:f dead:b dense:b act_tokens:s top_logits:s "
                "bottom_logits:s",
    "histograms": "feature:i bin:i lo:f hi:f count:i",
    "top_examples": "feature:i rank:i row:i act:f token_id:i doc:i pos:i",
    "intervals": "feature:i interval:i rank:i lo:f hi:f row:i act:f token_id:i doc:i pos:i",
    "logits": "feature:i sign:s rank:i token_id:i token:s value:f",
    "neighbours": "feature:i rank:i neighbour:i cosine:f",
    "cooccurrence": "feature:i rank:i other:i jaccard:f together:i",
    "contexts": "feature:i row:i tokens:S values:F focus:i"}


class NeuronpediaError(DashboardError):
    """A Neuronpedia export cannot be written, or an export folder cannot be read."""


# --- import --------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _fail(where: str, key: str, wanted: str, value: Any) -> NeuronpediaError:
    return NeuronpediaError(f"{where}: '{key}' must be {wanted}, not {_kind(value)}.")


def _number(record: dict, key: str, where: str, default: float | None = None) -> float | None:
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, key, "a number", value)
    return float(value)


def _list(record: dict, key: str, where: str, types: tuple, wanted: str) -> list:
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, types) for v in value):
        raise _fail(where, key, wanted, value if not isinstance(value, list) else
                    next(v for v in value if isinstance(v, bool) or not isinstance(v, types)))
    return value


def _pair(record: dict, keys: tuple[str, str], where: str, first: tuple = (str,), name: str = "strings") -> list:
    """Two parallel lists: ``(first items, numbers)`` zipped, checked to be of equal length."""
    left = _list(record, keys[0], where, first, f"a list of {name}")
    right = _list(record, keys[1], where, (int, float), "a list of numbers")
    if len(left) != len(right):
        raise NeuronpediaError(f"{where}: '{keys[0]}' and '{keys[1]}' have different lengths.")
    return list(zip(left, right))


def _feature_of(record: dict, where: str, ident: dict) -> int:
    """The record's feature index; its model and source must be those of the records before it."""
    for key in ("modelId", "layer"):
        value = record.get(key)
        if not isinstance(value, str):
            raise _fail(where, key, "a string", value)
        if ident.setdefault(key, value) != value:
            raise NeuronpediaError(f"{where}: the export mixes {key} '{ident[key]}' and '{value}'; import one source.")
    value = record.get("index")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, "index", "a feature number", value)
    return value


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` per line of a gzipped JSON-lines file; a bad file or line raises one sentence."""
    name = f"{path.parent.name}/{path.name}"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise NeuronpediaError(f"Line {number} of {name} is not valid JSON (the file may be cut short); "
                                           "download the export again.") from exc
                if not isinstance(record, dict):
                    raise NeuronpediaError(f"Line {number} of {name} is {_kind(record)}, not a JSON object.")
                yield f"Line {number} of {name}", record
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise NeuronpediaError(f"{name} is not a valid gzip file (corrupt or cut short); download the export "
                               "again.") from exc


def _first_record(path: Path) -> dict:
    """The one record of a metadata file such as ``source.jsonl`` ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()),
                                 "{}"))
    except ValueError as exc:
        raise NeuronpediaError(f"{path.name} of the export is not valid JSON; download the export again.") from exc
    if not isinstance(record, dict):
        raise NeuronpediaError(f"{path.name} of the export is {_kind(record)}, not a JSON object.")
    return record


def _source_folder(path: Path) -> Path:
    if not path.is_dir():
        raise NeuronpediaError(f"The Neuronpedia export '{path}' does not exist or is not a folder.")
    found = sorted({p.parent for pattern in ("features", "*/features", "*/*/features") for p in path.glob(pattern)
                    if p.is_dir()})
    if not found:
        raise NeuronpediaError(f"'{path}' holds no Neuronpedia export (no features/ folder of batch files).")
    if len(found) > 1:
        raise NeuronpediaError(f"'{path}' holds {len(found)} exported sources ({', '.join(p.name for p in found)}); "
                               "pass the folder of one.")
    return found[0]


def _batch_files(folder: Path) -> list[Path]:
    def number(path: Path) -> int:
        match = re.fullmatch(r"batch-(\d+)\.jsonl\.gz", path.name)
        return int(match.group(1)) if match else -1
    return sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: (number(p), p.name))


class _Tables:
    """The dashboard's parquet tables, written a row group at a time to temporary files moved into place on exit."""

    def __init__(self, out: Path) -> None:
        import pyarrow as pa

        types = {"i": pa.int64(), "f": pa.float32(), "d": pa.float64(), "b": pa.bool_(), "s": pa.string(),
                 "S": pa.list_(pa.string()), "F": pa.list_(pa.float32())}
        self.out, self.writers = out, {}
        self.schemas = {name: pa.schema([(c.split(":")[0], types[c.split(":")[1]]) for c in spec.split()])
                        for name, spec in _COLUMNS.items()}
        self.rows = {name: {c: [] for c in schema.names} for name, schema in self.schemas.items()}

    def add(self, table: str, *values: Any) -> None:
        for column, value in zip(self.rows[table].values(), values):
            column.append(value)

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for name, columns in self.rows.items():
            if columns and next(iter(columns.values())):
                if name not in self.writers:
                    self.writers[name] = pq.ParquetWriter(str(temp_path(self.out / f"{name}.parquet")),
                                                          self.schemas[name])
                self.writers[name].write_table(pa.table(columns, schema=self.schemas[name]))
                self.rows[name] = {c: [] for c in columns}

    def __enter__(self) -> _Tables:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        import pyarrow.parquet as pq

        if kind is None:
            self.flush()
        for name, schema in self.schemas.items():
            if kind is None and name not in self.writers:
                self.writers[name] = pq.ParquetWriter(str(temp_path(self.out / f"{name}.parquet")), schema)
            if name in self.writers:
                self.writers[name].close()
                tmp = temp_path(self.out / f"{name}.parquet")
                if kind is None:
                    os.replace(tmp, self.out / f"{name}.parquet")
                else:
                    tmp.unlink(missing_ok=True)


def _read_features(files: list[Path], tables: _Tables, ident: dict, progress: Progress | None) -> dict[int, tuple]:
    """Histograms, logits and neighbours into ``tables``; returns ``{feature: (density, max, mean, +, -)}``."""
    stats: dict[int, tuple] = {}
    for number, path in enumerate(files):
        for where, record in _records(path):
            f = _feature_of(record, where, ident)
            if f in stats:
                raise NeuronpediaError(f"{where}: feature {f} appears twice in the export.")
            bars = _pair(record, ("freq_hist_data_bar_heights", "freq_hist_data_bar_values"), where, (int, float),
                         "numbers")
            width = abs(bars[1][1] - bars[0][1]) if len(bars) > 1 else 2 * abs(bars[0][1]) if bars else 0.0
            for b, (height, value) in enumerate(bars):
                if height > 0:
                    tables.add("histograms", f, b, value - width / 2, value + width / 2, round(height))
            total = sum(h for h, _ in bars if h > 0)
            max_act = _number(record, "maxActApprox", where, 0.0)
            mean = sum(h * v for h, v in bars if h > 0) / total if total > 0 else 0.0
            sides = {sign: _pair(record, (f"{name}_str", f"{name}_values"), where) for sign, name in
                     (("+", "pos"), ("-", "neg"))}
            for sign, pairs in sides.items():
                for rank, (token, value) in enumerate(pairs):
                    tables.add("logits", f, sign, rank, -1, token, value)
            neighbours = [(i, v) for i, v in _pair(record, ("topkCosSimIndices", "topkCosSimValues"), where, (int,),
                                                   "feature numbers") if i != f]
            for rank, (other, cosine) in enumerate(neighbours):
                tables.add("neighbours", f, rank, other, cosine)
            stats[f] = (_number(record, "frac_nonzero", where, 0.0), max_act, mean,
                        *(" | ".join(t.strip() for t, _ in sides[sign][:5]) for sign in "+-"))
        tables.flush()
        report(progress, 0.5 * (number + 1) / len(files), f"features: {path.name}")
    return stats


def _interval_ids(bounds: Sequence[tuple[float, float]]) -> list[int]:
    """Equal-width intervals keep their index (``lo / width``); others are numbered by their lower bound."""
    widths = [hi - lo for lo, hi in bounds]
    if widths[0] > 0 and all(abs(w - widths[0]) <= 1e-4 * widths[0] for w in widths):
        steps = [lo / widths[0] for lo, _ in bounds]
        if all(abs(s - round(s)) < 1e-3 for s in steps):
            return [round(s) for s in steps]
    order = {lo: i for i, lo in enumerate(sorted({lo for lo, _ in bounds}))}
    return [order[lo] for lo, _ in bounds]


def _read_activation(record: dict, where: str, ident: dict) -> tuple[int, list[str], list[float], int, Any, Any, int]:
    f = _feature_of(record, where, ident)
    tokens = _list(record, "tokens", where, (str,), "a list of strings")
    values = [float(v) for v in _list(record, "values", where, (int, float), "a list of numbers")]
    if not tokens or len(tokens) != len(values):
        raise NeuronpediaError(f"{where}: 'tokens' and 'values' must be non-empty lists of the same length.")
    focus = next((record[k] for k in ("qualifyingTokenIndex", "maxValueTokenIndex") if record.get(k) is not None),
                 max(range(len(values)), key=values.__getitem__))
    if isinstance(focus, bool) or not isinstance(focus, int) or not 0 <= focus < len(tokens):
        raise _fail(where, "qualifyingTokenIndex", f"a token index below {len(tokens)}", focus)
    doc = record.get("dataIndex")
    doc = int(doc) if isinstance(doc, int) or (isinstance(doc, str) and doc.isdigit()) else -1
    return (f, tokens, values, focus, _number(record, "binMin", where), _number(record, "binMax", where), doc)


def _read_activations(files: list[Path], tables: _Tables, ident: dict, stats: dict,
                      progress: Progress | None) -> dict[int, list[str]]:
    """Examples and their windows into ``tables``; returns each feature's top activating tokens."""
    words: dict[int, list[str]] = defaultdict(list)
    ranks: dict[tuple, int] = defaultdict(int)
    row = 0
    for number, path in enumerate(files):
        top, binned = defaultdict(list), defaultdict(list)
        for where, record in _records(path):
            f, tokens, values, focus, lo, hi, doc = _read_activation(record, where, ident)
            if f not in stats:
                raise NeuronpediaError(f"{where}: feature {f} has examples but no record in features/.")
            tables.add("contexts", f, row, tokens, values, focus)
            example = (values[focus], row, doc, focus, tokens[focus])
            if lo is None or hi is None or lo < 0:  # top examples carry binMin -1 (or no bin at all)
                top[f].append(example)
            else:
                binned[f].append((lo, hi, example))
            row += 1
        for f, examples in top.items():
            for act, r, doc, focus, token in sorted(examples, key=lambda e: -e[0]):
                tables.add("top_examples", f, ranks[f, "top"], r, act, -1, doc, focus)
                ranks[f, "top"] += 1
                if token.strip() and token.strip() not in words[f] and len(words[f]) < 8:
                    words[f].append(token.strip())
        for f, examples in binned.items():
            for interval, (lo, hi, (act, r, doc, focus, _)) in zip(_interval_ids([e[:2] for e in examples]),
                                                                   examples):
                tables.add("intervals", f, interval, ranks[f, interval], lo, hi, r, act, -1, doc, focus)
                ranks[f, interval] += 1
        tables.flush()
        report(progress, 0.5 + 0.5 * (number + 1) / len(files), f"activations: {path.name}")
    return words


def import_neuronpedia(export_dir: str | Path, out_dir: str | Path, *, weights_hash: str | None = None,
                       progress: Progress | None = None) -> Path:
    """Turn a Neuronpedia export (one source's folder, or a folder holding exactly one) into a dashboard folder.

    ``weights_hash`` ties it to a local model (the feature page lists a model's dashboards by it).
    """
    src = _source_folder(Path(export_dir))
    files = _batch_files(src / "features")
    if not files:
        raise NeuronpediaError(f"The export '{src}' holds no features/batch-*.jsonl.gz files.")
    source, model = _first_record(src / "source.jsonl"), _first_record(src / "model.jsonl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder without a manifest is incomplete
    for stale in out.glob("map_*.parquet"):  # feature maps cached from an earlier dashboard in this folder
        stale.unlink()
    ident: dict = {}
    with _Tables(out) as tables:
        stats = _read_features(files, tables, ident, progress)
        if not stats:
            raise NeuronpediaError(f"The export '{src}' holds no feature records.")
        words = _read_activations(_batch_files(src / "activations"), tables, ident, stats, progress)
        match = re.search(r"\((\d+) tokens", str(source.get("notes") or ""))
        prompts, length = source.get("num_prompts"), source.get("num_tokens_in_prompt")
        n_rows = int(match.group(1)) if match else prompts * length if all(
            isinstance(v, int) and not isinstance(v, bool) for v in (prompts, length)) else 0
        for f in range(max(stats) + 1):
            density, max_act, mean, up, down = stats.get(f, (0.0, 0.0, 0.0, "", ""))
            tables.add("features", f, round(density * n_rows), density, max_act, mean, density <= DEAD_DENSITY,
                       density > DENSE_DENSITY, " | ".join(words.get(f, [])), up, down)
    layer_match = re.match(r"(\d+)-(.*)", ident["layer"])
    rest = layer_match.group(2) if layer_match else ident["layer"]
    site = next((s for s, p in sorted(SET_PREFIX.items(), key=lambda kv: -len(kv[1]))
                 if rest == p or rest.startswith(p + "-")), "resid_post")
    manifest = {"format": DASHBOARD_FORMAT, "key": f"neuronpedia-{ident['modelId']}-{ident['layer']}",
                "complete": True, "source": SOURCE, "approximate": APPROXIMATE, "code_version": __version__,
                "sae_path": None, "sae_name": ident["layer"], "sae_sha256": None, "d_sae": max(stats) + 1,
                "d_in": model.get("dimension"), "architecture": None, "site": site,
                "layer": int(layer_match.group(1)) if layer_match else 0, "store_path": "",
                "model": ident["modelId"], "weights_hash": weights_hash, "corpus_hash": None, "n_rows": n_rows,
                "config": {}, "pass_seconds": 0.0, "cooccurrence": False,
                "tables": [f"{t}.parquet" for t in TABLES], "contexts": CONTEXTS,
                "neuronpedia": {"modelId": ident["modelId"], "sourceId": ident["layer"],
                                "setName": source.get("setName"), "dataset": source.get("dataset"),
                                "export": str(src.resolve())},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(out / MANIFEST, manifest)
    return out


# --- reading an import ---------------------------------------------------------------------------
class ImportedDashboard(Dashboard):
    """A dashboard imported from Neuronpedia: token windows come from ``contexts.parquet``; no SAE, no store."""

    def store(self):
        raise NeuronpediaError(f"The dashboard '{self.path.name}' was imported from Neuronpedia and has no "
                               "activation store.")

    def sae(self):
        raise NeuronpediaError(f"The dashboard '{self.path.name}' was imported from Neuronpedia without SAE weights, "
                               "so the feature map and activations on your text are not available.")

    def contexts(self, feature: int, rows: Sequence[int], tokenizer=None, before: int | None = 10,
                 after: int | None = 4) -> list[dict]:
        """The stored windows of these example rows, cut to ``before``/``after`` tokens around each example."""
        import pyarrow.parquet as pq

        f, rows = self.check_feature(feature), [int(r) for r in rows]
        if not rows:
            return []
        table = pq.read_table(self.path / CONTEXTS, filters=[("feature", "=", f), ("row", "in", rows)]).to_pydict()
        found = {r: (t, v, c) for r, t, v, c in zip(table["row"], table["tokens"], table["values"], table["focus"])}
        out = []
        for row in rows:
            if row not in found:
                raise NeuronpediaError(f"Row {row} is not an example of feature {f} in this import.")
            tokens, values, focus = found[row]
            lo = max(0, focus - before) if before is not None else 0
            hi = min(len(tokens), focus + after + 1) if after is not None else len(tokens)
            out.append({"row": row, "tokens": tokens[lo:hi], "acts": [float(v) for v in values[lo:hi]],
                        "focus": focus - lo})
        return out


def open_dashboard(path: str | Path, sae_dir: str | Path | None = None) -> Dashboard:
    """:meth:`Dashboard.open`, returning an :class:`ImportedDashboard` for a folder imported from Neuronpedia."""
    dash = Dashboard.open(path, sae_dir)
    return ImportedDashboard(dash.path, dash.manifest) if dash.manifest.get("source") == SOURCE else dash
