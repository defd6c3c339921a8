"""How a training run computes: the dtype of the base weights, autocast, and fp16 loss scaling.

On CUDA the forward runs under autocast in bf16 (fp16 on GPUs without native bf16, with a
GradScaler), as TRL and transformers' Trainer do with ``bf16=True``: the residual stream, the
attention, the LoRA matmuls and the LM head then compute in 16 bits even where
``prepare_model_for_kbit_training`` or full fine-tuning keep fp32 weights. On the CPU the base
weights are bf16 and nothing is autocast (what the CPU kernels were measured with), unless fp16
is asked for. TF32 is allowed for the matmuls that stay in fp32 on CUDA.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from llama_sft.config.hardware import choose_dtype


@dataclass(frozen=True)
class Precision:
    weights: Any              # torch dtype the base weights are loaded in
    autocast: Any | None      # torch dtype the forward runs in under autocast; None: no autocast
    loss_scaling: bool        # fp16: the loss is scaled and the gradients unscaled before clipping
    device_type: str          # "cuda" or "cpu"

    def autocast_context(self):
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast)


def choose_precision(dtype: str, method: str, device_type: str) -> Precision:
    """The precision of a run of ``method`` asking for ``dtype`` (auto | bfloat16 | float16 |
    float32) on ``device_type``. Full fine-tuning keeps fp32 master weights."""
    import torch

    compute = choose_dtype(dtype)
    full = method == "full"
    if compute == torch.float16:
        return Precision(torch.float32 if full else torch.float16, torch.float16, True,
                         device_type)
    if compute == torch.float32:
        return Precision(torch.float32, None, False, device_type)
    if device_type == "cpu":
        return Precision(torch.float32 if full else compute, None, False, device_type)
    return Precision(torch.float32 if full else compute, compute, False, device_type)


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA may use TF32 tensor cores."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
