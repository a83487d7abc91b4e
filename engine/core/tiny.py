"""Tiny randomly initialised models of the supported architectures, built from configs.

Used by the tests and by the ``tiny:<arch>`` model spec (e.g. ``tiny:llama``), which loads in
milliseconds and needs no download: handy for UI tests and for trying the app without weights.
The tokenizer is a byte-level BPE without merges built in memory, so every string encodes (one
token per byte) and whole words can be added as single tokens.
"""
from __future__ import annotations

import torch

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
    """arch -> (config factory, model class); built lazily so only the chosen config is made."""
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=512, **ids)
    gqa = dict(num_key_value_heads=KV_HEADS, **common)
    return {
        "llama": (lambda: tf.LlamaConfig(**gqa), tf.LlamaForCausalLM),
        "mistral": (lambda: tf.MistralConfig(**gqa), tf.MistralForCausalLM),
        "qwen2": (lambda: tf.Qwen2Config(**gqa), tf.Qwen2ForCausalLM),
        "qwen3": (lambda: tf.Qwen3Config(head_dim=8, **gqa), tf.Qwen3ForCausalLM),
        "gemma": (lambda: tf.GemmaConfig(head_dim=8, **gqa), tf.GemmaForCausalLM),
        "gemma2": (lambda: tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **gqa), tf.Gemma2ForCausalLM),
        "gemma3": (lambda: tf.Gemma3TextConfig(head_dim=8, sliding_window=4, **gqa), tf.Gemma3ForCausalLM),
        "phi": (lambda: tf.PhiConfig(**common), tf.PhiForCausalLM),
        "phi3": (lambda: tf.Phi3Config(**gqa), tf.Phi3ForCausalLM),
        "gpt2": (lambda: tf.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=512,
                                       **ids), tf.GPT2LMHeadModel),
        "gpt_neox": (lambda: tf.GPTNeoXConfig(use_parallel_residual=True, **common), tf.GPTNeoXForCausalLM),
        "gpt_neox_seq": (lambda: tf.GPTNeoXConfig(use_parallel_residual=False, **common), tf.GPTNeoXForCausalLM),
        # lens-only: no MLP module (OPT's fc1/fc2 sit on the layer), no attention or MLP (Mamba),
        # branches scaled inside the layer (Granite's residual_multiplier)
        "opt": (lambda: tf.OPTConfig(ffn_dim=FFN, word_embed_proj_dim=HIDDEN, **_opt(common)), tf.OPTForCausalLM),
        "opt_proj": (lambda: tf.OPTConfig(ffn_dim=FFN, word_embed_proj_dim=HIDDEN // 2, do_layer_norm_before=False,
                                          **_opt(common)), tf.OPTForCausalLM),  # OPT-350m: post-norm, project_out
        "mamba": (lambda: tf.MambaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=8,
                                         expand=2, conv_kernel=4, **ids), tf.MambaForCausalLM),
        "granite": (lambda: tf.GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22,
                                             attention_multiplier=0.125, logits_scaling=8.0, **gqa),
                    tf.GraniteForCausalLM),
        "cohere": (lambda: tf.CohereConfig(logit_scale=0.25, tie_word_embeddings=False, **gqa), tf.CohereForCausalLM),
    }


def _opt(common: dict) -> dict:
    return {key: value for key, value in common.items() if key != "intermediate_size"}


# every test over the ``tiny_lm`` fixture runs on ARCHS (all sites exist); LENS_ONLY_ARCHS lack some
# sub-block sites, so only the lens and the residual sites are tested on them (tests/engine/core)
LENS_ONLY_ARCHS = ["opt", "opt_proj", "mamba", "granite"]
ARCHS = [arch for arch in _configs(300) if arch not in LENS_ONLY_ARCHS]
ALL_ARCHS = ARCHS + LENS_ONLY_ARCHS


def build_tiny(arch: str, tokenizer=None, seed: int = 0, scale_head: float = 1.0):
    """A tiny random model; ``scale_head`` multiplies the unembedding so logits are large."""
    tokenizer = tokenizer or make_tokenizer()
    factory, cls = _configs(len(tokenizer))[arch]
    config = factory()
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init is tiny; spread the weights so layers really differ
        for name, param in model.named_parameters():
            if name.endswith("A_log"):  # Mamba's state decay: keep the initialisation's stable range
                continue
            if param.ndim == 2 and "embed" not in name and "wte" not in name:
                param.mul_(10.0)
            elif param.ndim == 1 and name.endswith("weight"):  # norm gains: not all ones
                param.uniform_(0.5, 1.5)
            elif param.ndim == 1 and name.endswith("bias"):
                param.normal_(0.0, 0.1)
        if scale_head != 1.0:
            model.get_output_embeddings().weight.mul_(scale_head)
    return model, tokenizer
