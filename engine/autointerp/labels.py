"""Cheap labels for every feature, without any language model: ``labels.parquet`` next to the dashboards.

A label reads like ``Paris, London · “in Paris” · →city, town``: the feature's most frequent activating tokens
(over its top examples and interval samples, ties broken by summed activation), its most frequent bigram (the token
before plus the activating token) when that bigram covers at least ``ngram_share`` of the examples and occurs at
least twice, and its top positive logit tokens after an arrow.

Computed in one batch: the previous token of every example row is gathered with one numpy index into the store's
token ids, the distinct token ids are decoded with one ``batch_decode``, and the ranking and string assembly of all
features is a single duckdb query over the dashboard's parquet tables. Dead features get an empty label.
Columns: ``feature``, ``label``, ``tokens``, ``ngram``, ``logits``.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from engine.autointerp.examples import dashboard_tokenizer, open_dashboard
from engine.autointerp.prompts import NEWLINE
from engine.autointerp.tables import LABELS, write_table
from engine.core.progress import Progress, report

COLUMNS = ("feature", "label", "tokens", "ngram", "logits")
UNPRINTABLE = "[\x00-\x1f\x7f\ufffd]"  # control characters and the replacement character (partial UTF-8)

_SQL = """
WITH ex AS (
    SELECT DISTINCT e.feature, e.row, e.act, e.token_id, p.prev_id
    FROM (SELECT feature, row, act, token_id FROM read_parquet($top)
          UNION ALL SELECT feature, row, act, token_id FROM read_parquet($intervals)) e
    LEFT JOIN prev p ON p.row = e.row
),
sizes AS (SELECT feature, count(*) AS n FROM ex GROUP BY feature),
tok AS (
    SELECT e.feature, w.word, count(*) AS n, sum(e.act) AS s
    FROM ex e JOIN words w ON w.token_id = e.token_id
    WHERE w.word <> '' GROUP BY e.feature, w.word
),
tok_top AS (
    SELECT feature, string_agg(word, ', ' ORDER BY r) AS tokens FROM (
        SELECT *, row_number() OVER (PARTITION BY feature ORDER BY n DESC, s DESC, word) AS r FROM tok)
    WHERE r <= $n_tokens GROUP BY feature
),
bi AS (
    SELECT e.feature, trim(a.raw || b.raw) AS ngram, count(*) AS n, sum(e.act) AS s
    FROM ex e JOIN words a ON a.token_id = e.prev_id JOIN words b ON b.token_id = e.token_id
    WHERE a.word <> '' AND b.word <> '' GROUP BY e.feature, trim(a.raw || b.raw)
),
bi_top AS (
    SELECT b.feature, b.ngram FROM (
        SELECT *, row_number() OVER (PARTITION BY feature ORDER BY n DESC, s DESC, ngram) AS r FROM bi) b
    JOIN sizes z ON z.feature = b.feature
    WHERE b.r = 1 AND b.n >= 2 AND b.n >= $ngram_share * z.n
),
logit_top AS (
    SELECT feature, string_agg(word, ', ' ORDER BY rank) AS logits FROM (
        SELECT feature, rank, trim(token) AS word, row_number() OVER (PARTITION BY feature ORDER BY rank) AS r
        FROM read_parquet($logits)
        WHERE sign = '+' AND trim(token) <> '' AND NOT regexp_matches(token, $unprintable)
          AND token_id NOT IN (SELECT token_id FROM specials))
    WHERE r <= $n_logits GROUP BY feature
)
SELECT f.feature,
       concat_ws(' · ', t.tokens, '“' || b.ngram || '”', '→' || l.logits) AS label,
       coalesce(t.tokens, '') AS tokens, coalesce(b.ngram, '') AS ngram, coalesce(l.logits, '') AS logits
