"""Exports beside the archive: the merged model (safetensors) and a GGUF file."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from llama_sft.errors import UsageError
from llama_sft.files import atomic_file, atomic_output_dir, published_mode
from llama_sft.model.loading import load_for_inference

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
        loaded.prompt_format.save(tmp)
        for path in (tmp, *tmp.iterdir()):
            published_mode(path)
    log.info("wrote %s", out_dir)
    return out_dir


def _gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [])
              if p.get("type") == "Split"]
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if splits == [regex]:
                return name
    raise UsageError("--gguf supports byte-level BPE tokenizers (SmolLM2, Llama 3); for this "
                     "one use llama.cpp's convert_hf_to_gguf.py on the merged model")


def _gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _permute_qk(weights, n_head: int):
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when loading)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_tensor(tensor_map, hf_name: str, data, n_head: int, n_kv: int):
    """(GGUF name, array): matrices in f16 with q/k permuted, norms in f32."""
    import numpy as np

    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UsageError(f"--gguf: tensor {hf_name} has no GGUF name; use llama.cpp's "
                         f"convert_hf_to_gguf.py")
    if hf_name.endswith("q_proj.weight"):
        data = _permute_qk(data, n_head)
    elif hf_name.endswith("k_proj.weight"):
        data = _permute_qk(data, n_kv)
    return name, np.ascontiguousarray(data.astype(np.float16) if data.ndim > 1 else data)


def export_gguf(merged_dir: Path, out_path: Path) -> Path:
    """Export a merged LLaMA model (plain RoPE, byte-level BPE tokenizer) to GGUF f16."""
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(merged_dir)
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise UsageError(f"--gguf exports LLaMA models with plain RoPE; {merged_dir} is "
                         f"{config.model_type} ({rope.get('rope_type')}); use llama.cpp's "
                         f"convert_hf_to_gguf.py")
    pre = _gguf_pre_tokenizer(json.loads((merged_dir / "tokenizer.json").read_text("utf-8")))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(out_path.name.removesuffix(".f16.gguf"))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        tokens, types = _gguf_vocab(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(
            writer, quiet=True)
        for shard in sorted(merged_dir.glob("*.safetensors")):
            with safe_open(shard, "pt") as fh:
                for hf_name in tqdm(sorted(fh.keys()), desc=f"gguf {shard.name}", unit="tensor",
                                    disable=None):
                    data = fh.get_tensor(hf_name).float().numpy()
                    writer.add_tensor(*_gguf_tensor(tensor_map, hf_name, data, n_head, n_kv))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s", out_path)
    return out_path
