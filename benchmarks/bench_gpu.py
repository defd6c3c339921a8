#!/usr/bin/env python3
"""GPU training throughput and memory: this pipeline's trainer against TRL and peft + transformers.

    bash benchmarks/gpu_check.sh                                   # the prepared GPU run
    python3 benchmarks/bench_gpu.py                                # the same, by hand (CUDA)
    python3 benchmarks/bench_gpu.py --shapes tiny --device cpu --seq-len 64 --steps 1   # smoke

Random-weight LLaMA models of real shapes (no download): ``7b`` (Llama-2-7B: MHA, 32k vocabulary)
and ``8b`` (Llama-3.1-8B: GQA, 128k vocabulary), one example of ``--seq-len`` tokens per step (the
first half a masked prompt), gradient checkpointing, LoRA r16 on every linear layer, in bf16
(``lora``) and on an nf4 base (``qlora``). Frameworks, each in a fresh process on the same weights
and examples:

    ours   llama_sft's Trainer.train_step with its CUDA precision (bf16 autocast, flash varlen
           attention for the packed row)
    trl    trl.SFTTrainer, bf16=True, padding_free=True (flash attention where installed)
    hf     peft + transformers Trainer, bf16=True, the example as one padded row

Per run: tokens/s over the measured steps, MFU against the GPU's bf16 matmul peak measured first,
peak reserved and allocated memory of training (the peak statistics are reset after the model is
built), and the first losses. ``--output`` (default ``benchmarks/results/gpu.json``) gets every
run, the ratios and the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_train import (csv_list, flops_per_token, log, machine_info,  # noqa: E402
                         matmul_params)
from llama_sft.errors import PipelineError, UsageError, run_main  # noqa: E402
from llama_sft.files import now_iso, write_json  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "gpu.json"
IGNORE_INDEX = -100
SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
}
PRESET_OF_SHAPE = {"7b": "7b", "8b": "8b", "tiny": "7b"}
FRAMEWORKS = ("ours", "trl", "hf")
METHODS = ("lora", "qlora")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}
LEARNING_RATE = 1e-4
TARGETS = {"ours_vs_trl_tokens_per_s": 1.3, "qlora_7b_reserved_gb": 8.0, "first5_loss_diff": 0.02}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="7b,8b", help="comma-separated, from: 7b, 8b, tiny "
                        "(default: 7b,8b)")
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora "
                        "(default: lora,qlora)")
    parser.add_argument("--frameworks", default="ours,trl,hf",
                        help="comma-separated: ours, trl, hf (default: ours,trl,hf)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu runs the same code at the tiny shape (default: cuda)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per example (default: "
                        "2048)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps (default: 4)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps "
                        "(default: 1)")
    parser.add_argument("--run-timeout", type=int, default=240,
                        help="seconds one run may take before it is stopped (default: 240)")
    parser.add_argument("--budget", type=int, default=0,
                        help="seconds for all runs; runs not started by then are listed as "
                             "skipped; 0: no limit (default: 0)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="result JSON (default: "
                        f"{DEFAULT_OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args) -> None:
    problems = []
    for name, valid in (("shapes", SHAPES), ("methods", METHODS), ("frameworks", FRAMEWORKS)):
        chosen = csv_list(getattr(args, name))
        unknown = sorted(set(chosen) - set(valid))
        if unknown or not chosen:
            problems.append(f"--{name}: give some of {', '.join(valid)}"
                            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if min(args.seq_len, args.steps, args.run_timeout) <= 0 or args.warmup < 0:
        problems.append("--seq-len, --steps and --run-timeout must be > 0, --warmup >= 0")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            problems.append("--device cuda: no CUDA device is visible; use --device cpu "
                            "--shapes tiny for the smoke run")
    if problems:
        raise UsageError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Worker side: one (shape, method, framework) in its own process

def build_random_llama(shape: str, device: str, attn_implementation: str = "sdpa"):
    """A random-weight LlamaForCausalLM in bf16 created on ``device``; the same weights every
    time (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16,
                                             attn_implementation=attn_implementation)


def quantize_4bit(model, compute_dtype) -> None:
    """Swap the decoder's nn.Linear layers for nf4 Linear4bit (double quant, as --use-4bit loads
    them), one at a time, dropping each bf16 original as it goes."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                  compute_dtype=compute_dtype, compress_statistics=True,
                                  quant_type="nf4", quant_storage=compute_dtype, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=compute_dtype,
                                         module=q)._quantize(device)
            setattr(parent, name, q)
            del child
    model.is_loaded_in_4bit = True


def synthetic_examples(n: int, seq_len: int, vocab: int) -> list[dict[str, list[int]]]:
    """Random-token examples of ``seq_len`` tokens, the first half a masked prompt."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen).tolist()
        half = seq_len // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * half + ids[half:]})
    return out


