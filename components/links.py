"""Links that reproduce a view: a page's state mirrored into the URL's query parameters.

One call near the top of a page, before its widgets are drawn::

    from components.links import sync_query_params

    for problem in sync_query_params({"iv_prompt": "I think", "iv_tab": "Next token", "gen_n": 12,
                                      "iv_specs": None},
                                     long_keys={"iv_prompt", "iv_specs"},
                                     options={"iv_tab": TAB_LABELS}):
        st.warning(problem)

For every ``key -> default`` of ``state_keys`` (keys of ``st.session_state``, usually widget keys):

- **read** (whenever the key is missing from ``st.session_state``: a new session, a widget that was not drawn
  on the last run, a return from another page): the value this session last had, else ``?key=value`` from
  the URL, else ``?s_key=<id>`` (a share, :mod:`engine.core.shares`), else ``default``. URL text is parsed by
  the default's type: ``bool`` (``true``/``false``), ``int``, ``float``, ``str``, ``tuple`` (a JSON list, e.g. a
  slider range) and JSON for ``list``/``dict``/``None`` defaults. A value outside ``options[key]`` is dropped.
- **write**: the current values go back into the URL; a value equal to its default is removed (short links).
  Values of ``long_keys`` longer than :data:`LONG_CHARS` characters, and non-empty lists or dicts among them, are
  stored as a content-addressed share and the URL carries ``?s_key=<16 hex digits>`` instead.

Because the last values are also kept in ``st.session_state["_links"]``, widgets that are only drawn sometimes
(inside a tab that computes only when open) keep their values although Streamlit drops the state of widgets it
did not draw. The call is idempotent: call it again after code that changes state without ``st.rerun()`` (a
value built mid-run, e.g. a default computed from a model) to update the URL on the same run.

It returns one sentence per problem (a bad value, a bad or missing share id) for the page to show; the
defaults are used for those keys. Widgets synced this way must not also get a ``value=``/``index=``. To reset a
key on purpose, set it to its default (deleting it from ``st.session_state`` is not enough: the remembered value
comes back), or call :func:`forget` first.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Collection, Iterable
from typing import Any

import streamlit as st

from engine.core import shares
from engine.core.errors import UserError

LONG_CHARS = 300       # longer values of long_keys go through a share
SHARE_PREFIX = "s_"    # ?s_<key>=<share id>
_SHADOW = "_links"     # session_state entry: key -> the value last written to the URL


# --- text <-> value -----------------------------------------------------------------------------------
def encode(value: Any) -> str:
    """How a value is written into the URL (strings as they are, booleans lowercase, the rest JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False,
                      separators=(",", ":"))


def _as_tuple(raw: Any, default: tuple) -> tuple:
    if not isinstance(raw, list) or len(raw) != len(default):
        raise ValueError("wrong length")
    return tuple(type(d)(v) if isinstance(d, (int, float)) and not isinstance(d, bool) else v
                 for v, d in zip(raw, default))


def decode(raw: Any, default: Any) -> Any:
    """URL text (or a share's payload) -> a value of the default's type; ``ValueError`` when it is not one."""
    if isinstance(default, bool):
        if str(raw).lower() not in ("true", "false", "1", "0"):
            raise ValueError("not a boolean")
        return str(raw).lower() in ("true", "1")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("not finite")
        return value
    if isinstance(default, str):
        if not isinstance(raw, str):
            raise ValueError("not text")
        return raw
    parsed = json.loads(raw) if isinstance(raw, str) else raw
    if isinstance(default, tuple):
        return _as_tuple(parsed, default)
    if default is not None and type(parsed) is not type(default):
        raise ValueError(f"not a {type(default).__name__}")
    return parsed


def _is_long(value: Any) -> bool:
    return (isinstance(value, (list, dict)) and bool(value)) or len(encode(value)) > LONG_CHARS


# --- reading ------------------------------------------------------------------------------------------
def _from_url(key: str, default: Any) -> Any:
    """The URL's value for ``key`` (share first), or ``default``; ``UserError``/``ValueError`` when bad."""
    params = st.query_params
    sid = params.get(SHARE_PREFIX + key)
    if sid is not None:
        return decode(shares.get(sid), default)
    if key in params:
        return decode(params[key], default)
    return default


def _read(key: str, default: Any, allowed: Collection | None, problems: list[str]) -> None:
    shadow = st.session_state.setdefault(_SHADOW, {})
    if key in shadow:
        st.session_state[key] = copy.deepcopy(shadow[key])
        return
    try:
        value = _from_url(key, default)
    except UserError as exc:
        value = default
        problems.append(str(exc))
    except (ValueError, TypeError):
        value = default
        problems.append(f"The link's value for '{key}' is not valid here; the default is shown instead.")
    if allowed is not None and value not in allowed:
        problems.append(f"The link's value for '{key}' ({str(value)[:40]!r}) is not one of the choices here; "
                        "the default is shown instead.")
        value = default
    st.session_state[key] = copy.deepcopy(value)


# --- writing ------------------------------------------------------------------------------------------
def _set(name: str, text: str | None) -> None:
    params = st.query_params
    if text is None:
        if name in params:
            del params[name]
    elif params.get(name) != text:
        params[name] = text


def _write(key: str, default: Any, long: bool, problems: list[str]) -> None:
    value = st.session_state[key]
    st.session_state[_SHADOW][key] = copy.deepcopy(value)
    if value == default:
        _set(key, None)
        _set(SHARE_PREFIX + key, None)
        return
    if long and _is_long(value):
        try:
            sid = shares.put(list(value) if isinstance(value, tuple) else value)
        except UserError as exc:  # too large for a link: the URL keeps no value for it
            problems.append(str(exc))
            sid = None
        _set(key, None)
        _set(SHARE_PREFIX + key, sid)
        return
    _set(SHARE_PREFIX + key, None)
    _set(key, encode(value))


def sync_query_params(state_keys: dict[str, Any], long_keys: Iterable[str] = (), *,
                      options: dict[str, Collection] | None = None) -> list[str]:
    """Fill missing ``st.session_state`` keys from this session, the URL or the defaults, then write the current
    values back into the URL (long ones as shares). Returns one sentence per problem found in the link."""
    long, options = set(long_keys), options or {}
    problems: list[str] = []
    for key, default in state_keys.items():
        if key not in st.session_state:
            _read(key, default, options.get(key), problems)
    for key, default in state_keys.items():
        _write(key, default, key in long, problems)
    return problems


def forget(keys: Iterable[str]) -> None:
    """Drop the remembered values of ``keys`` (the next :func:`sync_query_params` reads them afresh)."""
    shadow = st.session_state.get(_SHADOW, {})
    for key in keys:
        shadow.pop(key, None)
