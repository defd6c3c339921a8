#!/usr/bin/env python3
"""Pilot run: a short training on the golden set that says go or no-go for the full run.

    python3 llama_pilot.py --golden-set ./sft_output/golden_set.jsonl --output-dir ./pilot_output
    python3 llama_pilot.py --golden-set ./sft_output/golden_set.jsonl --output-dir ./pilot_output \\
      --model-size 7b --max-steps 100 --use-4bit --use-wandb

The pilot is llama_train.py's trainer with pilot defaults (--max-steps 100, evaluation every
quarter, 4-bit where CUDA is present) plus checks, each with its measured value, threshold and
pass/fail:
  data       supervised-token ratio in range, EOS supervised in every example, no zero-label
             example, the prompt format round-trips through the tokenizer
  learning   loss fell by a meaningful fraction, no NaN/inf, finite gradient norms
  capacity   the model fits the golden set (final eval loss low enough)
  stopping   share of generations that end with EOS before --max-new-tokens
  resources  tokens/s, peak memory vs the estimate, projected full-run time, memory fit per preset
Writes pilot_evaluation.json and final_model/ into --output-dir. Exit 0 on go, 1 on no-go.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama_io import EXIT_GATE, EXIT_OK, HelpFormatter, run_main
from llama_train import add_training_flags, check_runnable, config_from_args, report_targets

REPORT = "pilot_evaluation.json"


@dataclass
class Check:
    group: str
    name: str
    value: Any
    threshold: str
    passed: bool
    detail: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--golden-set", required=True, help="golden_set.jsonl from the prep stage")
    parser.add_argument("--dataset", default=None,
                        help="full sft_dataset.jsonl, for the projected full-run time "
                             "(default: sft_dataset.jsonl beside the golden set, if present)")
    add_training_flags(parser)
    parser.set_defaults(max_steps=100)
    next(a for a in parser._actions if a.dest == "max_steps").help = "optimizer steps (default: 100)"
    g = parser.add_argument_group("pilot thresholds")
    g.add_argument("--num-samples", type=int, default=16, help="golden prompts generated at the end")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation limit for samples")
    g.add_argument("--min-loss-drop", type=float, default=0.2,
                   help="required relative fall of the training loss (first vs last steps)")
    g.add_argument("--max-final-loss", type=float, default=1.0,
                   help="capacity: final eval loss on the golden set must be below this")
    g.add_argument("--min-stop-rate", type=float, default=0.8,
                   help="share of generations that must end with EOS")
    g.add_argument("--supervised-ratio", default="0.01,0.95",
                   help="allowed range of supervised tokens / all tokens")
    return parser


# ---------------------------------------------------------------------------------------------
# Checks

def data_checks(tokenizer, fmt, records, max_length: int, ratio_range: tuple[float, float]):
    """Checks on the exact tensors training will see (before any model is loaded)."""
    import llama_dataset

    eos = tokenizer.eos_token_id
    encoded = [llama_dataset.encode_example(tokenizer, fmt, r, max_length) for r in records]
    kept = [e for e in encoded if e is not None]
    zero = sum(1 for e in kept if e.num_supervised == 0) + (len(encoded) - len(kept))
    no_eos = sum(1 for e in kept if eos not in [t for t in e.labels if t != llama_dataset.IGNORE_INDEX])
    tokens = sum(len(e) for e in kept)
    ratio = sum(e.num_supervised for e in kept) / tokens if tokens else 0.0
    bad_roundtrip = [r.get("id") for r in records[:50] if not _roundtrips(tokenizer, fmt, r)]
    lo, hi = ratio_range
    return [
        Check("data", "supervised_token_ratio", round(ratio, 4), f"in [{lo}, {hi}]",
              lo <= ratio <= hi),
        Check("data", "examples_without_eos_label", no_eos, "== 0", no_eos == 0,
              "EOS must be supervised or the model never learns to stop"),
        Check("data", "zero_label_examples", zero, "== 0", zero == 0),
        Check("data", "prompt_roundtrip_failures", len(bad_roundtrip), "== 0", not bad_roundtrip,
              ", ".join(map(str, bad_roundtrip[:5]))),
    ]


def _roundtrips(tokenizer, fmt, record) -> bool:
    text = fmt.render(tokenizer, record["instruction"], record.get("context") or "")
    ids = fmt.encode_prompt(tokenizer, record["instruction"], record.get("context") or "")
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if fmt.adds_special_tokens and tokenizer.bos_token and decoded.startswith(tokenizer.bos_token):
        decoded = decoded[len(tokenizer.bos_token):].lstrip(" ") if not text.startswith(" ") else \
            decoded[len(tokenizer.bos_token):]
    return decoded == text


def learning_checks(rows: list[dict], min_drop: float) -> tuple[list[Check], dict[str, float]]:
    losses = [r["loss"] for r in rows if "loss" in r]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    bad = rows[-1].get("bad_steps", 0) if rows else 0
    k = max(1, min(5, len(losses) // 4))
    first = statistics.fmean(losses[:k]) if losses else float("nan")
    last = statistics.fmean(losses[-k:]) if losses else float("nan")
    drop = (first - last) / first if losses and first > 0 else 0.0
    finite = all(math.isfinite(x) for x in losses + norms)
    return [
        Check("learning", "loss_drop", round(drop, 4), f">= {min_drop}", drop >= min_drop,
              f"first {first:.4f} -> last {last:.4f}"),
        Check("learning", "non_finite_steps", bad, "== 0", bad == 0 and finite),
        Check("learning", "grad_norm_finite", all(math.isfinite(x) for x in norms), "true",
              bool(norms) and all(math.isfinite(x) for x in norms),
              f"max {max(norms):.3g}" if norms else "no steps"),
    ], {"first_loss": first, "last_loss": last}


def resource_report(cfg, rows, wall_s: float, full_tokens: int | None, peak_mb: float) -> dict:
    from llama_config import PRESETS, detect_hardware, estimate_training_memory_gb

    hw = detect_hardware()
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tps = statistics.median(speeds) if speeds else 0.0
    epochs = cfg.optim.num_epochs
    projected = (full_tokens * epochs / tps) if full_tokens and tps else None
    if cfg.preset.max_steps and full_tokens and speeds:
        tokens_per_step = statistics.fmean(r["tokens_per_s"] * r["step_time_s"] for r in rows
                                           if "tokens_per_s" in r)
        projected = min(projected, cfg.preset.max_steps * tokens_per_step / tps)
    estimate = estimate_training_memory_gb(
        cfg.preset, quantization=cfg.model.quantization, method=cfg.model.method,
        lora_r=cfg.lora.lora_r, lora_targets=cfg.lora.lora_target_modules,
        batch_size=cfg.optim.batch_size, max_length=cfg.data.max_length,
        gradient_checkpointing=cfg.model.gradient_checkpointing)
    budget = max((g["memory_gb"] for g in hw["gpus"]), default=None)
    if budget is None:
        import psutil
        budget = round(psutil.virtual_memory().total / 1e9, 1)
    fits = {name: _fit(p, budget) for name, p in PRESETS.items()}
    return {"tokens_per_s": round(tps, 1), "pilot_wall_s": round(wall_s, 1),
            "peak_memory_mb": round(peak_mb, 1), "memory_estimate_gb": round(estimate, 2),
            "memory_kind": "cuda max_memory_allocated" if hw["cuda"] else "process RSS (CPU)",
            "projected_full_run_s": round(projected, 1) if projected else None,
            "full_run_tokens": full_tokens, "hardware": hw, "memory_budget_gb": budget,
            "preset_fit": fits}


def _fit(preset, budget_gb: float) -> dict[str, Any]:
    """Whether a preset's defaults fit ``budget_gb``; if not, the first variant that does."""
    from llama_config import estimate_training_memory_gb

    def est(quant, bs, ckpt):
        return estimate_training_memory_gb(preset, quantization=quant, method="lora",
                                           lora_r=preset.lora_r,
                                           lora_targets=preset.lora_target_modules, batch_size=bs,
                                           max_length=preset.max_length, gradient_checkpointing=ckpt)
    base = est(preset.quantization, preset.batch_size, preset.gradient_checkpointing)
    result = {"estimate_gb": round(base, 1), "fits": base <= budget_gb}
    if not result["fits"]:
        global_batch = preset.batch_size * preset.gradient_accumulation_steps
        for quant in dict.fromkeys((preset.quantization, "4bit")):
            for bs in (preset.batch_size, 2, 1):
                if bs <= preset.batch_size and est(quant, bs, True) <= budget_gb:
                    result["suggestion"] = {"quantization": quant, "batch_size": bs,
                                            "gradient_accumulation_steps": max(1, global_batch // bs),
                                            "gradient_checkpointing": True,
                                            "estimate_gb": round(est(quant, bs, True), 1)}
                    return result
        result["suggestion"] = f"needs more than {budget_gb} GB even at 4-bit, batch 1; use " \
                               f"{preset.num_gpus}+ GPUs with FSDP ({preset.accelerate_config})"
    return result


# ---------------------------------------------------------------------------------------------

def print_table(checks: list[Check], verdict: str) -> None:
    ordered = sorted(checks, key=lambda c: c.passed)
    print(f"\npilot verdict: {verdict.upper()}")
    print(f"{'':4} {'group':<10} {'check':<28} {'value':>12}  threshold")
    for c in ordered:
        value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
        print(f"{'ok' if c.passed else 'FAIL':<4} {c.group:<10} {c.name:<28} {value:>12}  "
              f"{c.threshold}  {c.detail}".rstrip())


def run(args) -> int:
    import torch

    from llama_dataset import PromptFormat, read_sft_jsonl
    from llama_io import describe_inputs, now_iso, verify_file_against_manifest, write_json
    from llama_model import generate_many, load_tokenizer
    from llama_trainer import build_trainer

    if args.use_4bit is False and not args.use_8bit and args.method is None and \
            torch.cuda.is_available():
        args.use_4bit = True  # pilot default: QLoRA where CUDA is present
    max_steps = args.max_steps
    pilot_file = {"eval_steps": max(1, max_steps // 4), "save_steps": max_steps + 1,
                  "num_eval_samples": 0, "early_stopping_patience": None}
    cfg = config_from_args(args, extra_file_values={k: v for k, v in pilot_file.items()
                                                    if args.__dict__.get(k) is None})
    targets = report_targets(args)
    check_runnable(cfg)
    lo, hi = (float(x) for x in args.supervised_ratio.split(","))
    verify_file_against_manifest(args.golden_set)
    golden = read_sft_jsonl(args.golden_set)
    dataset = Path(args.dataset) if args.dataset else Path(args.golden_set).with_name(
        "sft_dataset.jsonl")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    checks = data_checks(tokenizer, fmt, golden, cfg.data.max_length, (lo, hi))
    report: dict[str, Any] = {"stage": "pilot", "created": now_iso(), "config": cfg.to_dict(),
                              "golden_set": str(args.golden_set), "golden_examples": len(golden)}
    trained = next(c for c in checks if c.name == "zero_label_examples").value < len(golden)
    if trained:
        t0 = time.time()
        trainer = build_trainer(cfg, out, train_records=golden, eval_records=golden,
                                sample_records=[], report_to=targets, stage="pilot",
                                wandb_project=args.wandb_project, progress=not args.no_progress,
                                inputs=describe_inputs({"golden_set": args.golden_set}))
        result = trainer.run()
        wall = time.time() - t0
        rows = [r for r in _read_rows(out / "metrics.jsonl")]
        learn, losses = learning_checks([r for r in rows if "loss" in r], args.min_loss_drop)
        checks += learn
        final_eval = result.best_eval_loss
        checks.append(Check("capacity", "final_eval_loss", round(final_eval, 4) if final_eval
                            is not None else None, f"< {args.max_final_loss}",
                            final_eval is not None and final_eval < args.max_final_loss,
                            f"first eval {result.first_eval_loss:.4f}" if result.first_eval_loss
                            else ""))
        samples = golden[:args.num_samples]
        model = trainer.acc.unwrap_model(trainer.model)
        prompts = [fmt.encode_prompt(tokenizer, r["instruction"], r.get("context") or "")
                   for r in samples]
        gens, _ = generate_many(model, tokenizer, prompts, batch_size=8,
                                max_new_tokens=args.max_new_tokens)
        stop_rate = sum(g.stopped for g in gens) / len(gens) if gens else 0.0
        checks.append(Check("stopping", "stop_rate", round(stop_rate, 4), f">= {args.min_stop_rate}",
                            stop_rate >= args.min_stop_rate, f"{len(gens)} generations"))
        full_tokens = _full_run_tokens(dataset, tokenizer, fmt, cfg) if dataset.exists() else None
        peak = max((r.get("memory_mb", 0) for r in rows), default=0.0)
        resources = resource_report(cfg, rows, wall, full_tokens, peak)
        fit = resources["preset_fit"][cfg.model.model_size]
        checks.append(Check("resources", "memory_fit", fit["estimate_gb"],
                            f"<= {resources['memory_budget_gb']} GB", fit["fits"],
                            str(fit.get("suggestion", ""))))
        report.update(losses=losses, resources=resources, train_summary=result.summary,
                      samples=[{"id": r.get("id"), "category": r.get("category"),
                                "prompt": fmt.render(tokenizer, r["instruction"],
                                                     r.get("context") or ""),
                                "reference": r["response"], "generation": g.text,
                                "stopped": g.stopped, "exact_match": g.text.strip() ==
                                r["response"].strip()} for r, g in zip(samples, gens)])
    verdict = "go" if all(c.passed for c in checks) else "no-go"
    report["verdict"] = verdict
    report["failed_checks"] = [c.name for c in checks if not c.passed]
    report["checks"] = [asdict(c) for c in sorted(checks, key=lambda c: c.passed)]
    write_json(out / REPORT, report)
    print_table(checks, verdict)
    print(f"report: {out / REPORT}")
    return EXIT_OK if verdict == "go" else EXIT_GATE


def _read_rows(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _full_run_tokens(dataset: Path, tokenizer, fmt, cfg) -> int:
    """Tokens one epoch of the full train split takes (for the projected wall time)."""
    from llama_dataset import encode_records, read_sft_jsonl

    train = read_sft_jsonl(dataset, split="train")
    kept, _ = encode_records(tokenizer, fmt, train, cfg.data.max_length)
    return sum(len(e) for e in kept)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