class Steps:
    """Wall time per optimizer step (CUDA synchronized at each step's end) and the losses."""

    def __init__(self, device: str):
        self.device, self.times, self.losses, self.t0 = device, [], [], 0.0

    def start(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def lap(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self.t0)
        self.t0 = now

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def reset_peaks(device: str) -> None:
    """Free what building the model left behind, then start the peak statistics from here."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_ours(spec: dict[str, Any], examples: list[dict], steps: Steps) -> dict[str, Any]:
    import types

    from accelerate import Accelerator

    from llama_sft.config.settings import KERNELS, resolve_config
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.tokenize import Encoded
    from llama_sft.model.kernels.packed_attention import packed_attention
    from llama_sft.model.kernels.selection import kernels_for
    from llama_sft.model.lora import attach_lora
    from llama_sft.train.examples import TrainData
    from llama_sft.train.precision import allow_tf32, choose_precision
    from llama_sft.train.trainer import Trainer

    device, qlora = spec["device"], spec["method"] == "qlora"
    precision = choose_precision("bfloat16", "lora", device)
    if device == "cuda":
        allow_tf32()
    kernels = kernels_for(KERNELS, device, sharded=False)
    model = build_random_llama(spec["shape"], device, packed_attention())
    if qlora:
        quantize_4bit(model, precision.weights)
    cfg = resolve_config(PRESET_OF_SHAPE[spec["shape"]], overrides={
        "method": "qlora" if qlora else "lora", "batch_size": 1, "gradient_accumulation_steps": 1,
        "max_steps": len(examples), "max_length": spec["seq_len"], "gradient_checkpointing": True,
        "learning_rate": LEARNING_RATE, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
        "lora_dropout": LORA["lora_dropout"], "lora_target_modules": LORA["target_modules"],
        "warmup_steps": 0, "lr_scheduler": "constant", "kernels": list(kernels)})
    model = attach_lora(model, cfg.lora, quantized=qlora, gradient_checkpointing=True,
                        kernels=kernels)
    data = TrainData([Encoded(e["input_ids"], e["labels"]) for e in examples], [], [])
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        trainer = Trainer(cfg, Path(tmp), data, model=model,
                          tokenizer=types.SimpleNamespace(pad_token_id=0),
                          fmt=PromptFormat("instruction"), accelerator=Accelerator(cpu=device == "cpu"),
                          progress=False, precision=precision)
        info = matmul_params(trainer.acc.unwrap_model(trainer.model))
        reset_peaks(device)
        steps.start()
        for example in data.train:
            steps.losses.append(trainer.train_step([[example]])["loss"])
            steps.lap()
    return {"model_info": info, "settings": {"precision": str(precision.autocast),
                                             "kernels": list(kernels)}}


def _peer_args(spec: dict[str, Any], tmp: str, n: int) -> dict[str, Any]:
    cuda = spec["device"] == "cuda"
    return {"output_dir": tmp, "max_steps": n, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch",
            "max_grad_norm": 1.0, "seed": 42, "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False}, "bf16": cuda,
            "use_cpu": not cuda, "eval_strategy": "no", "save_strategy": "no",
            "logging_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "dataloader_num_workers": 0, "train_sampling_strategy": "sequential"}


def _step_callback(steps: Steps):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            steps.start()

        def on_step_end(self, args, state, control, **kwargs):
            steps.lap()

    return StepTimes()


def _loss_recording(base, steps: Steps):
    class Recording(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            steps.losses.append(float(loss))     # one micro-batch per step here
            return loss
    return Recording


def _peer_model(spec: dict[str, Any]):
    import importlib.util

    attn = "flash_attention_2" if spec["device"] == "cuda" and \
        importlib.util.find_spec("flash_attn") else "sdpa"
    model = build_random_llama(spec["shape"], spec["device"], attn)
    if spec["method"] == "qlora":
        import torch
        quantize_4bit(model, torch.bfloat16)
    return model, attn


def run_trl(spec: dict[str, Any], examples: list[dict], steps: Steps) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    model, attn = _peer_model(spec)
    rows = [{"input_ids": e["input_ids"],
             "completion_mask": [int(label != IGNORE_INDEX) for label in e["labels"]]}
            for e in examples]
    tokenizer = _stub_tokenizer(PreTrainedTokenizerFast)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        args = SFTConfig(**_peer_args(spec, tmp, len(examples)), padding_free=True,
                         max_length=None, completion_only_loss=True)
        trainer = _loss_recording(SFTTrainer, steps)(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"),
            callbacks=[_step_callback(steps)])
        info = matmul_params(trainer.model)
        reset_peaks(spec["device"])
        trainer.train()
    return {"model_info": info, "settings": {"bf16": args.bf16, "padding_free": True,
                                             "attn_implementation": attn}}


def run_hf(spec: dict[str, Any], examples: list[dict], steps: Steps) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator

    model, attn = _peer_model(spec)
    if spec["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
             "labels": e["labels"]} for e in examples]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        trainer = _loss_recording(Trainer, steps)(
            model=model, args=TrainingArguments(**_peer_args(spec, tmp, len(examples))),
            train_dataset=Dataset.from_list(rows), data_collator=default_data_collator,
            callbacks=[_step_callback(steps)])
        info = matmul_params(trainer.model)
        reset_peaks(spec["device"])
        trainer.train()
    return {"model_info": info, "settings": {"bf16": spec["device"] == "cuda",
                                             "attn_implementation": attn}}


def _stub_tokenizer(cls):
    """A minimal fast tokenizer for SFTTrainer (the data arrive tokenized; only pad/eos ids are
    read)."""
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return cls(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
               unk_token="<unk>")


RUNNERS = {"ours": run_ours, "trl": run_trl, "hf": run_hf}


def worker(spec_path: str) -> int:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    n = spec["steps"] + spec["warmup"]
    examples = synthetic_examples(n, spec["seq_len"], SHAPES[spec["shape"]]["vocab_size"])
    steps = Steps(spec["device"])
    extra = RUNNERS[spec["framework"]](spec, examples, steps)
    cuda = spec["device"] == "cuda"
    measured = steps.times[spec["warmup"]:]
    row = {**{k: spec[k] for k in ("shape", "method", "framework", "seq_len")},
           "tokens_per_s": spec["seq_len"] * len(measured) / sum(measured),
           "step_time_s": sum(measured) / len(measured), "losses": steps.losses,
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
           "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
           **extra}
    write_json(spec["output"], row)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side

def gpu_bf16_peak(seconds: float = 2.0, n: int = 8192) -> float:
    """Best sustained bf16 matmul TFLOP/s of the GPU (n x n)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best / 1e12


def launch(spec: dict[str, Any], tmp: Path, timeout: int) -> dict[str, Any]:
    spec_path = tmp / f"{spec['tag']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                               str(spec_path)], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_ident(spec), "error": f"stopped after {timeout} s"}
    if proc.returncode != 0 or not Path(spec["output"]).exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
        return {**_ident(spec), "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(Path(spec["output"]).read_text())


def _ident(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("shape", "method", "framework", "seq_len")}


def completed(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


def add_mfu(row: dict[str, Any], peak_tflops: float | None) -> None:
    if not completed(row) or not peak_tflops:
        return
    flops = flops_per_token(row["model_info"], context=row["seq_len"] / 2)
    row["flops_per_token"] = flops["total"]
    row["mfu_bf16"] = row["tokens_per_s"] * flops["total"] / (peak_tflops * 1e12)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape and method: ours against TRL and hf (tokens/s, reserved memory, first-5 loss
    difference), and the targets."""
    out: dict[str, Any] = {}
    by = {(r["shape"], r["method"], r["framework"]): r for r in rows if completed(r)}
    for shape, method in dict.fromkeys((r["shape"], r["method"]) for r in rows):
        ours = by.get((shape, method, "ours"))
        if ours is None:
            continue
        block = {}
        for peer in ("trl", "hf"):
            other = by.get((shape, method, peer))
            if other is None:
                continue
            first = min(5, len(ours["losses"]), len(other["losses"]))
            block[peer] = {
                "tokens_per_s_ratio": ours["tokens_per_s"] / other["tokens_per_s"],
                "reserved_gb_ours_minus_peer": None if ours["peak_reserved_gb"] is None
                else ours["peak_reserved_gb"] - other["peak_reserved_gb"],
                "first5_loss_max_rel_diff": max(abs(a - b) / abs(b) for a, b in
                                                zip(ours["losses"][:first], other["losses"][:first]))}
        out[f"{shape}/{method}"] = block
    return out


def targets(rows: list[dict[str, Any]], comparison: dict[str, Any]) -> dict[str, Any]:
    met = {}
    ratios = [b["trl"]["tokens_per_s_ratio"] for b in comparison.values() if "trl" in b]
    if ratios:
        met["ours_vs_trl_tokens_per_s"] = {"value": min(ratios),
                                           "target": TARGETS["ours_vs_trl_tokens_per_s"],
                                           "met": min(ratios) >= TARGETS["ours_vs_trl_tokens_per_s"]}
    qlora = next((r for r in rows if (r["shape"], r["method"], r["framework"]) ==
                  ("7b", "qlora", "ours") and completed(r)), None)
    if qlora is not None and qlora["peak_reserved_gb"] is not None:
        met["qlora_7b_reserved_gb"] = {"value": qlora["peak_reserved_gb"],
                                       "target": TARGETS["qlora_7b_reserved_gb"],
                                       "met": qlora["peak_reserved_gb"] < TARGETS["qlora_7b_reserved_gb"]}
    diffs = [b["trl"]["first5_loss_max_rel_diff"] for b in comparison.values() if "trl" in b]
    if diffs:
        met["first5_loss_diff"] = {"value": max(diffs), "target": TARGETS["first5_loss_diff"],
                                   "met": max(diffs) < TARGETS["first5_loss_diff"]}
    return met


def estimate_for(shape: str, method: str, seq_len: int) -> dict[str, float] | None:
    """The pipeline's memory estimate for this run (real shapes only), to set beside the peak."""
    if shape == "tiny":
        return None
    from llama_sft.config.hardware import estimate_training_memory
    from llama_sft.config.presets import get_preset

    preset = get_preset(PRESET_OF_SHAPE[shape])
    return estimate_training_memory(
        preset, quantization="4bit" if method == "qlora" else "none", method="lora",
        lora_r=LORA["r"], lora_targets=tuple(LORA["target_modules"]), batch_size=1,
        max_length=seq_len, gradient_checkpointing=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':<6}{'method':<7}{'framework':<10}{'tokens/s':>10}{'MFU':>8}"
             f"{'reserved GB':>13}{'first losses':>40}"]
    for r in rows:
        if not completed(r):
            why = r.get("error") or r["skipped"]
            lines.append(f"{r['shape']:<6}{r['method']:<7}{r['framework']:<10}  {why}")
            continue
        mfu = f"{r['mfu_bf16']:.1%}" if r.get("mfu_bf16") is not None else "-"
        reserved = f"{r['peak_reserved_gb']:.2f}" if r["peak_reserved_gb"] is not None else "-"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:5])
        lines.append(f"{r['shape']:<6}{r['method']:<7}{r['framework']:<10}"
                     f"{r['tokens_per_s']:>10.0f}{mfu:>8}{reserved:>13}  {losses}")
    return "\n".join(lines)


def run(args) -> int:
    if args.worker:
        return worker(args.worker)
    check_args(args)
    peak = gpu_bf16_peak() if args.device == "cuda" else None
    deadline = time.monotonic() + args.budget if args.budget else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for shape in csv_list(args.shapes):
            for method in csv_list(args.methods):
                for framework in csv_list(args.frameworks):
                    tag = f"{shape}-{method}-{framework}"
                    ident = {"shape": shape, "method": method, "framework": framework,
                             "seq_len": args.seq_len}
                    if deadline is not None and time.monotonic() > deadline:
                        rows.append({**ident, "skipped": f"--budget {args.budget} s spent"})
                        continue
                    log(f"run {tag}")
                    spec = {"tag": tag, "shape": shape, "method": method, "framework": framework,
                            "device": args.device, "seq_len": args.seq_len, "steps": args.steps,
                            "warmup": args.warmup, "output": str(Path(tmp) / f"{tag}.out.json")}
                    row = launch(spec, Path(tmp), args.run_timeout)
                    add_mfu(row, peak)
                    row["memory_estimate"] = estimate_for(shape, method, args.seq_len)
                    rows.append(row)
    comparison = compare(rows)
    result = {"benchmark": "gpu", "created": now_iso(), "machine": machine_info(),
              "device": args.device, "bf16_peak_tflops": peak,
              "settings": {"seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                           "batch_size": 1, "gradient_checkpointing": True, "lora": LORA,
                           "learning_rate": LEARNING_RATE},
              "runs": rows, "comparison": comparison, "targets": targets(rows, comparison)}
    write_json(args.output, result)
    print(format_table(rows))
    for name, t in result["targets"].items():
        print(f"{name} = {t['value']:.3f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    print(f"result written to {args.output}")
    skipped = [f"{r['shape']}/{r['method']}/{r['framework']}" for r in rows if "skipped" in r]
    if skipped:
        print(f"skipped for time: {', '.join(skipped)}")
    failed = [r for r in rows if "error" in r]
    if failed:
        raise PipelineError(f"{len(failed)} of {len(rows)} runs failed: "
                            + "; ".join(f"{r['shape']}/{r['method']}/{r['framework']}: "
                                        f"{r['error']}" for r in failed), 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
