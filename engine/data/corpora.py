"""Text sources for activation capture and the built-in prompt sets of the concept view.

A corpus *spec* is one string:

- ``builtin``               an offline English corpus built at run time from the docstrings of the
                            Python standard library (parsed with :mod:`ast`, never imported, never copied
                            into the repository); one text per module, in sorted module order
- ``builtin-multilingual``  word lists in seven languages from :mod:`engine.data.prompt_sets`
- ``path/to/file.txt``      one UTF-8 text file (one document)
- ``path/to/folder``        every ``*.txt`` file below the folder, in sorted order (one document each)
- ``path/to/file.jsonl``    one JSON object per line with a ``text`` field
- ``hf:<dataset>``          the first data files (parquet, jsonl or txt) of a Hugging Face dataset,
                            when the hub is reachable; column ``text`` (or the first string column)

Every source yields the same texts in the same order on every run, so a capture that is
interrupted can skip what it already stored. :func:`corpus_hash` identifies the content.

Paths are read through :mod:`engine.core.paths`: resolved first, kept under the data roots when
``enforce_roots`` is true (the UI always passes True; the CLI default follows ``LATENT_EXPLORER_DATA``),
stat-ed before they are opened so that only regular files are read (never ``/dev/zero``, pipes or
sockets), each within the size limits, and folders are walked with a bound on entries and files.
:func:`check_corpus` says what a spec takes and what it skipped without reading any text.

:func:`prompt_set` builds the small labelled sets of the concept view (multilingual concepts,
days, months, numbers, countries and capitals).
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import itertools
import json
import logging
import os
import stat
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import engine.core.paths as paths
import engine.data.prompt_sets as ps
from engine.core.errors import UserError
from engine.core.fileio import BLOCK

log = logging.getLogger(__name__)

BUILTIN_VERSION = 1  # bump when the way the built-in corpora are assembled changes
MIN_MODULE_CHARS = 200
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__",
              "ensurepip", "venv", "tkinter", "pydoc_data"}


class CorpusError(UserError):
    pass


# --- built-in corpora ---------------------------------------------------------------------
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_docstrings(path: Path) -> str:
    """Module, class and function docstrings of one source file, joined by blank lines."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                parts.append(doc)
    # ast.walk visits the module twice (as tree and as its own first node); keep order, drop repeats
    seen, unique = set(), []
    for part in parts:
        if part not in seen:
            seen.add(part)
            unique.append(part)
    return "\n\n".join(unique)


def _builtin_texts() -> Iterator[str]:
    for path in _stdlib_files():
        text = _module_docstrings(path)
        if len(text) >= MIN_MODULE_CHARS:
            yield text


def _multilingual_texts() -> Iterator[str]:
    """Per language: one comma-separated list per concept category, then days, months, numbers."""
    for code in ps.LANGUAGES:
        for category in ps.CATEGORIES:
            words = [entry[code] for entry in ps.CONCEPTS if entry["category"] == category]
            if words:
                yield ", ".join(words)
        for table in (ps.DAYS, ps.MONTHS, ps.NUMBERS):
            yield ", ".join(table[code])


BUILTIN = {"builtin": _builtin_texts, "builtin-multilingual": _multilingual_texts}


# --- files --------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".text", ".md")
FOLDER_SUFFIXES = (".txt",)
FILE_ENV, TOTAL_ENV = "LATENT_EXPLORER_MAX_FILE_BYTES", "LATENT_EXPLORER_MAX_TOTAL_BYTES"


