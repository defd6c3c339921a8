"""The evaluation stage: the fine-tuned model (and optionally its base) on a golden set."""
from __future__ import annotations

import collections
from dataclasses import asdict
from typing import Any

from llama_sft.adapter.source import open_adapter
from llama_sft.errors import EXIT_GATE, PipelineError
from llama_sft.evaluate.gates import check_gates
from llama_sft.evaluate.report import (SCHEMA_VERSION, build_samples, category_of, compare,
                                       environment_info, format_table, model_info, model_result)
from llama_sft.evaluate.runner import run_model, select_records
from llama_sft.evaluate.settings import DEFAULT_MAX_LENGTH, GenerationSettings, validate_args
from llama_sft.files import now_iso, sha256_file, write_json
from llama_sft.model.loading import load_for_inference
from llama_sft.tracking import TrackedRun, log_evaluation


def evaluate(args, gen: GenerationSettings, gates: dict[str, float]) -> dict[str, Any]:
    """Load, run the fine-tuned (and base) model, and build the report dict."""
    records, matching = select_records(args.dataset, args.split, args.num_samples)
    quantization = "4bit" if args.use_4bit else "8bit" if args.use_8bit else "none"
    with open_adapter(args.adapter_path, args.base_model) as adapter:
        loaded = load_for_inference(adapter.path, base_model=args.base_model,
                                    quantization=quantization, dtype=args.dtype)
        info = model_info(loaded, args.adapter_path, adapter.training_config)
        trained = info["training_config"] or {}
        max_length = args.max_length or trained.get("max_length") or DEFAULT_MAX_LENGTH
        tok, fmt = loaded.tokenizer, loaded.prompt_format
        prompts_text = [fmt.render_record(tok, r) for r in records]
        prompts = [fmt.encode_record_prompt(tok, r) for r in records]
        ft_samples, ft_speed = run_model(loaded.model, tok, fmt, records, prompts, gen,
                                         max_length, "fine-tuned")
        base_samples = base_speed = None
        if args.compare_base:
            with loaded.model.disable_adapter():
                base_samples, base_speed = run_model(loaded.model, tok, fmt, records, prompts,
                                                     gen, max_length, "base")
    finetuned = model_result(records, ft_samples, ft_speed)
    base = model_result(records, base_samples, base_speed) if base_samples is not None else None
    settings = {"base_model": loaded.base_model, "adapter_path": str(args.adapter_path),
                "dataset": str(args.dataset), "split": args.split,
                "num_samples": args.num_samples, "quantization": quantization,
                "dtype": args.dtype, "max_length": max_length, **asdict(gen),
                "compare_base": args.compare_base, "fail_under": gates}
    data = {"path": str(args.dataset), "sha256": sha256_file(args.dataset), "split": args.split,
            "records_matching": matching, "evaluated": len(records),
            "categories": dict(sorted(collections.Counter(map(category_of, records)).items()))}
    return {"schema_version": SCHEMA_VERSION, "stage": "evaluate", "created": now_iso(),
            "settings": settings, "model": info, "data": data, "environment": environment_info(),
            "finetuned": finetuned, "base": base,
            "delta": compare(finetuned, base) if base is not None else None,
            "gates": check_gates(gates, finetuned["overall"],
                                 base["overall"] if base is not None else None),
            "samples": build_samples(records, prompts_text, ft_samples, base_samples)}


def run(args) -> int:
    """Check the flags, evaluate, write the report (with ``--mlflow``, also into the training's
    MLflow run); a failed ``--fail-under`` gate exits 1."""
    gen, gates = validate_args(args)
    # the training's MLflow run must be there before any model is loaded
    tracked = TrackedRun.for_adapter(args.adapter_path, "--mlflow") if args.mlflow else None
    report = evaluate(args, gen, gates)
    write_json(args.output, report)
    print(format_table(report["finetuned"], report["base"]))
    print(f"report written to {args.output}")
    if tracked is not None:
        log_evaluation(tracked, report, args.output)
        print(f"logged to MLflow run {tracked.run_id}")
    if not report["gates"]["passed"]:
        failed = [reason for c in report["gates"]["checks"] for reason in c["reasons"]]
        raise PipelineError(f"evaluation gate failed: {'; '.join(failed)} "
                            f"(report: {args.output})", EXIT_GATE)
    return 0
