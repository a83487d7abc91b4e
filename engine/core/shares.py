"""Content-addressed shares: long pieces of a view's state stored on disk under a short id.

A link reproduces a view through its URL's query parameters, but some state is too long for a URL
(an intervention list with steering vectors, a long prompt). :func:`put` stores such a payload as
``<cache>/shares/<id>.json`` and returns the id, the first 16 hex digits of the SHA-256 of the payload's
canonical JSON, so the same payload always gets the same id and the URL carries ``?s_<name>=<id>``;
:func:`get` reads it back. A share is written once (atomically) and never changes: a damaged file is
detected because its payload no longer hashes to its id.

Shares live on the machine that serves the app: a link made there opens anywhere that reads the same cache.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.core.fileio import atomic_write_json

ID_LENGTH = 16                 # hex digits of the SHA-256 kept in the id (64 bits)
MAX_BYTES = 2 * 1024 * 1024    # the largest payload a share holds (canonical JSON, UTF-8)
_ID = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")
FORMAT = 1


class ShareError(UserError):
    """A share that cannot be stored or read (too large, not JSON, bad id, missing or damaged file)."""


def share_dir() -> Path:
    from engine.core.models import cache_root

    return cache_root() / "shares"


def _canonical(payload: Any) -> str:
    """The one JSON text a payload hashes as (sorted keys, no spaces, no NaN)."""
    try:
        return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShareError(f"This state cannot be put in a link: it is not plain JSON ({exc}).") from None


def share_id(payload: Any) -> str:
    """The id :func:`put` would give ``payload`` (nothing is written)."""
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()[:ID_LENGTH]


def check_id(sid: Any) -> str:
    """``sid`` if it is a well-formed share id (exactly 16 lowercase hex digits), else a :class:`ShareError`."""
    if not isinstance(sid, str) or not _ID.fullmatch(sid):
        shown = str(sid)[:40]
        raise ShareError(f"'{shown}' is not a share id: a share id is {ID_LENGTH} hexadecimal characters "
                         "(copy the whole link again).")
    return sid


def put(payload: dict | list | str, max_bytes: int = MAX_BYTES) -> str:
    """Store ``payload`` (JSON: a dict, a list or a string) and return its id; storing it again is a no-op."""
    text = _canonical(payload)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ShareError(f"This state is {size / 1024:,.0f} KB, more than a link can hold "
                         f"({max_bytes / 1024:,.0f} KB); download it as a file instead.")
    sid = hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]
    path = share_dir() / f"{sid}.json"
    if not path.is_file():
        atomic_write_json(path, {"format": FORMAT, "payload": payload})
    return sid


def get(sid: str) -> dict | list | str:
    """The payload stored under ``sid``; a bad id, a missing share or a damaged file is one-sentence ShareError."""
    check_id(sid)
    path = share_dir() / f"{sid}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShareError(f"The shared state '{sid}' is not stored on this server (links keep long state in "
                         "its cache/shares folder); the defaults are shown instead.") from None
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        record = json.loads(text)
        payload = record["payload"]
        intact = share_id(payload) == sid
    except (ValueError, TypeError, KeyError, ShareError):
        intact = False
    if not intact:
        raise ShareError(f"The shared state '{sid}' is damaged on this server; the defaults are shown instead.")
    return payload
