"""The pilot's resource report: speed, memory against the estimate, projected full-run time,
and whether each preset fits this machine."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from llama_sft.config.hardware import detect_hardware, estimate_training_memory
from llama_sft.config.presets import PRESETS
from llama_sft.data.records import read_sft_jsonl
from llama_sft.data.tokenize import encode_records


def resource_report(cfg, rows, wall_s: float, full_tokens: int | None, peak_mb: float) -> dict:
    """Speed, peak memory beside its estimate (the same kind of figure: what torch allocated on
    CUDA, the process's RSS on the CPU), the projected full-run time and each preset's fit."""
    hw = detect_hardware()
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tps = statistics.median(speeds) if speeds else 0.0
    epochs = cfg.optim.num_epochs
    projected = (full_tokens * epochs / tps) if full_tokens and tps else None
    if cfg.preset.max_steps and full_tokens and speeds:
        tokens_per_step = statistics.fmean(r["tokens_per_s"] * r["step_time_s"] for r in rows
                                           if "tokens_per_s" in r)
        projected = min(projected, cfg.preset.max_steps * tokens_per_step / tps)
    estimate = estimate_training_memory(
        cfg.preset, quantization=cfg.model.quantization, method=cfg.model.method,
        lora_r=cfg.lora.lora_r, lora_targets=cfg.lora.lora_target_modules,
        batch_size=cfg.optim.batch_size, max_length=cfg.data.max_length,
        gradient_checkpointing=cfg.model.gradient_checkpointing)
    budget = max((g["memory_gb"] for g in hw["gpus"]), default=None)
    if budget is None:
        import psutil
        budget = round(psutil.virtual_memory().total / 1e9, 1)
    fits = {name: _fit(p, budget, cuda=hw["cuda"]) for name, p in PRESETS.items()}
    return {"tokens_per_s": round(tps, 1), "pilot_wall_s": round(wall_s, 1),
            "peak_memory_mb": round(peak_mb, 1),
            "memory_estimate_gb": estimate["allocated_gb"], "memory_estimate": estimate,
            "memory_kind": "cuda max_memory_allocated" if hw["cuda"] else "process RSS (CPU)",
            "projected_full_run_s": round(projected, 1) if projected else None,
            "full_run_tokens": full_tokens, "hardware": hw, "memory_budget_gb": budget,
            "preset_fit": fits}


def _fit(preset, budget_gb: float, cuda: bool = True) -> dict[str, Any]:
    """Whether a preset's defaults fit one device of ``budget_gb``; if not, the first variant
    that does, else what FSDP over the preset's GPU count needs per device. Without CUDA a
    preset made for GPUs does not fit, whatever the RAM."""
    def est(quant, bs, ckpt, world=1):
        return estimate_training_memory(
            preset, quantization=quant, method="lora", lora_r=preset.lora_r,
            lora_targets=preset.lora_target_modules, batch_size=bs, max_length=preset.max_length,
            gradient_checkpointing=ckpt, world_size=world)["total_gb"]

    base = est(preset.quantization, preset.batch_size, preset.gradient_checkpointing)
    if not cuda and preset.min_gpu_memory_gb > 0:
        return {"estimate_gb": round(base, 1), "fits": False,
                "suggestion": f"needs a CUDA GPU ({preset.recommended_gpu}); this machine has "
                              f"none. On a CPU use --model-size 135m"}
    result = {"estimate_gb": round(base, 1), "fits": base <= budget_gb}
    if result["fits"]:
        return result
    global_batch = preset.batch_size * preset.gradient_accumulation_steps
    for quant in dict.fromkeys((preset.quantization, "4bit")):
        for bs in (preset.batch_size, 2, 1):
            if bs <= preset.batch_size and est(quant, bs, True) <= budget_gb:
                result["suggestion"] = {"quantization": quant, "batch_size": bs,
                                        "gradient_accumulation_steps": max(1, global_batch // bs),
                                        "gradient_checkpointing": True,
                                        "estimate_gb": round(est(quant, bs, True), 1)}
                return result
    gpus = max(2, preset.num_gpus)
    per_device = est(preset.quantization, 1, True, gpus)
    result["suggestion"] = (f"needs more than {budget_gb} GB on one device even at 4-bit, batch "
                            f"1; FSDP over {gpus} GPUs ({preset.accelerate_config or 'fsdp.yaml'}) "
                            f"needs about {per_device:.1f} GB on each")
    return result


def _full_run_tokens(dataset: Path, tokenizer, fmt, cfg) -> int:
    """Tokens one epoch of the full train split takes (for the projected wall time)."""

    train = read_sft_jsonl(dataset, split="train")
    kept, _ = encode_records(tokenizer, fmt, train, cfg.data.max_length)
    return sum(len(e) for e in kept)
