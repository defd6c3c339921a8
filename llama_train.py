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
the preset's value. The resolved config is printed and saved.
Writes into --output-dir: checkpoint-*/ (resumable), final_model/ (PEFT adapter + tokenizer +
prompt_format.json + training_config.json + manifest.json), metrics.jsonl, metrics_summary.json,
loss_curve.png, tensorboard/, manifest.json.
"""
from __future__ import annotations

import argparse
import sys

from llama_sft.cli import HelpFormatter
from llama_sft.config.flags import add_training_flags
from llama_sft.errors import run_main
from llama_sft.train.stage import run


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


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
