"""Checkpoints: writing, finding, reading and restoring a resumable step, and the best weights.

Written to a temporary directory and renamed into place (a crash mid-write leaves the previous
checkpoint as the newest complete one); weights, optimizer, scheduler and RNG state as
safetensors + JSON, no pickle; resume refuses a checkpoint with missing state.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from llama_sft.cli import log
from llama_sft.errors import DataError, StorageError, UsageError
from llama_sft.files import now_iso, write_json
from llama_sft.train.distributed import load_into_params
from llama_sft.train.optim import (_load_optimizer_state, _load_zero3_optimizer_state,
                                   _optimizer_state, _zero3_optimizer_state)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "best_weights.safetensors"   # the best evaluation's weights while training
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.json",
                    "rng.safetensors", STATE_FILE)

# Settings that may change between a checkpoint and its resume without changing the result.
RESUME_MUTABLE = {"save_steps", "save_total_limit", "eval_steps", "early_stopping_patience",
                  "num_eval_samples", "max_eval_examples", "max_new_tokens", "max_bad_steps"}


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


def rng_state(trainer) -> dict[str, Any]:
    """This process's RNG state, plus every rank's under several processes (a collective)."""
    import torch

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if trainer.world > 1:
        own = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state()
        for kind, state in own.items():
            every = trainer.acc.gather(state.to(trainer.acc.device)).cpu().view(trainer.world, -1)
            rng.update({f"{kind}_rank{r}": every[r].clone() for r in range(trainer.world)})
    return rng


def save_checkpoint(trainer) -> Path:
    """Write checkpoint-<step>/ atomically; rotate only after it is complete."""
    from safetensors.torch import save_file

    step = trainer.state["step"]
    final = trainer.out / f"checkpoint-{step}"
    tmp = trainer.out / f".checkpoint-{step}.tmp"
    rng = rng_state(trainer)
    if trainer.is_main or trainer.sharded:       # sharded, gathering takes every rank
        weights = trainer.trainable_state()
        opt_tensors, opt_meta = _zero3_optimizer_state(trainer.optimizer, trainer.trainable) \
            if trainer.deepspeed else _optimizer_state(trainer.optimizer, trainer.trainable)
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_file(weights, tmp / "weights.safetensors")
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", {
                "optimizer": opt_meta, "scheduler": trainer.scheduler.state_dict(),
                **({"scaler": trainer.scaler.state_dict()} if trainer.scaler else {})})
            save_file(rng, tmp / "rng.safetensors")
            best = trainer.out / BEST_WEIGHTS
            if best.exists():
                shutil.copy2(best, tmp / best.name)
            write_json(tmp / STATE_FILE, {
                **trainer.state, "python_rng": _py_rng_state(), "world_size": trainer.world,
                "config": trainer.cfg.to_dict(), "saved": now_iso(),
                "total_steps": trainer.total_steps})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"disk full while writing {final.name}; earlier checkpoints "
                                   f"are intact. Free space or lower --save-total-limit") from None
            raise StorageError(f"could not write {final.name}: {exc}") from None
        rotate_checkpoints(trainer.out, trainer.cfg.eval.save_total_limit)
    trainer.acc.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(trainer, path: Path) -> None:
    """Restore weights, optimizer, scheduler, RNG and loop state from ``path`` (checked first:
    a checkpoint of other settings or another process count is refused)."""
    import torch

    state, weights, meta, opt_tensors, rng = read_checkpoint(path, set(trainer.state))
    saved_cfg, now_cfg = state.get("config", {}), trainer.cfg.to_dict()
    diff = sorted(k for k in set(saved_cfg) | set(now_cfg)
                  if k not in RESUME_MUTABLE and saved_cfg.get(k) != now_cfg.get(k))
    if diff:
        raise UsageError(f"cannot resume from {path}: settings differ from the checkpoint's "
                         f"({', '.join(diff)})")
    if state.get("world_size", 1) != trainer.world:
        raise UsageError(f"cannot resume from {path}: written with {state['world_size']} "
                         f"processes, now {trainer.world} (the data order and optimizer shards "
                         f"depend on it); relaunch with --num_processes {state['world_size']}")
    load_into_params(dict(trainer.trainable), weights)
    load_optimizer = _load_zero3_optimizer_state if trainer.deepspeed else _load_optimizer_state
    load_optimizer(trainer.optimizer, trainer.trainable, opt_tensors, meta["optimizer"])
    trainer.scheduler.load_state_dict(meta["scheduler"])
    if trainer.scaler is not None:
        if "scaler" not in meta:
            raise UsageError(f"cannot resume from {path}: optimizer.json lacks the fp16 loss "
                             f"scaler's state (refusing to restart it silently)")
        trainer.scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(rng.get(f"torch_rank{trainer.rank}", rng["torch"]))
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if re.fullmatch(r"cuda\d+", k)]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        if f"cuda_rank{trainer.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda_rank{trainer.rank}"])
    _set_py_rng_state(state.pop("python_rng"))
    for key in trainer.state:
        trainer.state[key] = state[key]
    if trainer.is_main:
        _restore_best_file(trainer, path)
        log(f"resumed from {path} at step {trainer.state['step']}")
    trainer.acc.wait_for_everyone()


def _restore_best_file(trainer, path: Path) -> None:
    """Bring the best weights back to the checkpoint's step."""
    best = path / BEST_WEIGHTS
    if trainer.state["best_step"] is not None:
        if not best.exists():
            raise UsageError(f"cannot resume from {path}: {BEST_WEIGHTS} is missing")
        shutil.copy2(best, trainer.out / best.name)


def save_best(trainer) -> None:
    """Keep the current trainable weights as the best so far (a collective when sharded)."""
    from safetensors.torch import save_file

    weights = trainer.trainable_state() if trainer.is_main or trainer.sharded else None
    if trainer.is_main:
        best = trainer.out / BEST_WEIGHTS
        tmp = best.with_suffix(".tmp")
        try:
            save_file(weights, tmp)
            os.replace(tmp, best)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            code = "disk full" if exc.errno == errno.ENOSPC else str(exc)
            raise StorageError(f"could not save the best weights: {code}") from None
    trainer.acc.wait_for_everyone()   # every rank reads this file in restore_best()


def restore_best(trainer) -> bool:
    """Load the best weights back into the model; False when there are none."""
    import torch
    from safetensors.torch import load_file

    best = trainer.out / BEST_WEIGHTS
    found = best.exists()
    if trainer.world > 1:
        seen = trainer.acc.gather(torch.tensor([int(found)], device=trainer.acc.device))
        if int(seen.min()) != int(seen.max()):
            raise StorageError(f"{best} is visible to some processes but not others: with "
                               f"several machines, --output-dir must be on storage all share")
    if not found:
        return False
    load_into_params(dict(trainer.trainable), load_file(best))
    return True
