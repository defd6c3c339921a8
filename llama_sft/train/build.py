"""Assembling a training run: accelerator, tokenizer, model and adapter, data, then the Trainer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from llama_sft.cli import log
from llama_sft.config.settings import RunConfig
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.model.kernels.memory import retain_freed_memory
from llama_sft.model.kernels.packed_attention import packed_attention
from llama_sft.model.kernels.selection import kernels_for
from llama_sft.model.loading import count_parameters, load_base_model, load_tokenizer
from llama_sft.model.lora import attach_lora
from llama_sft.train.callbacks import TrainerCallback
from llama_sft.train.distributed import (_not_deepspeed_cpu_notice, check_distributed_setup,
                                         make_accelerator)
from llama_sft.train.examples import prepare_data
from llama_sft.train.precision import allow_tf32, choose_precision
from llama_sft.train.trainer import Trainer


def build_trainer(cfg: RunConfig, output_dir: Path, *, train_records, eval_records,
                  sample_records, inputs: dict[str, Any] | None = None,
                  report_to: tuple[str, ...] = (), wandb_project: str = "llama-sft",
                  stage: str = "train", progress: bool = True,
                  callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Load tokenizer and model (``llama_sft.model``), tokenize, and return a ready Trainer."""
    from transformers import set_seed

    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)
    accelerator = make_accelerator(cfg)
    check_distributed_setup(accelerator)   # before loading anything
    device_type = accelerator.device.type
    sharded = accelerator.distributed_type in ("FSDP", "DEEPSPEED")
    kernels = kernels_for(cfg.model.kernels, device_type, sharded)
    precision = choose_precision(cfg.model.dtype, cfg.model.method, device_type)
    if device_type == "cuda":
        allow_tf32()
    if "retain_memory" in kernels:
        retain_freed_memory()
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    data = prepare_data(cfg, tokenizer, fmt, train_records, eval_records, sample_records)
    quantized = cfg.model.quantization != "none"
    model = load_base_model(cfg.base_model, dtype=precision.weights,
                            quantization=cfg.model.quantization,
                            device_map=base_device_map(accelerator, quantized),
                            attn_implementation=packed_attention() if cfg.data.packing
                            and "packed_attention" in kernels else "sdpa")
    if cfg.model.method == "full":
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = attach_lora(model, cfg.lora, quantized=quantized,
                            gradient_checkpointing=cfg.model.gradient_checkpointing,
                            kernels=kernels)
    if not (quantized or sharded):
        model = model.to(accelerator.device)   # FSDP and ZeRO-3 place their own shards
    trainable, total = count_parameters(model)
    if accelerator.distributed_type == "DEEPSPEED":    # zero.Init left each base weight empty
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if accelerator.is_main_process:
        log(f"model {cfg.base_model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
            f"trainable ({cfg.model.method}, {cfg.model.quantization}, {model.dtype})")
    return Trainer(cfg, output_dir, data, model=model, tokenizer=tokenizer, fmt=fmt,
                   accelerator=accelerator, inputs=inputs, report_to=report_to,
                   wandb_project=wandb_project, stage=stage, progress=progress,
                   callbacks=callbacks, precision=precision)


def base_device_map(accelerator, quantized: bool):
    """Where the base model loads: a quantized one on this process's device; under FSDP with
    cpu_ram_efficient_loading, on the meta device in every process but the main one (which
    broadcasts the weights as FSDP shards them), so no other process holds the whole model;
    else on the CPU, to be moved or sharded."""
    if quantized:
        return {"": accelerator.device}
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if (accelerator.distributed_type == "FSDP" and plugin is not None
            and plugin.cpu_ram_efficient_loading and not accelerator.is_main_process):
        return {"": "meta"}
    return None


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


OOM_ADVICE = ("out of memory: lower --batch-size (raise --gradient-accumulation-steps to keep the "
              "global batch), add --use-4bit, lower --max-length, or enable "
              "--gradient-checkpointing")
