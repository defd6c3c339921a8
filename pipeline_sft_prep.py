#!/usr/bin/env python3
"""Prep stage: turn enriched records into the files every later stage reads.

    python3 pipeline_sft_prep.py --enriched data/demo_enriched.jsonl --output-dir ./sft_output
    python3 pipeline_sft_prep.py --enriched part1.jsonl part2.csv.gz more.json \\
        --output-dir ./sft_output --min-quality 0.5 --model-size 7b --tokenizer ./llama2-tokenizer
    python3 pipeline_sft_prep.py --enriched qa.jsonl --output-dir ./sft_output \\
        --field-map instruction=question context=passage response=answer category=task
    python3 pipeline_sft_prep.py --enriched 'shards/part-*.parquet' ./saved_dataset \\
        --output-dir ./sft_output
    python3 pipeline_sft_prep.py --enriched hf://datasets/ORG/NAME --hf-split train \\
        --output-dir ./sft_output

Input: JSONL (one record per line, streamed), a JSON array (read whole: use JSONL for big
inputs), or CSV with a header (streamed); any of them gzipped. Through ``datasets``, streamed:
parquet files (or a quoted glob of them), a directory written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk`` (--hf-split picks the split) and hub datasets
``hf://datasets/ORG/NAME`` (--hf-split, --hf-config; with HF_HUB_OFFLINE=1 only from the cache).
Record shapes are found per record: instruction/context/response (+category), alpaca
instruction/input/output, prompt/completion, and conversations: OpenAI ``messages``
(system/user/assistant) or ShareGPT ``conversations`` (human/gpt/system), any number of
exchanges (kept whole under ``messages`` when there is more than one); ``--field-map`` names other
fields (also ``messages=X`` or ``conversations=X``). Every other field (source, quality
score, tags, ...) is kept under ``metadata``.

Writes into --output-dir, atomically (a failed run leaves the old directory as it was):
``sft_dataset.jsonl`` (train/val/test), ``golden_set.jsonl``, ``training_config.json`` (only
data-derived RunConfig keys; read by ``llama_train.py --config``), ``prep_report.json`` (every
count), ``rejects.jsonl`` (every dropped record with file, line and reason) and ``manifest.json``.
Same input and seed give byte-identical files (the manifest's ``created`` time aside).

Exit codes: 0 ok, 2 usage error, 65 bad data (0 valid examples, or more invalid records than
--max-reject-fraction), 74 I/O error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from llama_sft.errors import EXIT_OK, run_main
from llama_sft.prep.options import (INPUT_FORMATS, MAPPABLE_KEYS, MAX_AUTO_WORKERS,
                                    PARALLEL_MIN_BYTES, PrepConfig, config_from_args)
from llama_sft.prep.stage import run_prep


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    d = PrepConfig(enriched=())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--enriched", nargs="+", required=True, metavar="INPUT",
                   help="inputs: .jsonl, .json (array) or .csv files (optionally gzipped), "
                        ".parquet files, globs of files, save_to_disk directories, hub datasets "
                        "hf://datasets/ORG/NAME")
    p.add_argument("--output-dir", default=d.output_dir, help="directory to (re)write")
    p.add_argument("--input-format", default=d.input_format, choices=INPUT_FORMATS,
                   help="input format of the files (auto: from the file name, then the first "
                        "bytes); directories and hub ids are always read through datasets")
    p.add_argument("--hf-split", default=d.hf_split,
                   help="split to read from a hub dataset or a DatasetDict directory")
    p.add_argument("--hf-config", default=d.hf_config,
                   help="configuration (subset) of a hub dataset; None: its default")
    p.add_argument("--field-map", nargs="+", metavar="KEY=FIELD",
                   help=f"where the fields are, e.g. instruction=question response=answer; "
                        f"keys: {', '.join(MAPPABLE_KEYS)}")
    p.add_argument("--min-quality", type=float, default=d.min_quality,
                   help="drop records whose quality score (quality_score/quality/score) is lower; "
                        "records without a score are kept")
    p.add_argument("--max-reject-fraction", type=float, default=d.max_reject_fraction,
                   help="fail (exit 65) when more than this share of the records is invalid "
                        "(duplicates and other filters do not count)")
    p.add_argument("--model-size", default=d.model_size,
                   help="preset whose tokenizer, max length and batch size are assumed "
                        "(default: 135m, the embedded model)")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer directory or hub id (default: the preset's base model)")
    p.add_argument("--prompt-style", default=d.prompt_style,
                   choices=("auto", "chat_template", "instruction", "llama2"),
                   help="prompt format used for token counts (must match training)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per example, prompt + response + EOS (default: the preset's)")
    p.add_argument("--length-policy", default=d.length_policy, choices=("drop", "truncate"),
                   help="examples over --max-length: drop them, or cut the end of the response "
                        "(never all of it)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for splits and the golden set")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the records held out for validation")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="share of the records held out for the test split")
    p.add_argument("--golden-size", type=int, default=d.golden_size,
                   help="curated evaluation examples (at most 20%% of the kept records)")
    p.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold,
                   help="MinHash Jaccard at or above which two records are near duplicates")
    p.add_argument("--contamination-threshold", type=float, default=d.contamination_threshold,
                   help="MinHash Jaccard at or above which a train record leaks a golden/test one")
    p.add_argument("--contamination-ngram", type=int, default=d.contamination_ngram,
                   help="a shared word n-gram this long (not template text) marks a leak")
    p.add_argument("--no-pii-scrub", dest="pii_scrub", action="store_false",
                   help="keep e-mail addresses, phone numbers and API keys as they are")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="processes for the per-record work (parse, validate, clean, scrub, "
                        "MinHash) and the contamination scan; "
                        f"default: the CPU count (at most {MAX_AUTO_WORKERS}) for inputs over "
                        f"{PARALLEL_MIN_BYTES // 2**20} MB, else 0 (all in this process); the "
                        "outputs are the same either way")
    return p


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        run_prep(config_from_args(args))
        return EXIT_OK

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