FROM read_parquet($features) f
LEFT JOIN tok_top t ON t.feature = f.feature
LEFT JOIN bi_top b ON b.feature = f.feature
LEFT JOIN logit_top l ON l.feature = f.feature AND NOT f.dead
ORDER BY f.feature
"""


def _words(tokenizer, ids: np.ndarray) -> pd.DataFrame:
    """``token_id``, ``raw`` (the decoded text, newlines shown as a mark) and ``word`` (raw, stripped)."""
    unique = np.unique(ids[ids >= 0]).tolist()
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    texts = tokenizer.batch_decode([[i] for i in unique]) if unique else []
    raw = pd.Series(texts, dtype=object).str.replace("\r", "", regex=False).str.replace("\n", NEWLINE,
                                                                                           regex=False)
    frame = pd.DataFrame({"token_id": pd.Series(unique, dtype="int64"), "raw": raw})
    frame["word"] = frame["raw"].str.strip()
    frame.loc[frame["token_id"].isin(special) | frame["raw"].str.contains(UNPRINTABLE, regex=True), "word"] = ""
    return frame


def build_labels(dashboard, tokenizer=None, *, out_dir: str | Path | None = None, n_tokens: int = 3,
                 n_logits: int = 2, ngram_share: float = 0.3, progress: Progress | None = None) -> Path:
    """Write ``labels.parquet`` for every feature of a dashboard; returns its path."""
    import duckdb

    dash = open_dashboard(dashboard)
    tokenizer = dashboard_tokenizer(dash, tokenizer)
    report(progress, 0.0, "gathering example tokens")
    tables = {name: str(Path(dash.path) / f"{name}.parquet") for name in ("features", "top_examples", "intervals",
                                                                           "logits")}
    con = duckdb.connect()
    try:
        rows = con.execute("SELECT DISTINCT row FROM read_parquet(?) UNION SELECT DISTINCT row FROM read_parquet(?)",
                           [tables["top_examples"], tables["intervals"]]).fetchnumpy()["row"].astype(np.int64)
        store = dash.store()
        token_ids = store.token_ids().numpy()
        positions = store.positions().numpy()
        has_prev = positions[rows] > 0
        prev = pd.DataFrame({"row": rows[has_prev], "prev_id": token_ids[rows[has_prev] - 1].astype(np.int64)})
        ids = np.concatenate([token_ids[rows], prev["prev_id"].to_numpy()]).astype(np.int64)
        report(progress, 0.3, "decoding tokens")
        words = _words(tokenizer, ids)
        con.register("prev", prev)
        con.register("words", words)
        specials = sorted(set(getattr(tokenizer, "all_special_ids", None) or []))
        con.register("specials", pd.DataFrame({"token_id": pd.Series(specials, dtype="int64")}))
        report(progress, 0.6, "ranking tokens and n-grams")
        table = con.execute(_SQL, {"top": tables["top_examples"], "intervals": tables["intervals"],
                                   "logits": tables["logits"], "features": tables["features"],
                                   "n_tokens": int(n_tokens), "n_logits": int(n_logits),
                                   "ngram_share": float(ngram_share), "unprintable": UNPRINTABLE}).df()
    finally:
        con.close()
    table["label"] = table["label"].fillna("")
    path = Path(out_dir if out_dir is not None else dash.path) / LABELS
    write_table(path, table[list(COLUMNS)])
    _CACHE.pop(str(path.resolve()), None)
    report(progress, 1.0, f"{int((table['label'] != '').sum()):,} labels")
    return path


# --- reading ----------------------------------------------------------------------------------------
_CACHE: dict[str, tuple[int, dict[int, str]]] = {}
_CACHE_LOCK = threading.Lock()


def read_labels(folder: str | Path) -> pd.DataFrame:
    path = Path(folder) / LABELS
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    return pd.read_parquet(path)


def labels_dict(folder: str | Path) -> dict[int, str]:
    """``{feature: label}`` of a dashboard folder, cached until ``labels.parquet`` changes ({} when not built)."""
    path = (Path(folder) / LABELS).resolve()
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    with _CACHE_LOCK:
        hit = _CACHE.get(str(path))
        if hit is None or hit[0] != stamp:
            frame = pd.read_parquet(path, columns=["feature", "label"])
            hit = (stamp, dict(zip(frame["feature"].astype(int), frame["label"].astype(str))))
            _CACHE[str(path)] = hit
        return hit[1]


def label_for(folder: str | Path, feature: int) -> str:
    """The feature's label ("" when labels were not built or the feature is dead)."""
    return labels_dict(folder).get(int(feature), "")
