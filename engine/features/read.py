"""Reading built dashboards: find them, open one, query its tables with duckdb, rebuild token contexts.

:class:`Dashboard` is one built folder (see :mod:`engine.features.folder`); :func:`list_dashboards` and
:func:`find_dashboard` locate folders, :func:`corpus_means` reads per-feature corpus means for mean-ablation.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.devices import module_device, to_host
from engine.features.folder import (
    DASHBOARD_FORMAT,
    MANIFEST,
    TABLES,
    DashboardError,
    dashboards_root,
    decode_tokens,
    sae_digest,
)

if TYPE_CHECKING:
    import pandas as pd

    from engine.data.store import ActivationStore
    from engine.sae.base import SAE


def list_dashboards(root: str | Path | None = None, weights_hash: str | None = None) -> list[dict]:
    """Complete dashboards under ``root`` (default ``cache/dashboards``), newest first; optionally one model's."""
    root = Path(root) if root is not None else dashboards_root()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        path = folder / MANIFEST
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            continue
        if not manifest.get("complete") or (weights_hash and manifest.get("weights_hash") != weights_hash):
            continue
        found.append({"path": str(folder), "name": folder.name, "manifest": manifest, "mtime": path.stat().st_mtime})
    return sorted(found, key=lambda entry: -entry["mtime"])


def find_dashboard(sae_dir: str | Path, root: str | Path | None = None) -> dict | None:
    """The newest complete dashboard built for this exact SAE (matched by its weights' sha256), or None."""
    digest = sae_digest(sae_dir)
    return next((entry for entry in list_dashboards(root) if entry["manifest"].get("sae_sha256") == digest), None)


def corpus_means(sae_dir: str | Path, features: Sequence[int], root: str | Path | None = None) -> dict | None:
    """Each feature's mean activation over every token of the newest dashboard built for this exact SAE
    (zeros included: density x mean when firing), for mean-ablation against a corpus rather than one prompt.

    Returns ``{"means": [...], "tokens": n, "dashboard": name}``, or None when no dashboard of this SAE exists.
    """
    features = [int(f) for f in features]
    entry = find_dashboard(sae_dir, root) if features else None
    if entry is None:
        return None
    dash = Dashboard.open(entry["path"])
    table = dash.query("SELECT feature, density * mean_act AS m FROM features WHERE feature IN "
                       f"({', '.join('?' * len(features))})", features)
    found = dict(zip(table["feature"].astype(int), table["m"].astype(float)))
    missing = [f for f in features if f not in found]
    if missing:
        raise DashboardError(f"Feature {missing[0]} is not in the dashboard '{entry['name']}' "
                             f"({dash.manifest.get('d_sae')} features).")
    return {"means": [found[f] for f in features], "tokens": int(dash.manifest.get("n_rows", 0)),
            "dashboard": entry["name"]}


