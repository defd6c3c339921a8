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
from llama_sft.model.loading import count_parameters, load_base_model, load_tokenizer
from llama_sft.model.lora import attach_lora
from llama_sft.train.callbacks import TrainerCallback
from llama_sft.train.distributed import (_not_deepspeed_cpu_notice, check_distributed_setup,
                                         make_accelerator)
from llama_sft.train.examples import prepare_data
from llama_sft.train.trainer import Trainer


def build_trainer(cfg: RunConfig, output_dir: Path, *, train_records, eval_records,
                  sample_records, inputs: dict[str, Any] | None = None,
                  report_to: tuple[str, ...] = (), wandb_project: str = "llama-sft",
                  stage: str = "train", progress: bool = True,
                  callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Load tokenizer and model (``llama_sft.model``), tokenize, and return a ready Trainer."""
    import torch
    from transformers import set_seed

    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)
    accelerator = make_accelerator(cfg)
    check_distributed_setup(accelerator)   # before loading anything
    kernels = cfg.model.kernels
    if accelerator.device.type == "cpu" and "retain_memory" in kernels:
        retain_freed_memory()
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    data = prepare_data(cfg, tokenizer, fmt, train_records, eval_records, sample_records)
    quantized = cfg.model.quantization != "none"
    device_map = {"": accelerator.device} if quantized else None
    model = load_base_model(cfg.base_model, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                            device_map=device_map,
                            attn_implementation=packed_attention() if cfg.data.packing
                            and "packed_attention" in kernels else "sdpa")
    if cfg.model.method == "full":
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if model.dtype != torch.float32:
            model = model.float()  # full fine-tuning keeps fp32 master weights
    else:
        model = attach_lora(model, cfg.lora, quantized=quantized,
                            gradient_checkpointing=cfg.model.gradient_checkpointing,
                            kernels=kernels)
    if not quantized:
        model = model.to(accelerator.device)
    trainable, total = count_parameters(model)
    if accelerator.distributed_type == "DEEPSPEED":    # zero.Init left each base weight empty
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if accelerator.is_main_process:
        log(f"model {cfg.base_model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
            f"trainable ({cfg.model.method}, {cfg.model.quantization}, {model.dtype})")
    return Trainer(cfg, output_dir, data, model=model, tokenizer=tokenizer, fmt=fmt,
                   accelerator=accelerator, inputs=inputs, report_to=report_to,
                   wandb_project=wandb_project, stage=stage, progress=progress,
                   callbacks=callbacks)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


OOM_ADVICE = ("out of memory: lower --batch-size (raise --gradient-accumulation-steps to keep the "
              "global batch), add --use-4bit, lower --max-length, or enable "
              "--gradient-checkpointing")
