"""Chat backends for the explainer and the scorers, behind one interface.

``backend.chat(messages, max_tokens) -> str`` answers one conversation (raising :class:`BackendError` with one
sentence when it cannot); ``backend.chat_batch(conversations, max_tokens) -> list[Answer]`` answers many at once
and never raises for a single conversation: each :class:`Answer` holds either the text or the reason it failed.

- :class:`LocalChatBackend`: a local Hugging Face chat model loaded through :func:`engine.core.models.load_model`
  (the embedded ``smollm2-135m`` works offline); the tokenizer's chat template, greedy decoding, batches padded
  on the left.
- :class:`OpenAICompatibleBackend`: any ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, Ollama ...),
  given by base URL, model name and the NAME of the environment variable holding the API key. The key is read from
  the environment for each request and never kept in files, specs, names or links. Standard library only: a thread
  pool bounded by ``concurrency``, a per-request ``timeout``, and retries with exponential back-off on HTTP 429/5xx,
  timeouts and connection errors. Answers that are not JSON, have no choices or no text fail that conversation.

:func:`backend_from_spec` rebuilds a backend from :meth:`ChatBackend.spec` (a JSON-able dict for job specs).
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.autointerp.examples import AutointerpError


class BackendError(AutointerpError):
    """A chat backend cannot be set up or gave no usable answer."""


@dataclass
class Answer:
    """One conversation's result: ``text`` on success, else ``error`` (one sentence)."""

    text: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class ChatBackend:
    """The interface every explainer / scorer backend implements."""

    name: str = "backend"
    batch_size: int = 8  # conversations handed to one chat_batch call by the explain and score loops

    def chat_batch(self, conversations: list[list[dict]], max_tokens: int = 200) -> list[Answer]:
        raise NotImplementedError

    def chat(self, messages: list[dict], max_tokens: int = 200) -> str:
        answer = self.chat_batch([messages], max_tokens)[0]
        if not answer.ok:
            raise BackendError(answer.error or "The backend gave no answer.")
        return answer.text or ""

    def spec(self) -> dict:
        """Settings that rebuild this backend with :func:`backend_from_spec` (never a secret)."""
        raise NotImplementedError


