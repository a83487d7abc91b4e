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

import copy
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
from engine.core.devices import to_host


class BackendError(AutointerpError):
    """A chat backend cannot be set up or gave no usable answer."""


@dataclass
class Answer:
    """One conversation's result: ``text`` on success, else ``error`` (one sentence)."""

    text: str | None = None
    error: str | None = None
    score: float | None = None  # yes/no trials of a local model: yes-logit minus no-logit (> 0 means yes)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class ChatBackend:
    """The interface every explainer / scorer backend implements."""

    name: str = "backend"
    batch_size: int = 8  # conversations handed to one chat_batch call by the explain and score loops

    def chat_batch(self, conversations: list[list[dict]], max_tokens: int = 200) -> list[Answer]:
        raise NotImplementedError

    def judge_batch(self, conversations: list[list[dict]], max_tokens: int = 5) -> list[Answer]:
        """Answers to yes/no questions (the scorers' trials). By default the model writes them; a local model
        overrides this with one forward pass that compares its next-token logits for yes and no."""
        return self.chat_batch(conversations, max_tokens)

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


YES_WORDS = ("yes", "Yes", " yes", " Yes", "YES")
NO_WORDS = ("no", "No", " no", " No", "NO")
SHARED_PREFIX_MIN = 8  # a batch's common prompt prefix (tokens) worth computing once and sharing


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, row)) if a != b), n))
    return max(n, 0)


class LocalChatBackend(ChatBackend):
    """Greedy generation with a local causal LM (a model spec or an already loaded ``LoadedModel``).

    Yes/no trials (:meth:`judge_batch`) are not generated: one forward pass per batch reads the logits of the
    assistant's first token, and the answer is yes when the best yes-token (``YES_WORDS``) beats the best no-token.
    The prompt prefix the batch shares (system prompt and explanation of one feature) runs once and its key/value
    cache is repeated for every trial (``share_prefix``), which makes scoring several times cheaper."""

    def __init__(self, model="smollm2-135m", *, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                 max_input_tokens: int = 2048, judge_batch_size: int = 32, share_prefix: bool = True):
        from engine.core.models import load_model

        self.lm = load_model(model, device=device, dtype=dtype, check=False) if isinstance(model, str) else model
        self.batch_size = max(1, int(batch_size))
        self.judge_batch_size, self.share_prefix = max(1, int(judge_batch_size)), bool(share_prefix)
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
        yes = {tok.encode(w, add_special_tokens=False)[0] for w in YES_WORDS}
        no = {tok.encode(w, add_special_tokens=False)[0] for w in NO_WORDS}
        self._yes, self._no = sorted(yes - no), sorted(no - yes)

    def spec(self) -> dict:
        return {"kind": "local", "model": self.lm.name, "batch_size": self.batch_size, "device": self._device,
                "dtype": self._dtype, "judge_batch_size": self.judge_batch_size, "share_prefix": self.share_prefix}

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


    def judge_batch(self, conversations: list[list[dict]], max_tokens: int = 5) -> list[Answer]:
        tok = self.lm.tokenizer
        ids = tok([self.prompt_text(m) for m in conversations], add_special_tokens=False)["input_ids"]
        answers = [Answer(error=f"The prompt has {len(r)} tokens, more than the {self.max_input_tokens} the local "
                                "model is given.") for r in ids]
        fits = [i for i, r in enumerate(ids) if len(r) <= self.max_input_tokens]
        for start in range(0, len(fits), self.judge_batch_size):
            chunk = fits[start:start + self.judge_batch_size]
            try:
                said = self.yes_logit_margin([ids[i] for i in chunk])
            except (RuntimeError, ValueError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                said = [None] * len(chunk)
                for i in chunk:
                    answers[i] = Answer(error=f"Local scoring failed: {reason}")
            for i, margin in zip(chunk, said):
                if margin is not None:
                    answers[i] = Answer(text="yes" if margin > 0 else "no", score=float(margin))
        return answers

    def yes_logit_margin(self, rows: list[list[int]]) -> list[float]:
        """Per prompt (token ids), best yes-logit minus best no-logit for the assistant's first token."""
        import torch

        prefix = _common_prefix(rows) if self.share_prefix and len(rows) > 1 else 0
        if prefix < SHARED_PREFIX_MIN:
            return self._margins(rows, 0, None)
        with self.lm.lock, torch.no_grad():
            cache = self.lm.model(input_ids=torch.tensor([rows[0][:prefix]], device=self.lm.device),
                                  use_cache=True).past_key_values
        window = getattr(self.lm.model.config, "sliding_window", None)
        if not window or window >= max(len(r) for r in rows):
            return self._margins(rows, prefix, cache)
        # A sliding window counts cache slots, padding included: pads between the shared prefix and a prompt's
        # own tokens would push real tokens out of the window, so prompts of equal length go together, unpadded.
        margins: list[float] = [0.0] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_length.setdefault(len(row), []).append(i)
        for group in by_length.values():
            for i, m in zip(group, self._margins([rows[i] for i in group], prefix, copy.deepcopy(cache))):
                margins[i] = m
        return margins

    def _margins(self, rows: list[list[int]], prefix: int, cache) -> list[float]:
        """One forward pass over the rows' tokens after ``prefix`` (left-padded), on top of ``cache`` (the shared
        prefix's keys and values for one row, repeated here for every row) when given."""
        import torch

        tails = [r[prefix:] for r in rows]
        width = max(len(t) for t in tails)
        pad, device = self.lm.tokenizer.pad_token_id, self.lm.device
        input_ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
        positions = (prefix + mask.cumsum(1) - 1).clamp(min=prefix)
        with self.lm.lock, torch.no_grad():
            if cache is not None:
                cache.batch_repeat_interleave(len(rows))
                mask = torch.cat([torch.ones(len(rows), prefix, dtype=mask.dtype, device=device), mask], dim=1)
            out = self.lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
            last = out.logits[:, -1].float()
            margin = last[:, self._yes].amax(1) - last[:, self._no].amax(1)
        return to_host(margin).tolist()


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
