"""Hardware: memory estimates, what this machine has, and whether a run can go ahead here."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from llama_sft.config.presets import Preset, get_preset
from llama_sft.errors import UsageError


def lora_parameter_count(preset: Preset, r: int, targets: tuple[str, ...]) -> int:
    """Exact LoRA parameter count for a LLaMA architecture: r·(in+out) per targeted linear."""
    h, i = preset.hidden_size, preset.intermediate_size
    kv = preset.num_kv_heads * (h // preset.num_heads)
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return preset.num_layers * sum(r * sum(dims[t]) for t in targets if t in dims)


CUDA_CONTEXT_GB = 0.5      # CUDA context and allocator slack: memory max_memory_allocated omits


def estimate_training_memory(preset: Preset, *, quantization: str, method: str, lora_r: int,
                             lora_targets: tuple[str, ...], batch_size: int, max_length: int,
                             gradient_checkpointing: bool, world_size: int = 1) -> dict[str, float]:
    """First-order peak memory of fine-tuning on one device, in GB (10^9 bytes), by part.

    ``allocated_gb`` is what ``torch.cuda.max_memory_allocated`` measures; ``total_gb`` adds the
    CUDA context and allocator slack (compare it with a GPU's memory).
    - weights: the decoder's linear layers at 2 bytes/param (bf16), 0.55 (nf4 with double-quant
      constants) or 1.05 (int8); the embeddings and LM head (not quantized) at 2 bytes, or 4
      where k-bit training upcasts them to fp32;
    - dequantization: a 4-/8-bit linear dequantizes its weight to bf16 for each matmul, forward
      and backward: two copies of the largest one;
    - trainable state: 16 bytes per trainable param (fp32 weight, gradient, two Adam moments);
    - activations (bf16, SDPA; Korthikanti et al. 2022): 34·h bytes per token per layer, or 2·h
      per layer plus one layer's 34·h with checkpointing;
    - logits: 14·vocab bytes per token (bf16 logits, their fp32 copy, the fp32 log-softmax and
      its gradient);
    - FSDP over ``world_size`` devices shards bf16 weights and the trainable state; a 4-bit
      model is loaded whole on every device before it is sharded, so it counts whole.
    """
    h, layers, vocab = preset.hidden_size, preset.num_layers, preset.vocab_size
    outer = 2 * vocab * h                                   # embeddings + LM head
    quantized = quantization != "none"
    linear_bytes = {"none": 2.0, "8bit": 1.05, "4bit": 0.55}[quantization]
    weights = (preset.params - outer) * linear_bytes + outer * (4 if quantized else 2)
    if world_size > 1 and not quantized:
        weights /= world_size
    trainable = preset.params if method == "full" else \
        lora_parameter_count(preset, lora_r, lora_targets)
    tokens = batch_size * max_length
    per_token = (2 * h * layers + 34 * h) if gradient_checkpointing else 34 * h * layers
    parts = {"weights_gb": weights / 1e9,
             "dequantization_gb": 2 * 2 * h * preset.intermediate_size / 1e9 if quantized else 0.0,
             "trainable_state_gb": trainable * 16 / world_size / 1e9,
             "activations_gb": tokens * per_token / 1e9,
             "logits_gb": tokens * 14 * vocab / 1e9}
    allocated = sum(parts.values())
    return {**{k: round(v, 3) for k, v in parts.items()}, "allocated_gb": round(allocated, 3),
            "cuda_context_gb": CUDA_CONTEXT_GB, "total_gb": round(allocated + CUDA_CONTEXT_GB, 3)}


def cuda_bf16_native() -> bool:
    """Whether a CUDA GPU is present that computes bf16 natively (Ampere and newer).
    ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only emulated (T4,
    V100), which is slower than fp16 there."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def choose_dtype(requested: str = "auto"):
    """The torch dtype for ``requested``; auto: bf16 on CPU (several times faster than fp32 there)
    and on GPUs with native bf16, fp16 (with loss scaling in training) on older GPUs."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and not cuda_bf16_native():
        return torch.float16
    return torch.bfloat16


def detect_hardware() -> dict[str, Any]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name,
                         "memory_gb": round(props.total_memory / 1e9, 1),
                         "compute_capability": f"{props.major}.{props.minor}"})
    return {"cuda": bool(gpus), "gpus": gpus, "bf16": cuda_bf16_native() if gpus else True,
            "cpu_count": os.cpu_count()}


def environment_check(size: str, embedded_state: str | None = None
                      ) -> tuple[list[tuple[str, str, bool]], str | None]:
    """Rows of (item, value, ok) and, when the size cannot run here, a one-line reason.

    ``embedded_state`` is the embedded model's state (``model.embedded.embedded_model_status``)
    when the preset trains it.
    """
    import importlib.metadata as md

    preset = get_preset(size)
    rows = [("python", sys.version.split()[0], sys.version_info >= (3, 10))]
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                "wandb", "huggingface-hub", "jsonlines"):
        try:
            rows.append((pkg, md.version(pkg), True))
        except md.PackageNotFoundError:
            rows.append((pkg, "not installed", False))
    hw = detect_hardware()
    reason = None
    if hw["gpus"]:
        for gpu in hw["gpus"]:
            ok = gpu["memory_gb"] >= preset.min_gpu_memory_gb
            rows.append((f"gpu{gpu['index']}", f"{gpu['name']} {gpu['memory_gb']} GB "
                         f"(preset needs {preset.min_gpu_memory_gb} GB)", ok))
        total = sum(g["memory_gb"] for g in hw["gpus"])
        if max(g["memory_gb"] for g in hw["gpus"]) < preset.min_gpu_memory_gb and \
                total < preset.min_gpu_memory_gb * max(preset.num_gpus, 1):
            reason = (f"{size} needs a GPU with {preset.min_gpu_memory_gb} GB; the largest here has "
                      f"{max(g['memory_gb'] for g in hw['gpus'])} GB. Try a smaller --model-size.")
        rows.append(("bf16", "supported" if hw["bf16"] else "not supported (fp16 will be used)",
                     True))
    else:
        rows.append(("cuda", "not available (CPU only)", preset.min_gpu_memory_gb == 0))
        if preset.min_gpu_memory_gb > 0:
            reason = (f"{size} needs a CUDA GPU with {preset.min_gpu_memory_gb} GB; none found. "
                      f"Use --model-size 135m on CPU.")
    free_gb = shutil.disk_usage(Path.cwd()).free / 1e9
    rows.append(("free disk", f"{free_gb:.1f} GB", free_gb > 2))
    rows.append(("hf auth", _hf_auth_state(), True))
    if embedded_state is not None:
        rows.append(("embedded model", embedded_state, embedded_state.startswith("ready")))
        if not embedded_state.startswith("ready") and reason is None:
            reason = "the embedded model is not installed; run `make setup`"
    return rows, reason


def _hf_auth_state() -> str:
    """Whether a hub token is configured; never the token itself."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "configured (environment)"
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    if (hf_home / "token").exists():
        return "configured (token file)"
    return "not configured (needed only for gated meta-llama models)"


def check_runnable(cfg) -> None:
    """Refuse, before loading anything, a run this machine cannot do."""
    import importlib.util

    if cfg.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use-4bit/--use-8bit need bitsandbytes (pip install bitsandbytes)")
    preset = cfg.preset
    if cfg.base_model == preset.base_model and preset.min_gpu_memory_gb > 0:
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--model-size {preset.name} ({preset.base_model}) needs a CUDA GPU "
                             f"with {preset.min_gpu_memory_gb:g} GB; none found. On a CPU use "
                             f"--model-size 135m (the embedded model)")
