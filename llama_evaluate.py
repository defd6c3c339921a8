#!/usr/bin/env python3
"""Evaluate a fine-tuned adapter on a golden set, optionally against its base model.

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \\
        --dataset ./sft_output/golden_set.jsonl --output ./final_evaluation.json --num-samples 50
    python3 llama_evaluate.py --base-model meta-llama/Llama-2-7b-hf \\
        --adapter-path ./training_output/final_model --dataset ./sft_output/golden_set.jsonl \\
        --output ./final_evaluation.json --num-samples 50 --use-4bit
    python3 llama_evaluate.py --adapter-path ./packages/my-model.tar.gz \\
        --dataset ./sft_output/sft_dataset.jsonl --split test --output ./eval_test.json \\
        --num-samples 0 --compare-base --fail-under exact_match=0.5 rouge_l=0.6

The base model and prompt format are the ones recorded in the adapter directory (``--base-model``
only has to be given to double-check; a different one is refused). ``--adapter-path`` may also be
a package archive written by ``llama_package.py``. Generation is batched (left padding, KV cache,
greedy unless ``--temperature`` > 0; a greedy batch takes a waiting prompt as each answer
finishes). The report schema is in ``docs/evaluation_report.md``.

Exit codes: 0 ok, 1 a ``--fail-under`` gate failed (the report is still written and says which),
2 usage or config error (bad adapter path, base model mismatch), 65 bad data, 74 I/O error.
"""
from __future__ import annotations

import argparse
import sys

from llama_sft.cli import add_decoding_flags
from llama_sft.errors import run_main
from llama_sft.evaluate.gates import GATE_METRICS
from llama_sft.evaluate.settings import DEFAULT_MAX_LENGTH, GenerationSettings
from llama_sft.evaluate.stage import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapter-path", required=True,
                        help="adapter directory (training_output/final_model) or package .tar.gz")
    parser.add_argument("--base-model", default=None,
                        help="base model; None: the one recorded in the adapter directory")
    parser.add_argument("--dataset", required=True, help="SFT JSONL file (golden_set.jsonl, ...)")
    parser.add_argument("--output", required=True, help="report JSON file to write")
    parser.add_argument("--split", default=None,
                        help="evaluate only records of this split (train/val/test/golden); "
                             "None: every record in the file")
    parser.add_argument("--num-samples", type=int, default=50,
                        help="evaluate the first N records (0 = all)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true", help="load the base model in 4-bit nf4")
    quant.add_argument("--use-8bit", action="store_true", help="load the base model in 8-bit")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype (auto: bf16 where supported)")
    parser.add_argument("--compare-base", action="store_true",
                        help="also evaluate the base model (adapter disabled) and report deltas")
    parser.add_argument("--fail-under", nargs="+", action="extend", default=[],
                        metavar="METRIC=VALUE",
                        help=f"exit 1 when a metric is under VALUE (or, with --compare-base, "
                             f"under the base model); metrics: {', '.join(GATE_METRICS)}")
    parser.add_argument("--max-length", type=int, default=None,
                        help="token limit for the teacher-forced loss; None: the adapter's "
                             f"training max_length (else {DEFAULT_MAX_LENGTH})")
    defaults = GenerationSettings()
    add_decoding_flags(parser, max_new_tokens=defaults.max_new_tokens,
                       temperature=defaults.temperature, top_p=defaults.top_p)
    parser.add_argument("--num-return-sequences", type=int,
                        default=defaults.num_return_sequences,
                        help="answers per prompt (needs --temperature > 0 when > 1)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="most prompts decoding at once (greedy decoding refills finished "
                             "rows from the waiting prompts) and per loss forward pass")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="torch seed set before each model's generation pass")
    parser.add_argument("--mlflow", action="store_true",
                        help="also log the metrics (evaluate/<metric>) and this report into the "
                             "MLflow run that trained the adapter (its final_model/tracking.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
