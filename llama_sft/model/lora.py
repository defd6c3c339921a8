"""A fresh LoRA adapter on a loaded base model, with the training kernels the run asks for."""
from __future__ import annotations

from typing import Sequence

from llama_sft.config.settings import KERNELS, LoraSettings
from llama_sft.model.kernels.dropout import swap_lora_dropout
from llama_sft.model.kernels.fused_lora import fuse_lora_linears, group_lora_siblings
from llama_sft.model.kernels.rms_norm import fast_rms_norms


def attach_lora(model, lora: LoraSettings, *, quantized: bool, gradient_checkpointing: bool,
                kernels: Sequence[str] = KERNELS):
    """Wrap ``model`` with a fresh LoRA adapter, then switch in the ``kernels`` named (any of
    mask_dropout, fused_lora, lora_siblings, rms_norm; lora_siblings needs fused_lora). Adapter
    weights, names and saving are peft's either way."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=list(lora.lora_target_modules), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if "mask_dropout" in kernels:
        swap_lora_dropout(model)
    if "fused_lora" in kernels:
        fuse_lora_linears(model)
    if "lora_siblings" in kernels:
        group_lora_siblings(model)
    if "rms_norm" in kernels:
        fast_rms_norms(model)
    return model
