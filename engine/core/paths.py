"""Data roots and safe file access: every path a user types goes through here before it is read.

*Data roots* are the folders user-given paths may point into: the folders in ``LATENT_EXPLORER_DATA``
(``os.pathsep``-separated), or by default the cache (``LATENT_EXPLORER_CACHE``, else ``cache/``) and
``data/`` under the repository root. The UI always keeps paths inside them; the CLI only when
``LATENT_EXPLORER_DATA`` is set (a person at their own shell may read their own files), see
:func:`roots_enforced`.

Whatever the mode, a path is resolved (``~`` expanded, symlinks followed, ``..`` removed) and checked
with ``os.stat`` *before* anything opens it: only regular files are read (never devices, named pipes or
sockets), each up to a size limit, folders are walked with a bound on entries and files, and the
pseudo-file systems ``/proc``, ``/sys`` and ``/dev`` and whole system folders (``/``, ``/etc``, ...)
are refused. Each refusal is a :class:`PathNotAllowed` with one sentence.

Limits are module constants, each with an environment override (read at import):

- :data:`MAX_FILE_BYTES`  (``LATENT_EXPLORER_MAX_FILE_BYTES``, 64 MiB) one file read into memory
- :data:`MAX_TOTAL_BYTES` (``LATENT_EXPLORER_MAX_TOTAL_BYTES``, 1 GiB) a whole corpus, or one streamed file
- :data:`MAX_FILES`       (``LATENT_EXPLORER_MAX_FILES``, 10,000) files taken from one folder
- :data:`MAX_WALK_ENTRIES` (``LATENT_EXPLORER_MAX_WALK_ENTRIES``, 200,000) folder entries looked at in one walk
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from engine.core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_DATA = "LATENT_EXPLORER_DATA"
MiB = 1 << 20


class PathNotAllowed(UserError):
    """A path the user gave may not be read: outside the data roots, not a regular file, too large..."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        return default
    return value if value > 0 else default


MAX_FILE_BYTES = _env_int("LATENT_EXPLORER_MAX_FILE_BYTES", 64 * MiB)
MAX_TOTAL_BYTES = _env_int("LATENT_EXPLORER_MAX_TOTAL_BYTES", 1024 * MiB)
MAX_FILES = _env_int("LATENT_EXPLORER_MAX_FILES", 10_000)
MAX_WALK_ENTRIES = _env_int("LATENT_EXPLORER_MAX_WALK_ENTRIES", 200_000)
READ_BLOCK = 1 << 20

# never read below these (pseudo-files: endless, blocking or huge), whatever the roots say
PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))
# never take one of these folders as a whole (a folder walk of "/" or "/etc" is never what was meant)
_SYSTEM_NAMES = ("/", "/etc", "/usr", "/var", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/boot", "/run", "/root",
                 "/home", "/opt", "/srv", "/mnt", "/media", "/tmp", "/proc", "/sys", "/dev")
SYSTEM_DIRS = frozenset(Path(p) for p in _SYSTEM_NAMES) | frozenset(Path(p).resolve() for p in _SYSTEM_NAMES)


def human_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n:,} bytes"


def _sizes(size: int, limit: int) -> tuple[str, str]:
    """Both sizes for a message, exact when rounding would make them look equal."""
    shown, cap = human_bytes(size), human_bytes(limit)
    return (f"{size:,} bytes", f"{limit:,} bytes") if shown == cap else (shown, cap)


# --- roots --------------------------------------------------------------------------------
def default_cache_root() -> Path:
    """Same rule as :func:`engine.core.models.cache_root` (not imported here: it pulls in torch)."""
    return Path(os.environ.get("LATENT_EXPLORER_CACHE", REPO_ROOT / "cache"))


def _data_env() -> str:
    return os.environ.get(ENV_DATA, "").strip()


def data_roots() -> list[Path]:
    """The allowed data folders, resolved: ``LATENT_EXPLORER_DATA`` or the cache and ``data/``."""
    raw = _data_env()
    if raw:
        found = [Path(part.strip()).expanduser() for part in raw.split(os.pathsep) if part.strip()]
    else:
        found = [default_cache_root(), REPO_ROOT / "data"]
    roots: list[Path] = []
    for root in found:
        resolved = _resolve(root, str(root), "data folder")
        if resolved not in roots:
            roots.append(resolved)
    return roots


def roots_enforced(ui: bool) -> bool:
    """In the UI paths always stay under the data roots; in the CLI only when LATENT_EXPLORER_DATA is set."""
    return bool(ui) or bool(_data_env())


# --- resolving ----------------------------------------------------------------------------
def _resolve(path: Path, shown: str, what: str) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes, names too long, no home
        raise PathNotAllowed(f"The {what} path '{shown}' cannot be resolved ({type(exc).__name__}).") from exc


