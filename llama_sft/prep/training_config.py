"""The data-derived training settings the prep stage writes to ``training_config.json``."""
from __future__ import annotations

import math
from typing import Any

from llama_sft.prep.splits import length_summary

EVALS_PER_RUN = 5            # evaluations the derived eval_steps gives over a run
WARMUP_SHARE = 0.05          # share of the run the derived warmup_steps covers
LENGTH_MULTIPLE = 64         # the derived max_length is rounded up to a multiple of this


def derive_training_config(n_train: int, lengths: list[int], preset, max_length_cap: int
                           ) -> tuple[dict[str, int], dict[str, Any]]:
    """The data-derived RunConfig keys and how they were derived."""
    longest = max(lengths) if lengths else LENGTH_MULTIPLE
    max_length = min(max_length_cap, math.ceil(longest / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    world = max(1, preset.num_gpus)
    per_step = preset.batch_size * preset.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = preset.max_steps or steps_per_epoch * preset.num_epochs
    eval_steps = max(1, math.ceil(total / EVALS_PER_RUN))
    values = {"eval_steps": eval_steps, "max_length": max_length, "save_steps": eval_steps,
              "warmup_steps": max(1, math.ceil(total * WARMUP_SHARE))}
    derivation = {
        "preset": preset.name, "batch_size": preset.batch_size,
        "gradient_accumulation_steps": preset.gradient_accumulation_steps, "world_size": world,
        "examples_per_step": per_step, "train_examples": n_train,
        "steps_per_epoch": steps_per_epoch, "num_epochs": preset.num_epochs,
        "max_steps": preset.max_steps, "total_steps": total,
        "eval_steps_rule": f"ceil(total_steps / {EVALS_PER_RUN}); save_steps = eval_steps",
        "warmup_steps_rule": f"ceil(total_steps * {WARMUP_SHARE})",
        "max_length_rule": f"longest kept example ({longest} tokens) rounded up to a multiple of "
                           f"{LENGTH_MULTIPLE}, capped at --max-length {max_length_cap}, so the "
                           f"trainer truncates nothing",
        "length_percentiles": length_summary(lengths)}
    return values, derivation
