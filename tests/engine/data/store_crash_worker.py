"""Child process of the store crash test: extends a store with a tiny model until it is killed.

Imported once by a multiprocessing fork server (torch, transformers and the tiny model's classes are
loaded there), so each child starts in milliseconds instead of importing torch again.
"""
from __future__ import annotations

import importlib

import torch
from transformers import LlamaForCausalLM  # noqa: F401  (loaded once in the fork server)

from engine.core.models import from_model
from engine.core.tiny import build_tiny, make_tokenizer

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "river", "stone", "light", "music"]
TEXTS = [f"The {WORDS[i % 10]} and the {WORDS[(3 * i) % 10]} are number {i}; {WORDS[(7 * i) % 10]} again."
         for i in range(400)]
OPTIONS = dict(context_length=32, batch_size=2, dtype="float32", corpus_spec="", shard_tokens=48)


def tiny_lm():
    model, tokenizer = build_tiny("llama", make_tokenizer())
    return from_model(model, tokenizer, name="tiny-llama", check=False)


def extend(folder: str, max_tokens: int, writer: str = "engine.data.store_writer", reached=None) -> None:
    """Run ``build_store`` of the module ``writer`` on ``folder`` (the crash test kills this process).

    ``reached`` (a shared integer) receives the progress in millionths after every batch.
    """
    torch.set_num_threads(1)
    build_store = importlib.import_module(writer).build_store

    def progress(fraction: float, message: str = "") -> None:
        if reached is not None:
            reached.value = int(fraction * 1_000_000)

    build_store(tiny_lm(), iter(TEXTS), folder, max_tokens=max_tokens, progress=progress, **OPTIONS)
