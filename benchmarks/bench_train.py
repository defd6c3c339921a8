#!/usr/bin/env python3
"""Training throughput: this pipeline's trainer against TRL's SFTTrainer and a plain transformers Trainer.

    python3 benchmarks/bench_train.py                      # embedded 135m + tiny LLaMA, all frameworks
    python3 benchmarks/bench_train.py --models tiny --steps 2 --warmup 1 --max-load 0   # smoke (seconds)
    python3 benchmarks/bench_train.py --models 135m --frameworks ours,trl_packing --profile

Every framework trains the same model with the same examples (``sft_output/`` train split, tokenized
once by ``llama_sft.data.tokenize.encode_records``), the same max_length, per-device batch, accumulation,
learning rate and schedule, AdamW, LoRA config and weight dtype, for the same number of optimizer
steps; gradient checkpointing, evaluation and checkpoint saving are off for all. Frameworks:

    ours              llama_sft.train.build_trainer + Trainer.run (padding-free packing of each batch)
    ours_padded       the same with --no-packing (pad to the longest example), for comparison
    trl_default       TRL SFTTrainer, its defaults (pad to the longest in the batch, bf16 autocast)
    trl_packing       TRL SFTTrainer, packing=True (best-fit-decreasing rows of max_length)
    trl_padding_free  TRL SFTTrainer, padding_free=True (each batch flattened into one row)
    hf_maxlen         transformers.Trainer, every example padded to max_length

Runs are interleaved (ours, peer, ours, peer, ...), each in a fresh process (its own peak RSS),
each after waiting for the 1-minute load average to drop below --max-load. A step's time is the
wall time from the end of the previous optimizer step to the end of this one (data, forward,
backward, optimizer, hooks); tokens/s counts real (non-pad) tokens over the measured steps.
MFU = tokens/s x FLOPs/token / the machine's matmul peak, measured in the same run (bf16, fp32):
FLOPs/token = 4*N_frozen + 6*N_trainable + 12*layers*d_attn*ctx, with N the weights of every
matmul (linear layers and the LM head; embedding lookups excluded) and ctx the mean causal
context of a token within its own example. Writes ``benchmarks/results/train.json`` (per run,
per framework, ratios, targets, machine) and prints a table. The GPU comparison is
``bench_gpu.py`` (run by ``gpu_check.sh``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from llama_sft.config.settings import KERNELS  # noqa: E402
from llama_sft.errors import PipelineError, UsageError, run_main  # noqa: E402
from llama_sft.files import now_iso, write_json  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "train.json"
DEFAULT_DATASET = ROOT / "sft_output" / "sft_dataset.jsonl"
DEFAULT_CONFIG = ROOT / "sft_output" / "training_config.json"
FRAMEWORKS = {
    "ours": "llama_sft.train.build_trainer + Trainer.run: padding-free packing of each batch, "
            "logits only at supervised positions",
    "trl_default": "trl.SFTTrainer defaults: pad to the longest example, bf16 autocast, fused "
                   "chunked LM-head loss with entropy/accuracy metrics",
    "trl_packing": "trl.SFTTrainer packing=True: best-fit-decreasing rows of max_length, "
                   "padding-free",
    "trl_padding_free": "trl.SFTTrainer padding_free=True: each batch flattened into one row",
    "hf_maxlen": "transformers.Trainer + peft: every example padded to max_length",
    # Variants of ours, each a run-config setting (not peers; not run unless named):
    "ours_padded": "ours with packing off: pad to the longest example of the batch",
    "ours_lora_dropout0": "ours with lora_dropout 0 (peft then skips the dropout on each input)",
    "ours_torch_dropout": "ours without the mask_dropout kernel: peft's nn.Dropout on each LoRA "
                          "input (torch bernoulli_ masks)",
    "ours_peft_lora": "ours without the fused_lora kernel: peft's own LoRA forward",
    "ours_ungrouped": "ours without the lora_siblings kernel: each fused LoRA linear computed on "
                      "its own (q/k/v and gate/up not together)",
    "ours_torch_rms_norm": "ours without the rms_norm kernel: transformers' LlamaRMSNorm",
    "ours_masked_sdpa": "ours without the packed_attention kernel: SDPA with the block-diagonal "
                        "mask over each packed row",
    "ours_glibc_default": "ours without the retain_memory kernel: glibc's default malloc policy",
    "ours_no_kernels": "ours with none of the training kernels (--kernels none)",
}
DEFAULT_FRAMEWORKS = ("ours", "trl_default", "trl_packing", "trl_padding_free", "hf_maxlen")


def _without(*names: str) -> dict[str, Any]:
    return {"kernels": [k for k in KERNELS if k not in names]}


# name: run-config values over the benchmark's config
OURS_VARIANTS = {"ours": {}, "ours_padded": {"packing": False},
                 "ours_lora_dropout0": {"lora_dropout": 0.0},
                 "ours_torch_dropout": _without("mask_dropout"),
                 "ours_peft_lora": _without("fused_lora", "lora_siblings"),
                 "ours_ungrouped": _without("lora_siblings"),
                 "ours_torch_rms_norm": _without("rms_norm"),
                 "ours_masked_sdpa": _without("packed_attention"),
                 "ours_glibc_default": _without("retain_memory"),
                 "ours_no_kernels": {"kernels": []}}
TRL_BEST_CANDIDATES = ("trl_default", "trl_packing", "trl_padding_free")
TARGETS = {"vs_trl_default": 1.5, "vs_trl_best": 1.1, "mfu_bf16": 0.45}
UTILIZATION_FLOOR = 0.9     # a run whose threads got less CPU than this was disturbed
PROBE_SECONDS = 0.5         # the matmul speed probe before and after each run
IGNORE_INDEX = -100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="135m,tiny",
                        help="comma-separated: 135m (the embedded SmolLM2-135M), tiny (random "
                             "2-layer LLaMA)")
    parser.add_argument("--frameworks", default=",".join(DEFAULT_FRAMEWORKS),
                        help=f"comma-separated, from: {', '.join(FRAMEWORKS)}")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET),
                        help="sft_dataset.jsonl; its train split is trained on")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="training_config.json (resolved over the 135m preset, as llama_train does)")
    parser.add_argument("--tiny-model-dir", default=None,
                        help="an existing tiny model directory; None: build one in a temp dir")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed optimizer steps before the measured ones")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch (all frameworks)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="micro-batches per optimizer step (all frameworks)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="weight dtype of the base model (all frameworks)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--schedule", default="alternate", choices=("alternate", "round"),
                        help="alternate: ours before every peer; round: each framework once per round")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-runs of a run disturbed by other processes (CPU utilization "
                             f"under {UTILIZATION_FLOOR}, or a speed probe under --probe-floor); "
                             "disturbed runs are kept, flagged")
    parser.add_argument("--probe-floor", type=float, default=0.85,
                        help="before and after each run, time bf16 matmuls for "
                             f"{PROBE_SECONDS} s; below this share of the measured bf16 peak the "
                             "machine's cores are shared with something this machine cannot see "
                             "(another virtual machine): wait before the run, flag it after; 0 "
                             "disables")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run; None: torch's default")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait before each run until the 1-minute load average is below this; "
                             "0 disables waiting")
    parser.add_argument("--max-wait", type=float, default=1200,
                        help="seconds to wait for a quiet machine before one run")
    parser.add_argument("--wait-budget", type=float, default=7200,
                        help="seconds of waiting in all; when spent, runs start without waiting")
    parser.add_argument("--peak-seconds", type=float, default=2.0,
                        help="seconds per matrix size when measuring the matmul peak")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, profile ours and the best TRL setting (torch "
                             "profiler, top operators into the result)")
    parser.add_argument("--output", default=None,
                        help=f"result JSON; None: {DEFAULT_OUTPUT.relative_to(ROOT)}")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args) -> None:
    """All problems at once, before anything is loaded."""
    problems = [f"--{n.replace('_', '-')} must be > 0" for n in
                ("steps", "batch_size", "gradient_accumulation_steps", "repeats")
                if getattr(args, n) <= 0]
    if args.warmup < 0 or args.retries < 0:
        problems.append("--warmup and --retries must be >= 0")
    if not 0 <= args.probe_floor < 1:
        problems.append("--probe-floor must be in [0, 1)")
    unknown_models = sorted(set(csv_list(args.models)) - {"135m", "tiny"})
    if unknown_models:
        problems.append(f"--models: unknown {', '.join(unknown_models)} (valid: 135m, tiny)")
    unknown = sorted(set(csv_list(args.frameworks)) - set(FRAMEWORKS))
    if unknown:
        problems.append(f"--frameworks: unknown {', '.join(unknown)} (valid: {', '.join(FRAMEWORKS)})")
    if not csv_list(args.frameworks):
        problems.append("--frameworks names none")
    if not Path(args.dataset).is_file():
        problems.append(f"--dataset {args.dataset} not found (run pipeline_sft_prep.py first)")
    if args.config and not Path(args.config).is_file():
        problems.append(f"--config {args.config} not found (pass --config '' for the preset alone)")
    if args.tiny_model_dir and not Path(args.tiny_model_dir).is_dir():
        problems.append(f"--tiny-model-dir {args.tiny_model_dir} is not a directory")
    if problems:
        raise UsageError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Machine, load and the matmul peak

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    from llama_sft.files import library_versions

    versions = library_versions()
    for pkg in ("trl",):
        try:
            import importlib.metadata as md
            versions[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as absent
            versions[pkg] = None
    return {"date": now_iso(), "platform": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(os.getloadavg()), "versions": versions}


def code_state() -> dict[str, Any]:
    """Which pipeline code was measured: the commit, what was uncommitted, and a digest of the
    package's sources as they were."""
    import hashlib

    from llama_sft.files import git_commit

    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "llama_sft", "*.py"],
                                cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        status = ""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "llama_sft").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {"git_commit": git_commit(),
            "uncommitted": sorted(line[3:] for line in status.splitlines()),
            "llama_sft_sha256": digest.hexdigest()[:16]}