class Dashboard:
    """A built dashboard folder, queried with duckdb; contexts are rebuilt from its store."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self._store = None
        self._sae = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, sae_dir: str | Path | None = None) -> Dashboard:
        """Open a dashboard folder; with ``sae_dir``, refuse one built for another SAE."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise DashboardError(f"'{path}' holds no built dashboard (no {MANIFEST}); build the dashboards first.")
        try:
            manifest = json.loads(file.read_text())
        except ValueError as exc:
            raise DashboardError(f"The manifest of '{path}' is corrupt; build the dashboards again.") from exc
        if manifest.get("format") != DASHBOARD_FORMAT or not manifest.get("complete"):
            raise DashboardError(f"The dashboard '{path}' is incomplete or from another version; build it again.")
        missing = [t for t in TABLES if not (path / f"{t}.parquet").is_file()]
        if missing:
            raise DashboardError(f"The dashboard '{path}' lacks {missing[0]}.parquet; build the dashboards again.")
        if sae_dir is not None and sae_digest(sae_dir) != manifest.get("sae_sha256"):
            raise DashboardError(f"The dashboard '{path.name}' was built for another SAE than '{Path(sae_dir).name}'; "
                                 "build dashboards for this SAE.")
        return cls(path, manifest)

    # -- basics
    @property
    def d_sae(self) -> int:
        return int(self.manifest["d_sae"])

    @property
    def site(self) -> str:
        return str(self.manifest["site"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    def check_feature(self, feature: int) -> int:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < self.d_sae:
            raise DashboardError(f"Feature {feature} does not exist: this SAE has features 0..{self.d_sae - 1}.")
        return int(feature)

    def store(self) -> ActivationStore:
        """The activation store the dashboard was built from (opened once)."""
        from engine.data.store import ActivationStore

        with self._lock:
            if self._store is None:
                self._store = ActivationStore.open(self.manifest["store_path"])
                if self._store.weights_hash != self.manifest["weights_hash"]:
                    raise DashboardError("The dashboard's activation store was replaced by one of another model; "
                                         "build the dashboards again.")
            return self._store

    def sae(self) -> SAE:
        """The dashboard's SAE, float32 on the CPU, loaded once and shared: callers must not move or cast it."""
        from engine.sae.io import load_sae

        with self._lock:
            if self._sae is None:
                path = self.manifest["sae_path"]
                if sae_digest(path) != self.manifest["sae_sha256"]:
                    raise DashboardError(f"The SAE at '{path}' changed since this dashboard was built; build the "
                                         "dashboards again.")
                self._sae = load_sae(path, dtype=torch.float32)
            return self._sae

    def query(self, sql: str, params: Sequence | None = None) -> pd.DataFrame:
        """Run SQL over the tables (named ``features``, ``histograms``, ...); returns a pandas DataFrame."""
        import duckdb

        con = duckdb.connect()
        try:
            for table in TABLES:  # views cannot take prepared parameters: quote the path as a literal
                literal = str(self.path / f"{table}.parquet").replace("'", "''")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{literal}')")
            return con.execute(sql, list(params or [])).df()
        finally:
            con.close()

    # -- the list
    def feature_table(self, *, sort: str = "density", descending: bool = True, hide_dense: bool = True,
                      dead: bool = False, min_density: float = 0.0, min_max_act: float = 0.0,
                      search: str = "", limit: int = 1000) -> pd.DataFrame:
        """Live (or, with ``dead``, dead) features filtered and sorted; ``search`` matches tokens and logits."""
        columns = ("feature", "density", "max_act", "mean_act", "count", "act_tokens", "top_logits")
        if sort not in columns:
            raise DashboardError(f"Cannot sort by '{sort}'; choose one of {', '.join(columns)}.")
        where = ["dead" if dead else "NOT dead"]
        params: list = []
        if hide_dense and not dead:
            where.append("NOT dense")
        if min_density > 0:
            where.append("density >= ?")
            params.append(float(min_density))
        if min_max_act > 0:
            where.append("max_act >= ?")
            params.append(float(min_max_act))
        if search.strip():
            where.append("(act_tokens ILIKE ? OR top_logits ILIKE ? OR bottom_logits ILIKE ? "
                         "OR CAST(feature AS VARCHAR) = ?)")
            pattern = f"%{search.strip()}%"
            params += [pattern, pattern, pattern, search.strip()]
        order = f"{sort} {'DESC' if descending else 'ASC'}, feature"
        sql = (f"SELECT feature, density, max_act, mean_act, count, act_tokens, top_logits, bottom_logits "
               f"FROM features WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {int(limit)}")
        return self.query(sql, params)

    def summary(self) -> dict:
        row = self.query("SELECT count(*) AS n, sum(CAST(dead AS INT)) AS dead, sum(CAST(dense AS INT)) AS dense "
                         "FROM features").iloc[0]
        return {"features": int(row["n"]), "dead": int(row["dead"] or 0), "dense": int(row["dense"] or 0),
                "tokens": int(self.manifest["n_rows"])}

    def labels(self, features: Sequence[int]) -> dict[int, str]:
        """Short labels (top activating tokens) for a few features."""
        ids = [int(f) for f in features]
        if not ids:
            return {}
        frame = self.query(f"SELECT feature, act_tokens FROM features WHERE feature IN "
                           f"({', '.join('?' * len(ids))})", ids)
        return {int(f): " | ".join(str(t).split(" | ")[:3]) for f, t in zip(frame["feature"], frame["act_tokens"])}

    # -- one feature
    def feature(self, feature: int) -> dict:
        """Everything the feature page shows (tables as DataFrames)."""
        f = self.check_feature(feature)
        stats = self.query("SELECT * FROM features WHERE feature = ?", [f]).iloc[0].to_dict()
        return {"stats": stats,
                "histogram": self.query("SELECT bin, lo, hi, count FROM histograms WHERE feature = ? ORDER BY bin",
                                        [f]),
                "top": self.query("SELECT rank, row, act, doc, pos FROM top_examples WHERE feature = ? "
                                  "ORDER BY rank", [f]),
                "intervals": self.query("SELECT interval, rank, lo, hi, row, act, doc, pos FROM intervals "
                                        "WHERE feature = ? ORDER BY interval DESC, rank", [f]),
                "logits": self.query("SELECT sign, rank, token_id, token, value FROM logits WHERE feature = ? "
                                     "ORDER BY sign, rank", [f]),
                "neighbours": self.query("SELECT n.rank, n.neighbour, n.cosine, f.act_tokens FROM neighbours n "
                                         "JOIN features f ON f.feature = n.neighbour WHERE n.feature = ? "
                                         "ORDER BY n.rank", [f]),
                "cooccurring": self.query("SELECT c.rank, c.other, c.jaccard, c.together, f.act_tokens "
                                          "FROM cooccurrence c JOIN features f ON f.feature = c.other "
                                          "WHERE c.feature = ? ORDER BY c.rank", [f])}

    def contexts(self, feature: int, rows: Sequence[int], tokenizer, before: int = 10,
                 after: int = 4) -> list[dict]:
        """Token windows around store rows with this feature's activation on every token (one SAE encode).

        Each window: ``row``, ``tokens`` (strings), ``acts`` (floats, one per token) and ``focus`` (the row's index).
        """
        f = self.check_feature(feature)
        store = self.store()
        rows_t = torch.as_tensor([int(r) for r in rows], dtype=torch.long)
        if rows_t.numel() == 0:
            return []
        positions = store.positions()
        starts_of_windows = torch.nonzero(positions == 0).squeeze(1)
        next_start = torch.searchsorted(starts_of_windows, rows_t, right=True)
        bound = torch.cat([starts_of_windows, torch.tensor([store.n_tokens])])[next_start]
        lo = rows_t - torch.minimum(positions[rows_t], torch.full_like(rows_t, before))
        hi = torch.minimum(rows_t + after + 1, bound)
        lengths = hi - lo
        flat = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(lo, hi)])  # ≤ (before+after+1)·len(rows)
        sae = self.sae()
        with torch.no_grad():
            x = store.read(self.site, self.layer, flat).to(module_device(sae))  # [n, d_in]
            acts = to_host(sae.encode(x)[:, f], torch.float32)  # [n]
        acts = torch.where(positions[flat] == 0, torch.zeros_like(acts), acts)
        ids = store.token_ids()[flat]
        words = decode_tokens(tokenizer, ids.tolist())
        out, offset = [], 0
        for row, start, length in zip(rows_t.tolist(), lo.tolist(), lengths.tolist()):
            part = slice(offset, offset + length)
            out.append({"row": row, "tokens": [words[int(i)] for i in ids[part]], "acts": acts[part].tolist(),
                        "focus": row - start})
            offset += length
        return out
