"""The prep stage's options and the reject reasons it reports."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

from llama_sft.config.presets import PRESETS
from llama_sft.data.prompt_format import PROMPT_STYLES
from llama_sft.errors import UsageError
from llama_sft.prep.containers import resolve_inputs

STAGE = "prep"
OUTPUT_FILES = ("sft_dataset.jsonl", "golden_set.jsonl", "training_config.json",
                "prep_report.json", "rejects.jsonl", "manifest.json")
INPUT_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "arrow")
MAPPABLE_KEYS = ("id", "instruction", "context", "response", "category", "quality", "messages",
                 "conversations")

# Reasons a record is invalid: these count towards --max-reject-fraction.
INVALID_REASONS = ("not_utf8", "invalid_json", "truncated_line", "not_an_object",
                   "wrong_top_level_type", "invalid_csv", "unknown_shape", "missing_field",
                   "null_field", "wrong_type", "bad_chat", "empty_instruction", "empty_response",
                   "duplicate_id")

# Reasons a valid record is filtered out: counted and reported, never a failure by themselves.
FILTER_REASONS = ("low_quality", "duplicate", "near_duplicate", "too_long", "contaminated")
PARALLEL_MIN_BYTES = 16 * 2**20   # inputs at least this big use worker processes by default
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class PrepConfig:
    """The prep options (written to the manifest as the stage's config)."""

    enriched: tuple[str, ...]                 # input files, Arrow shards and hub sources
    output_dir: str = "./sft_output"
    input_format: str = "auto"                # auto | jsonl | json | csv | tsv | parquet | arrow
    hf_split: str = "train"                   # split of a hub dataset or DatasetDict directory
    hf_config: str | None = None              # configuration (subset) of a hub dataset
    field_map: dict[str, str] = field(default_factory=dict)  # canonical key -> input field
    min_quality: float | None = None          # drop records whose quality score is below this
    max_reject_fraction: float = 0.1          # share of invalid records that fails the run
    model_size: str | None = None             # preset whose tokenizer and batch are assumed
    tokenizer: str | None = None              # tokenizer path / hub id (default: the preset's)
    prompt_style: str = "auto"                # auto | chat_template | instruction | llama2
    max_length: int | None = None             # token cap per example (default: preset's)
    length_policy: str = "drop"               # drop | truncate examples over max_length
    seed: int = 42
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    golden_size: int = 150
    dedup_threshold: float = 0.9              # MinHash Jaccard for near duplicates
    contamination_threshold: float = 0.85     # MinHash Jaccard train vs golden/test
    contamination_ngram: int = 13             # shared word n-gram that marks a leak
    pii_scrub: bool = True
    workers: int | None = None                # processes for per-record work; None: auto

    def problems(self) -> list[str]:
        """Every problem with the options, so they are reported at once."""
        out = []
        if self.input_format not in INPUT_FORMATS:
            out.append(f"--input-format must be one of {', '.join(INPUT_FORMATS)}")
        if not self.hf_split.strip():
            out.append("--hf-split must name a split")
        unknown = sorted(set(self.field_map) - set(MAPPABLE_KEYS))
        if unknown:
            out.append(f"--field-map: unknown key(s) {', '.join(unknown)}; "
                       f"valid: {', '.join(MAPPABLE_KEYS)}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            out.append("--max-reject-fraction must be in [0, 1]")
        if self.max_length is not None and self.max_length < 16:
            out.append("--max-length must be at least 16")
        if self.length_policy not in ("drop", "truncate"):
            out.append("--length-policy must be drop or truncate")
        if self.prompt_style not in PROMPT_STYLES:
            out.append(f"--prompt-style must be one of {', '.join(PROMPT_STYLES)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 0.5:
                out.append(f"--{name.replace('_', '-')} must be in [0, 0.5)")
        if self.golden_size < 0:
            out.append("--golden-size must be >= 0")
        for name in ("dedup_threshold", "contamination_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                out.append(f"--{name.replace('_', '-')} must be in (0, 1)")
        if self.workers is not None and self.workers < 0:
            out.append("--workers must be >= 0")
        if self.contamination_ngram < 5:
            out.append("--contamination-ngram must be at least 5 words")
        if self.model_size is not None:
            if self.model_size.lower() not in PRESETS:
                out.append(f"unknown --model-size {self.model_size!r}; valid sizes: "
                           f"{', '.join(PRESETS)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["enriched"] = list(self.enriched)
        return values


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    """``["instruction=question", "response=answer"]`` (or comma-joined) -> dict."""
    mapping: dict[str, str] = {}
    for item in items or []:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise UsageError(f"--field-map entry {pair!r} is not KEY=FIELD "
                                 f"(e.g. response=answer)")
            mapping[key.strip()] = value.strip()
    return mapping


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    """The options from the command line, ``--enriched`` resolved to what is read (globs
    expanded, save_to_disk directories as their Arrow shards, hub ids checked)."""
    values = vars(args).copy()
    values["field_map"] = parse_field_map(values["field_map"])
    values["enriched"] = resolve_inputs(values["enriched"], values["hf_split"],
                                        values["hf_config"])
    return PrepConfig(**values)
