#!/usr/bin/env python3
"""Fine-tune a LLaMA model on the prep stage's SFT data (LoRA, QLoRA, 8-bit or full).

    python3 llama_train.py --model-size 7b --dataset ./sft_output/sft_dataset.jsonl \\
      --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output \\
      --config ./sft_output/training_config.json --use-4bit --use-wandb

    # the embedded CPU default, offline:
    python3 llama_train.py --model-size 135m --dataset ./sft_output/sft_dataset.jsonl \\
      --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output \\
      --config ./sft_output/training_config.json

    # several GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml llama_train.py ...

Settings resolve as preset (--model-size) < --config JSON < explicit flags; flags left out keep
the preset's value (shown as "preset" below). The resolved config is printed and saved.
Writes into --output-dir: checkpoint-*/ (resumable), final_model/ (PEFT adapter + tokenizer +
prompt_format.json + training_config.json + manifest.json), metrics.jsonl, metrics_summary.json,
loss_curve.png, tensorboard/, manifest.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama_config import DEFAULT_SIZE, PRESETS, load_config_file, resolve_config
from llama_io import EXIT_GATE, EXIT_OK, DataError, HelpFormatter, UsageError, run_main

PRESET = "preset"


def _bool_flag(parser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), default=None,
                        action=argparse.BooleanOptionalAction, help=f"{help_text} (default: {PRESET})")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by llama_train.py and llama_pilot.py; all default to None ("use preset")."""
    p = parser
    p.add_argument("--model-size", default=None,
                   help=f"preset: {', '.join(PRESETS)} (default: {DEFAULT_SIZE})")
    p.add_argument("--base-model", default=None, help="hub id or local dir overriding the preset's")
    p.add_argument("--config", default=None, help="JSON config (e.g. sft_output/training_config.json)")
    p.add_argument("--output-dir", required=True, help="where checkpoints and final_model/ go")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--use-4bit", action="store_true", help="QLoRA: nf4 4-bit base with double quant")
    q.add_argument("--use-8bit", action="store_true", help="8-bit base (LLM.int8)")
    p.add_argument("--method", choices=("lora", "qlora", "full"), default=None,
                   help=f"fine-tuning method (default: {PRESET})")
    for flag, kind, text in (
            ("lora-r", int, "LoRA rank"), ("lora-alpha", int, "LoRA alpha"),
            ("lora-dropout", float, "LoRA dropout"),
            ("lora-target-modules", str, "comma-separated module names"),
            ("batch-size", int, "examples per device per micro-step"),
            ("gradient-accumulation-steps", int, "micro-steps per optimizer step"),
            ("learning-rate", float, "peak learning rate"),
            ("num-epochs", int, "epochs (ignored when --max-steps is set)"),
            ("max-steps", int, "optimizer steps"),
            ("max-length", int, "max tokens per example"),
            ("eval-steps", int, "evaluate every N steps"),
            ("save-steps", int, "checkpoint every N steps"),
            ("save-total-limit", int, "checkpoints kept"),
            ("early-stopping-patience", int, "evaluations without improvement before stopping"),
            ("warmup-steps", int, "linear warm-up steps"),
            ("seed", int, "random seed"),
            ("dtype", str, "auto|bfloat16|float16|float32")):
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"{text} (default: {PRESET})")
    _bool_flag(p, "packing", "padding-free packing of each batch")
    _bool_flag(p, "gradient-checkpointing", "gradient checkpointing")
    p.add_argument("--use-wandb", action="store_true",
                   help="log to Weights & Biases (offline mode when no key is configured)")
    p.add_argument("--wandb-project", default="llama-sft", help="W&B project")
    p.add_argument("--report-to", default="tensorboard",
                   help="comma-separated: tensorboard, wandb, none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


FLAG_KEYS = ("model_size", "base_model", "method", "lora_r", "lora_alpha", "lora_dropout",
             "lora_target_modules", "batch_size", "gradient_accumulation_steps", "learning_rate",
             "num_epochs", "max_steps", "max_length", "eval_steps", "save_steps",
             "save_total_limit", "early_stopping_patience", "warmup_steps", "seed", "dtype",
             "packing", "gradient_checkpointing")


def config_from_args(args, extra_file_values: dict | None = None):
    """Resolve preset < --config file < explicit flags."""
    overrides = {k: getattr(args, k) for k in FLAG_KEYS}
    if args.use_4bit:
        overrides["quantization"] = "4bit"
    elif args.use_8bit:
        overrides["quantization"] = "8bit"
    file_values = dict(extra_file_values or {})
    if args.config:
        file_values.update(load_config_file(args.config))
    return resolve_config(overrides.get("model_size"), file_values=file_values,
                          overrides=overrides, origin=args.config or "config")


def report_targets(args) -> tuple[str, ...]:
    targets = {t.strip() for t in args.report_to.split(",") if t.strip() and t.strip() != "none"}
    if args.use_wandb:
        targets.add("wandb")
    unknown = targets - {"tensorboard", "wandb"}
    if unknown:
        raise UsageError(f"--report-to: unknown target(s) {', '.join(sorted(unknown))}")
    return tuple(sorted(targets))


def check_runnable(cfg) -> None:
    """Refuse, before loading anything, a run this machine cannot do."""
    import importlib.util

    if cfg.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use-4bit/--use-8bit need bitsandbytes (pip install bitsandbytes)")
    preset = cfg.preset
    if cfg.base_model == preset.base_model and preset.min_gpu_memory_gb > 0:
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--model-size {preset.name} ({preset.base_model}) needs a CUDA GPU "
                             f"with {preset.min_gpu_memory_gb:g} GB; none found. On a CPU use "
                             f"--model-size 135m (the embedded model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="sft_dataset.jsonl: train split trains, val split evaluates")
    parser.add_argument("--golden-set", default=None,
                        help="golden_set.jsonl: prompts generated at each evaluation (and the "
                             "eval set when the dataset has no val split)")
    parser.add_argument("--resume", default=None, nargs="?", const="auto",
                        help="auto (newest complete checkpoint in --output-dir) or a checkpoint dir")
    add_training_flags(parser)
    return parser


def run(args) -> int:
    from llama_dataset import read_sft_jsonl
    from llama_io import describe_inputs, verify_file_against_manifest
    from llama_trainer import OOM_ADVICE, build_trainer, find_resume_checkpoint, is_oom

    cfg = config_from_args(args)
    targets = report_targets(args)
    check_runnable(cfg)
    out = Path(args.output_dir)
    for path in filter(None, (args.dataset, args.golden_set)):
        verify_file_against_manifest(path)
    records = read_sft_jsonl(args.dataset)
    if not records:
        raise DataError(f"0 valid examples in {args.dataset}: the file holds no records; "
                        f"re-run pipeline_sft_prep.py")
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "val"]
    golden = read_sft_jsonl(args.golden_set) if args.golden_set else []
    if not evals:
        evals = golden
    if not train:
        raise UsageError(f"{args.dataset} has no records with split 'train'")
    resume = find_resume_checkpoint(out, args.resume)
    if os.environ.get("RANK", "0") == "0":       # accelerate launch starts one copy per rank
        print("resolved config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()),
              file=sys.stderr)
    inputs = describe_inputs({k: v for k, v in (("dataset", args.dataset),
                                                ("golden_set", args.golden_set)) if v})
    try:
        trainer = build_trainer(cfg, out, train_records=train, eval_records=evals,
                                sample_records=golden or evals, inputs=inputs, report_to=targets,
                                wandb_project=args.wandb_project, progress=not args.no_progress)
        result = trainer.run(resume=resume)
    except RuntimeError as exc:
        if is_oom(exc):
            print(f"error: {OOM_ADVICE}", file=sys.stderr)
            return EXIT_GATE
        raise
    if not trainer.is_main:        # under accelerate launch only rank 0 reports
        return EXIT_OK
    first, best = result.first_eval_loss, result.best_eval_loss
    change = f"eval loss {first:.4f} -> {best:.4f}" if first is not None and best is not None else ""
    print(f"done: {result.steps} steps{' (early stop)' if result.stopped_early else ''}; {change}; "
          f"final model in {result.final_model}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
