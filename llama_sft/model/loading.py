"""Loading tokenizers and models: the one place a model is loaded (dtype, device, quantization)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.adapter.directory import check_adapter_dir, recorded_base_model
from llama_sft.config.hardware import choose_dtype
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.errors import UsageError
from llama_sft.model.embedded import resolve_model_path


def quiet_library_noise() -> None:
    """Silence third-party messages that say nothing actionable to a user of this pipeline."""
    import logging
    import warnings

    # bitsandbytes looks for an optional hub kernel on AVX512-BF16 CPUs and warns when offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft saving an adapter offline cannot fetch the base config to see whether the vocabulary
    # was resized; this pipeline never resizes it, so the adapter is complete either way.
    warnings.filterwarnings("ignore", message="Could not find a config file in .*",
                            category=UserWarning)


quiet_library_noise()


def load_tokenizer(name_or_path: str):
    """Load the tokenizer; give it a pad token distinct from EOS when the vocabulary has one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of {name_or_path!r}: "
                         f"{str(exc).splitlines()[0]} (gated meta-llama models need "
                         f"`huggingface-cli login`)") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # labels never mask by pad id, so EOS stays
    return tokenizer


def copy_sentencepiece_model(source: str, out: Path) -> bool:
    """Copy ``tokenizer.model`` (SentencePiece) of a model directory or hub id into ``out`` where
    there is one: tokenizers saved by transformers leave it out, and llama.cpp's converter reads
    Llama 2's token scores from it. Fetched from the hub (or its cache when offline)."""
    import shutil

    from transformers.utils import cached_file

    path = cached_file(resolve_model_path(source), "tokenizer.model",
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None or (Path(out) / "tokenizer.model").exists():
        return False
    shutil.copyfile(path, Path(out) / "tokenizer.model")
    return True


def quantization_config(quantization: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(name_or_path: str, *, dtype: Any = "auto", quantization: str = "none",
                    device_map: Any = None, attn_implementation: str = "sdpa"):
    """Load a causal LM for training or inference through one path.

    ``dtype`` is a name (``choose_dtype``) or a torch dtype. ``device_map`` is transformers':
    None loads a full-precision model onto the CPU, for the caller to place (training moves it
    to its device, or leaves it to FSDP/ZeRO-3 to shard); "auto" spreads it over the GPUs (and
    the CPU) when CUDA is present, and is the CPU otherwise. A quantized model is loaded where
    it computes: the current GPU (or "auto"), else the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype)
    quant = quantization_config(quantization, torch_dtype)
    cuda = torch.cuda.is_available()
    if device_map == "auto" and not cuda:
        device_map = None
    if quant is not None and device_map is None:
        device_map = {"": torch.cuda.current_device()} if cuda else {"": "cpu"}
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, quantization_config=quant, device_map=device_map,
            attn_implementation=attn_implementation)
    except OSError as exc:
        raise UsageError(f"cannot load base model {name_or_path!r}: {str(exc).splitlines()[0]} "
                         f"(gated meta-llama models need `huggingface-cli login`)") from None
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. A 4-bit weight packs two parameters into each byte of
    its storage dtype (uint8, or the compute dtype with ``bnb_4bit_quant_storage``), so it holds
    ``numel * element_size * 2`` of them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    prompt_format: Any
    base_model: str
    adapter_dir: Path | None


def load_for_inference(adapter_dir: str | os.PathLike | None = None, *,
                       base_model: str | None = None, quantization: str = "none",
                       dtype: str = "auto", device_map: Any = "auto") -> LoadedModel:
    """Base + adapter (or the base alone), with the prompt format the adapter was trained with.

    ``device_map`` as ``load_base_model`` takes it: by default the model is spread over the GPUs
    when there are any (so a model larger than one GPU still loads), else on the CPU."""
    from peft import PeftModel

    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None:
        if not adapter.is_dir():
            raise UsageError(f"adapter path {adapter} does not exist or is not a directory")
        base = base_model or recorded_base_model(adapter)
        check_adapter_dir(adapter, base)
        tokenizer = load_tokenizer(str(adapter))
        fmt = PromptFormat.load(adapter)
    else:
        if not base_model:
            raise UsageError("give --adapter-path or --base-model")
        base = base_model
        tokenizer = load_tokenizer(base)
        fmt = PromptFormat.for_tokenizer(tokenizer)
    model = load_base_model(base, dtype=dtype, quantization=quantization, device_map=device_map)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return LoadedModel(model, tokenizer, fmt, base, adapter)