def _decode_text(data: bytes, path: Path) -> str:
    if b"\x00" in data[:65536]:
        raise CorpusError(f"'{path}' is not a text file (it contains NUL bytes); give a UTF-8 .txt file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"'{path}' is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8.") from exc
    sample = text[:20000]
    controls = sum(1 for ch in sample if unicodedata.category(ch) in ("Cc", "Cs", "Co") and ch not in "\n\t\r\f")
    if controls > max(8, 0.02 * len(sample)):
        raise CorpusError(f"'{path}' does not look like text ({controls} control characters); give plain text.")
    return text


def _read_text_file(path: Path) -> str:
    """One document: a regular file (checked with stat before it is opened) of at most MAX_FILE_BYTES."""
    try:
        data = paths.read_bytes_limited(path, paths.MAX_FILE_BYTES, what="corpus file")
    except paths.PathNotAllowed as exc:
        raise CorpusError(str(exc)) from exc
    return _decode_text(data, path)


def _folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The .txt files below a folder (bounded walk) and notes on what was skipped; none at all is an error."""
    files, notes = paths.walk_files(folder, max_files=paths.MAX_FILES, suffixes=FOLDER_SUFFIXES)
    if not files:
        skipped = f" that can be read (skipped: {paths.describe_skipped(notes)})" if notes else ""
        raise CorpusError(f"The folder '{folder}' holds no .txt files{skipped}; add some or point to a file "
                          "instead.")
    if notes:
        log.warning("corpus folder %s: skipped %d: %s", folder, len(notes), paths.describe_skipped(notes))
    return files, notes


def _jsonl_texts(path: Path) -> Iterator[str]:
    """Stream a JSON-lines file (at most MAX_TOTAL_BYTES in all, MAX_FILE_BYTES per line)."""
    try:
        paths.check_regular_file(path, paths.MAX_TOTAL_BYTES, what="corpus file", limit_env=TOTAL_ENV)
        handle = paths.open_regular(path, what="corpus file")
    except paths.PathNotAllowed as exc:
        raise CorpusError(str(exc)) from exc
    line_cap, budget = paths.MAX_FILE_BYTES, paths.MAX_TOTAL_BYTES
    with handle:
        for number in itertools.count(1):
            raw = handle.readline(line_cap + 1)
            if not raw:
                return
            budget -= len(raw)
            if len(raw) > line_cap or budget < 0:
                what = "is longer than" if len(raw) > line_cap else "goes past the corpus limit of"
                limit = line_cap if len(raw) > line_cap else paths.MAX_TOTAL_BYTES
                raise CorpusError(f"Line {number} of '{path}' {what} {paths.human_bytes(limit)}; split the file.")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CorpusError(f"Line {number} of '{path}' is not valid JSON; fix it or remove it.") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"Line {number} of '{path}' has no string field 'text'; every line needs one.")
            if text.strip():
                yield text


# --- Hugging Face datasets ----------------------------------------------------------------
def _hf_files(name: str) -> list[str]:
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise CorpusError("Reading Hugging Face datasets needs the package 'huggingface_hub'.") from exc
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CorpusError(f"The Hugging Face hub is switched off (HF_HUB_OFFLINE), so dataset '{name}' cannot be "
                          "read; use a local file or 'builtin'.")
    try:
        files = HfApi().list_repo_files(name, repo_type="dataset")
    except Exception as exc:  # network errors, missing repos and gated repos come in many types
        raise CorpusError(f"The Hugging Face dataset '{name}' could not be reached ({type(exc).__name__}); check the "
                          "name and the network, or use a local file or 'builtin'.") from exc
    for suffix in (".parquet", ".jsonl", ".txt"):
        chosen = sorted(f for f in files if f.endswith(suffix))
        if chosen:
            train = [f for f in chosen if "train" in f]
            return train or chosen
    raise CorpusError(f"The Hugging Face dataset '{name}' has no parquet, jsonl or txt files to read.")


def _hf_texts(name: str) -> Iterator[str]:
    from huggingface_hub import hf_hub_download

    for filename in _hf_files(name):
        try:
            local = Path(hf_hub_download(name, filename, repo_type="dataset"))
        except Exception as exc:
            raise CorpusError(f"Downloading '{filename}' of dataset '{name}' failed ({type(exc).__name__}); "
                              "check the network.") from exc
        if local.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(local)
            schema = parquet.schema_arrow
            column = "text" if "text" in schema.names else next(
                (f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)), None)
            if column is None:
                raise CorpusError(f"'{filename}' of dataset '{name}' has no text column.")
            for batch in parquet.iter_batches(columns=[column], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if isinstance(text, str) and text.strip():
                        yield text
        elif local.suffix == ".jsonl":
            yield from _jsonl_texts(local)
        else:
            yield _read_text_file(local)


# --- public API ---------------------------------------------------------------------------
@dataclass
class CorpusCheck:
    """What a corpus spec points at, found without reading any text (see :func:`check_corpus`)."""

    spec: str
    kind: str  # "builtin" | "hf" | "file" | "jsonl" | "folder"
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    total_bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    def note(self) -> str:
        """One sentence about skipped files and limits reached ("" when nothing was skipped)."""
        if not self.skipped:
            return ""
        return (f"Skipped in '{self.spec}' ({len(self.skipped)}): {paths.describe_skipped(self.skipped)}; "
                f"read {len(self.files):,} files ({paths.human_bytes(self.total_bytes)}).")


def _enforce(enforce_roots: bool | None) -> bool:
    return paths.roots_enforced(ui=False) if enforce_roots is None else bool(enforce_roots)


def _local(spec: str, enforce_roots: bool) -> CorpusCheck:
    """Resolve a path spec (roots checked first, before anything is stat-ed), then stat it: a folder, a
    regular .txt/.jsonl file, or one clear error."""
    try:
        path = paths.safe_path(spec, enforce_roots=enforce_roots, what="corpus")
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise CorpusError(f"The corpus '{spec}' is neither 'builtin', 'builtin-multilingual', 'hf:<dataset>' nor an "
                          "existing file or folder.") from exc
    except OSError as exc:
        raise CorpusError(f"The corpus '{spec}' cannot be read ({type(exc).__name__}).") from exc
    except paths.PathNotAllowed as exc:
        raise CorpusError(str(exc)) from exc
    if stat.S_ISDIR(info.st_mode):
        files, notes = _folder_files(path)
        return CorpusCheck(spec, "folder", path, files, sum(f.stat().st_size for f in files), notes)
    suffix = path.suffix.lower()
    if stat.S_ISREG(info.st_mode) and suffix not in (*TEXT_SUFFIXES, ".jsonl"):
        raise CorpusError(f"'{spec}' is not a .txt or .jsonl file; give plain text, JSON lines or a folder.")
    kind = "jsonl" if suffix == ".jsonl" else "file"
    limit, env = (paths.MAX_TOTAL_BYTES, TOTAL_ENV) if kind == "jsonl" else (paths.MAX_FILE_BYTES, FILE_ENV)
    try:
        size = paths.check_regular_file(path, limit, what="corpus", limit_env=env)
    except paths.PathNotAllowed as exc:
        raise CorpusError(str(exc)) from exc
    return CorpusCheck(spec, kind, path, [path], size)


def check_corpus(spec: str, *, enforce_roots: bool | None = None) -> CorpusCheck:
    """Check a spec without reading its text: what it is, which files it takes and what it skipped.

    ``enforce_roots``: keep paths under :func:`engine.core.paths.data_roots` (the UI passes True; the default
    follows :func:`engine.core.paths.roots_enforced` for the CLI). Bad specs raise :class:`CorpusError`.
    """
    spec = (spec or "").strip()
    if not spec:
        raise CorpusError("No corpus was given: use 'builtin', a text file, a folder, a .jsonl file or 'hf:<name>'.")
    if spec in BUILTIN:
        return CorpusCheck(spec, "builtin")
    if spec.startswith("hf:"):
        name = spec[3:].strip()
        if not name:
            raise CorpusError("'hf:' needs a dataset name, for example 'hf:roneneldan/TinyStories'.")
        return CorpusCheck(spec, "hf")
    return _local(spec, _enforce(enforce_roots))


def _non_empty(texts: Iterator[str], spec: str, notes: list[str]) -> Iterator[str]:
    """Pass texts on; a corpus that ends without one text is an error (with what was skipped)."""
    produced = False
    for text in texts:
        produced = True
        yield text
    if not produced:
        skipped = f" (skipped: {paths.describe_skipped(notes)})" if notes else ""
        raise CorpusError(f"The corpus '{spec}' holds no text{skipped}; give files with some text in them.")


def _folder_texts(files: list[Path]) -> Iterator[str]:
    for file in files:
        text = _read_text_file(file)
        if text.strip():
            yield text


def iter_texts(spec: str, *, enforce_roots: bool | None = None, notes: list[str] | None = None) -> Iterator[str]:
    """Yield the documents of a corpus, deterministically (see the module docstring for specs).

    The spec is checked before the first text is produced, so a bad spec fails at once. Paths are read
    only as regular files within the limits of :mod:`engine.core.paths`; ``enforce_roots`` keeps them under
    the data roots (default: :func:`engine.core.paths.roots_enforced` for the CLI; the UI passes True).
    Files skipped in a folder are appended to ``notes`` when a list is given.
    """
    check = check_corpus(spec, enforce_roots=enforce_roots)
    if notes is not None:
        notes.extend(check.skipped)
    if check.kind == "builtin":
        return BUILTIN[check.spec]()
    if check.kind == "hf":
        name = check.spec[3:].strip()
        _hf_files(name)  # fail early with a clear message when the hub is unreachable
        return _non_empty(_hf_texts(name), check.spec, [])
    if check.kind == "folder":
        return _non_empty(_folder_texts(check.files), check.spec, check.skipped)
    if check.kind == "jsonl":
        return _non_empty(_jsonl_texts(check.path), check.spec, [])
    text = _read_text_file(check.path)
    if not text.strip():
        raise CorpusError(f"The file '{check.spec}' is empty; give a file with some text.")
    return iter([text])


def _hash_files(files: list[Path], root: Path, max_bytes: int) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() if file != root else b"")
        paths.check_regular_file(file, max_bytes, what="corpus file")
        with paths.open_regular(file, what="corpus file") as handle:
            remaining = max_bytes
            while remaining >= 0 and (block := handle.read(min(BLOCK, remaining + 1))):
                digest.update(block)
                remaining -= len(block)
            if remaining < 0:
                raise CorpusError(f"'{file}' grew past {paths.human_bytes(max_bytes)} while it was hashed.")
    return digest.hexdigest()


def corpus_hash(spec: str, *, enforce_roots: bool | None = None) -> str:
    """A content hash of a corpus: file bytes for files, code and Python version for built-ins."""
    spec = (spec or "").strip()
    if spec in BUILTIN:
        if spec == "builtin":
            ident = f"{spec}|v{BUILTIN_VERSION}|{sys.version_info[:3]}|{sysconfig.get_paths()['stdlib']}"
        else:
            ident = f"{spec}|v{BUILTIN_VERSION}|{inspect.getsource(ps)}"
        return hashlib.sha256(ident.encode()).hexdigest()
    if spec.startswith("hf:"):
        return hashlib.sha256(spec.encode()).hexdigest()
    check = check_corpus(spec, enforce_roots=enforce_roots)
    try:
        if check.kind == "folder":
            return _hash_files(check.files, check.path, paths.MAX_FILE_BYTES)
        limit = paths.MAX_TOTAL_BYTES if check.kind == "jsonl" else paths.MAX_FILE_BYTES
        return _hash_files([check.path], check.path, limit)
    except paths.PathNotAllowed as exc:
        raise CorpusError(str(exc)) from exc


# --- labelled prompt sets for the concept view ---------------------------------------------
@dataclass
class PromptSet:
    """Short texts with one or more labels each; the concept view embeds each text."""

    name: str
    description: str
    texts: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    default_color: str = "language"
    default_probe: str = "concept"
    concept_label: str | None = None  # with a "language" label: the same item across languages


def _table_set(name: str, description: str, table: dict[str, list[str]], item_label: str) -> PromptSet:
    texts, language, item, index = [], [], [], []
    for code in ps.LANGUAGES:
        for i, word in enumerate(table[code]):
            texts.append(word)
            language.append(code)
            item.append(table["en"][i])
            index.append(str(i + 1))
    return PromptSet(name, description, texts, {"language": language, item_label: item, "index": index},
                     default_color=item_label, default_probe=item_label, concept_label=item_label)


def _concepts() -> PromptSet:
    rows = ps.concept_rows()
    return PromptSet(
        "concepts", "The same concept in seven languages (colour by language vs by concept: in middle layers "
        "translations move together).",
        [row["word"] for row in rows],
        {"language": [row["language"] for row in rows], "concept": [row["concept"] for row in rows],
         "category": [row["category"] for row in rows]},
        default_color="category", default_probe="category", concept_label="concept")


def _countries() -> PromptSet:
    texts, kind, continent, pair = [], [], [], []
    for entry in ps.COUNTRIES:
        for what in ("country", "capital"):
            texts.append(entry[what])
            kind.append(what)
            continent.append(entry["continent"])
            pair.append(entry["country"])
    return PromptSet("countries", "Countries and their capitals, labelled by continent.", texts,
                     {"kind": kind, "continent": continent, "country": pair},
                     default_color="continent", default_probe="kind")


PROMPT_SETS = {
    "concepts": _concepts,
    "days": lambda: _table_set("days", "Days of the week in seven languages (look for a circle).", ps.DAYS, "day"),
    "months": lambda: _table_set("months", "Months in seven languages (look for a circle).", ps.MONTHS, "month"),
    "numbers": lambda: _table_set("numbers", "Numbers one to twenty in seven languages.", ps.NUMBERS, "number"),
    "countries": _countries,
}


def prompt_set(name: str) -> PromptSet:
    """One of :data:`PROMPT_SETS` by name."""
    if name not in PROMPT_SETS:
        raise CorpusError(f"Unknown prompt set '{name}'; choose from {', '.join(PROMPT_SETS)}.")
    return PROMPT_SETS[name]()
