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
import sys

from llama_sft.cli import HelpFormatter
from llama_sft.config.flags import add_training_flags
from llama_sft.errors import run_main
from llama_sft.pilot.stage import run

# settings the pilot fixes itself (it generates its samples at the end, with --max-new-tokens)
PILOT_OWN = ("num_eval_samples", "max_new_tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--golden-set", required=True, help="golden_set.jsonl from the prep stage")
    parser.add_argument("--dataset", default=None,
                        help="full sft_dataset.jsonl, for the projected full-run time "
                             "(default: sft_dataset.jsonl beside the golden set, if present)")
    add_training_flags(parser, exclude=PILOT_OWN, defaults={"max_steps": 100},
                       shown_defaults={"eval_steps": "--max-steps / 4",
                                       "save_steps": "only at the end",
                                       "early_stopping_patience": "off"})
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


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
