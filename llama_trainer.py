"""The training loop shared by llama_train.py and llama_pilot.py.

One loop for LoRA, QLoRA (4-bit), 8-bit and full fine-tuning, on one device or under
``accelerate launch`` (DDP / FSDP2 / DeepSpeed ZeRO-3). What it promises:

- loss on response tokens only, normalised by the number of supervised tokens in the whole
  optimizer step (all micro-batches, all ranks), so packing, padding and world size agree;
- checkpoints written to a temporary directory and renamed into place (a crash mid-write leaves
  the previous checkpoint as the newest complete one); weights, optimizer, scheduler and RNG state
  as safetensors + JSON, no pickle; resume refuses a checkpoint with missing state;
- the data order is a function of (seed, epoch), so a resumed run sees the same batches;
- NaN/inf steps are skipped and counted; too many abort the run without saving;
- SIGTERM / Ctrl-C finish the current step, write a complete checkpoint and exit 130;
- ``metrics.jsonl`` (one row per step and per evaluation), TensorBoard, optional W&B, and
  ``loss_curve.png`` at the end; ``final_model/`` holds the best evaluation's weights.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llama_config import RunConfig
from llama_dataset import Encoded, PromptFormat, collate, encode_records, token_stats
from llama_io import (EXIT_GATE, EXIT_INTERRUPTED, DataError, PipelineError, StorageError,
                      UsageError, now_iso, write_json, write_manifest)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# AdamW param-group keys that choose an implementation; a resumed run keeps its own.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.json",
                    "rng.safetensors", STATE_FILE)
# Settings that may change between a checkpoint and its resume without changing the result.
RESUME_MUTABLE = {"save_steps", "save_total_limit", "eval_steps", "early_stopping_patience",
                  "num_eval_samples", "max_eval_examples", "max_new_tokens", "max_bad_steps"}


class TrainingDiverged(PipelineError):
    exit_code = EXIT_GATE


class Interrupted(PipelineError):
    exit_code = EXIT_INTERRUPTED


@dataclass
class TrainData:
    train: list[Encoded]
    eval: list[Encoded]
    samples: list[dict[str, Any]]        # golden records whose prompts are generated at each eval
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path
    steps: int
    stopped_early: bool
    best_eval_loss: float | None
    first_eval_loss: float | None
    summary: dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: RunConfig, tokenizer, fmt: PromptFormat, train_records, eval_records,
                 sample_records) -> TrainData:
    """Tokenize; examples with zero supervised tokens never reach training."""
    train, dropped_train = encode_records(tokenizer, fmt, train_records, cfg.data.max_length)
    evals, dropped_eval = encode_records(tokenizer, fmt, eval_records[:cfg.eval.max_eval_examples],
                                         cfg.data.max_length)
    if not train:
        raise PipelineError("0 trainable examples after tokenization (every example was empty or "
                            "longer than --max-length)", 65)
    return TrainData(train, evals, list(sample_records[:cfg.eval.num_eval_samples]),
                     {"train": dropped_train, "eval": dropped_eval})


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


class Trainer:
    """Runs one training job into ``output_dir``."""

    def __init__(self, cfg: RunConfig, output_dir: Path, data: TrainData, *, model, tokenizer,
                 fmt: PromptFormat, accelerator, inputs: dict[str, Any] | None = None,
                 report_to: tuple[str, ...] = (), wandb_project: str = "llama-sft",
                 stage: str = "train", progress: bool = True):
        import torch

        self.cfg, self.out, self.data = cfg, Path(output_dir), data
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.acc = accelerator
        self.inputs = inputs or {}
        self.report_to, self.wandb_project, self.stage = report_to, wandb_project, stage
        self.progress = progress
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
        # torch's fused AdamW updates every parameter in one kernel (on CPU 7 ms a step for the
        # 135M model's 420 LoRA matrices, against 25 ms for the per-parameter loop); sharded
        # parameters keep the default implementation.
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable],
                                           lr=cfg.optim.learning_rate,
                                           weight_decay=cfg.optim.weight_decay,
                                           fused=None if self.sharded else True)
        self.micro_per_epoch = math.ceil(len(data.train) / (cfg.optim.batch_size * self.world))
        self.steps_per_epoch = max(1, self.micro_per_epoch // cfg.optim.gradient_accumulation_steps)
        self.total_steps = cfg.optim.max_steps or self.steps_per_epoch * cfg.optim.num_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(cfg, self.total_steps))
        check_distributed_setup(accelerator)
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        # FSDP2 swaps each parameter for a sharded DTensor, ZeRO-3 empties it and keeps this
        # rank's partition aside: same names, same order.
        self.trainable = [(n, p) for n, p in accelerator.unwrap_model(self.model).named_parameters()
                          if p.requires_grad]
        if self.is_main and self.world > 1:
            log(describe_distribution(accelerator, self.model))
        self.state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "bad_steps": 0,
                      "best_eval_loss": None, "best_step": None, "first_eval_loss": None,
                      "evals_without_improvement": 0, "tokens_seen": 0, "stopped_early": False}
        self._stop_signal: str | None = None
        self._writers: list[Any] = []

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
            batch = {k: v.to(device) for k, v in
                     collate(mb, pad_id, self.cfg.data.packing).items()}
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
            grad_norm = clip_grad_norm([p for _, p in self.trainable], self.cfg.optim.max_grad_norm)
        loss_value, norm_value = float(total_loss), float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()           # a no-op under DeepSpeed: engine_step() did it
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": norm_value, "finite": finite, "tokens": tokens,
                "supervised_tokens": float(items)}

    def backward(self, loss, *, last_micro_batch: bool) -> None:
        if not self.deepspeed:
            self.acc.backward(loss)
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

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        import torch

        self.model.eval()
        pad_id = self.tokenizer.pad_token_id
        loss_sum, items = 0.0, 0
        bs = max(1, self.cfg.optim.batch_size)
        shard = self.data.eval[self.rank::self.world]
        # Under FSDP every forward is a collective: all ranks run the same number of batches,
        # a rank whose shard ran out repeats its first example with weight 0.
        rounds = math.ceil(math.ceil(len(self.data.eval) / self.world) / bs) if self.sharded \
            else math.ceil(len(shard) / bs)
        with torch.no_grad():
            for i in range(0, rounds * bs, bs):
                chunk = shard[i:i + bs]
                weight = 1 if chunk else 0
                chunk = chunk or self.data.eval[:1]
                n = sum(e.num_supervised for e in chunk)
                batch = {k: v.to(self.acc.device) for k, v in
                         collate(chunk, pad_id, self.cfg.data.packing).items()}
                loss_sum += float(supervised_loss(self.model, batch, n)) * n * weight
                items += n * weight
        if self.world > 1:
            totals = self.acc.reduce(torch.tensor([loss_sum, float(items)], device=self.acc.device),
                                     reduction="sum")
            loss_sum, items = float(totals[0]), int(totals[1])
        loss = loss_sum / items if items else float("nan")
        result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
                  "eval_examples": len(self.data.eval)}
        if self.data.samples and (self.is_main or self.sharded):
            samples = self.generate_samples()   # sharded: every rank takes part in generate()
            if self.is_main:
                result["samples"] = samples
        return result

    def generate_samples(self) -> list[dict[str, Any]]:
        from llama_model import generate_batch

        model = self.acc.unwrap_model(self.model)
        prompts = [self.fmt.encode_prompt(self.tokenizer, r["instruction"], r.get("context", ""))
                   for r in self.data.samples]
        gens = generate_batch(model, self.tokenizer, prompts,
                              max_new_tokens=self.cfg.eval.max_new_tokens)
        return [{"id": r.get("id"), "instruction": r["instruction"], "reference": r["response"],
                 "generation": g.text, "stopped": g.stopped}
                for r, g in zip(self.data.samples, gens)]

    # -- checkpoints -----------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Any]:
        """Full (gathered) trainable weights on CPU. Sharded, a collective: call on every rank."""
        return {n: full_param(p).to("cpu").contiguous().clone() for n, p in self.trainable}

    def rng_state(self) -> dict[str, Any]:
        """This process's RNG state, plus every rank's under several processes (a collective)."""
        import torch

        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self.world > 1:
            own = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                own["cuda"] = torch.cuda.get_rng_state()
            for kind, state in own.items():
                every = self.acc.gather(state.to(self.acc.device)).cpu().view(self.world, -1)
                rng.update({f"{kind}_rank{r}": every[r].clone() for r in range(self.world)})
        return rng

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step>/ atomically; rotate only after it is complete."""
        from safetensors.torch import save_file

        step = self.state["step"]
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp"
        rng = self.rng_state()
        if self.is_main or self.sharded:       # sharded, gathering takes every rank
            weights = self.trainable_state()
            opt_tensors, opt_meta = _zero3_optimizer_state(self.optimizer, self.trainable) \
                if self.deepspeed else _optimizer_state(self.optimizer, self.trainable)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                save_file(weights, tmp / "weights.safetensors")
                save_file(opt_tensors, tmp / "optimizer.safetensors")
                write_json(tmp / "optimizer.json", {
                    "optimizer": opt_meta, "scheduler": self.scheduler.state_dict()})
                save_file(rng, tmp / "rng.safetensors")
                best = self.out / "best_weights.safetensors"
                if best.exists():
                    shutil.copy2(best, tmp / best.name)
                write_json(tmp / STATE_FILE, {
                    **self.state, "python_rng": _py_rng_state(), "world_size": self.world,
                    "config": self.cfg.to_dict(), "saved": now_iso(),
                    "total_steps": self.total_steps})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if exc.errno == errno.ENOSPC:
                    raise StorageError(f"disk full while writing {final.name}; earlier checkpoints "
                                       f"are intact. Free space or lower --save-total-limit") from None
                raise StorageError(f"could not write {final.name}: {exc}") from None
            self.rotate_checkpoints()
        self.acc.wait_for_everyone()
        return final

    def rotate_checkpoints(self) -> None:
        complete = list_checkpoints(self.out)
        for path in complete[:-self.cfg.eval.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        import torch

        state, weights, meta, opt_tensors, rng = read_checkpoint(path, set(self.state))
        saved_cfg, now_cfg = state.get("config", {}), self.cfg.to_dict()
        diff = sorted(k for k in set(saved_cfg) | set(now_cfg)
                      if k not in RESUME_MUTABLE and saved_cfg.get(k) != now_cfg.get(k))
        if diff:
            raise UsageError(f"cannot resume from {path}: settings differ from the checkpoint's "
                             f"({', '.join(diff)})")
        if state.get("world_size", 1) != self.world:
            raise UsageError(f"cannot resume from {path}: written with {state['world_size']} "
                             f"processes, now {self.world} (the data order and optimizer shards "
                             f"depend on it); relaunch with --num_processes {state['world_size']}")
        load_into_params(dict(self.trainable), weights)
        load_optimizer = _load_zero3_optimizer_state if self.deepspeed else _load_optimizer_state
        load_optimizer(self.optimizer, self.trainable, opt_tensors, meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(rng.get(f"torch_rank{self.rank}", rng["torch"]))
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if re.fullmatch(r"cuda\d+", k)]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
            if f"cuda_rank{self.rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda_rank{self.rank}"])
        _set_py_rng_state(state.pop("python_rng"))
        for key in self.state:
            self.state[key] = state[key]
        if self.is_main:
            self._restore_side_files(path)
            log(f"resumed from {path} at step {self.state['step']}")
        self.acc.wait_for_everyone()

    def _restore_side_files(self, path: Path) -> None:
        """Bring best weights and metrics back to the checkpoint's step."""
        best = path / "best_weights.safetensors"
        if self.state["best_step"] is not None:
            if not best.exists():
                raise UsageError(f"cannot resume from {path}: best_weights.safetensors is missing")
            shutil.copy2(best, self.out / best.name)
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            # a kill mid-append can leave a torn last line: it is dropped with the later rows
            rows = [line for line in metrics.read_text().splitlines()
                    if (row := _json_row(line)) is not None and row["step"] <= self.state["step"]]
            metrics.write_text("".join(f"{r}\n" for r in rows))

    # -- best weights ----------------------------------------------------------------------------
    def save_best(self) -> None:
        from safetensors.torch import save_file

        weights = self.trainable_state() if self.is_main or self.sharded else None
        if self.is_main:
            best = self.out / "best_weights.safetensors"
            tmp = best.with_suffix(".tmp")
            try:
                save_file(weights, tmp)
                os.replace(tmp, best)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                code = "disk full" if exc.errno == errno.ENOSPC else str(exc)
                raise StorageError(f"could not save the best weights: {code}") from None
        self.acc.wait_for_everyone()   # every rank reads this file in restore_best()

    def restore_best(self) -> bool:
        import torch
        from safetensors.torch import load_file

        best = self.out / "best_weights.safetensors"
        found = best.exists()
        if self.world > 1:
            seen = self.acc.gather(torch.tensor([int(found)], device=self.acc.device))
            if int(seen.min()) != int(seen.max()):
                raise StorageError(f"{best} is visible to some processes but not others: with "
                                   f"several machines, --output-dir must be on storage all share")
        if not found:
            return False
        load_into_params(dict(self.trainable), load_file(best))
        return True

    # -- logging ---------------------------------------------------------------------------------
    def open_loggers(self) -> None:
        if not self.is_main:
            return
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self._writers.append(("tensorboard", SummaryWriter(str(self.out / "tensorboard"))))
        if "wandb" in self.report_to:
            import wandb
            if not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
                os.environ.setdefault("WANDB_MODE", "offline")
            run = wandb.init(project=self.wandb_project, dir=str(self.out),
                             config=self.cfg.to_dict(), job_type=self.stage, reinit="finish_previous")
            self._writers.append(("wandb", run))

    def log_metrics(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "samples"}) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, writer in self._writers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    writer.add_scalar(key, value, row["step"])
            else:
                writer.log(scalars, step=row["step"])

    def close_loggers(self) -> None:
        for kind, writer in self._writers:
            writer.close() if kind == "tensorboard" else writer.finish()
        self._writers = []

    # -- signals ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def graceful_signals(self):
        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            log(f"{self._stop_signal} received: finishing this step, then writing a checkpoint")
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT: all ranks must checkpoint at the same step."""
        import torch

        flag = self._stop_signal is not None
        if self.world > 1:
            flag = bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device),
                                        reduction="sum").item() > 0)
        return flag

    # -- the loop --------------------------------------------------------------------------------
    def run(self, resume: Path | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.load_checkpoint(resume)
        elif self.is_main:
            for stale in ("metrics.jsonl", "best_weights.safetensors"):
                (self.out / stale).unlink(missing_ok=True)
        self.open_loggers()
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
        with self.graceful_signals():
            while self.state["step"] < self.total_steps and not self.state["stopped_early"]:
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
                if not stats["finite"]:
                    self.state["bad_steps"] += 1
                    log(f"step {self.state['step'] + 1}: non-finite loss/grad, step skipped "
                        f"({self.state['bad_steps']}/{cfg.optim.max_bad_steps})")
                    if self.state["bad_steps"] > cfg.optim.max_bad_steps:
                        good = list_checkpoints(self.out)
                        newest = f" (newest checkpoint: {good[-1].name})" if good else ""
                        raise TrainingDiverged(
                            f"training diverged: {self.state['bad_steps']} non-finite steps, "
                            f"over max_bad_steps {cfg.optim.max_bad_steps}; nothing non-finite "
                            f"was saved{newest}. Lower --learning-rate or check the data")
                    continue
                self.state["step"] += 1
                self.state["tokens_seen"] += stats["tokens"]
                step = self.state["step"]
                self.log_metrics({"step": step, "epoch": round(step / self.steps_per_epoch, 4),
                                  "loss": stats["loss"], "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": stats["grad_norm"],
                                  "tokens_per_s": stats["tokens"] / dt,
                                  "step_time_s": dt, "memory_mb": _memory_mb(),
                                  "bad_steps": self.state["bad_steps"]})
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                if self.data.eval and (step % cfg.eval.eval_steps == 0 or step == self.total_steps):
                    self.run_eval()
                if step % cfg.eval.save_steps == 0 and step < self.total_steps:
                    self.save_checkpoint()
                if self.stop_requested():
                    path = self.save_checkpoint()
                    bar.close()
                    self.close_loggers()
                    raise Interrupted(f"stopped by {self._stop_signal or 'a signal to another process'}"
                                      f"; checkpoint saved at {path}. Continue with --resume auto")
        bar.close()
        return self.finish()

    def run_eval(self) -> None:
        result = self.evaluate()
        step = self.state["step"]
        loss = result["eval_loss"]
        if self.state["first_eval_loss"] is None:
            self.state["first_eval_loss"] = loss
        self.log_metrics({"step": step, **result})
        if self.is_main:
            log(f"step {step}: eval loss {loss:.4f} (perplexity {result['eval_perplexity']:.2f})")
            for s in result.get("samples", [])[:3]:
                log(f"  sample {s['id']}: {s['generation'][:120]!r}  (reference {s['reference'][:60]!r})")
        if step == 0:
            return
        best = self.state["best_eval_loss"]
        if best is None or loss < best:
            self.state.update(best_eval_loss=loss, best_step=step, evals_without_improvement=0)
            self.save_best()
        else:
            self.state["evals_without_improvement"] += 1
            patience = self.cfg.eval.early_stopping_patience
            if patience and self.state["evals_without_improvement"] >= patience:
                if self.is_main:
                    log(f"early stopping at step {step}: no eval improvement in {patience} "
                        f"evaluations (best {best:.4f} at step {self.state['best_step']})")
                self.state["stopped_early"] = True

    def finish(self) -> TrainResult:
        """Write final_model/ (the best evaluation's weights), the plot and the manifest."""
        restored = self.restore_best()
        final = self.out / "final_model"
        summary = {"stage": self.stage, "steps": self.state["step"],
                   "total_steps": self.total_steps, "stopped_early": self.state["stopped_early"],
                   "weights_from_step": self.state["best_step"] if restored else self.state["step"],
                   "first_eval_loss": self.state["first_eval_loss"],
                   "best_eval_loss": self.state["best_eval_loss"],
                   "bad_steps": self.state["bad_steps"], "tokens_seen": self.state["tokens_seen"],
                   "train_examples": len(self.data.train), "eval_examples": len(self.data.eval),
                   "dropped_examples": self.data.dropped, "world_size": self.world,
                   "global_batch": self.cfg.optim.batch_size *
                   self.cfg.optim.gradient_accumulation_steps * self.world,
                   "token_stats": token_stats(self.data.train)}
        state = self.trainable_state() if self.sharded else None  # gathered on every rank
        if self.is_main:
            self.save_final_model(final, summary, state)
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
            write_json(self.out / "metrics_summary.json", summary)
            write_json(self.out / "training_config.json", self.cfg.to_dict())
            (self.out / "best_weights.safetensors").unlink(missing_ok=True)
            write_manifest(self.out, stage=self.stage, inputs=self.inputs, config=self.cfg.to_dict())
        self.close_loggers()
        self.acc.wait_for_everyone()
        return TrainResult(self.out, final, self.state["step"], self.state["stopped_early"],
                           self.state["best_eval_loss"], self.state["first_eval_loss"], summary)

    def save_final_model(self, final: Path, summary: dict[str, Any],
                         state_dict: dict[str, Any] | None = None) -> None:
        """Write final_model/; ``state_dict`` holds the gathered weights when they are sharded."""
        from llama_io import atomic_output_dir

        model = self.acc.unwrap_model(self.model)
        extra = {} if state_dict is None else {"state_dict": state_dict}
        try:
            with atomic_output_dir(final) as tmp:
                if hasattr(model, "peft_config"):
                    model.peft_config["default"].base_model_name_or_path = self.cfg.base_model
                model.save_pretrained(tmp, safe_serialization=True, **extra)
                self.tokenizer.save_pretrained(tmp)
                self.fmt.save(tmp)
                write_json(tmp / "training_config.json", self.cfg.to_dict())
                write_json(tmp / "metrics_summary.json", summary)
                for junk in ("training_args.bin", "README.md"):
                    (tmp / junk).unlink(missing_ok=True)
                write_manifest(tmp, stage=f"{self.stage}/final_model", inputs=self.inputs,
                               config=self.cfg.to_dict())
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else str(exc)
            raise StorageError(f"could not write {final} ({why}); an earlier {final.name} and "
                               f"the checkpoints are intact. Free space, then continue with "
                               f"--resume auto") from None


# ---------------------------------------------------------------------------------------------
# Helpers

def supervised_loss(model, batch: dict[str, Any], num_items):
    """Summed cross-entropy over supervised tokens, divided by ``num_items``.

    Logits are computed only where a label is supervised (``logits_to_keep`` with a boolean
    mask), so the vocabulary projection skips prompt and padding positions: on SFT data, where
    most tokens are prompt, that is most of the lm_head's work and its fp32 logits' memory.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum") / num_items


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


def clip_grad_norm(params: list, max_norm: float):
    """Clip to ``max_norm``; returns the global norm (all shards under FSDP) as a plain tensor."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with a state file), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        complete = list_checkpoints(output_dir)
        if not complete:
            log(f"--resume auto: no complete checkpoint in {output_dir}; starting fresh")
            return None
        return complete[-1]
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint directory")
    return path


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


def read_checkpoint(path: Path, state_keys: set[str]) -> tuple[dict[str, Any], ...]:
    """(state, weights, optimizer meta, optimizer tensors, RNG) of a checkpoint, all read and
    checked before anything is restored; missing or damaged state is refused, never skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
    if missing:
        raise UsageError(f"cannot resume from {path}: missing {', '.join(missing)} "
                         f"(refusing to restart silently)")
    read = {}
    for name in CHECKPOINT_FILES:
        try:
            read[name] = json.loads((path / name).read_text(encoding="utf-8")) \
                if name.endswith(".json") else load_file(path / name)
        except (ValueError, SafetensorError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"cannot resume from {path}: {name} is damaged ({exc}); resume "
                            f"from an earlier checkpoint with --resume <dir>") from None
    state, meta, rng = read[STATE_FILE], read["optimizer.json"], read["rng.safetensors"]
    weights, opt_tensors = read["weights.safetensors"], read["optimizer.safetensors"]
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise DataError(f"cannot resume from {path}: {STATE_FILE} and optimizer.json must hold "
                        f"JSON objects")
    lacking = sorted((state_keys | {"python_rng", "config"}) - set(state))
    lacking += [f"optimizer.json:{k}" for k in ("optimizer", "scheduler") if k not in meta]
    lacking += [] if "torch" in rng else ["rng.safetensors:torch (the RNG state)"]
    if lacking:
        raise UsageError(f"cannot resume from {path}: the checkpoint lacks {', '.join(lacking)} "
                         f"(refusing to restart silently)")
    return state, weights, meta, opt_tensors, rng


def _json_row(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _py_rng_state() -> dict[str, Any]:
    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_py_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
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


def build_trainer(cfg: RunConfig, output_dir: Path, *, train_records, eval_records,
                  sample_records, inputs: dict[str, Any] | None = None,
                  report_to: tuple[str, ...] = (), wandb_project: str = "llama-sft",
                  stage: str = "train", progress: bool = True) -> Trainer:
    """Load tokenizer and model through llama_model, tokenize, and return a ready Trainer."""
    # llama_model first: it quiets library noise before accelerate imports bitsandbytes
    from llama_model import (attach_lora, count_parameters, load_base_model, load_tokenizer,
                             packed_attention, retain_freed_memory)

    import torch
    from transformers import set_seed

    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)
    accelerator = make_accelerator(cfg)
    check_distributed_setup(accelerator)   # before loading anything
    if accelerator.device.type == "cpu":
        retain_freed_memory()
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    data = prepare_data(cfg, tokenizer, fmt, train_records, eval_records, sample_records)
    quantized = cfg.model.quantization != "none"
    device_map = {"": accelerator.device} if quantized else None
    model = load_base_model(cfg.base_model, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                            device_map=device_map,
                            attn_implementation=packed_attention() if cfg.data.packing else "sdpa")
    if cfg.model.method == "full":
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if model.dtype != torch.float32:
            model = model.float()  # full fine-tuning keeps fp32 master weights
    else:
        model = attach_lora(model, cfg.lora, quantized=quantized,
                            gradient_checkpointing=cfg.model.gradient_checkpointing)
    if not quantized:
        model = model.to(accelerator.device)
    trainable, total = count_parameters(model)
    if accelerator.distributed_type == "DEEPSPEED":    # zero.Init left each base weight empty
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if accelerator.is_main_process:
        log(f"model {cfg.base_model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
            f"trainable ({cfg.model.method}, {cfg.model.quantization}, {model.dtype})")
    return Trainer(cfg, output_dir, data, model=model, tokenizer=tokenizer, fmt=fmt,
                   accelerator=accelerator, inputs=inputs, report_to=report_to,
                   wandb_project=wandb_project, stage=stage, progress=progress)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


OOM_ADVICE = ("out of memory: lower --batch-size (raise --gradient-accumulation-steps to keep the "
              "global batch), add --use-4bit, lower --max-length, or enable "
              "--gradient-checkpointing")
