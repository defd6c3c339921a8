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


def estimate_training_memory_gb(preset: Preset, *, quantization: str, method: str, lora_r: int,
                                lora_targets: tuple[str, ...], batch_size: int, max_length: int,
                                gradient_checkpointing: bool) -> float:
    """First-order peak memory of fine-tuning on one device, in GB (10^9 bytes).

    weights: 2 bytes/param (bf16), 0.55 (nf4 + double-quant constants) or 1.05 (int8);
    trainable state: 16 bytes per trainable param (fp32 weight, grad, two Adam moments);
    activations (bf16, SDPA, Korthikanti et al. 2022): 34·h bytes per token per layer, or
    2·h per layer plus one layer's 34·h when checkpointing; logits: 8·vocab bytes per token
    (fp32 logits and their gradient); plus 0.5 GB for the CUDA context and allocator slack.
    """
    bytes_per_param = {"none": 2.0, "8bit": 1.05, "4bit": 0.55}[quantization]
    trainable = preset.params if method == "full" else \
        lora_parameter_count(preset, lora_r, lora_targets)
    tokens = batch_size * max_length
    h, layers = preset.hidden_size, preset.num_layers
    per_token = (2 * h * layers + 34 * h) if gradient_checkpointing else 34 * h * layers
    activations = tokens * (per_token + 8 * preset.vocab_size)
    return (preset.params * bytes_per_param + trainable * 16 + activations) / 1e9 + 0.5


def detect_hardware() -> dict[str, Any]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name,
                         "memory_gb": round(props.total_memory / 1e9, 1),
                         "compute_capability": f"{props.major}.{props.minor}"})
    bf16 = bool(gpus) and torch.cuda.is_bf16_supported()
    return {"cuda": bool(gpus), "gpus": gpus, "bf16": bf16 if gpus else True,
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
