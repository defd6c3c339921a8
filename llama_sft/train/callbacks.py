"""Callbacks: what the training loop tells the outside world, and the loggers built on them.

The trainer calls every callback on every process: ``on_train_begin`` (after a resume, if any),
``on_step_end`` after each optimizer step that updated the weights, ``on_evaluate`` after each
evaluation, ``on_checkpoint`` after a checkpoint is complete, and ``on_train_end`` when the run
ends (finished, or stopped by a signal with its checkpoint written). A metrics row is a flat dict
with ``step`` and ``time``; the loggers below write the main process's rows (metrics.jsonl,
TensorBoard, W&B, MLflow).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class TrainerCallback:
    """Override the hooks you need; ``trainer`` is the running ``train.trainer.Trainer``."""

    def on_train_begin(self, trainer, resumed: bool) -> None:
        """Before the first step (``resumed``: the state came from a checkpoint)."""

    def on_step_end(self, trainer, row: dict[str, Any], stats: dict[str, Any]) -> None:
        """After an optimizer step: ``row`` as logged, ``stats`` as the step returned them
        (loss, grad_norm, tokens, supervised_tokens over all processes)."""

    def on_evaluate(self, trainer, row: dict[str, Any]) -> None:
        """After an evaluation: eval_loss, eval_perplexity, eval_examples and, on the main
        process, the generated ``samples``."""

    def on_checkpoint(self, trainer, path: Path) -> None:
        """After ``path`` (checkpoint-<step>/) was written completely."""

    def on_final_model(self, trainer, directory: Path) -> None:
        """While ``final_model/`` is written (``directory``: its staging folder, before the
        manifest): a file added here is listed in the manifest."""

    def on_train_end(self, trainer) -> None:
        """When the run ends, finished or interrupted."""


class RowRecorder(TrainerCallback):
    """Keeps every step and evaluation row in memory (the pilot's checks read them)."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def on_step_end(self, trainer, row, stats):
        self.rows.append(row)

    def on_evaluate(self, trainer, row):
        self.rows.append({k: v for k, v in row.items() if k != "samples"})


class MetricsFile(TrainerCallback):
    """``metrics.jsonl``: one JSON row per step and per evaluation (samples left out).

    A fresh run starts the file anew; a resumed run keeps the rows up to the checkpoint's step
    (a kill mid-append can leave a torn last line: it is dropped with the later rows).
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / METRICS_FILE

    def on_train_begin(self, trainer, resumed):
        if not resumed:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            step = trainer.state["step"]
            rows = [line for line in self.path.read_text().splitlines()
                    if (row := _json_row(line)) is not None and row["step"] <= step]
            self.path.write_text("".join(f"{r}\n" for r in rows))

    def on_step_end(self, trainer, row, stats):
        self.write(row)

    def on_evaluate(self, trainer, row):
        self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "samples"}) + "\n")


class _ScalarLogger(TrainerCallback):
    """A logger of each row's numbers (``step`` is the x axis, not a series)."""

    def on_step_end(self, trainer, row, stats):
        self.log(_scalars(row), row["step"])

    def on_evaluate(self, trainer, row):
        self.log(_scalars(row), row["step"])

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError


class TensorBoardLogger(_ScalarLogger):
    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, scalars, step):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def on_train_end(self, trainer):
        self.writer.close()


class WandbLogger(_ScalarLogger):
    """Weights & Biases; offline mode when no API key is configured (nothing leaves the machine)."""

    def __init__(self, output_dir: Path, project: str, config: dict[str, Any], job_type: str):
        import wandb

        if not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
            os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, dir=str(output_dir), config=config,
                              job_type=job_type, reinit="finish_previous")

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def on_train_end(self, trainer):
        self.run.finish()


class MlflowLogger(_ScalarLogger):
    """MLflow (``llama_sft.tracking``): the resolved config as params, each row's numbers as
    metrics at its step, and at the end ``final_model/`` and ``loss_curve.png`` as artifacts.

    The run is recorded in ``tracking.json`` in the output dir at the start and in
    ``final_model/`` (listed in its manifest) when that is written. A resumed run continues the
    recorded one and skips the steps it already holds (a resume replays them exactly)."""

    def __init__(self, output_dir: Path, config: dict[str, Any], stage: str):
        self.out, self.config, self.stage = Path(output_dir), config, stage
        self.run = None
        self.logged_through = -1

    def on_train_begin(self, trainer, resumed):
        from llama_sft.tracking import TrackedRun, read_record

        previous = read_record(self.out) if resumed else None
        self.run = TrackedRun.start(self.stage, self.config, previous)
        if previous is not None and previous["run_id"] == self.run.run_id:
            self.logged_through = self.run.last_step("loss")
        self.run.record(self.out)

    def log(self, scalars, step):
        if step > self.logged_through:
            timestamp = scalars.pop("time", None)    # the row's wall clock: the metric's own
            self.run.log_metrics(scalars, step, timestamp)

    def on_final_model(self, trainer, directory):
        self.run.record(directory, step=trainer.state["step"])

    def on_train_end(self, trainer):
        state = trainer.state
        finished = trainer.stop.signal is None and (state["step"] >= trainer.total_steps
                                                    or state["stopped_early"])
        final = self.out / "final_model"
        if finished and final.is_dir():
            self.run.log_artifact(final)
            if (self.out / "loss_curve.png").exists():
                self.run.log_artifact(self.out / "loss_curve.png")
        self.run.end("FINISHED" if finished else "KILLED")


def make_loggers(output_dir: Path, report_to: tuple[str, ...], *, wandb_project: str,
                 config: dict[str, Any], stage: str) -> list[TrainerCallback]:
    """metrics.jsonl always, then TensorBoard, W&B and MLflow as ``report_to`` names them."""
    loggers: list[TrainerCallback] = [MetricsFile(output_dir)]
    if "tensorboard" in report_to:
        loggers.append(TensorBoardLogger(output_dir))
    if "wandb" in report_to:
        loggers.append(WandbLogger(output_dir, wandb_project, config, stage))
    if "mlflow" in report_to:
        loggers.append(MlflowLogger(output_dir, config, stage))
    return loggers


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def _json_row(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """``loss_curve.png``: training loss per step and evaluation loss, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                train.append((row["step"], row["loss"]))
            if "eval_loss" in row:
                evals.append((row["step"], row["eval_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(fig)
