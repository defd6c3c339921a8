"""The merged model (safetensors): the LoRA folded into the base, the source of every export."""
from __future__ import annotations

import logging
from pathlib import Path

from llama_sft.files import atomic_output_dir, published_mode
from llama_sft.model.loading import copy_sentencepiece_model, load_for_inference

log = logging.getLogger("llama_package")


def merge_adapter(adapter_dir: Path, base_model: str, out_dir: Path, *,
                  dtype: str = "auto") -> Path:
    """Fold the LoRA weights into the (unquantized) base and save a plain safetensors model.

    The merge runs on the CPU: it needs the whole base model in memory once, which host RAM
    holds where one GPU often cannot (a 70B model is 138 GB in bf16)."""
    log.info("merging the adapter into %s (%s, on the CPU) ...", base_model, dtype)
    loaded = load_for_inference(adapter_dir, base_model=base_model, dtype=dtype, device_map=None)
    merged = loaded.model.merge_and_unload()
    with atomic_output_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        copy_sentencepiece_model(base_model, tmp)
        loaded.prompt_format.save(tmp)
        for path in (tmp, *tmp.iterdir()):
            published_mode(path)
    log.info("wrote %s", out_dir)
    return out_dir
