"""The serving policy (demo mode): which models, paths, uploads and jobs a served app allows. Above core and data.

- ``LATENT_EXPLORER_DEMO=1``            demo mode: only allowed models, no hub downloads, no remote code,
                                         no Hugging Face datasets, one job at a time per session
- ``LATENT_EXPLORER_TOKEN``             optional access token the UI asks for (compared in constant time)
- ``LATENT_EXPLORER_MODELS``            comma-separated allow-list of model specs (exact names, paths or
                                         ``fnmatch`` patterns such as ``tiny:*``); default: the embedded models,
                                         ``LATENT_EXPLORER_MODEL`` when set, and the model folders already
                                         converted under ``cache/models``
- ``LATENT_EXPLORER_MAX_UPLOAD_BYTES``  largest upload (default 16 MiB)
- ``LATENT_EXPLORER_MAX_JOBS``          jobs one session may run at once (default 1 in demo mode, else no limit)

Paths typed into the UI always stay under the data roots (:mod:`engine.core.paths`), demo or not.
"""
from __future__ import annotations

import fnmatch
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.core import paths
from engine.core.errors import UserError

ENV_DEMO = "LATENT_EXPLORER_DEMO"
ENV_TOKEN = "LATENT_EXPLORER_TOKEN"
ENV_MODELS = "LATENT_EXPLORER_MODELS"
ENV_MAX_UPLOAD = "LATENT_EXPLORER_MAX_UPLOAD_BYTES"
ENV_MAX_JOBS = "LATENT_EXPLORER_MAX_JOBS"
DEFAULT_MAX_UPLOAD_BYTES = 16 * paths.MiB
_TRUE = ("1", "true", "yes", "on")


class NotAllowed(UserError):
    """Something this server's policy does not allow (a model, remote code, a path, an upload, a job)."""


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip().replace("_", "")
    try:
        return max(0, int(raw)) if raw else default
    except ValueError:
        return default


def cached_model_folders() -> list[Path]:
    """Model folders already converted under ``cache/models`` (config, weights and the converter's stamp)."""
    from engine.core.models import cache_root

    base = cache_root() / "models"
    try:
        candidates = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p.resolve() for p in candidates
            if all((p / name).is_file() for name in ("config.json", "model.safetensors", "latent_explorer.json"))]


def _hub_cached(repo_id: str) -> bool:
    from engine.core.sources import hub_cached  # imports torch: only when a hub id is checked

    return hub_cached(repo_id)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or (os.sep != "/" and os.sep in spec)


