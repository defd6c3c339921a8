"""Tiny random-weight LLaMA models for tests and the benchmarks' quick modes.

Three families, each a few layers of hidden size 64 on a real tokenizer:
- ``smollm2``: the embedded model's GPT-2-style BPE vocabulary and ChatML template;
- ``llama2``: Llama 2's SentencePiece vocabulary (32,000 tokens), multi-head attention, untied
  embeddings, plain RoPE, no pad token and no chat template, as the base model ships;
- ``llama3``: Llama 3's BPE vocabulary (128,256 tokens), grouped-query attention, ``llama3`` RoPE
  scaling, the base model's ``<|end_of_text|>`` EOS with Meta's instruct chat template.
"""
from __future__ import annotations

import os
from pathlib import Path

from llama_sft.model.loading import copy_sentencepiece_model

FAMILIES = ("smollm2", "llama2", "llama3")
_SHAPES = {
    "smollm2": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=True),
    # initializer_range 0.1: logits with clear top-2 gaps, so that greedy tokens compare across
    # runtimes (f16 GGUF, ONNX) without ties decided by rounding
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                   tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.1),
    "llama3": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                   tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.1,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
}


def family_tokenizer_dir(family: str) -> Path:
    """Where ``family``'s tokenizer is saved (materialized once, offline)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if family == "smollm2":
        from llama_sft.model.embedded import ensure_embedded_model
        return ensure_embedded_model(verbose=False)
    from llama_sft.model.llamacpp_source import tokenizer_dir
    return tokenizer_dir(family)


def save_tiny_llama(out_dir: str | os.PathLike, family: str = "smollm2") -> Path:
    """A random-weight LlamaForCausalLM (2 layers, hidden 64) of ``family``'s shape saved with its
    tokenizer: the stand-in that the tests and the benchmarks' quick modes train, evaluate and
    package without downloading anything."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(family_tokenizer_dir(family))
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **_SHAPES[family])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_sentencepiece_model(str(family_tokenizer_dir(family)), out)
    return out
