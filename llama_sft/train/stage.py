"""The training stage: read the prep stage's files, train, write ``--output-dir``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from llama_sft.config.flags import config_from_args, report_targets
from llama_sft.config.hardware import check_runnable
from llama_sft.data.records import read_sft_jsonl
from llama_sft.errors import EXIT_GATE, EXIT_OK, DataError, UsageError
from llama_sft.files import describe_inputs, verify_file_against_manifest
from llama_sft.train.build import OOM_ADVICE, build_trainer, is_oom
from llama_sft.train.checkpoint import find_resume_checkpoint


def run(args) -> int:
    """Resolve the config, check the run can go ahead here, read the data, train."""
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
