#!/usr/bin/env python3
"""Inspect an SFT file as training will see it: tokens per split, and examples with the
supervised part marked.

    python3 llama_dataset.py ./sft_output/sft_dataset.jsonl
    python3 llama_dataset.py ./sft_output/golden_set.jsonl --show 3
    python3 llama_dataset.py ./sft_output/sft_dataset.jsonl --tokenizer ./llama2-tokenizer \\
        --prompt-style llama2 --max-length 2048 --json

In ``--show`` output the masked prompt is printed as is and the supervised tokens (the response
and its end-of-sequence token) between ``>>>`` and ``<<<``. ``without_eos_label`` counts kept
examples whose EOS is not supervised (a truncated response); anything else there is a bug.

As an import, this module is the data API (``llama_sft.data``): records, prompt formats,
tokenization with masked prompts, collators.
"""
from __future__ import annotations

import argparse
import json
import sys

from llama_sft.cli import HelpFormatter
from llama_sft.config.presets import DEFAULT_SIZE, PRESETS, get_preset
from llama_sft.data.collate import collate, pack_collate, pad_collate
from llama_sft.data.inspect import show_example, split_stats
from llama_sft.data.prompt_format import PROMPT_FORMAT_FILE, PROMPT_STYLES, PromptFormat
from llama_sft.data.records import SPLITS, read_sft_jsonl
from llama_sft.data.tokenize import (IGNORE_INDEX, Encoded, assemble_example, encode_batch,
                                     encode_example, encode_records, token_stats)
from llama_sft.errors import UsageError, run_main

__all__ = ["IGNORE_INDEX", "PROMPT_FORMAT_FILE", "PROMPT_STYLES", "SPLITS", "Encoded",
           "PromptFormat", "assemble_example", "collate", "encode_batch", "encode_example",
           "encode_records", "pack_collate", "pad_collate", "read_sft_jsonl", "token_stats"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("dataset", help="sft_dataset.jsonl or golden_set.jsonl")
    parser.add_argument("--model-size", default=DEFAULT_SIZE,
                        help=f"preset whose tokenizer and max length apply: {', '.join(PRESETS)}")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or hub id (default: the preset's base model)")
    parser.add_argument("--prompt-style", default="auto", choices=PROMPT_STYLES,
                        help="prompt format (auto: the chat template when the tokenizer has one)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (default: the preset's)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N examples with the supervised tokens marked")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    return parser


def inspect(args) -> int:
    from llama_sft.model.loading import load_tokenizer

    preset = get_preset(args.model_size)
    max_length = args.max_length or preset.max_length
    if max_length <= 0 or args.show < 0:
        raise UsageError("--max-length must be > 0 and --show >= 0")
    records = read_sft_jsonl(args.dataset)
    tokenizer = load_tokenizer(args.tokenizer or preset.base_model)
    fmt = PromptFormat.for_tokenizer(tokenizer, args.prompt_style)
    stats = split_stats(tokenizer, fmt, records, max_length)
    if args.json:
        print(json.dumps({"prompt_style": fmt.style, "max_length": max_length, "splits": stats},
                         indent=2))
    else:
        print(f"prompt style {fmt.style}, max length {max_length}")
        for split, s in stats.items():
            print(f"{split:<7} {s['examples']:>6} examples  {s['tokens']:>9} tokens  "
                  f"supervised {s.get('supervised_ratio', 0):.1%}  dropped {s['dropped']}  "
                  f"without EOS label {s['without_eos_label']}")
    for record in records[:args.show]:
        example = encode_example(tokenizer, fmt, record, max_length)
        shown = show_example(tokenizer, example) if example else "(dropped: over --max-length)"
        print(f"\n--- {record.get('id')} ({record.get('split')})\n{shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: inspect(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
