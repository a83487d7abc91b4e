"""Labels from the dashboard tables (against a plain-Python recount), BM25 search, and features like a text."""
from __future__ import annotations

import math
import shutil
from collections import Counter

import pandas as pd
import pytest

from engine.autointerp.explain import explain_features
from engine.autointerp.labels import build_labels, label_for, labels_dict, read_labels
from engine.autointerp.search import bm25_scores, features_like_text, fts_available, search_text
from engine.core.errors import UserError
from engine.features.read import Dashboard


def test_labels_name_the_paris_and_london_features(paris, tmp_path):
    dash, tok, _, _ = paris
    path = build_labels(dash, tok, out_dir=tmp_path)
    table = pd.read_parquet(path)
    assert list(table.columns) == ["feature", "label", "tokens", "ngram", "logits"]
    assert table["feature"].tolist() == list(range(dash.d_sae))
    assert table.loc[0, "tokens"] == "Paris" and table.loc[1, "tokens"] == "London"
    assert label_for(tmp_path, 0).startswith("Paris") and "→" in label_for(tmp_path, 0)
    assert labels_dict(tmp_path)[1].startswith("London") and label_for(tmp_path / "nowhere", 0) == ""
    # London always follows "to " -> a bigram that covers every example
    assert table.loc[1, "ngram"] == "" or "London" in table.loc[1, "ngram"]


def test_label_tokens_equal_a_plain_recount(paris, tmp_path):
    dash, tok, _, _ = paris
    table = pd.read_parquet(build_labels(dash, tok, out_dir=tmp_path, n_tokens=3)).set_index("feature")
    examples = pd.concat([dash.query("SELECT feature, row, act, token_id FROM top_examples"),
                          dash.query("SELECT feature, row, act, token_id FROM intervals")]).drop_duplicates()
    for feature, group in examples.groupby("feature"):
        count, total = Counter(), Counter()
        for token_id, act in zip(group["token_id"], group["act"]):
            word = tok.decode([int(token_id)]).strip()
            if word:
                count[word] += 1
                total[word] += act
        expected = sorted(count, key=lambda w: (-count[w], -total[w], w))[:3]
        assert table.loc[feature, "tokens"] == ", ".join(expected)
    logits = dash.query("SELECT feature, rank, token FROM logits WHERE sign = '+' ORDER BY feature, rank")
    for feature, group in logits.groupby("feature"):
        printable = [t.strip() for t in group["token"] if t.strip() and t.isprintable() and "\ufffd" not in t
                     and t not in tok.all_special_tokens]
        assert table.loc[feature, "logits"] == ", ".join(printable[:2])


def test_bm25_matches_a_hand_computation():
    docs = ["the word Paris", "Paris and London, Paris again", "numbers after at", ""]
    scores = bm25_scores(docs, "paris paris")  # repeated query terms count once
    lengths = [3, 5, 3, 0]
    avg = sum(lengths) / 4
    idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))
    expected = [idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * n / avg)) for tf, n in zip([1, 2, 0, 0], lengths)]
    assert scores == pytest.approx(expected)
    assert bm25_scores(docs, "zzz").tolist() == [0.0] * 4 and bm25_scores([], "a").size == 0
    assert bm25_scores(["Café au lait"], "cafe")[0] > 0  # accents stripped


def test_search_text_over_explanations_and_labels(paris, backend, tmp_path):
    dash, tok, _, _ = paris
    folder = tmp_path
    with pytest.raises(UserError, match="no labels, explanations or dashboard"):
        search_text(folder, "Paris")
    explain_features(dash, backend, [0, 1, 2], tokenizer=tok, out_dir=folder)
    build_labels(dash, tok, out_dir=folder)
    hits = search_text(folder, "paris", limit=5)
    assert list(hits.columns) == ["feature", "score", "explanation", "label"]
    assert hits["feature"].iloc[0] == 0 and hits["score"].is_monotonic_decreasing
    assert hits.attrs["method"] in ("fts", "bm25")
    assert search_text(folder, "London word", limit=1)["feature"].tolist() == [1]
    assert search_text(folder, "qqqq").empty
    with pytest.raises(UserError, match="Type some words"):
        search_text(folder, "  ")
    # before any explanation or label: the dashboard's own token lists are searched
    assert search_text(dash.path, "London", method="bm25")["feature"].iloc[0] == 1


def test_fts_is_used_only_when_it_loads(paris, tmp_path):
    dash, tok, _, _ = paris
    build_labels(dash, tok, out_dir=tmp_path)
    if fts_available():
        assert search_text(tmp_path, "Paris", method="fts")["feature"].iloc[0] == 0
    else:
        with pytest.raises(UserError, match="full-text search extension is not installed"):
            search_text(tmp_path, "Paris", method="fts")
        assert search_text(tmp_path, "Paris").attrs["method"] == "bm25"


def test_features_like_text_embeds_the_query_with_the_model(paris, tmp_path):
    dash, tok, lm, sae = paris
    folder = shutil.copytree(dash.path, tmp_path / "dash")  # labels next to a copy of the dashboard
    build_labels(Dashboard.open(folder), tok)
    by_activation = features_like_text(lm, sae, "Paris", limit=8)
    assert list(by_activation.columns)[:3] == ["feature", "activation", "max_token_act"]
    assert by_activation["activation"].is_monotonic_decreasing
    found = by_activation.set_index("feature")
    assert found.loc[0, "activation"] == pytest.approx(1.0, rel=1e-4) and 1 not in found.index
    # relative to each feature's maximum over the store, the exact detector is at its maximum (1.0) and ranks
    # with the features whose maximum also lies on "Paris"
    paris_hits = features_like_text(lm, sae, "Paris", limit=3, build_dir=folder, rank_by="relative")
    assert paris_hits["relative"].is_monotonic_decreasing and "explanation" in paris_hits.columns
    top = paris_hits[paris_hits["relative"] >= paris_hits["relative"].iloc[0] - 1e-4].set_index("feature")
    assert 0 in top.index and top.loc[0, "relative"] == pytest.approx(1.0, rel=1e-4)
    assert top.loc[0, "label"].startswith("Paris")
    london = features_like_text(lm, sae, "London", limit=3, build_dir=folder, rank_by="relative")
    assert 1 in london["feature"].tolist() and 0 not in london["feature"].tolist()
    with pytest.raises(UserError, match="relative"):
        features_like_text(lm, sae, "Paris", rank_by="relative")
    mixed = features_like_text(lm, sae, "We flew to Paris", limit=8)
    assert 0 in mixed["feature"].tolist() and (mixed["max_token_act"] > 0).all()
    with pytest.raises(UserError, match="Enter some text"):
        features_like_text(lm, sae, " ")
    assert read_labels(tmp_path / "none").empty
