"""A tiny random-weight LLaMA for tests and the benchmarks' quick modes."""
from __future__ import annotations

import os
from pathlib import Path

from llama_sft.model.embedded import ensure_embedded_model


def save_tiny_llama(out_dir: str | os.PathLike) -> Path:
    """A random-weight LlamaForCausalLM (2 layers, hidden 64, tied embeddings, a few MB) saved
    with the embedded model's tokenizer and chat template: the stand-in that the tests and the
    benchmarks' quick modes train, evaluate and package without downloading anything."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model(verbose=False))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