@dataclass(frozen=True)
class ServingPolicy:
    """The rules a served UI applies to what visitors type; build it with :meth:`from_env`."""

    demo: bool = False
    token: str | None = None
    models: tuple[str, ...] | None = None  # explicit allow-list; None: the default (see allowed_models)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_jobs_per_session: int = 0  # 0: no limit

    def __repr__(self) -> str:  # never print the token
        return (f"ServingPolicy(demo={self.demo}, token={'set' if self.token else None}, models={self.models}, "
                f"max_upload_bytes={self.max_upload_bytes}, max_jobs_per_session={self.max_jobs_per_session})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingPolicy:
        env = os.environ if environ is None else environ
        demo = env.get(ENV_DEMO, "").strip().lower() in _TRUE
        listed = tuple(m.strip() for m in env.get(ENV_MODELS, "").split(",") if m.strip())
        return cls(demo=demo, token=env.get(ENV_TOKEN, "") or None, models=listed or None,
                   max_upload_bytes=_int(env, ENV_MAX_UPLOAD, DEFAULT_MAX_UPLOAD_BYTES),
                   max_jobs_per_session=_int(env, ENV_MAX_JOBS, 1 if demo else 0))

    # --- access ---------------------------------------------------------------------------
    @property
    def token_required(self) -> bool:
        return bool(self.token)

    def check_token(self, given: str | None) -> bool:
        """True when no token is configured, or ``given`` equals it (constant-time comparison)."""
        if not self.token:
            return True
        return hmac.compare_digest((given or "").encode("utf-8"), self.token.encode("utf-8"))

    # --- models ---------------------------------------------------------------------------
    @property
    def allow_remote_code(self) -> bool:
        return not self.demo

    @property
    def allow_hub_downloads(self) -> bool:
        return not self.demo

    def allowed_models(self) -> list[str]:
        """The allow-list: ``LATENT_EXPLORER_MODELS``, else the embedded models, the server's default model
        (``LATENT_EXPLORER_MODEL``) and the folders already converted under ``cache/models``."""
        if self.models is not None:
            return list(self.models)
        from engine.core.models import EMBEDDED

        names = list(EMBEDDED)
        default = os.environ.get("LATENT_EXPLORER_MODEL", "").strip()
        if default and default not in names:
            names.append(default)
        return names + [str(p) for p in cached_model_folders()]

    def _on_list(self, spec: str) -> bool:
        allowed = self.allowed_models()
        if any(spec == entry or fnmatch.fnmatchcase(spec, entry) for entry in allowed):
            return True
        if not _looks_like_path(spec) and "/" not in spec:
            return False
        try:
            resolved = Path(spec).expanduser().resolve()
            return any(_looks_like_path(entry) and Path(entry).expanduser().resolve() == resolved
                       for entry in allowed)
        except (OSError, RuntimeError, ValueError):
            return False

    def _refuse_model(self, spec: str, reason: str) -> None:
        choices = ", ".join(m for m in self.allowed_models() if not _looks_like_path(m)) or "none"
        raise NotAllowed(f"This demo {reason} '{spec}'; choose one of: {choices}.")

    def check_model(self, spec: str, *, trust_remote_code: bool = False) -> None:
        """Raise :class:`NotAllowed` (one sentence) for a model this server must not load.

        Demo mode: remote code is refused, and so is anything not on the allow-list (checked before the
        path is looked at) and any hub model that would have to be downloaded. Always: a local folder or
        ``.gguf`` file must lie under the data roots.
        """
        from engine.core.models import resolve

        spec = (spec or "").strip()
        if not spec:
            resolve(spec)  # "No model was given ..."
        if trust_remote_code and not self.allow_remote_code:
            raise NotAllowed("This demo does not run code that comes with a model; untick 'Trust remote code'.")
        if self.demo and not self._on_list(spec):
            self._refuse_model(spec, "does not load")
        if spec and _looks_like_path(spec):
            self.check_path(spec, what="model")  # before resolve() looks at the file system
        source = resolve(spec)
        if source.kind in ("local", "gguf") and source.path is not None:
            self.check_path(source.path, what="model")
        if source.kind == "hub" and self.demo and not _hub_cached(spec):
            self._refuse_model(spec, "does not download from the Hugging Face hub, and has no local copy of")

    # --- paths, corpora, uploads, jobs ----------------------------------------------------
    def check_path(self, path: str | os.PathLike, what: str = "file") -> Path:
        """The resolved path, which must lie under the data roots (in the UI always, demo or not)."""
        return paths.resolve_under_roots(path, what=what)

    def check_corpus(self, spec: str) -> str:
        """A corpus spec the UI may use: built-ins, a path under the data roots (returned resolved), and
        ``hf:`` datasets except in demo mode (they are downloads)."""
        from engine.data.corpora import BUILTIN

        spec = (spec or "").strip()
        if spec in BUILTIN or not spec:
            return spec
        if spec.startswith("hf:"):
            if not self.allow_hub_downloads:
                raise NotAllowed("This demo does not download Hugging Face datasets; use 'builtin' or a file under "
                                 "the data folders.")
            return spec
        return str(self.check_path(spec, what="corpus"))

    def check_upload(self, n_bytes: int) -> None:
        if n_bytes > self.max_upload_bytes:
            raise NotAllowed(f"The upload is {paths.human_bytes(n_bytes)}, over this server's limit of "
                             f"{paths.human_bytes(self.max_upload_bytes)}.")

    def check_jobs(self, running: int) -> None:
        """Refuse a new job when the session already runs ``max_jobs_per_session`` (0: no limit)."""
        if self.max_jobs_per_session and running >= self.max_jobs_per_session:
            raise NotAllowed(f"This session already runs {running} job(s), the most this server allows; wait for "
                             "it to finish.")


def current_policy() -> ServingPolicy:
    """The policy of this process, read from the environment now."""
    return ServingPolicy.from_env()
