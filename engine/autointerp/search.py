"""Find features: full-text search over explanations and labels, and "features like this text".

**Text search** (:func:`search_text`): each feature is one document, its newest successful explanation (any
explainer) plus its label (``labels.parquet``, else the dashboard's own activating-token and logit lists), ranked by
BM25. With ``method="auto"`` DuckDB's ``fts`` extension is used when ``LOAD fts`` works offline (it must have been
installed beforehand; duckdb wheels do not bundle it), otherwise the same Okapi BM25 computed here:

    score(d, q) = sum over distinct query terms t of  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)),   k1 = 1.2, b = 0.75,

with terms the lower-cased, accent-stripped word characters runs (``\\w+``) and ``|d|`` the document's term count.
Documents without a query term are left out.

**Features like a text** (:func:`features_like_text`): the model itself embeds the query: the residual at the SAE's
site and layer is averaged over the query's tokens and encoded by the SAE; features are ranked by that activation
(then by their largest per-token activation). It needs no explanation, only the model and the SAE.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from engine.autointerp.examples import AutointerpError
from engine.autointerp.explain import read_explanations
from engine.autointerp.labels import read_labels

TOKEN_PATTERN = r"(?u)\b\w+\b"
K1, B = 1.2, 0.75
RESULT_COLUMNS = ("feature", "score", "explanation", "label")


@functools.lru_cache(maxsize=1)
def fts_available() -> bool:
    """Whether duckdb's full-text search extension loads without the network."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("LOAD fts")
        return True
    except duckdb.Error:
        return False
    finally:
        con.close()


def _analyzer():
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(lowercase=True, strip_accents="unicode", token_pattern=TOKEN_PATTERN)


def bm25_scores(documents: list[str], query: str, k1: float = K1, b: float = B) -> np.ndarray:
    """Okapi BM25 of every document for the query (see the module docstring); zeros when no term matches."""
    scores = np.zeros(len(documents))
    vectorizer = _analyzer()
    terms = list(dict.fromkeys(vectorizer.build_analyzer()(query or "")))
    if not documents or not terms:
        return scores
    try:
        counts = vectorizer.fit_transform(documents).tocsc()
    except ValueError:  # every document is empty
        return scores
    columns = [vectorizer.vocabulary_[t] for t in terms if t in vectorizer.vocabulary_]
    if not columns:
        return scores
    lengths = np.asarray(counts.sum(axis=1)).ravel().astype(float)
    norm = k1 * (1.0 - b + b * lengths / max(lengths.mean(), 1e-12))
    tf = counts[:, columns].toarray().astype(float)
    df = (tf > 0).sum(axis=0)
    n = len(documents)
    idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
    return (idf[None, :] * tf * (k1 + 1.0) / (tf + norm[:, None])).sum(axis=1)


def documents(build_dir: str | Path) -> pd.DataFrame:
    """``feature``, ``explanation``, ``label``, ``text`` for every feature that has an explanation or a label."""
    folder = Path(build_dir)
    labels = read_labels(folder)[["feature", "label"]]
    if labels.empty and (folder / "features.parquet").is_file():
        lists = pd.read_parquet(folder / "features.parquet", columns=["feature", "act_tokens", "top_logits"])
        labels = pd.DataFrame({"feature": lists["feature"],
                               "label": (lists["act_tokens"].fillna("").str.replace(" | ", ", ", regex=False)
                                         + " · →" + lists["top_logits"].fillna("").str.replace(" | ", ", ",
                                                                                               regex=False))})
    explained = read_explanations(folder)[["feature", "explanation"]]
    if labels.empty and explained.empty:
        raise AutointerpError(f"'{folder}' holds no labels, explanations or dashboard to search; build the "
                              "dashboards (or explain some features) first.")
    labels = labels.assign(feature=labels["feature"].astype(int))
    explained = explained.assign(feature=explained["feature"].astype(int))
    docs = explained.merge(labels, on="feature", how="outer").fillna({"explanation": "", "label": ""})
    docs["text"] = (docs["explanation"] + " " + docs["label"]).str.strip()
    return docs[docs["text"] != ""].sort_values("feature").reset_index(drop=True)


def _fts_scores(docs: pd.DataFrame, query: str) -> np.ndarray:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("LOAD fts")
        con.register("frame", docs[["feature", "text"]])
        con.execute("CREATE TABLE docs AS SELECT feature, text FROM frame")
        con.execute("PRAGMA create_fts_index('docs', 'feature', 'text', stemmer = 'none', stopwords = 'none', "
                    "strip_accents = 1, lower = 1)")
        found = con.execute("SELECT feature, fts_main_docs.match_bm25(feature, ?) AS score FROM docs",
                            [query]).df()
    finally:
        con.close()
    score = dict(zip(found["feature"].astype(int), found["score"].fillna(0.0).astype(float)))
    return np.array([score.get(int(f), 0.0) for f in docs["feature"]])