# --- a local Hugging Face chat model ---------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class LocalChatBackend(ChatBackend):
    """Greedy generation with a local causal LM (a model spec or an already loaded ``LoadedModel``)."""

    def __init__(self, model="smollm2-135m", *, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                 max_input_tokens: int = 2048):
        from engine.core.models import load_model

        self.lm = load_model(model, device=device, dtype=dtype, check=False) if isinstance(model, str) else model
        self.batch_size = max(1, int(batch_size))
        self.max_input_tokens = int(max_input_tokens)
        self.name = f"local:{self.lm.name}"
        self._device, self._dtype = device, dtype
        tok = self.lm.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        stops = {tok.eos_token_id}
        vocab = tok.get_vocab()
        stops |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>") if t in vocab}
        self._stops = sorted(i for i in stops if i is not None)

    def spec(self) -> dict:
        return {"kind": "local", "model": self.lm.name, "batch_size": self.batch_size, "device": self._device,
                "dtype": self._dtype}

    def prompt_text(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template renders it, ready for the assistant's turn."""
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if "<|im_start|>" in tok.get_vocab():
            return tok.apply_chat_template(messages, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
        body = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return f"{body}\n\nAssistant:"

    def chat_batch(self, conversations: list[list[dict]], max_tokens: int = 200) -> list[Answer]:
        answers: list[Answer] = []
        for start in range(0, len(conversations), self.batch_size):
            answers += self._generate(conversations[start:start + self.batch_size], max_tokens)
        return answers

    def _generate(self, conversations: list[list[dict]], max_tokens: int) -> list[Answer]:
        import torch
        from transformers import GenerationConfig

        tok = self.lm.tokenizer
        texts = [self.prompt_text(m) for m in conversations]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        fits = [n <= self.max_input_tokens for n in lengths]
        answers = [Answer(error=f"The prompt has {n} tokens, more than the {self.max_input_tokens} the local "
                                "model is given.") for n in lengths]
        chosen = [t for t, ok in zip(texts, fits) if ok]
        if not chosen:
            return answers
        enc = tok(chosen, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        config = GenerationConfig(max_new_tokens=int(max_tokens), do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=self._stops or None)
        try:
            with self.lm.lock, torch.no_grad():
                out = self.lm.model.generate(input_ids=enc["input_ids"].to(self.lm.device),
                                             attention_mask=enc["attention_mask"].to(self.lm.device),
                                             generation_config=config)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return [a if not ok else Answer(error=f"Local generation failed: {reason}") for a, ok in zip(answers, fits)]
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        decoded = iter(tok.batch_decode(new, skip_special_tokens=True))
        return [Answer(text=next(decoded).strip()) if ok else a for a, ok in zip(answers, fits)]


# --- any OpenAI-compatible endpoint ----------------------------------------------------------------
class _Retry(Exception):
    """A failure worth another try (HTTP 429/5xx, timeout, connection error)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


def _http_reason(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
        message = json.loads(body).get("error", {})
        message = message.get("message", "") if isinstance(message, dict) else str(message)
    except (ValueError, AttributeError, OSError):
        message = ""
    return f"HTTP {exc.code}" + (f": {message.strip()[:200]}" if message.strip() else "")


def _content(payload) -> str:
    """The text of the first choice; raises BackendError with the reason when the answer is garbage."""
    if not isinstance(payload, dict):
        raise BackendError("The server's answer is not a JSON object.")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError("The server's answer has no choices.")
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(choices[0].get("text"), str):  # completion-style answers
        content = choices[0]["text"]
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise BackendError("The server's answer has no message text.")
    return content


class OpenAICompatibleBackend(ChatBackend):
    """``POST {base_url}/chat/completions`` with ``Authorization: Bearer $<api_key_env>``."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", *,
                 concurrency: int = 4, timeout: float = 60.0, retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, temperature: float = 0.0, batch_size: int | None = None):
        parsed = urllib.parse.urlparse((base_url or "").strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise BackendError(f"'{base_url}' is not an http(s) URL; give the endpoint's base URL such as "
                               "https://api.openai.com/v1.")
        if parsed.username or parsed.password or parsed.query:
            raise BackendError("The base URL must not hold credentials or a query; put the API key in an "
                               "environment variable and give its name.")
        if not (model or "").strip():
            raise BackendError("Name the model the endpoint should run (for example gpt-4o-mini).")
        path = parsed.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        self.url = urllib.parse.urlunparse((parsed.scheme, parsed.netloc, path, "", "", ""))
        self.base_url = base_url.strip()
        self.model = model.strip()
        self.api_key_env = (api_key_env or "").strip() or None
        self.concurrency = max(1, int(concurrency))
        self.timeout, self.retries = float(timeout), max(0, int(retries))
        self.backoff, self.max_backoff, self.temperature = float(backoff), float(max_backoff), float(temperature)
        self.batch_size = int(batch_size) if batch_size else 4 * self.concurrency
        self.name = f"openai:{self.model}@{parsed.netloc}"
        self._key()  # fail now, with one sentence, when the variable is missing

    def spec(self) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "concurrency": self.concurrency, "timeout": self.timeout, "retries": self.retries,
                "backoff": self.backoff, "temperature": self.temperature, "batch_size": self.batch_size}

    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise BackendError(f"The environment variable {self.api_key_env} that should hold the API key is not "
                               "set; export it in the shell that starts Latent Explorer (keys are never stored).")
        return key

    def _request(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                           "temperature": self.temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            reason = _http_reason(exc)
            if exc.code == 429 or exc.code >= 500:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
                raise _Retry(reason, wait) from None
            if exc.code in (401, 403):
                raise BackendError(f"The server refused the API key from {self.api_key_env} ({reason}).") from None
            raise BackendError(f"The server refused the request ({reason}).") from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"no answer within {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            raise _Retry(f"cannot reach {self.url} ({exc.reason})") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise _Retry(f"the connection broke ({type(exc).__name__})") from None
        try:
            payload = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
            raise BackendError(f"The server's answer is not JSON ({snippet!r}).") from None
        return _content(payload)

    def _one(self, messages: list[dict], max_tokens: int) -> Answer:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return Answer(text=self._request(messages, max_tokens))
            except BackendError as exc:
                return Answer(error=str(exc))
            except _Retry as exc:
                last = exc.reason
                if attempt < self.retries:
                    delay = min(self.max_backoff, exc.wait if exc.wait is not None else self.backoff * 2 ** attempt)
                    time.sleep(delay * (1.0 + 0.1 * random.random()))
        return Answer(error=f"No answer from {self.name} after {self.retries + 1} tries (last: {last}).")

    def chat_batch(self, conversations: list[list[dict]], max_tokens: int = 200) -> list[Answer]:
        if not conversations:
            return []
        self._key()
        workers = min(self.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autointerp-http") as pool:
            return list(pool.map(lambda m: self._one(m, max_tokens), conversations))


def backend_from_spec(spec: dict) -> ChatBackend:
    """A backend from :meth:`ChatBackend.spec` (``kind`` ``local`` or ``openai``)."""
    spec = dict(spec or {})
    kind = spec.pop("kind", None)
    if kind == "local":
        return LocalChatBackend(spec.pop("model", "smollm2-135m"), **spec)
    if kind == "openai":
        return OpenAICompatibleBackend(spec.pop("base_url", ""), spec.pop("model", ""), **spec)
    raise BackendError(f"Unknown backend kind {kind!r}; choose 'local' or 'openai'.")
