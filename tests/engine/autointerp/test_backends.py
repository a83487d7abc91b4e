"""Chat backends: a real HTTP server on 127.0.0.1 (retries, timeouts, garbage, keys) and the local HF backend."""
from __future__ import annotations

import json
import socket

import pytest

from engine.autointerp.backends import (
    BackendError,
    LocalChatBackend,
    OpenAICompatibleBackend,
    backend_from_spec,
)
from engine.autointerp.prompts import DETECTION_SYSTEM, EXPLAINER_SYSTEM
from engine.core.errors import UserError
from tests.engine.autointerp.fakes import API_KEY, KEY_ENV

EXPLAIN = [{"role": "system", "content": EXPLAINER_SYSTEM},
           {"role": "user", "content": "Excerpts:\n1. (10/10) We flew to <<Paris>> in May"}]


def make(server, **overrides) -> OpenAICompatibleBackend:
    settings = dict(concurrency=1, timeout=5.0, retries=3, backoff=0.01)
    settings.update(overrides)
    return OpenAICompatibleBackend(server.url, "rule-model", KEY_ENV, **settings)


def test_chat_posts_an_openai_request_and_reads_the_answer(server, backend):
    assert backend.chat(EXPLAIN, max_tokens=30) == "Explanation: the word Paris"
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {API_KEY}"
    assert request["body"]["model"] == "rule-model" and request["body"]["max_tokens"] == 30
    assert request["body"]["messages"] == EXPLAIN and request["body"]["temperature"] == 0.0
    detect = [{"role": "system", "content": DETECTION_SYSTEM},
              {"role": "user", "content": "Explanation: the word Paris\n\nText: in Paris now\n\nOk?"}]
    answers = backend.chat_batch([detect, EXPLAIN, detect], max_tokens=5)  # order kept across the thread pool
    assert [a.text for a in answers] == ["yes", "Explanation: the word Paris", "yes"]


def test_retries_after_server_errors_and_a_timeout(server):
    backend = make(server, timeout=2.0)  # long enough for a normal answer on a loaded machine
    server.faults.extend(["500", "500"])
    assert backend.chat(EXPLAIN) == "Explanation: the word Paris"
    assert len(server.requests) == 3
    server.sleep_s = 4.0
    server.faults.append("sleep")  # the server answers after the client gave up: the second try succeeds
    assert backend.chat(EXPLAIN) == "Explanation: the word Paris"
    assert len(server.requests) == 5


def test_gives_up_after_the_last_retry_with_the_reason(server):
    backend = make(server, retries=2)
    server.faults.extend(["500"] * 3)
    answer = backend.chat_batch([EXPLAIN])[0]
    assert not answer.ok and "after 3 tries" in answer.error and "HTTP 500: overloaded" in answer.error
    with pytest.raises(BackendError, match="after 3 tries"):
        server.faults.extend(["500"] * 3)
        backend.chat(EXPLAIN)


@pytest.mark.parametrize("fault, reason", [("garbage", "not JSON"), ("nochoices", "no choices")])
def test_garbage_answers_fail_that_conversation_without_retry(server, fault, reason):
    backend = make(server)
    server.faults.append(fault)
    first, second = backend.chat_batch([EXPLAIN, EXPLAIN])
    assert not first.ok and reason in first.error
    assert second.ok and second.text == "Explanation: the word Paris"
    assert len(server.requests) == 2


def test_missing_api_key_is_one_clear_sentence(monkeypatch, server):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=f"environment variable {KEY_ENV} .*not set"):
        OpenAICompatibleBackend(server.url, "rule-model", KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "wrong")
    backend = make(server)
    answer = backend.chat_batch([EXPLAIN])[0]
    assert "refused the API key" in answer.error and len(server.requests) == 1  # 401: no retry


