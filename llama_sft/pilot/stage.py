"""The pilot stage: a short training on the golden set, its checks, and the go / no-go report."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llama_sft.config.flags import config_from_args, report_targets
from llama_sft.config.hardware import check_runnable
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.records import read_sft_jsonl
from llama_sft.errors import EXIT_GATE, EXIT_OK
from llama_sft.files import describe_inputs, now_iso, verify_file_against_manifest, write_json
from llama_sft.model.generation.batch import generate_many
from llama_sft.model.loading import load_tokenizer
from llama_sft.pilot.checks import Check, data_checks, learning_checks
from llama_sft.pilot.resources import _full_run_tokens, resource_report
from llama_sft.train.build import build_trainer
from llama_sft.train.callbacks import RowRecorder

REPORT = "pilot_evaluation.json"


def print_table(checks: list[Check], verdict: str) -> None:
    ordered = sorted(checks, key=lambda c: c.passed)
    print(f"\npilot verdict: {verdict.upper()}")
    print(f"{'':4} {'group':<10} {'check':<28} {'value':>12}  threshold")
    for c in ordered:
        value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
        print(f"{'ok' if c.passed else 'FAIL':<4} {c.group:<10} {c.name:<28} {value:>12}  "
              f"{c.threshold}  {c.detail}".rstrip())


def pilot_defaults(max_steps: int) -> dict[str, Any]:
    """The pilot's own settings (over the preset, under --config and flags): four evaluations,
    no checkpoint before the end, no samples during training, no early stop."""
    return {"eval_steps": max(1, max_steps // 4), "save_steps": max_steps + 1,
            "num_eval_samples": 0, "early_stopping_patience": None}


def run(args) -> int:
    """Data checks, a short training, learning/stopping/resource checks, the go / no-go report."""
    import torch

    if args.use_4bit is False and not args.use_8bit and args.method is None and \
            torch.cuda.is_available():
        args.use_4bit = True  # pilot default: QLoRA where CUDA is present
    cfg = config_from_args(args, stage_defaults=pilot_defaults(args.max_steps))
    targets = report_targets(args)      # a bad --report-to fails before anything is loaded
    check_runnable(cfg)
    lo, hi = (float(x) for x in args.supervised_ratio.split(","))
    verify_file_against_manifest(args.golden_set)
    golden = read_sft_jsonl(args.golden_set)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.prompt_style)
    checks = data_checks(tokenizer, fmt, golden, cfg.data.max_length, (lo, hi))
    report: dict[str, Any] = {"stage": "pilot", "created": now_iso(), "config": cfg.to_dict(),
                              "golden_set": str(args.golden_set), "golden_examples": len(golden)}
    if next(c for c in checks if c.name == "zero_label_examples").value < len(golden):
        report.update(train_and_check(args, cfg, targets, golden, tokenizer, fmt, checks))
    verdict = "go" if all(c.passed for c in checks) else "no-go"
    report["verdict"] = verdict
    report["failed_checks"] = [c.name for c in checks if not c.passed]
    report["checks"] = [asdict(c) for c in sorted(checks, key=lambda c: c.passed)]
    write_json(out / REPORT, report)
    if "mlflow" in targets and (out / "final_model" / "tracking.json").is_file():
        from llama_sft.tracking import TrackedRun

        TrackedRun.for_adapter(out / "final_model", "--report-to").log_artifact(out / REPORT,
                                                                              "pilot")
    print_table(checks, verdict)
    print(f"report: {out / REPORT}")
    return EXIT_OK if verdict == "go" else EXIT_GATE


def train_and_check(args, cfg, targets: tuple[str, ...], golden: list[dict], tokenizer, fmt,
                    checks: list[Check]) -> dict[str, Any]:
    """Train on the golden set, add the learning, capacity, stopping and resource checks to
    ``checks``, and return the report's training sections."""
    out = Path(args.output_dir)
    rows = RowRecorder()
    t0 = time.time()
    trainer = build_trainer(cfg, out, train_records=golden, eval_records=golden,
                            sample_records=[], report_to=targets, stage="pilot",
                            wandb_project=args.wandb_project, progress=not args.no_progress,
                            inputs=describe_inputs({"golden_set": args.golden_set}),
                            callbacks=[rows])
    result = trainer.run()
    wall = time.time() - t0
    learn, losses = learning_checks([r for r in rows.rows if "loss" in r], args.min_loss_drop)
    checks += learn
    final_eval = result.best_eval_loss
    checks.append(Check("capacity", "final_eval_loss", round(final_eval, 4) if final_eval
                        is not None else None, f"< {args.max_final_loss}",
                        final_eval is not None and final_eval < args.max_final_loss,
                        f"first eval {result.first_eval_loss:.4f}" if result.first_eval_loss
                        else ""))
    samples = golden[:args.num_samples]
    model = trainer.acc.unwrap_model(trainer.model)
    prompts = [fmt.encode_record_prompt(tokenizer, r)
               for r in samples]
    gens, _ = generate_many(model, tokenizer, prompts, batch_size=8,
                            max_new_tokens=args.max_new_tokens,
                            stop_ids=fmt.stop_ids(tokenizer))
    stop_rate = sum(g.stopped for g in gens) / len(gens) if gens else 0.0
    checks.append(Check("stopping", "stop_rate", round(stop_rate, 4), f">= {args.min_stop_rate}",
                        stop_rate >= args.min_stop_rate, f"{len(gens)} generations"))
    dataset = Path(args.dataset) if args.dataset else Path(args.golden_set).with_name(
        "sft_dataset.jsonl")
    full_tokens = _full_run_tokens(dataset, tokenizer, fmt, cfg) if dataset.exists() else None
    peak = max((r.get("memory_mb", 0) for r in rows.rows), default=0.0)
    resources = resource_report(cfg, rows.rows, wall, full_tokens, peak)
    fit = resources["preset_fit"][cfg.model.model_size]
    checks.append(Check("resources", "memory_fit", fit["estimate_gb"],
                        f"<= {resources['memory_budget_gb']} GB", fit["fits"],
                        str(fit.get("suggestion", ""))))
    return {"losses": losses, "resources": resources, "train_summary": result.summary,
            "samples": [{"id": r.get("id"), "category": r.get("category"),
                         "prompt": fmt.render_record(tokenizer, r),
                         "reference": r["response"], "generation": g.text, "stopped": g.stopped,
                         "exact_match": g.text.strip() == r["response"].strip()}
                        for r, g in zip(samples, gens)]}
