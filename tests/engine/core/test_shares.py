"""Content-addressed shares: short ids for long link state, stored under <cache>/shares."""
from __future__ import annotations

import json

import pytest

from engine.core import shares
from engine.core.errors import UserError


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))


def test_put_get_round_trip_and_ids_are_content_addressed(tmp_path):
    payload = [{"op": "steer", "layer": 6, "params": {"direction": [0.5, -1.25, 3.0], "alpha": 2.0}}]
    sid = shares.put(payload)
    assert len(sid) == shares.ID_LENGTH and all(c in "0123456789abcdef" for c in sid)
    assert (tmp_path / "cache" / "shares" / f"{sid}.json").is_file()
    assert shares.get(sid) == payload
    assert shares.put(json.loads(json.dumps(payload))) == sid  # same content, same id
    assert shares.put({"b": 1, "a": 2}) == shares.put({"a": 2, "b": 1})  # key order does not matter
    assert shares.put(payload + [{}]) != sid
    text = "A long prompt " * 100 + "ünïcödé 中文"
    assert shares.get(shares.put(text)) == text
    assert shares.share_id(text) == shares.put(text)
    assert not list((tmp_path / "cache" / "shares").glob(".*.tmp"))  # atomic writes leave no temporary file


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABCDEF0123456789x", "abc", "", "0" * 15, "0" * 17,
                                 "0123456789abcdeG", "..%2F..%2Fsecret", "0123456789abcde/", None, 12])
def test_bad_ids_are_refused_with_one_sentence(bad):
    with pytest.raises(shares.ShareError) as caught:
        shares.get(bad)
    message = str(caught.value)
    assert "not a share id" in message and message.count(". ") == 0 and "\n" not in message


def test_missing_and_damaged_shares(tmp_path):
    with pytest.raises(UserError, match="not stored on this server"):
        shares.get("0123456789abcdef")
    sid = shares.put({"prompt": "hello"})
    path = tmp_path / "cache" / "shares" / f"{sid}.json"
    path.write_text(json.dumps({"format": 1, "payload": {"prompt": "tampered"}}))
    with pytest.raises(UserError, match="damaged"):
        shares.get(sid)
    for junk in ("{not json", "", json.dumps([1, 2]), json.dumps({"format": 1})):
        path.write_text(junk)
        with pytest.raises(UserError, match="damaged"):
            shares.get(sid)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="damaged"):
        shares.get(sid)


def test_size_cap_and_non_json_payloads():
    with pytest.raises(UserError, match="more than a link can hold"):
        shares.put("x" * 2000, max_bytes=1000)
    assert shares.get(shares.put("x" * 900, max_bytes=1000)) == "x" * 900
    with pytest.raises(UserError, match="not plain JSON"):
        shares.put({"value": float("nan")})
    with pytest.raises(UserError, match="not plain JSON"):
        shares.put({"value": object()})
