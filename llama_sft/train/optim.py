"""The optimizer side of a step: the learning-rate schedule, clipping, and AdamW state as named
tensors (no pickle) for checkpoints, under one process, FSDP2 or DeepSpeed ZeRO-3."""
from __future__ import annotations

import math
from typing import Any, Callable

from llama_sft.config.settings import RunConfig
from llama_sft.errors import UsageError
from llama_sft.train.distributed import full_tensor, shard_like

# AdamW param-group keys that choose an implementation; a resumed run keeps its own.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else \
        int(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.optim.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return factor


def clip_grad_norm(params: list, max_norm: float):
    """Clip to ``max_norm``; returns the global norm (all shards under FSDP) as a plain tensor."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _optimizer_state(optimizer, trainable) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW state as named tensors + JSON (no pickle)."""
    import torch

    state = optimizer.state_dict()
    index_to_name = {i: name for i, (name, _) in enumerate(trainable)}
    tensors, scalars = {}, {}
    for idx in sorted(state["state"]):            # one order on every rank: gathers pair up
        for key, value in sorted(state["state"][idx].items()):
            if isinstance(value, torch.Tensor):
                tensors[f"{index_to_name[idx]}::{key}"] = full_tensor(value.detach()).cpu().contiguous()
            else:
                scalars[f"{index_to_name[idx]}::{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _zero3_optimizer_state(optimizer, trainable) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same files as ``_optimizer_state`` from ZeRO-3's partitioned AdamW state, gathered
    per parameter (a collective). ``optimizer`` is accelerate's wrapper of DeepSpeed's."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adamw = optimizer.optimizer.optimizer          # the torch AdamW that ZeRO-3 steps
    partitions = list(adamw.state.values())        # keyed by flat partitions, not parameters
    tensors = {}
    for name, param in trainable if partitions else ():     # no state before the first update
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(param, key)
            tensors[f"{name}::{key}"] = full.cpu().reshape(param.ds_shape).contiguous()
        tensors[f"{name}::step"] = partitions[0]["step"].detach().cpu().clone()  # all equal
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": list(range(len(trainable)))} for g in adamw.param_groups]
    return tensors, {"param_groups": groups, "scalars": {}}


def _load_optimizer_state(optimizer, trainable, tensors, meta) -> None:
    name_to_index = {name: i for i, (name, _) in enumerate(trainable)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field_name = key.rsplit("::", 1)
        if name not in name_to_index:
            raise UsageError(f"checkpoint optimizer state names unknown parameter {name}")
        index = name_to_index[name]
        if field_name != "step" and hasattr(value, "shape"):
            value = shard_like(value, trainable[index][1])
        state.setdefault(index, {})[field_name] = value
    # How AdamW runs (fused kernel or loop) is this process's choice, not the checkpoint's.
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              | {k: current[k] for k in IMPLEMENTATION_FLAGS if k in current}
              for g, current in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_zero3_optimizer_state(optimizer, trainable, tensors, meta) -> None:
    """Rebuild ZeRO-3's partitioned AdamW state from a checkpoint's full tensors (a collective).
    ``optimizer`` is accelerate's wrapper of DeepSpeed's ZeRO-3 optimizer."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = optimizer.optimizer
    adamw = zero.optimizer
    for group, saved in zip(adamw.param_groups, meta["param_groups"]):   # lr of the last step
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                      if k != "params"})
    steps = [v for k, v in tensors.items() if k.endswith("::step")]
    if not steps:                # written before the first update: AdamW had no state yet
        return
    missing = [f"{n}::{key}" for n, _ in trainable for key in ("exp_avg", "exp_avg_sq", "step")
               if f"{n}::{key}" not in tensors]
    if missing or len({float(s) for s in steps}) != 1:
        raise UsageError(f"cannot resume under ZeRO-3: the optimizer state "
                         f"{'lacks ' + missing[0] if missing else 'has differing step counts'}")
    # AdamW creates its state at the first step; ZeRO-3 steps it on flat fp32 partitions
    for flat in zero.fp32_partitioned_groups_flat:
        adamw.state[flat] = {"step": steps[0].clone(), "exp_avg": flat.new_zeros(flat.shape),
                             "exp_avg_sq": flat.new_zeros(flat.shape)}
    for name, param in trainable:
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, tensors[f"{name}::{key}"].float(), key)
