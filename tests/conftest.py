"""Tiny randomly initialised models of every supported architecture, built from configs here.

No network: the tokenizer is a byte-level BPE without merges built in memory, so every
string encodes (one token per byte) and a few whole words can be added as single tokens.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 3, 4, 2, 64


def make_tokenizer(extra_tokens=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>")
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return tokenizer


def _configs(vocab: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=128)
    return {
        "llama": (tf.LlamaConfig(num_key_value_heads=KV_HEADS, **common), tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig(num_key_value_heads=KV_HEADS, **common), tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config(num_key_value_heads=KV_HEADS, **common), tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config(num_key_value_heads=KV_HEADS, head_dim=8, **common), tf.Qwen3ForCausalLM),
        "gemma": (tf.GemmaConfig(num_key_value_heads=KV_HEADS, head_dim=8, **common), tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config(num_key_value_heads=KV_HEADS, head_dim=8, final_logit_softcapping=5.0,
                                   **common), tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig(num_key_value_heads=KV_HEADS, head_dim=8, sliding_window=4, **common),
                   tf.Gemma3ForCausalLM),
        "phi": (tf.PhiConfig(**common), tf.PhiForCausalLM),
        "phi3": (tf.Phi3Config(num_key_value_heads=KV_HEADS, **common), tf.Phi3ForCausalLM),
        "gpt2": (tf.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128),
                 tf.GPT2LMHeadModel),
        "gpt_neox": (tf.GPTNeoXConfig(use_parallel_residual=True, **common), tf.GPTNeoXForCausalLM),
        "gpt_neox_seq": (tf.GPTNeoXConfig(use_parallel_residual=False, **common), tf.GPTNeoXForCausalLM),
    }


ARCHS = list(_configs(300))


def build_tiny(arch: str, tokenizer=None, seed: int = 0, scale_head: float = 1.0):
    """A tiny random model; ``scale_head`` multiplies the unembedding so logits are large."""
    tokenizer = tokenizer or make_tokenizer()
    config, cls = _configs(len(tokenizer))[arch]
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init is tiny; spread the weights so layers really differ
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name and "wte" not in name:
                param.mul_(10.0)
            elif param.ndim == 1 and name.endswith("weight"):  # norm gains: not all ones
                param.uniform_(0.5, 1.5)
            elif param.ndim == 1 and name.endswith("bias"):
                param.normal_(0.0, 0.1)
        if scale_head != 1.0:
            model.get_output_embeddings().weight.mul_(scale_head)
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny_lm(request, tokenizer):
    from engine.models import from_model

    model, tok = build_tiny(request.param, tokenizer)
    return from_model(model, tok, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from engine.models import from_model

    model, tok = build_tiny("llama", tokenizer)
    return from_model(model, tok, name="tiny-llama")
