"""The training loop shared by llama_train.py and llama_pilot.py.

One loop for LoRA, QLoRA (4-bit), 8-bit and full fine-tuning, on one device or under
``accelerate launch`` (DDP / FSDP2 / DeepSpeed ZeRO-3). What it promises:

- loss on response tokens only, normalised by the number of supervised tokens in the whole
  optimizer step (all micro-batches, all ranks), so packing, padding and world size agree;
- checkpoints written atomically and complete, resumed exactly (``train.checkpoint``);
- the data order is a function of (seed, epoch), so a resumed run sees the same batches;
- NaN/inf steps are skipped and counted; too many abort the run without saving;
- SIGTERM / Ctrl-C finish the current step, write a complete checkpoint and exit 130;
- callbacks hear of every step, evaluation and checkpoint (``train.callbacks``): the loggers
  (``metrics.jsonl``, TensorBoard, W&B), the pilot's checks and the benchmarks use them;
- ``final_model/`` holds the best evaluation's weights (``train.final_model``).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Sequence

from llama_sft.cli import log
from llama_sft.config.settings import RunConfig
from llama_sft.data.collate import collate, to_device
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import Encoded
from llama_sft.errors import EXIT_GATE, EXIT_INTERRUPTED, PipelineError, UsageError
from llama_sft.train.callbacks import TrainerCallback, make_loggers
from llama_sft.train.checkpoint import (BEST_WEIGHTS, list_checkpoints, load_checkpoint, save_best,
                                        save_checkpoint)
from llama_sft.train.distributed import check_distributed_setup, describe_distribution, full_param
from llama_sft.train.evaluation import evaluate
from llama_sft.train.examples import TrainData
from llama_sft.train.final_model import TrainResult, finish
from llama_sft.train.loss import supervised_loss
from llama_sft.train.optim import clip_grad_norm, lr_lambda
from llama_sft.train.precision import Precision
from llama_sft.train.signals import GracefulStop


class TrainingDiverged(PipelineError):
    exit_code = EXIT_GATE


class Interrupted(PipelineError):
    exit_code = EXIT_INTERRUPTED


class Trainer:
    """Runs one training job into ``output_dir``."""

    def __init__(self, cfg: RunConfig, output_dir: Path, data: TrainData, *, model, tokenizer,
                 fmt: PromptFormat, accelerator, inputs: dict[str, Any] | None = None,
                 report_to: tuple[str, ...] = (), wandb_project: str = "llama-sft",
                 stage: str = "train", progress: bool = True,
                 callbacks: Sequence[TrainerCallback] = (), precision: Precision | None = None):
        import torch

        self.cfg, self.out, self.data = cfg, Path(output_dir), data
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.acc = accelerator
        self.inputs = inputs or {}
        self.report_to, self.wandb_project, self.stage = report_to, wandb_project, stage
        self.progress = progress
        self.callbacks = list(callbacks)
        self.precision = precision or Precision(model.dtype, None, False, accelerator.device.type)
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise UsageError("the model has no trainable parameters")
        # ZeRO-3's engine owns accumulation, clipping and the optimizer step (train_step)
        self.deepspeed = accelerator.distributed_type == "DEEPSPEED"
        # FSDP2 (DTensor) or ZeRO-3 (partitioned) parameters: every forward and every gather
        # of a whole parameter is a collective that all ranks join
        self.sharded = accelerator.distributed_type == "FSDP" or self.deepspeed
        self.micro_per_epoch = math.ceil(len(data.train) / (cfg.optim.batch_size * self.world))
        self.steps_per_epoch = max(1, self.micro_per_epoch // cfg.optim.gradient_accumulation_steps)
        self.total_steps = cfg.optim.max_steps or self.steps_per_epoch * cfg.optim.num_epochs
        check_distributed_setup(accelerator)
        optimizer = self._adamw()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                           lr_lambda(cfg, self.total_steps))
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        # FSDP2 swaps each parameter for a sharded DTensor, ZeRO-3 empties it and keeps this
        # rank's partition aside: same names, same order.
        self.trainable = [(n, p) for n, p in accelerator.unwrap_model(self.model).named_parameters()
                          if p.requires_grad]
        if accelerator.distributed_type == "FSDP":
            # accelerate pairs old and sharded parameters by storage address, which parameters
            # on the meta device (every process but the main one, see train.build) do not have:
            # give the optimizer the sharded parameters by name (it holds no state yet)
            optimizer.param_groups[0]["params"] = [p for _, p in self.trainable]
        if self.is_main and self.world > 1:
            log(describe_distribution(accelerator, self.model))
        self.state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "bad_steps": 0,
                      "best_eval_loss": None, "best_step": None, "first_eval_loss": None,
                      "evals_without_improvement": 0, "tokens_seen": 0, "stopped_early": False}
        self.stop = GracefulStop()
        # fp16: accelerate's scaler when `accelerate launch --mixed_precision fp16` made one (its
        # backward then scales the loss), else ours; DeepSpeed scales inside its engine
        self.own_scaler = self.precision.loss_scaling and accelerator.scaler is None \
            and not self.deepspeed
        self.scaler = torch.amp.GradScaler(self.precision.device_type) if self.own_scaler \
            else accelerator.scaler

    def _adamw(self):
        """AdamW over the trainable parameters: torch's fused kernel (every parameter in one
        call) unless they are sharded."""
        import torch

        return torch.optim.AdamW([p for _, p in self.trainable], lr=self.cfg.optim.learning_rate,
                                 weight_decay=self.cfg.optim.weight_decay,
                                 fused=None if self.sharded else True)

    # -- data order ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of training examples for ``epoch``: a function of (seed, epoch)."""
        import torch

        gen = torch.Generator().manual_seed(self.cfg.optim.seed * 1000 + epoch)
        return torch.randperm(len(self.data.train), generator=gen).tolist()

    def micro_batches(self):
        """Yield (epoch, micro_index, local examples) from the saved position onwards."""
        bs = self.cfg.optim.batch_size
        epoch, start = self.state["epoch"], self.state["micro_in_epoch"]
        while True:
            order = self.epoch_order(epoch)
            usable = self.steps_per_epoch * self.cfg.optim.gradient_accumulation_steps
            for m in range(start, usable):
                global_idx = order[m * bs * self.world:(m + 1) * bs * self.world]
                local = global_idx[self.rank * bs:(self.rank + 1) * bs] or global_idx[:bs]
                yield epoch, m, [self.data.train[i] for i in local]
            epoch, start = epoch + 1, 0

    # -- one optimizer step ----------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, Any], num_items):
        with self.precision.autocast_context():
            return supervised_loss(self.model, batch, num_items)

    def train_step(self, micro: list[list[Encoded]]) -> dict[str, float]:
        import torch

        pad_id = self.tokenizer.pad_token_id
        device = self.acc.device
        counts = torch.tensor([float(sum(e.num_supervised for mb in micro for e in mb)),
                               float(sum(len(e) for mb in micro for e in mb))], device=device)
        if self.world > 1:
            counts = self.acc.reduce(counts, reduction="sum")
        items, tokens = counts[0], int(counts[1])       # over all ranks
        total_loss = torch.zeros((), device=device)
        self.model.train()
        for i, mb in enumerate(micro):
            batch = to_device(collate(mb, pad_id, self.cfg.data.packing), device)
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync or self.world == 1 else self.acc.no_sync(self.model)
            with ctx:
                # DDP and ZeRO average gradients over ranks, so scale the per-rank share back up.
                loss = self.forward_loss(batch, items) * self.world
                self.backward(loss, last_micro_batch=sync)
            total_loss += loss.detach() / self.world
        if self.world > 1:
            total_loss = self.acc.reduce(total_loss, reduction="sum")
        if self.deepspeed:
            grad_norm = self.engine_step()
        else:
            if self.scaler is not None:     # clipping and the norm see the true gradients
                self.scaler.unscale_(self.optimizer.optimizer)
            grad_norm = clip_grad_norm([p for _, p in self.trainable], self.cfg.optim.max_grad_norm)
        loss_value, norm_value = float(total_loss), float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer.optimizer)
            else:
                self.optimizer.step()       # a no-op under DeepSpeed: engine_step() did it
            self.scheduler.step()
        if self.scaler is not None:         # after an overflow the scale backs off
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: a finite loss with infinite gradients is the loss scale overflowing, not divergence
        overflow = self.scaler is not None and math.isfinite(loss_value) and not finite
        return {"loss": loss_value, "grad_norm": norm_value, "finite": finite, "tokens": tokens,
                "supervised_tokens": float(items), "overflow": overflow}

    def backward(self, loss, *, last_micro_batch: bool) -> None:
        if not self.deepspeed:
            self.acc.backward(self.scaler.scale(loss) if self.own_scaler else loss)
            return
        # accelerate's backward would also step the engine after every micro-batch: drive the
        # engine directly. The loss is already this micro-batch's share of the whole step.
        self.model.set_gradient_accumulation_boundary(last_micro_batch)
        self.model.backward(loss, scale_wrt_gas=False)

    def engine_step(self):
        """DeepSpeed: clip to gradient_clipping (= max_grad_norm), step the partitioned optimizer
        and zero the gradients; the engine skips the update itself when the norm is not finite.
        Returns the norm before clipping, as clip_grad_norm does."""
        self.model.step()
        return self.model.get_global_grad_norm()

    def trainable_state(self) -> dict[str, Any]:
        """Full (gathered) trainable weights on CPU. Sharded, a collective: call on every rank."""
        return {n: full_param(p).to("cpu").contiguous().clone() for n, p in self.trainable}

    # -- the loop --------------------------------------------------------------------------------
    def emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def run(self, resume: Path | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            load_checkpoint(self, resume)
        elif self.is_main:
            (self.out / BEST_WEIGHTS).unlink(missing_ok=True)
        if self.is_main:
            self.callbacks[:0] = make_loggers(self.out, self.report_to,
                                              wandb_project=self.wandb_project,
                                              config=cfg.to_dict(), stage=self.stage)
        self.emit("on_train_begin", resume is not None)
        accum = cfg.optim.gradient_accumulation_steps
        if self.is_main:
            log(f"training: {len(self.data.train)} examples, {self.total_steps} optimizer steps, "
                f"global batch {cfg.optim.batch_size} (per device) x {accum} (accumulation) x "
                f"{self.world} (processes) = {cfg.optim.batch_size * accum * self.world} examples")
        if self.state["step"] == 0 and self.data.eval:
            self.run_eval()
        batches = self.micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=self.stage,
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        with self.stop.installed():
            while self.state["step"] < self.total_steps and not self.state["stopped_early"]:
                if self.one_step(batches, bar):
                    self.after_step(bar)
        bar.close()
        result = finish(self)
        self.emit("on_train_end")
        self.acc.wait_for_everyone()
        return result

    def one_step(self, batches, bar) -> bool:
        """One optimizer step; False when it was skipped (non-finite loss or gradients)."""
        cfg = self.cfg
        accum = cfg.optim.gradient_accumulation_steps
        t0 = time.perf_counter()
        micro = []
        for _ in range(accum):
            epoch, m, examples = next(batches)
            micro.append(examples)
        stats = self.train_step(micro)
        dt = time.perf_counter() - t0
        self.state["epoch"], self.state["micro_in_epoch"] = epoch, m + 1
        if self.state["micro_in_epoch"] >= self.steps_per_epoch * accum:
            self.state["epoch"], self.state["micro_in_epoch"] = epoch + 1, 0
        if stats["overflow"]:
            log(f"step {self.state['step'] + 1}: fp16 gradients overflowed, step skipped; loss "
                f"scale now {self.scaler.get_scale():g}")
            return False
        if not stats["finite"]:
            self.skip_step()
            return False
        self.state["step"] += 1
        self.state["tokens_seen"] += stats["tokens"]
        step = self.state["step"]
        row = {"time": round(time.time(), 3), "step": step,
               "epoch": round(step / self.steps_per_epoch, 4), "loss": stats["loss"],
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": stats["grad_norm"],
               "tokens_per_s": stats["tokens"] / dt, "step_time_s": dt, "memory_mb": _memory_mb(),
               "bad_steps": self.state["bad_steps"]}
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.get_scale()
        self.emit("on_step_end", row, stats)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        return True

    def skip_step(self) -> None:
        """Count a non-finite step; past max_bad_steps the run aborts without saving."""
        limit = self.cfg.optim.max_bad_steps
        self.state["bad_steps"] += 1
        log(f"step {self.state['step'] + 1}: non-finite loss/grad, step skipped "
            f"({self.state['bad_steps']}/{limit})")
        if self.state["bad_steps"] > limit:
            good = list_checkpoints(self.out)
            newest = f" (newest checkpoint: {good[-1].name})" if good else ""
            raise TrainingDiverged(
                f"training diverged: {self.state['bad_steps']} non-finite steps, over "
                f"max_bad_steps {limit}; nothing non-finite was saved{newest}. Lower "
                f"--learning-rate or check the data")

    def after_step(self, bar) -> None:
        """Evaluate and checkpoint when due; on a signal, checkpoint and stop."""
        step, cfg = self.state["step"], self.cfg
        if self.data.eval and (step % cfg.eval.eval_steps == 0 or step == self.total_steps):
            self.run_eval()
        if step % cfg.eval.save_steps == 0 and step < self.total_steps:
            self.emit("on_checkpoint", save_checkpoint(self))
        if self.stop.requested(self.acc):
            path = save_checkpoint(self)
            self.emit("on_checkpoint", path)
            bar.close()
            self.emit("on_train_end")
            raise Interrupted(f"stopped by {self.stop.signal or 'a signal to another process'}"
                              f"; checkpoint saved at {path}. Continue with --resume auto")

    def run_eval(self) -> None:
        result = evaluate(self)
        step = self.state["step"]
        loss = result["eval_loss"]
        if self.state["first_eval_loss"] is None:
            self.state["first_eval_loss"] = loss
        self.emit("on_evaluate", {"time": round(time.time(), 3), "step": step, **result})
        if self.is_main:
            log(f"step {step}: eval loss {loss:.4f} (perplexity {result['eval_perplexity']:.2f})")
            for s in result.get("samples", [])[:3]:
                log(f"  sample {s['id']}: {s['generation'][:120]!r}  (reference {s['reference'][:60]!r})")
        if step == 0:
            return
        best = self.state["best_eval_loss"]
        if best is None or loss < best:
            self.state.update(best_eval_loss=loss, best_step=step, evals_without_improvement=0)
            save_best(self)
        else:
            self.state["evals_without_improvement"] += 1
            patience = self.cfg.eval.early_stopping_patience
            if patience and self.state["evals_without_improvement"] >= patience:
                if self.is_main:
                    log(f"early stopping at step {step}: no eval improvement in {patience} "
                        f"evaluations (best {best:.4f} at step {self.state['best_step']})")
                self.state["stopped_early"] = True


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20