class LoadGate:
    """Waits (polling every ``poll_s``) until the 1-minute load average is below ``max_load``."""

    def __init__(self, max_load: float, max_wait: float, budget: float, poll_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_load, self.max_wait, self.budget, self.poll_s = max_load, max_wait, budget, poll_s
        self.sleep = sleep
        self.waited = 0.0

    def wait(self, what: str) -> dict[str, Any]:
        load = os.getloadavg()[0]
        waited = 0.0
        while self.max_load > 0 and load >= self.max_load and waited < self.max_wait and \
                self.waited < self.budget:
            log(f"waiting for a quiet machine before {what}: load {load:.2f} >= {self.max_load}")
            self.sleep(self.poll_s)
            waited += self.poll_s
            self.waited += self.poll_s
            load = os.getloadavg()[0]
        quiet = self.max_load <= 0 or load < self.max_load
        return {"load_1m": round(load, 2), "waited_s": waited, "quiet": quiet}

    def wait_for_speed(self, what: str, probe: Callable[[], float], floor: float) -> float:
        """Polls ``probe`` (GFLOP/s) until it reaches ``floor`` or the waits run out; returns the
        last reading. A floor of 0 takes one reading and never waits."""
        rate, waited = probe(), 0.0
        while rate < floor and waited < self.max_wait and self.waited < self.budget:
            log(f"waiting for the cores before {what}: matmul probe {rate:.0f} < {floor:.0f} GFLOP/s")
            self.sleep(self.poll_s)
            waited += self.poll_s
            self.waited += self.poll_s
            rate = probe()
        return rate


def matmul_probe(seconds: float = PROBE_SECONDS, n: int = 1024) -> float:
    """Median GFLOP/s of n x n bf16 matmuls over ``seconds``: low when the cores are shared."""
    import torch

    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    torch.mm(a, b)
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return round(statistics.median(rates), 1)


def matmul_peak(dtype_name: str, seconds: float, sizes: Sequence[int] = (1024, 2048)) -> dict:
    """Best sustained FLOP/s of square matmuls in ``dtype_name`` on this process's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
        by_size[str(n)] = round(best / 1e9, 1)
    return {"dtype": dtype_name, "gflops": max(by_size.values()), "by_size_gflops": by_size}


# ---------------------------------------------------------------------------------------------
# Data and models shared by every framework

def resolve_run_config(args, model_path: str) -> dict[str, Any]:
    """The RunConfig every framework follows: 135m preset < --config < the benchmark's flags."""
    from llama_sft.config.settings import load_config_file, resolve_config

    file_values = load_config_file(args.config) if args.config else {}
    total = args.warmup + args.steps
    cfg = resolve_config("135m", file_values=file_values, overrides={
        "base_model": model_path, "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_steps": total,
        "dtype": args.dtype, "gradient_checkpointing": False, "packing": True,
        "eval_steps": total + 1, "save_steps": total + 1}, origin=str(args.config))
    return cfg.to_dict()


def encode_train_split(dataset: str, cfg_dict: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The train split tokenized as the trainer tokenizes it, in file order."""
    from llama_sft.config.settings import RunConfig
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.data.tokenize import encode_records
    from llama_sft.model.loading import load_tokenizer

    cfg = RunConfig.from_dict(cfg_dict)
    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    records = read_sft_jsonl(dataset, "train")
    if not records:
        raise UsageError(f"{dataset} has no records with split 'train'")
    examples, _ = encode_records(tokenizer, fmt, records, cfg.data.max_length)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def trainer_order(n: int, seed: int, epoch: int = 0) -> list[int]:
    """Trainer.epoch_order: the permutation the trainer uses for ``epoch``."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def examples_digest(examples: Sequence[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return digest.hexdigest()[:16]


def attention_context(examples: Sequence[dict[str, list[int]]]) -> float:
    """Mean causal context of a token within its example: sum n(n+1)/2 over sum n."""
    lengths = [len(e["input_ids"]) for e in examples]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def matmul_params(model) -> dict[str, int]:
    """Weights of every nn.Linear (LoRA A/B included, the tied LM head once) by trainability."""
    import torch

    seen, frozen, trainable, head = set(), 0, 0, 0
    out_emb = model.get_output_embeddings()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        n = module.weight.numel()
        if module.weight.requires_grad:
            trainable += n
        else:
            frozen += n
        head += n if module is out_emb or module.weight is out_emb.weight else 0
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"frozen": frozen, "trainable": trainable, "lm_head": head,
            "layers": cfg.num_hidden_layers, "attn_dim": cfg.num_attention_heads * head_dim,
            "total_params": sum(p.numel() for p in model.parameters())}


def flops_per_token(info: dict[str, int], context: float) -> dict[str, float]:
    """Training FLOPs per token: 4*N_frozen + 6*N_trainable + 12*layers*d_attn*context."""
    attention = 12 * info["layers"] * info["attn_dim"] * context
    return {"total": 4 * info["frozen"] + 6 * info["trainable"] + attention,
            "attention": attention, "lm_head": 4 * info["lm_head"]}


# ---------------------------------------------------------------------------------------------
# Worker side: one framework, one process

class StepRecorder:
    """Per-step wall time, real tokens, supervised tokens and loss; optionally drives a profiler."""

    def __init__(self, profiler=None):
        self.steps: list[dict[str, Any]] = []
        self.profiler = profiler
        self.tokens = self.supervised = 0
        self.loss = 0.0
        self.t_prev = self.cpu_prev = 0.0

    def start(self) -> None:
        self.t_prev, self.cpu_prev = time.perf_counter(), time.process_time()

    def add_micro(self, tokens: int, supervised: int, loss: float = 0.0) -> None:
        self.tokens += tokens
        self.supervised += supervised
        self.loss += loss

    def end_step(self, loss: float | None = None) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.steps.append({"seconds": now - self.t_prev, "cpu_seconds": cpu - self.cpu_prev,
                           "tokens": self.tokens, "supervised_tokens": self.supervised,
                           "loss": self.loss if loss is None else loss})
        self.t_prev, self.cpu_prev = now, cpu
        self.tokens = self.supervised = 0
        self.loss = 0.0
        if self.profiler is not None:
            self.profiler.step()


def run_ours(spec: dict[str, Any], recorder: StepRecorder, workdir: Path) -> dict[str, Any]:
    from llama_sft.config.settings import RunConfig
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.train.build import build_trainer
    from llama_sft.train.callbacks import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_end(self, trainer, row, stats):
            recorder.add_micro(stats["tokens"], int(stats["supervised_tokens"]))
            recorder.end_step(row["loss"])

    cfg = RunConfig.from_dict({**spec["config"], **OURS_VARIANTS[spec["framework"]]})
    records = read_sft_jsonl(spec["dataset"], "train")
    trainer = build_trainer(cfg, workdir / "out", train_records=records, eval_records=[],
                            sample_records=[], progress=False, callbacks=[Timing()])
    info = matmul_params(trainer.acc.unwrap_model(trainer.model))
    order = trainer.epoch_order(0)[:spec["examples_used"]]
    used = [{"input_ids": trainer.data.train[i].input_ids, "labels": trainer.data.train[i].labels}
            for i in order]
    recorder.start()
    trainer.run()
    return {"model_info": info, "examples_digest": examples_digest(used),
            "settings": {"packing": cfg.data.packing, "lora_dropout": cfg.lora.lora_dropout,
                         "kernels": list(cfg.model.kernels)}}


def _lora_config(cfg: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=list(cfg["lora_target_modules"]), bias="none",
                      task_type="CAUSAL_LM")


def _hf_common_args(cfg: dict[str, Any], workdir: Path, sampling: str) -> dict[str, Any]:
    """TrainingArguments shared by the TRL and transformers runs (the fairness settings)."""
    return {"output_dir": str(workdir / "out"), "max_steps": cfg["max_steps"],
            "per_device_train_batch_size": cfg["batch_size"],
            "gradient_accumulation_steps": cfg["gradient_accumulation_steps"],
            "learning_rate": cfg["learning_rate"], "lr_scheduler_type": cfg["lr_scheduler"],
            "warmup_steps": cfg["warmup_steps"] or 0, "weight_decay": cfg["weight_decay"],
            "max_grad_norm": cfg["max_grad_norm"], "optim": "adamw_torch", "seed": cfg["seed"],
            "gradient_checkpointing": False, "eval_strategy": "no", "save_strategy": "no",
            "logging_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "dataloader_num_workers": 0, "train_sampling_strategy": sampling,
            "use_cpu": not _cuda()}   # TRL's default bf16=True refuses a CPU without it


def _recording_trainer(base, recorder: StepRecorder):
    """``base`` (a transformers Trainer class) counting tokens and loss of every micro-batch."""
    from transformers import TrainerCallback

    class Recording(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                tokens = int(inputs["attention_mask"].sum())
            else:
                tokens = int(inputs["input_ids"].numel())
            supervised = int((inputs["labels"] != IGNORE_INDEX).sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            recorder.add_micro(tokens, supervised, float(loss))
            return loss

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.start()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()

    return Recording, Steps()


def _peer_model(cfg: dict[str, Any]):
    from llama_sft.model.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(cfg["base_model"])
    model = load_base_model(cfg["base_model"], dtype=cfg["dtype"])
    return model, tokenizer


def run_trl(spec: dict[str, Any], recorder: StepRecorder, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, fw = spec["config"], spec["framework"]
    examples = json.loads(Path(spec["examples_file"]).read_text())
    model, tokenizer = _peer_model(cfg)
    setting = {"trl_default": {}, "trl_packing": {"packing": True},
               "trl_padding_free": {"padding_free": True, "max_length": None}}[fw]
    # Examples arrive tokenized (input_ids + labels, prompt masked) and in the trainer's order,
    # so every framework sees identical tokens; packing re-orders rows, so it samples randomly.
    sampling = "random" if fw == "trl_packing" else "sequential"
    args = SFTConfig(**_hf_common_args(cfg, workdir, sampling),
                     **{"max_length": cfg["max_length"], **setting})
    trainer_cls, callback = _recording_trainer(SFTTrainer, recorder)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(examples),
                          processing_class=tokenizer, peft_config=_lora_config(cfg),
                          callbacks=[callback])
    info = matmul_params(trainer.model)
    trainer.train()
    return {"model_info": info, "examples_digest": examples_digest(examples[:spec["examples_used"]]),
            "settings": {"bf16_autocast": args.bf16, "packing": args.packing,
                         "padding_free": trainer.padding_free,
                         "packing_strategy": args.packing_strategy if args.packing else None}}


def run_hf(spec: dict[str, Any], recorder: StepRecorder, workdir: Path) -> dict[str, Any]:
    """What the user's seed documents do: every example padded to max_length, plain Trainer."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    cfg = spec["config"]
    examples = json.loads(Path(spec["examples_file"]).read_text())
    model, tokenizer = _peer_model(cfg)
    model = get_peft_model(model, _lora_config(cfg))
    width, pad = cfg["max_length"], tokenizer.pad_token_id
    padded = [{"input_ids": e["input_ids"] + [pad] * (width - len(e["input_ids"])),
               "attention_mask": [1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])),
               "labels": e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"]))}
              for e in examples]
    trainer_cls, callback = _recording_trainer(Trainer, recorder)
    trainer = trainer_cls(model=model, args=TrainingArguments(**_hf_common_args(cfg, workdir,
                                                                                "sequential")),
                          train_dataset=Dataset.from_list(padded),
                          data_collator=default_data_collator, callbacks=[callback])
    info = matmul_params(trainer.model)
    trainer.train()
    return {"model_info": info, "examples_digest": examples_digest(examples[:spec["examples_used"]]),
            "settings": {"bf16_autocast": False, "padded_to": width}}


RUNNERS = {**{name: run_ours for name in OURS_VARIANTS}, "trl_default": run_trl,
           "trl_packing": run_trl, "trl_padding_free": run_trl, "hf_maxlen": run_hf}


def top_operators(profiler, limit: int = 25) -> list[dict[str, Any]]:
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "self_share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
            for e in events[:limit]]


def worker(spec_path: str) -> int:
    """Run one framework as the spec says and write its result JSON (the hidden --worker mode)."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    profiler = None
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile, schedule
        profiler = profile(activities=[ProfilerActivity.CPU],
                           schedule=schedule(wait=0, warmup=spec["warmup"], active=spec["steps"],
                                            repeat=1))
        profiler.start()
    recorder = StepRecorder(profiler)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        extra = RUNNERS[spec["framework"]](spec, recorder, Path(tmp))
    result = {"framework": spec["framework"], "threads": torch.get_num_threads(),
              "steps": recorder.steps, "peak_rss_mb": round(
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}
    if profiler is not None:
        profiler.stop()
        result["profile"] = top_operators(profiler)
    write_json(spec["output"], result)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: schedule, run, summarize

def schedule(frameworks: Sequence[str], repeats: int, kind: str) -> list[tuple[int, str]]:
    """(round, framework) in run order. alternate: ours before every other framework, order
    reversed on odd rounds so drift hits both; round: every framework once per round."""
    ours = [f for f in frameworks if f == "ours"]
    peers = [f for f in frameworks if f != "ours"]
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        if kind == "round" or not ours or not peers:
            names = list(frameworks)
        else:
            names = [n for p in peers for n in (*ours, p)]
        order += [(r, n) for n in (names if r % 2 == 0 else names[::-1])]
    return order


def launch(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run one spec in a fresh Python process; a failure names the framework and the log tail."""
    spec_path = tmp / f"spec-{spec['tag']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(spec["output"]).exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise PipelineError(f"{spec['framework']} on {spec['model']} failed (exit "
                            f"{proc.returncode}): {tail}", 1)
    return json.loads(Path(spec["output"]).read_text())


def utilization(run: dict[str, Any], warmup: int) -> float:
    """CPU seconds over (wall seconds x threads) in the measured steps: about 1 on a quiet
    machine; well under 1 when another process took cores mid-run (the run is disturbed)."""
    steps = run["steps"][warmup:]
    return sum(s["cpu_seconds"] for s in steps) / (sum(s["seconds"] for s in steps) * run["threads"])


def summarize_runs(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One framework's measured steps: the median run among the undisturbed ones (all runs
    when every run was disturbed, flagged), and the pooled numbers beside it."""
    clean = [r for r in runs if not r["disturbed"]] or runs
    per_run = [sum(s["tokens"] for s in r["steps"][warmup:]) /
               sum(s["seconds"] for s in r["steps"][warmup:]) for r in clean]
    measured = [s for r in clean for s in r["steps"][warmup:]]
    seconds = sum(s["seconds"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    rate = statistics.median(per_run)
    return {
        "runs": len(runs), "undisturbed_runs": sum(not r["disturbed"] for r in runs),
        "measured_steps": len(measured),
        "tokens_per_s": rate,
        "tokens_per_s_by_run": [round(x, 2) for x in per_run],
        "tokens_per_s_pooled": tokens / seconds,
        "supervised_tokens_per_s": rate * sum(s["supervised_tokens"] for s in measured) / tokens,
        "step_time_s_mean": seconds / len(measured),
        "step_time_s_median": statistics.median(s["seconds"] for s in measured),
        "tokens_per_step": tokens / len(measured),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "first_loss_by_run": [r["steps"][0]["loss"] for r in runs],
        "final_loss_by_run": [r["steps"][-1]["loss"] for r in runs],
        "final_loss": statistics.fmean(r["steps"][-1]["loss"] for r in runs),
        "cpu_utilization_by_run": [round(r["utilization"], 3) for r in runs],
        "load_1m_by_run": [r["load"]["load_1m"] for r in runs],
        "load_1m_after_by_run": [r["load_after"] for r in runs],
        "probe_gflops_by_run": [r.get("probe_gflops") for r in runs],
        "all_runs_started_quiet": all(r["load"]["quiet"] for r in runs),
    }


def best_peaks(result: dict[str, Any]) -> dict[str, dict]:
    """The higher of the peaks measured before and after the runs (a peak is what the machine
    can do; a lower reading means something else ran during it)."""
    peaks = [p for p in (result.get("peak"), result.get("peak_after")) if p]
    return {k: max((p[k] for p in peaks), key=lambda x: x["gflops"]) for k in peaks[0]}


def add_mfu(summary: dict[str, Any], flops: dict[str, float], peaks: dict[str, dict]) -> None:
    """MFU by the issue's formula, and with the LM head counted only where a loss is taken."""
    achieved = summary["tokens_per_s"] * flops["total"]
    needed = achieved - flops["lm_head"] * (summary["tokens_per_s"] - summary["supervised_tokens_per_s"])
    summary["model_tflops"] = achieved / 1e12
    for name, peak in peaks.items():
        summary[f"mfu_{name}"] = achieved / (peak["gflops"] * 1e9)
        summary[f"mfu_{name}_lm_head_on_supervised_only"] = needed / (peak["gflops"] * 1e9)


def compare(frameworks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ours / peer tokens-per-second ratios and the issue's targets."""
    if "ours" not in frameworks:
        return {}
    ours = frameworks["ours"]["tokens_per_s"]
    ratios = {f"ours_over_{k}": ours / v["tokens_per_s"] for k, v in frameworks.items() if k != "ours"}
    trl = {k: frameworks[k]["tokens_per_s"] for k in TRL_BEST_CANDIDATES if k in frameworks}
    out: dict[str, Any] = {"ratios": ratios, "targets": {}}
    if "trl_default" in frameworks:
        out["targets"]["vs_trl_default"] = _target(ratios["ours_over_trl_default"],
                                                   TARGETS["vs_trl_default"])
    if trl:
        best = max(trl, key=trl.get)
        out["trl_best"] = best
        out["targets"]["vs_trl_best"] = _target(ours / trl[best], TARGETS["vs_trl_best"])
    if "mfu_bf16" in frameworks["ours"]:
        out["targets"]["mfu_bf16"] = _target(frameworks["ours"]["mfu_bf16"], TARGETS["mfu_bf16"])
    return out


def _target(value: float, target: float) -> dict[str, Any]:
    return {"value": round(value, 4), "target": target, "met": value >= target}


def format_table(result: dict[str, Any]) -> str:
    cols = ("model", "framework", "tokens/s", "step s", "tok/step", "peak RSS MB", "final loss",
            "MFU bf16", "ours/x", "clean runs")
    rows = []
    for model, block in result["models"].items():
        ratios = block.get("comparison", {}).get("ratios", {})
        for fw, s in block["frameworks"].items():
            ratio = ratios.get(f"ours_over_{fw}")
            rows.append((model, fw, f"{s['tokens_per_s']:.1f}", f"{s['step_time_s_mean']:.3f}",
                         f"{s['tokens_per_step']:.0f}", f"{s['peak_rss_mb']:.0f}",
                         f"{s['final_loss']:.4f}", f"{s.get('mfu_bf16', 0) * 100:.1f}%",
                         f"{ratio:.2f}" if ratio else "-",
                         f"{s['undisturbed_runs']}/{s['runs']}"))
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


class Benchmark:
    """The interleaved CPU benchmark: every (round, model, framework) run in its own process."""

    def __init__(self, args, output: Path):
        self.args, self.output = args, output
        self.gate = LoadGate(args.max_load, args.max_wait, args.wait_budget)
        self.runs: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}

    def measure_peaks(self) -> dict[str, dict]:
        import torch

        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        load = self.gate.wait("the matmul peak")
        peaks = {d: matmul_peak(d, self.args.peak_seconds) for d in ("bfloat16", "float32")}
        return {"bf16": {**peaks["bfloat16"], "load_1m": load["load_1m"]},
                "fp32": {**peaks["float32"], "load_1m": load["load_1m"]}}

    def prepare_model(self, name: str, tmp: Path) -> dict[str, Any]:
        from llama_sft.config.presets import EMBEDDED_MODEL_ID
        from llama_sft.model.tiny import save_tiny_llama

        if name == "tiny":
            path = self.args.tiny_model_dir or str(save_tiny_llama(tmp / "tiny-model"))
        else:
            path = EMBEDDED_MODEL_ID
        cfg = resolve_run_config(self.args, path)
        examples = encode_train_split(self.args.dataset, cfg)
        needed = cfg["max_steps"] * cfg["batch_size"] * cfg["gradient_accumulation_steps"]
        if len(examples) < needed:
            raise UsageError(f"{self.args.dataset}: {len(examples)} train examples, {needed} needed "
                             f"for {cfg['max_steps']} steps of {needed // cfg['max_steps']}; lower "
                             f"--steps or --batch-size")
        ordered = [examples[i] for i in trainer_order(len(examples), cfg["seed"])]
        examples_file = tmp / f"examples-{name}.json"
        examples_file.write_text(json.dumps(ordered))
        return {"path": path, "config": cfg, "examples_file": str(examples_file),
                "examples_used": needed, "digest": examples_digest(ordered[:needed]),
                "context": attention_context(examples), "train_examples": len(examples)}

    def run_one(self, model: str, prep: dict[str, Any], rnd: int, framework: str, tmp: Path,
                profile: bool = False) -> dict[str, Any]:
        """Run once; a disturbed run is kept (flagged) and run again, up to --retries times."""
        for attempt in range(self.args.retries + 1):
            tag = f"{model}-{framework}-{rnd}-{attempt}{'-profile' if profile else ''}"
            load = self.gate.wait(tag)
            floor = self.args.probe_floor * self.result["peak"]["bf16"]["gflops"]
            probe_before = self.gate.wait_for_speed(tag, matmul_probe, floor)
            spec = {"tag": tag, "model": model, "framework": framework, "config": prep["config"],
                    "dataset": self.args.dataset, "examples_file": prep["examples_file"],
                    "examples_used": prep["examples_used"], "warmup": self.args.warmup,
                    "steps": self.args.steps, "threads": self.args.threads, "profile": profile,
                    "output": str(tmp / f"result-{tag}.json")}
            log(f"run {tag} (load {load['load_1m']:.2f})")
            run = launch(spec, tmp)
            busy = utilization(run, self.args.warmup)
            probes = [probe_before, matmul_probe()]
            shared = min(probes) < floor
            run.update(model=model, round=rnd, attempt=attempt, load=load,
                       load_after=round(os.getloadavg()[0], 2), utilization=busy,
                       probe_gflops=probes, cores_shared=shared,
                       disturbed=busy < UTILIZATION_FLOOR or shared,
                       same_examples=run["examples_digest"] == prep["digest"])
            if not run["disturbed"] or attempt == self.args.retries or profile:
                return run
            log(f"{tag} was disturbed (CPU utilization {busy:.2f}, floor {UTILIZATION_FLOOR}; "
                f"matmul probe {min(probes):.0f}, floor {floor:.0f} GFLOP/s); kept as such, "
                f"running it again")
            self.runs.append(run)
        return run

    def execute(self) -> dict[str, Any]:
        args = self.args
        models, frameworks = csv_list(args.models), csv_list(args.frameworks)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
            tmp = Path(tmp_name)
            preps = {m: self.prepare_model(m, tmp) for m in models}
            self.result = self.header(preps, frameworks)
            self.result["peak"] = self.measure_peaks()
            for rnd, fw in schedule(frameworks, args.repeats, args.schedule):
                for model in models:
                    self.runs.append(self.run_one(model, preps[model], rnd, fw, tmp))
                    self.finish(preps, complete=False)
            self.result["peak_after"] = self.measure_peaks()
            if args.profile:
                self.result["profiles"] = self.profile(preps, tmp)
        return self.finish(preps, complete=True)

    def profile(self, preps: dict[str, dict], tmp: Path) -> dict[str, Any]:
        profiles = {}
        for model, block in self.result["models"].items():
            best = block.get("comparison", {}).get("trl_best")
            for fw in filter(None, ("ours", best)):
                run = self.run_one(model, preps[model], 0, fw, tmp, profile=True)
                profiles[f"{model}/{fw}"] = run["profile"]
        return profiles

    def header(self, preps: dict[str, dict], frameworks: list[str]) -> dict[str, Any]:
        args = self.args
        any_cfg = next(iter(preps.values()))["config"]
        return {
            "benchmark": "train", "created": now_iso(), "complete": False,
            "machine": machine_info(), "code": code_state(),
            "settings": {"dataset": str(args.dataset), "config_file": str(args.config),
                         "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                         "schedule": args.schedule, "dtype": args.dtype,
                         "batch_size": args.batch_size,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps,
                         "max_length": any_cfg["max_length"],
                         "learning_rate": any_cfg["learning_rate"],
                         "lr_scheduler": any_cfg["lr_scheduler"],
                         "warmup_steps": any_cfg["warmup_steps"],
                         "lora": {k: any_cfg[k] for k in ("lora_r", "lora_alpha", "lora_dropout",
                                                          "lora_target_modules")},
                         "optimizer": "torch AdamW (adamw_torch)", "gradient_checkpointing": False,
                         "max_load": args.max_load, "probe_floor": args.probe_floor,
                         "probe": f"median GFLOP/s of 1024x1024 bf16 matmuls for {PROBE_SECONDS} s "
                                  "before and after each run; a run with a probe under "
                                  "probe_floor x the bf16 peak is disturbed"},
            "frameworks": {f: FRAMEWORKS[f] for f in frameworks},
            "formula": "FLOPs/token = 4*N_frozen + 6*N_trainable + 12*layers*d_attn*ctx; N counts "
                       "every matmul weight (linear layers, LoRA A/B, LM head; not embedding "
                       "lookups); ctx = mean causal context of a token within its own example "
                       "(sum n(n+1)/2 / sum n over the train split). MFU = tokens/s x FLOPs/token "
                       "/ matmul peak. *_lm_head_on_supervised_only counts the LM head only at "
                       "positions with a loss.",
            "timing": "step time = wall time from the end of one optimizer step to the end of the "
                      "next (data, forward, backward, optimizer, hooks); tokens = real (non-pad) "
                      "tokens; model load and tokenization excluded; the first --warmup steps "
                      "of each run are not measured",
            "gpu": "benchmarks/bench_gpu.py (benchmarks/gpu_check.sh on a CUDA machine)",
            "models": {}, "runs": []}

    def finish(self, preps: dict[str, dict], complete: bool) -> dict[str, Any]:
        result = self.result
        result["complete"] = complete
        result["runs"] = [{k: v for k, v in r.items() if k != "profile"} for r in self.runs]
        for model, prep in preps.items():
            runs = [r for r in self.runs if r["model"] == model and "profile" not in r]
            if not runs:
                continue
            info = runs[0]["model_info"]
            flops = flops_per_token(info, prep["context"])
            block = {"model_path": prep["path"], "train_examples": prep["train_examples"],
                     "model_info": info, "attention_context": prep["context"],
                     "flops_per_token": flops, "same_examples": all(r["same_examples"] for r in runs),
                     "frameworks": {}}
            for fw in dict.fromkeys(r["framework"] for r in runs):
                summary = summarize_runs([r for r in runs if r["framework"] == fw], self.args.warmup)
                add_mfu(summary, flops, best_peaks(result))
                block["frameworks"][fw] = summary
            block["comparison"] = compare(block["frameworks"])
            result["models"][model] = block
        write_json(self.output, result)
        return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------

def run(args) -> int:
    if args.worker:
        return worker(args.worker)
    check_args(args)
    output = Path(args.output or DEFAULT_OUTPUT)
    result = Benchmark(args, output).execute()
    print(format_table(result))
    for model, block in result["models"].items():
        for name, t in block.get("comparison", {}).get("targets", {}).items():
            print(f"{model}: {name} = {t['value']:.3f} (target {t['target']}): "
                  f"{'met' if t['met'] else 'NOT met'}")
    loads = [r["load"]["load_1m"] for r in result["runs"]]
    print(f"load average at run start: {min(loads):.2f}..{max(loads):.2f}"
          f"{'' if all(r['load']['quiet'] for r in result['runs']) else ' (some runs on a busy machine)'}")
    print(f"result written to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