def search_text(build_dir: str | Path, query: str, limit: int = 20, *, method: str = "auto") -> pd.DataFrame:
    """Features whose explanation or label matches ``query``, best first: ``feature``, ``score``,
    ``explanation``, ``label`` (``attrs["method"]``: ``fts`` or ``bm25``)."""
    if not (query or "").strip():
        raise AutointerpError("Type some words to search the explanations and labels for.")
    if method not in ("auto", "fts", "bm25"):
        raise AutointerpError(f"Unknown search method '{method}'; choose auto, fts or bm25.")
    if method == "fts" and not fts_available():
        raise AutointerpError("DuckDB's full-text search extension is not installed on this machine (installing "
                              "it needs the network); use the built-in BM25 ranking instead.")
    docs = documents(build_dir)
    used = "fts" if method == "fts" or (method == "auto" and fts_available()) else "bm25"
    if used == "fts":
        import duckdb

        try:
            scores = _fts_scores(docs, query)
        except duckdb.Error:
            if method == "fts":
                raise
            used, scores = "bm25", bm25_scores(docs["text"].tolist(), query)
    else:
        scores = bm25_scores(docs["text"].tolist(), query)
    docs = docs.assign(score=scores)
    hits = docs[docs["score"] > 0].sort_values(["score", "feature"], ascending=[False, True]).head(int(limit))
    out = hits[list(RESULT_COLUMNS)].reset_index(drop=True)
    out.attrs["method"] = used
    return out


def features_like_text(lm, sae, text: str, limit: int = 20, *, build_dir: str | Path | None = None,
                       rank_by: str = "activation", max_tokens: int = 256) -> pd.DataFrame:
    """Features the SAE finds in ``text``, ranked by the activation of the query's mean residual:
    ``feature``, ``activation``, ``max_token_act``, ``mean_token_act``, ``tokens_fired``; with ``build_dir`` (the
    dashboard folder) also ``relative`` (activation / the feature's maximum over the store), ``label`` and
    ``explanation``. ``rank_by="relative"`` (needs ``build_dir``) ranks by ``relative`` instead, so features with
    large activation scales do not crowd out the rest."""
    import torch

    from engine.core.devices import to_host
    from engine.features.folder import DashboardError
    from engine.features.text import text_hidden

    if not (text or "").strip():
        raise AutointerpError("Enter some text to find the features it brings out.")
    if rank_by not in ("activation", "relative") or (rank_by == "relative" and build_dir is None):
        raise AutointerpError("Rank by 'activation', or by 'relative' with the dashboard folder given.")
    site, layer = sae.cfg.site()
    try:
        _, hidden = text_hidden(lm, sae, site, layer, text, max_tokens)  # [T, d_in] on the SAE's device
    except DashboardError as exc:
        raise AutointerpError(str(exc)) from exc
    with torch.no_grad():
        pooled = to_host(sae.encode(hidden.mean(dim=0, keepdim=True))[0], torch.float32)  # [d_sae]
        per_token = to_host(sae.encode(hidden), torch.float32)                             # [T, d_sae]
    frame = pd.DataFrame({"feature": np.arange(sae.d_sae), "activation": pooled.numpy(),
                          "max_token_act": per_token.max(dim=0).values.numpy(),
                          "mean_token_act": per_token.mean(dim=0).numpy(),
                          "tokens_fired": (per_token > 0).sum(dim=0).numpy()})
    frame = frame[(frame["activation"] > 0) | (frame["max_token_act"] > 0)]
    if build_dir is not None:
        maxima = pd.read_parquet(Path(build_dir) / "features.parquet", columns=["feature", "max_act"])
        labels = read_labels(build_dir)[["feature", "label"]]
        explained = read_explanations(build_dir)[["feature", "explanation"]]
        for extra in (maxima, labels, explained):
            frame = frame.merge(extra.assign(feature=extra["feature"].astype(int)), on="feature", how="left")
        frame["relative"] = (frame["activation"] / frame["max_act"].where(frame["max_act"] > 0)).fillna(0.0)
        frame = frame.drop(columns="max_act").fillna({"label": "", "explanation": ""})
    order = ["relative", "max_token_act", "feature"] if rank_by == "relative" else \
        ["activation", "max_token_act", "feature"]
    frame = frame.sort_values(order, ascending=[False, False, True])
    return frame.head(int(limit)).reset_index(drop=True)