def test_the_key_is_never_in_specs_or_names(server, backend):
    spec = backend.spec()
    assert API_KEY not in json.dumps(spec) and API_KEY not in backend.name and API_KEY not in backend.url
    assert spec["api_key_env"] == KEY_ENV
    again = backend_from_spec(json.loads(json.dumps(spec)))
    assert isinstance(again, OpenAICompatibleBackend) and again.name == backend.name
    assert again.chat(EXPLAIN) == "Explanation: the word Paris"
    with pytest.raises(UserError, match="credentials"):
        OpenAICompatibleBackend(f"http://user:{API_KEY}@127.0.0.1:1/v1", "m", KEY_ENV)
    with pytest.raises(UserError, match="not an http"):
        OpenAICompatibleBackend("ftp://example.org", "m", KEY_ENV)
    with pytest.raises(UserError, match="Unknown backend kind"):
        backend_from_spec({"kind": "magic"})


def test_unreachable_server_is_retried_then_reported(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}/v1", "m", KEY_ENV, retries=1, backoff=0.01,
                                      timeout=1.0)
    answer = backend.chat_batch([EXPLAIN])[0]
    assert not answer.ok and "after 2 tries" in answer.error and "cannot reach" in answer.error


def test_no_key_variable_means_no_authorization_header(server):
    backend = OpenAICompatibleBackend(server.url, "m", None, backoff=0.01)
    assert "refused the API key" in backend.chat_batch([EXPLAIN])[0].error
    assert server.requests[-1]["auth"] is None


def test_local_backend_batches_with_left_padding_like_single_prompts(tiny_llama):
    backend = LocalChatBackend(tiny_llama, batch_size=4)
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the word Paris."}]
    assert backend.prompt_text(short).endswith("Assistant:")  # no chat template: a plain transcript
    batch = backend.chat_batch([short, long, short], max_tokens=6)
    alone = [backend.chat_batch([m], max_tokens=6)[0] for m in (short, long)]
    assert all(a.ok for a in batch + alone)
    assert [a.text for a in batch] == [alone[0].text, alone[1].text, alone[0].text]
    backend.max_input_tokens = 30  # bytes: the short prompt has 20 tokens, the long one 61
    too_long = backend.chat_batch([long, short], max_tokens=3)
    assert "more than the 30" in too_long[0].error and too_long[1].ok
    assert backend.spec()["kind"] == "local" and backend.name == "local:tiny-llama"


def _trials(n: int) -> list[list[dict]]:
    explanation = "the word Paris and other capital cities"
    texts = ["We flew to Paris in May", "The cat sat on the mat", "London is big", "Paris", "x" * 40]
    return [[{"role": "system", "content": DETECTION_SYSTEM},
             {"role": "user", "content": f"Explanation: {explanation}\n\nDoes the feature fire on this text? "
                                         f"Answer yes or no.\n\nText: {texts[i % len(texts)]} {i}"}]
            for i in range(n)]  # the text last: the tiny Gemma 3 attends to a few tokens back only


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_judging_with_a_shared_prefix_equals_each_prompt_alone(arch, dtype):
    import torch

    from engine.core.models import from_model
    from engine.core.tiny import build_tiny

    model, tok = build_tiny(arch, seed=3)
    if arch == "gemma3":  # a window shorter than the prompt (still masked) that reaches back to the varying text
        model.config.sliding_window = 24
    lm = from_model(model.to(getattr(torch, dtype)), tok, name=f"tiny-{arch}")
    backend = LocalChatBackend(lm, judge_batch_size=16)
    conversations = _trials(7)
    rows = lm.tokenizer([backend.prompt_text(m) for m in conversations], add_special_tokens=False)["input_ids"]
    shared = backend.yes_logit_margin(rows)
    alone = [backend.yes_logit_margin([r])[0] for r in rows]  # one row: no padding, no shared prefix
    backend.share_prefix = False
    padded = backend.yes_logit_margin(rows)  # the whole batch left-padded, no cache
    tol = 1e-4 if dtype == "float32" else 0.1
    assert shared == pytest.approx(alone, abs=tol) and padded == pytest.approx(alone, abs=tol)
    assert len(set(round(m, 3) for m in alone)) > 1  # the trials differ, so equal margins are not a coincidence
    answers = backend.judge_batch(conversations)
    assert [a.text for a in answers] == ["yes" if m > 0 else "no" for m in alone] or dtype == "bfloat16"
    assert all(a.ok for a in answers)
    backend.max_input_tokens = 10
    assert "more than the 10" in backend.judge_batch(conversations[:1])[0].error
