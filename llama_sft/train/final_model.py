"""The end of a run: ``final_model/`` (the best evaluation's weights), the summary, the loss
plot and the output directory's manifest."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.data.tokenize import token_stats
from llama_sft.errors import StorageError
from llama_sft.files import atomic_output_dir, write_json, write_manifest
from llama_sft.train.callbacks import METRICS_FILE, plot_loss_curve
from llama_sft.train.checkpoint import BEST_WEIGHTS, restore_best


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path
    steps: int
    stopped_early: bool
    best_eval_loss: float | None
    first_eval_loss: float | None
    summary: dict[str, Any]


def finish(trainer) -> TrainResult:
    """Write final_model/ (the best evaluation's weights), the plot and the manifest."""
    restored = restore_best(trainer)
    state, cfg = trainer.state, trainer.cfg
    final = trainer.out / "final_model"
    summary = {"stage": trainer.stage, "steps": state["step"],
               "total_steps": trainer.total_steps, "stopped_early": state["stopped_early"],
               "weights_from_step": state["best_step"] if restored else state["step"],
               "first_eval_loss": state["first_eval_loss"],
               "best_eval_loss": state["best_eval_loss"],
               "bad_steps": state["bad_steps"], "tokens_seen": state["tokens_seen"],
               "train_examples": len(trainer.data.train), "eval_examples": len(trainer.data.eval),
               "dropped_examples": trainer.data.dropped, "world_size": trainer.world,
               "global_batch": cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps
               * trainer.world,
               "token_stats": token_stats(trainer.data.train)}
    weights = trainer.trainable_state() if trainer.sharded else None  # gathered on every rank
    if trainer.is_main:
        save_final_model(trainer, final, summary, weights)
        plot_loss_curve(trainer.out / METRICS_FILE, trainer.out / "loss_curve.png")
        write_json(trainer.out / "metrics_summary.json", summary)
        write_json(trainer.out / "training_config.json", cfg.to_dict())
        (trainer.out / BEST_WEIGHTS).unlink(missing_ok=True)
        write_manifest(trainer.out, stage=trainer.stage, inputs=trainer.inputs,
                       config=cfg.to_dict())
    return TrainResult(trainer.out, final, state["step"], state["stopped_early"],
                       state["best_eval_loss"], state["first_eval_loss"], summary)


def save_final_model(trainer, final: Path, summary: dict[str, Any],
                     state_dict: dict[str, Any] | None = None) -> None:
    """Write final_model/; ``state_dict`` holds the gathered weights when they are sharded."""
    model = trainer.acc.unwrap_model(trainer.model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    try:
        with atomic_output_dir(final) as tmp:
            if hasattr(model, "peft_config"):
                model.peft_config["default"].base_model_name_or_path = trainer.cfg.base_model
            model.save_pretrained(tmp, safe_serialization=True, **extra)
            trainer.tokenizer.save_pretrained(tmp)
            trainer.fmt.save(tmp)
            write_json(tmp / "training_config.json", trainer.cfg.to_dict())
            write_json(tmp / "metrics_summary.json", summary)
            for junk in ("training_args.bin", "README.md"):
                (tmp / junk).unlink(missing_ok=True)
            trainer.emit("on_final_model", tmp)
            write_manifest(tmp, stage=f"{trainer.stage}/final_model", inputs=trainer.inputs,
                           config=trainer.cfg.to_dict())
    except OSError as exc:
        why = "disk full" if exc.errno == errno.ENOSPC else str(exc)
        raise StorageError(f"could not write {final} ({why}); an earlier {final.name} and "
                           f"the checkpoints are intact. Free space, then continue with "
                           f"--resume auto") from None
