"""A job is a declarative spec: a registered *kind* plus JSON parameters.

``JobSpec(kind, params)`` is validated once, at submit, against the kind's declared parameters:
an unknown kind, an unknown or missing parameter, a value of the wrong type or a path that does not
exist ends in one sentence (:class:`JobSpecError`, a :class:`UserError`). Validation fills in the
defaults and makes paths absolute, so two specs that mean the same job are the same JSON, and the
job id is derived from that canonical JSON (``<kind>-<12 hex digits of its sha256>``). The id also
covers a cheap signature of the input files (size and modification time), so a job over a corpus or
a store that has changed since is a new job, not the finished old one.

Kinds are registered with :func:`register` (the built-in ones in :mod:`engine.jobs.kinds`). A kind
names its run function as ``"module:function"`` so a worker process imports only what it runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import UserError

REQUIRED = object()  # marks a parameter without a default
TYPES = ("str", "int", "float", "bool", "path", "layers", "str_list", "dict")
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "path": "a path", "layers": "'all' or a list of layer numbers", "str_list": "a list of strings",
               "dict": "an object of settings"}


class JobSpecError(UserError):
    """A job spec that cannot run: unknown kind, bad parameter or missing input."""


@dataclass(frozen=True)
class Param:
    """One parameter of a kind. ``must_exist``: a path that has to exist at submit (an input)."""

    name: str
    type: str
    default: Any = REQUIRED
    help: str = ""
    choices: tuple = ()
    optional: bool = False  # None is allowed
    must_exist: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown parameter type {self.type!r}")


@dataclass(frozen=True)
class Kind:
    """A registered job kind: ``run`` is ``"module:function"``, called as ``function(params, job)``."""

    name: str
    run: str
    params: tuple[Param, ...]
    summary: str = ""
    check: Callable[[dict], None] | None = None  # deeper validation at submit (may import engine modules)
    inputs: Callable[[dict], list[str]] | None = None  # extra input paths to sign (e.g. a corpus folder)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, Kind]:
    import engine.jobs.kinds  # noqa: F401  (registers the built-in kinds)

    return dict(_KINDS)


def get_kind(name: str) -> Kind:
    known = kinds()
    if name not in known:
        raise JobSpecError(f"Unknown job kind '{name}'; choose from {', '.join(sorted(known))}.")
    return known[name]


# --- values -----------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(kind: str, param: Param, value: Any) -> Any:
    """The value in canonical form, or a JobSpecError naming the parameter."""
    if value is None and (param.optional or param.default is None):
        return None
    ok, out = True, value
    if param.type in ("str", "path"):
        ok = isinstance(value, str) and bool(value.strip())
        if ok and param.type == "path":
            out = str(Path(value).expanduser().resolve())
        elif ok:
            out = value.strip()
    elif param.type == "int":
        ok = _is_int(value)
    elif param.type == "float":
        ok = _is_int(value) or isinstance(value, float)
        out = float(value) if ok else value
    elif param.type == "bool":
        ok = isinstance(value, bool)
    elif param.type == "layers":
        ok = value == "all" or (isinstance(value, list) and bool(value) and all(_is_int(v) for v in value))
        out = value if value == "all" or not ok else sorted(set(value))
    elif param.type == "str_list":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    elif param.type == "dict":
        ok = isinstance(value, dict)
    if not ok:
        raise JobSpecError(f"The parameter '{param.name}' of a {kind} job must be {_TYPE_WORDS[param.type]}, "
                           f"not {json.dumps(value, default=str)[:60]}.")
    if param.choices and out not in param.choices:
        raise JobSpecError(f"The parameter '{param.name}' of a {kind} job must be one of "
                           f"{', '.join(map(str, param.choices))}, not {out!r}.")
    if param.must_exist and out is not None and not Path(out).exists():
        raise JobSpecError(f"The {param.name} '{value}' of this {kind} job does not exist.")
    return out


def _signature(path: str) -> list:
    """Size and modification times of a file, or of a folder and its top-level entries (cheap, no hashing)."""
    target = Path(path)
    try:
        if target.is_dir():
            entries = sorted(os.scandir(target), key=lambda e: e.name)
            return [target.stat().st_mtime_ns, [[e.name, e.stat().st_size, e.stat().st_mtime_ns]
                                                 for e in entries if not e.name.startswith(".")]]
        stat = target.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return []


# --- the spec ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    kind: str
    params: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # path -> signature, filled in by validate()

    def to_json(self) -> dict:
        return {"kind": self.kind, "params": self.params, "inputs": self.inputs}

    @classmethod
    def from_json(cls, data: dict) -> JobSpec:
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise JobSpecError("A job spec is a JSON object with a 'kind' string and a 'params' object.")
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise JobSpecError("The 'params' of a job spec must be a JSON object.")
        extra = set(data) - {"kind", "params", "inputs"}
        if extra:
            raise JobSpecError(f"A job spec has only 'kind' and 'params'; remove '{sorted(extra)[0]}'.")
        return cls(data["kind"], dict(params), dict(data.get("inputs") or {}))

    @property
    def id(self) -> str:
        """``<kind>-<sha256 of the canonical JSON, 12 hex digits>``."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return f"{self.kind}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def validate(spec: JobSpec | dict) -> JobSpec:
    """The canonical spec (defaults filled, paths absolute, inputs signed), or one sentence saying what is wrong."""
    if isinstance(spec, dict):
        spec = JobSpec.from_json(spec)
    kind = get_kind(spec.kind)
    unknown = sorted(set(spec.params) - {p.name for p in kind.params})
    if unknown:
        raise JobSpecError(f"A {kind.name} job has no parameter '{unknown[0]}'; its parameters are "
                           f"{', '.join(p.name for p in kind.params)}.")
    params = {}
    for param in kind.params:
        if param.name not in spec.params:
            if param.default is REQUIRED:
                raise JobSpecError(f"A {kind.name} job needs the parameter '{param.name}'"
                                   f"{' (' + param.help + ')' if param.help else ''}.")
            params[param.name] = json.loads(json.dumps(param.default))  # a fresh copy of lists and dicts
        else:
            params[param.name] = _coerce(kind.name, param, spec.params[param.name])
    if kind.check is not None:
        try:
            kind.check(params)
        except JobSpecError:
            raise
        except UserError as exc:  # e.g. a corpus or a setting the engine refuses: same sentence, one type
            raise JobSpecError(str(exc)) from exc
    paths = [params[p.name] for p in kind.params if p.must_exist and params[p.name]]
    paths += kind.inputs(params) if kind.inputs is not None else []
    return JobSpec(kind.name, params, {path: _signature(path) for path in sorted(set(paths))})
