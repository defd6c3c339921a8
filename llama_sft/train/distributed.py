"""Distributed set-up under ``accelerate launch``: DDP, FSDP2, DeepSpeed ZeRO-3, and moving
whole tensors in and out of sharded parameters."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from llama_sft.config.settings import RunConfig
from llama_sft.errors import UsageError


def check_distributed_setup(accelerator) -> None:
    """Refuse launches this loop cannot run correctly, before any work is done."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise UsageError("FSDP version 1 is not supported by this trainer; set fsdp_version: 2 "
                         "(configs/accelerate/fsdp.yaml)")
    if kind not in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"):
        raise UsageError(f"distributed type {kind} is not supported by this trainer; use "
                         f"configs/accelerate/ddp.yaml, fsdp.yaml, fsdp_qlora.yaml or "
                         f"deepspeed_zero3.yaml (see docs/distributed.md)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise UsageError(f"launched as {launched} processes, but accelerate started no distributed "
                         f"backend, so each would train alone into the same --output-dir. Without "
                         f"GPUs set ACCELERATE_USE_CPU=1 (gloo); see docs/distributed.md")


def make_accelerator(cfg: RunConfig):
    """The Accelerator for this run. Under ``accelerate launch`` with a DeepSpeed config, the
    engine's accumulation steps, clipping and micro-batch come from the run config (the yaml
    leaves them out), and on a machine without CUDA DeepSpeed joins a gloo group."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return Accelerator()
    # DeepSpeed's collectives call torch names deprecated in torch 2.13: one warning per call
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    problems = deepspeed_env_problems(cfg, os.environ)
    if problems:   # before the plugin: its explicit values would override these silently
        raise UsageError("DeepSpeed config does not fit this run: " + "; ".join(problems))
    plugin = DeepSpeedPlugin(gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
                             gradient_clipping=cfg.optim.max_grad_norm)
    # accelerate picks no backend without CUDA unless told (ACCELERATE_USE_CPU turns DeepSpeed off)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers,
                              gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.optim.batch_size   # no DataLoader to read
    problems = deepspeed_config_problems(cfg, ds_config)
    if problems:   # a deepspeed_config_file's own numbers win over the plugin's
        raise UsageError("DeepSpeed config does not fit this run: " + "; ".join(problems))
    return accelerator


def deepspeed_env_problems(cfg: RunConfig, env) -> list[str]:
    """What ``accelerate launch`` passed from the yaml that contradicts the run config."""
    problems = []
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if gas != "auto" and int(gas) != cfg.optim.gradient_accumulation_steps:
        problems.append(f"gradient_accumulation_steps: {gas} in the accelerate config/flags, "
                        f"{cfg.optim.gradient_accumulation_steps} in the run config (remove it "
                        f"from the yaml: the trainer sets it)")
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clip != "auto" and float(clip) != cfg.optim.max_grad_norm:
        problems.append(f"gradient_clipping: {clip} in the accelerate config/flags, max_grad_norm "
                        f"{cfg.optim.max_grad_norm} in the run config (remove it from the yaml: "
                        f"the trainer sets it)")
    return problems


def deepspeed_config_problems(cfg: RunConfig, ds_config: dict[str, Any]) -> list[str]:
    """What the resolved DeepSpeed config has that this loop cannot run as configured."""
    problems = []
    stage = ds_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        problems.append(f"zero_stage {stage}: only ZeRO stage 3 is supported "
                        f"(configs/accelerate/deepspeed_zero3.yaml)")
    if cfg.model.quantization != "none":
        problems.append(f"{cfg.model.quantization} quantization: ZeRO-3 cannot partition "
                        f"bitsandbytes weights; use configs/accelerate/fsdp_qlora.yaml")
    for key, want in (("gradient_accumulation_steps", cfg.optim.gradient_accumulation_steps),
                      ("gradient_clipping", cfg.optim.max_grad_norm)):
        if ds_config.get(key, "auto") not in ("auto", want):
            problems.append(f"{key}: {ds_config[key]} in the DeepSpeed config, {want} in the run "
                            f"config (set it to \"auto\")")
    for key in ("optimizer", "scheduler"):
        if key in ds_config:
            problems.append(f"the DeepSpeed config sets its {key}; the trainer brings its own "
                            f"(AdamW with a {cfg.optim.lr_scheduler} schedule): remove it")
    return problems


def _not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """With deepspeed installed, accelerate imports it in every run, and on a machine without
    a GPU its probe warns "Setting accelerator to CPU ...": keep that line out of the logs."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def describe_distribution(accelerator, model) -> str:
    """One line: engine, processes, how many parameter tensors are sharded (FSDP2 DTensors or
    ZeRO-3 partitions)."""
    from torch.distributed.tensor import DTensor

    params = list(accelerator.unwrap_model(model).parameters())
    sharded = sum(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in params)
    kind = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
    return (f"distributed: {kind} over {accelerator.num_processes} processes "
            f"({accelerator.state.backend}); {sharded}/{len(params)} parameter tensors sharded")


def full_tensor(tensor):
    """``tensor`` itself, or for an FSDP2 shard (DTensor) the gathered whole; under FSDP this is
    a collective, so every rank must call it in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_param(param):
    """A trainable parameter's whole value: gathered from FSDP2 shards, or under ZeRO-3 the fp32
    master copy gathered from the optimizer's partitions (a collective either way)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return full_tensor(param.detach())


def shard_like(tensor, param):
    """A full tensor as ``param`` holds it: this rank's shard when ``param`` is an FSDP2 DTensor
    (every rank has the full tensor, so nothing is communicated)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def load_into_params(params: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Copy full tensors (from a checkpoint) into parameters, sharded or not."""
    import torch

    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UsageError(f"saved weights name parameters this model lacks: {', '.join(unknown[:3])}")
    if any(hasattr(p, "ds_id") for p in params.values()):
        _load_into_zero3_params(params, tensors)
        return
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(shard_like(tensor.to(params[name].dtype), params[name]))


def _load_into_zero3_params(params: dict[str, Any], tensors: dict[str, Any]) -> None:
    """ZeRO-3 keeps each trainable parameter twice, partitioned: the module's copy used by the
    forward, and the optimizer's fp32 master copy. Set both (collectives: every rank)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    targets = [params[name] for name in tensors]
    with torch.no_grad(), deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
        for name, tensor in tensors.items():
            params[name].data.copy_(tensor.to(params[name].dtype))
    for name, tensor in tensors.items():
        safe_set_full_fp32_param(params[name], tensor.float())
