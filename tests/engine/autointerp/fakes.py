"""Test helpers for autointerp: a minimal OpenAI-compatible server on 127.0.0.1 that answers from fixed rules,
with injectable one-shot faults (HTTP 500, a sleep past the client's timeout, garbage, no choices, empty text)."""
from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.autointerp.prompts import DETECTION_SYSTEM, EXPLAINER_SYSTEM, FUZZING_SYSTEM

API_KEY = "test-key-123"
KEY_ENV = "AUTOINTERP_TEST_KEY"


# --- the OpenAI-compatible server --------------------------------------------------------------------
def rule_answer(system: str, user: str) -> str:
    """Explainer: names the marked word. Detection: yes iff the text holds Paris and the explanation mentions it.
    Fuzzing: yes iff the explanation mentions Paris and every marked span is "Paris"."""
    if system == EXPLAINER_SYSTEM:
        marked = re.findall(r"<<(.*?)>>", user)
        word = max(set(marked), key=marked.count) if marked else "nothing"
        return f"Explanation: the word {word.strip()}"
    explanation = re.search(r"^Explanation: (.*)$", user, flags=re.MULTILINE).group(1)
    text = re.search(r"^Text: (.*)$", user, flags=re.MULTILINE).group(1)
    says_paris = "paris" in explanation.lower()
    if system == DETECTION_SYSTEM:
        return "yes" if says_paris and "Paris" in text else "no"
    if system == FUZZING_SYSTEM:
        spans = re.findall(r"<<(.*?)>>", text)
        return "Yes." if says_paris and spans and all(s.strip() == "Paris" for s in spans) else "No."
    return "I do not understand."


class FakeServer:
    """``faults``: a queue of one-shot misbehaviours taken by the next requests, in arrival order:
    ``500``, ``sleep`` (answers after ``sleep_s``), ``garbage`` (not JSON), ``nochoices``, ``empty`` (empty text)."""

    def __init__(self, answer=rule_answer, sleep_s: float = 1.0):
        self.answer = answer
        self.sleep_s = sleep_s
        self.faults: deque[str] = deque()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    fault = server.faults.popleft() if server.faults else None
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "overloaded"}})
                if fault == "sleep":
                    time.sleep(server.sleep_s)
                if fault == "garbage":
                    return self._send(200, None, raw=b"<html>bad gateway</html>")
                if fault == "nochoices":
                    return self._send(200, {"id": "x", "choices": []})
                messages = body["messages"]
                text = "" if fault == "empty" else server.answer(messages[0]["content"], messages[-1]["content"])
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

            def _send(self, code, payload, raw=None):
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def count(self, system: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["body"]["messages"][0]["content"] == system)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