def _under(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def check_system_path(resolved: Path, shown: str, *, what: str = "corpus") -> None:
    """Refuse the pseudo-file systems (``/proc``, ``/sys``, ``/dev``) and whole system folders (``/``, ``/etc``...)."""
    if resolved.parent == resolved or resolved in SYSTEM_DIRS:
        raise PathNotAllowed(f"The {what} '{shown}' is the system folder '{resolved}'; give the folder or file that "
                             "holds your data.")
    for pseudo in PSEUDO_FS:
        if _under(resolved, pseudo):
            raise PathNotAllowed(f"The {what} '{shown}' lies in {pseudo}, a system pseudo-file system that is never "
                                 "read; give a regular file.")


def resolve_path(path: str | os.PathLike, *, what: str = "corpus") -> Path:
    """Expand ``~`` and resolve (symlinks followed, ``..`` removed), refusing system pseudo-files; no root check."""
    shown = str(path)
    if not shown.strip():
        raise PathNotAllowed(f"No {what} path was given.")
    resolved = _resolve(Path(shown.strip()), shown, what)
    check_system_path(resolved, shown, what=what)
    return resolved


def resolve_under_roots(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None, *,
                        what: str = "corpus") -> Path:
    """Resolve ``path`` and require it to lie under one of ``roots`` (default :func:`data_roots`).

    The check is on the resolved path, so neither ``..`` nor a symlink can lead out of a root.
    Nothing is opened, and a path outside the roots is refused the same way whether it exists or not.
    """
    shown = str(path)
    if not shown.strip():
        raise PathNotAllowed(f"No {what} path was given.")
    resolved = _resolve(Path(shown.strip()), shown, what)
    allowed = data_roots() if roots is None else [_resolve(Path(r), str(r), "data folder") for r in roots]
    if not any(_under(resolved, root) for root in allowed):
        listing = ", ".join(str(root) for root in allowed) or "none"
        raise PathNotAllowed(f"The {what} '{shown}' is outside the allowed data folders ({listing}); put it under "
                             f"one of them or list its folder in {ENV_DATA}.")
    check_system_path(resolved, shown, what=what)
    return resolved


def safe_path(path: str | os.PathLike, *, enforce_roots: bool, what: str = "corpus",
              roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """:func:`resolve_under_roots` when ``enforce_roots``, else :func:`resolve_path`."""
    if enforce_roots:
        return resolve_under_roots(path, roots, what=what)
    return resolve_path(path, what=what)


# --- regular files ------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, max_bytes: int | None = None, *, what: str = "file",
                       limit_env: str = "LATENT_EXPLORER_MAX_FILE_BYTES") -> int:
    """``os.stat`` the path (nothing is opened) and return its size; refuse anything but a regular file
    no larger than ``max_bytes`` (default :data:`MAX_FILE_BYTES`)."""
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise PathNotAllowed(f"The {what} '{path}' does not exist.") from exc
    except (OSError, ValueError) as exc:
        raise PathNotAllowed(f"The {what} '{path}' cannot be read ({type(exc).__name__}).") from exc
    if not stat.S_ISREG(info.st_mode):
        raise PathNotAllowed(f"The {what} '{path}' is {_kind(info.st_mode)}, not a regular file; give a text file.")
    if info.st_size > limit:
        size, cap = _sizes(info.st_size, limit)
        raise PathNotAllowed(f"The {what} '{path}' is {size}, over the limit of {cap} per file; split it or raise "
                             f"{limit_env}.")
    return int(info.st_size)


def open_regular(path: str | os.PathLike, *, what: str = "file") -> BinaryIO:
    """Open a file for binary reading without ever blocking on a pipe or device swapped in after the stat:
    non-blocking open, then ``fstat`` on the open descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PathNotAllowed(f"The {what} '{path}' cannot be opened ({type(exc).__name__}).") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise PathNotAllowed(f"The {what} '{path}' is {_kind(mode)}, not a regular file; give a text file.")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes_limited(path: str | os.PathLike, max_bytes: int | None = None, *, what: str = "file") -> bytes:
    """The bytes of a regular file, read in blocks and never more than ``max_bytes`` (default MAX_FILE_BYTES)."""
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    check_regular_file(path, limit, what=what)
    chunks, total = [], 0
    with open_regular(path, what=what) as handle:
        while True:
            block = handle.read(min(READ_BLOCK, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:
                raise PathNotAllowed(f"The {what} '{path}' grew past the limit of {human_bytes(limit)} while it "
                                     "was read; split it or raise LATENT_EXPLORER_MAX_FILE_BYTES.")
    return b"".join(chunks)


def read_text_limited(path: str | os.PathLike, max_bytes: int | None = None, *, what: str = "file",
                      encoding: str = "utf-8") -> str:
    """A regular file's text (strict decoding), read with a byte cap; see :func:`read_bytes_limited`."""
    data = read_bytes_limited(path, max_bytes, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise PathNotAllowed(f"The {what} '{path}' is not {encoding} text (bad byte at offset {exc.start}).") from exc


# --- bounded folder walk ------------------------------------------------------------------
class _Walk:
    """State of one walk: what was kept, what was skipped and why, and how much was looked at."""

    def __init__(self, top: Path, suffixes: tuple[str, ...], max_files: int, max_entries: int,
                 max_file_bytes: int, max_total_bytes: int) -> None:
        self.top, self.suffixes = top, suffixes
        self.max_files, self.max_entries = max_files, max_entries
        self.max_file_bytes, self.max_total_bytes = max_file_bytes, max_total_bytes
        self.files: list[Path] = []
        self.notes: list[str] = []
        self.entries = 0
        self.total = 0
        self.stopped = False

    def rel(self, path: Path) -> str:
        return path.relative_to(self.top).as_posix()

    def stop(self, note: str) -> None:
        self.notes.append(note)
        self.stopped = True

    def wanted(self, name: str) -> bool:
        return not self.suffixes or name.lower().endswith(self.suffixes)

    def consider_file(self, path: Path, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            self.notes.append(f"{self.rel(path)} ({_kind(info.st_mode)})")
        elif info.st_size > self.max_file_bytes:
            size, cap = _sizes(info.st_size, self.max_file_bytes)
            self.notes.append(f"{self.rel(path)} ({size}, over the limit of {cap} per file)")
        elif self.total + info.st_size > self.max_total_bytes:
            self.stop(f"stopped before {self.rel(path)}: the files taken reach the limit of "
                      f"{human_bytes(self.max_total_bytes)} per corpus")
        elif len(self.files) >= self.max_files:
            self.stop(f"stopped at the limit of {self.max_files:,} files")
        else:
            self.files.append(path)
            self.total += info.st_size

    def consider_link(self, path: Path) -> Path | None:
        """A symlink's target when it stays inside the walked folder (folders behind links are not followed)."""
        try:
            target = path.resolve()
            info = os.stat(target)
        except (OSError, RuntimeError, ValueError):
            if self.wanted(path.name):
                self.notes.append(f"{self.rel(path)} (broken symbolic link)")
            return None
        if stat.S_ISDIR(info.st_mode):
            self.notes.append(f"{self.rel(path)} (symbolic link to a folder, not followed)")
        elif not self.wanted(path.name):
            pass
        elif not _under(target, self.top):
            self.notes.append(f"{self.rel(path)} (symbolic link to outside the folder)")
        else:
            self.consider_file(path, info)
        return None

    def scan(self, folder: Path) -> list[Path]:
        """Consider the entries of one folder (sorted by name); return its sub-folders."""
        try:
            with os.scandir(folder) as iterator:
                entries = []
                for entry in iterator:
                    self.entries += 1
                    if self.entries > self.max_entries:
                        self.stop(f"stopped after looking at {self.max_entries:,} folder entries")
                        break
                    entries.append(entry)
        except OSError as exc:
            self.notes.append(f"{self.rel(folder) or '.'}/ (cannot be listed: {type(exc).__name__})")
            return []
        subfolders = []
        for entry in sorted(entries, key=lambda e: e.name):
            if self.stopped:
                break
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    self.consider_link(path)
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
                elif self.wanted(entry.name):
                    self.consider_file(path, entry.stat(follow_symlinks=False))
            except OSError as exc:
                self.notes.append(f"{self.rel(path)} (cannot be read: {type(exc).__name__})")
        return subfolders


def walk_files(folder: str | os.PathLike, *, max_files: int | None = None, suffixes: Iterable[str] = (".txt",),
               max_entries: int | None = None, max_file_bytes: int | None = None,
               max_total_bytes: int | None = None) -> tuple[list[Path], list[str]]:
    """Regular files below ``folder`` whose names end in one of ``suffixes`` (all files when empty).

    A bounded walk with ``os.scandir``: symlinks are never followed into folders, and a symlinked file is
    kept only when its target stays inside ``folder``; devices, pipes and sockets are skipped, as are files
    over ``max_file_bytes``; the walk stops at ``max_files`` files, ``max_total_bytes`` bytes in all or
    ``max_entries`` entries looked at. Returns the files (sorted by relative path, as paths below the
    resolved folder) and one note per skipped file or limit reached.
    """
    top = Path(folder).resolve()
    walk = _Walk(top, tuple(s.lower() for s in suffixes), MAX_FILES if max_files is None else max_files,
                 MAX_WALK_ENTRIES if max_entries is None else max_entries,
                 MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes,
                 MAX_TOTAL_BYTES if max_total_bytes is None else max_total_bytes)
    pending = [top]  # a stack: depth first, in name order
    while pending and not walk.stopped:
        pending.extend(reversed(walk.scan(pending.pop())))
    return sorted(walk.files, key=walk.rel), walk.notes


def describe_skipped(notes: Sequence[str], limit: int = 5) -> str:
    """``"a.txt (a named pipe), b.txt (...) and 3 more"`` for a one-sentence message."""
    shown = "; ".join(notes[:limit])
    return shown + (f"; and {len(notes) - limit} more" if len(notes) > limit else "")
