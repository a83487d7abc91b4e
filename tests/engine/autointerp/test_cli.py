"""``python -m engine explain|score|labels|search`` handlers (parsed here without the global command list)."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from engine.cli.autointerp import parse_features, register
from engine.core.errors import UserError
from tests.engine.autointerp.fakes import KEY_ENV


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_parse_features():
    assert parse_features("0-3,7") == [0, 1, 2, 3, 7] and parse_features("") is None
    with pytest.raises(UserError, match="not a feature list"):
        parse_features("a-b")


def test_cli_explain_labels_and_search(plain_dashboard, server, tmp_path, capsys):
    folder = str(shutil.copytree(plain_dashboard, tmp_path / "dash"))
    remote = ["--base-url", server.url, "--api-model", "rule-model", "--api-key-env", KEY_ENV]
    assert run(["explain", "--dashboard", folder, "--features", "0-2", *remote, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["explained"] == 3 and result["path"].endswith("explanations.parquet")
    assert run(["labels", "--dashboard", folder, "--json"]) == 0  # tokenizer from the manifest (tiny:llama)
    assert json.loads(capsys.readouterr().out)["path"].endswith("labels.parquet")
    assert run(["search", "--dashboard", folder, "word", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert {h["feature"] for h in hits} >= {0, 1, 2}
    with pytest.raises(UserError, match="--api-model"):
        run(["explain", "--dashboard", folder, "--base-url", server.url])
