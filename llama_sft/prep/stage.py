"""The prep stage: turn enriched records into the files every later stage reads.

Writes into the output directory, atomically (a failed run leaves the old directory as it was):
``sft_dataset.jsonl`` (train/val/test), ``golden_set.jsonl``, ``training_config.json`` (only
data-derived RunConfig keys), ``prep_report.json`` (every count), ``rejects.jsonl`` (every dropped
record with file, line and reason) and ``manifest.json``. Same input and seed give byte-identical
files (the manifest's ``created`` time aside).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

from llama_sft.cli import progress_bar
from llama_sft.config.presets import DEFAULT_SIZE, get_preset
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import measure_batch
from llama_sft.errors import DataError, UsageError
from llama_sft.files import atomic_output_dir, describe_inputs, write_json, write_manifest
from llama_sft.model.loading import load_tokenizer
from llama_sft.prep.containers import HubSource
from llama_sft.prep.contamination import decontaminate
from llama_sft.prep.intake import Intake, Kept
from llama_sft.prep.options import STAGE, PrepConfig
from llama_sft.prep.report import RejectLog, _print_summary, build_report
from llama_sft.prep.splits import assign_splits
from llama_sft.prep.training_config import derive_training_config
from llama_sft.prep.workers import gc_paused

TOKENIZE_CHUNK = 2048        # records per fast-tokenizer batch call


class Prep:
    """One prep run, phase by phase (the benchmark times each phase): read (``Intake``), measure
    token lengths, split, decontaminate, then the records and the report."""

    def __init__(self, cfg: PrepConfig, rejects: RejectLog, tokenizer=None, prompt_format=None,
                 progress: bool = True):
        self.cfg, self.rejects = cfg, rejects
        self.tokenizer, self.fmt = tokenizer, prompt_format
        self.progress = progress
        self.intake = Intake(cfg, rejects, progress)
        self.splits: list[str] = []
        self.split_info: dict[str, Any] = {}
        self.contamination: dict[str, Any] = {}

    @property
    def kept(self) -> list[Kept]:
        return self.intake.kept

    @kept.setter
    def kept(self, kept: list[Kept]) -> None:
        self.intake.kept = kept

    # -- phase 1: read, validate, clean, scrub, dedup (streaming)
    def read(self) -> None:
        self.intake.read()

    def check_valid(self) -> None:
        self.intake.check_valid()

    # -- phase 2: token lengths with the target tokenizer and prompt format
    def measure_lengths(self, max_length: int) -> None:
        """Token counts with the target tokenizer and prompt format; the length policy drops or
        truncates examples over ``max_length``."""
        if self.tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has no EOS token; cannot supervise the end of answers")
        policy = self.cfg.length_policy
        survivors: list[Kept] = []
        with progress_bar(self.progress, total=len(self.kept), desc="tokenizing", unit=" records") as bar:
            for start in range(0, len(self.kept), TOKENIZE_CHUNK):
                chunk = self.kept[start:start + TOKENIZE_CHUNK]
                measures = measure_batch(self.tokenizer, self.fmt, [k.record for k in chunk],
                                         max_length, policy)
                for kept, measured in zip(chunk, measures):
                    if isinstance(measured, str):
                        self.rejects.add("too_long", measured, kept.file, kept.loc,
                                         rec_id=kept.record["id"])
                        continue
                    kept.tokens, kept.supervised, kept.truncated = measured
                    survivors.append(kept)
                bar.update(len(chunk))
        self.kept = survivors
        if not self.kept:
            raise DataError(f"0 valid examples: every record is over --max-length {max_length} "
                            f"tokens; raise --max-length or use --length-policy truncate")

    # -- phase 3: splits and the golden set
    def split(self) -> None:
        items = [(k.record["category"], k.quality, k.truncated) for k in self.kept]
        self.splits, self.split_info = assign_splits(
            items, seed=self.cfg.seed, val_fraction=self.cfg.val_fraction,
            test_fraction=self.cfg.test_fraction, golden_size=self.cfg.golden_size)

    # -- phase 4: contamination guard (train vs golden and test)
    def decontaminate(self) -> None:
        self.kept, self.splits, self.contamination = decontaminate(
            self.kept, self.splits, self.intake.signatures, self.cfg, self.rejects,
            workers=self.intake.worker_count(), progress=self.progress)

    # -- phase 5: outputs
    def records(self, golden: bool) -> Iterator[dict[str, Any]]:
        for kept, split in zip(self.kept, self.splits):
            if (split == "golden") != golden:
                continue
            record = dict(kept.record, split=split)
            prep = {"num_tokens": kept.tokens, "supervised_tokens": kept.supervised}
            if kept.truncated:
                prep["truncated"] = True
            record["metadata"] = {**record["metadata"], "prep": prep}
            yield record

    def report(self, training: dict[str, Any], derivation: dict[str, Any], tokenizer_name: str,
               max_length: int) -> dict[str, Any]:
        return build_report(self, training, derivation, tokenizer_name, max_length)


def write_jsonl(path: Path, records: Iterator[dict[str, Any]]) -> int:
    import jsonlines

    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        writer = jsonlines.Writer(fh, compact=True, sort_keys=False,
                                  dumps=lambda o: json.dumps(o, ensure_ascii=False))
        for record in records:
            writer.write(record)
            count += 1
    return count


_TOKENIZERS: dict[str, Any] = {}


def load_target_tokenizer(name: str):
    """The target model's tokenizer (cached per process: tests and benchmarks reuse it)."""
    if name not in _TOKENIZERS:

        try:
            _TOKENIZERS[name] = load_tokenizer(name)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load the tokenizer {name!r}: {str(exc).splitlines()[0]}; "
                             f"pass --tokenizer with a local tokenizer directory") from None
    return _TOKENIZERS[name]


def _check_paths(cfg: PrepConfig) -> list[str]:
    problems = []
    out = Path(cfg.output_dir).resolve()
    for name in cfg.enriched:
        path = Path(name)
        if HubSource.matches(name):
            continue
        if not path.is_file():
            problems.append(f"input file not found: {name}")
        elif out == path.resolve().parent or out in path.resolve().parents:
            problems.append(f"--output-dir {cfg.output_dir} contains the input {name}; "
                            f"it would be replaced")
    if out.exists() and not out.is_dir():
        problems.append(f"--output-dir {cfg.output_dir} exists and is not a directory")
    elif out.is_dir() and any(out.iterdir()) and not _written_by_prep(out):
        problems.append(f"--output-dir {cfg.output_dir} exists and was not written by the prep "
                        f"stage; refusing to replace it (choose an empty or new directory)")
    return problems


def _written_by_prep(directory: Path) -> bool:
    try:
        return json.loads((directory / "manifest.json").read_text())["stage"] == STAGE
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_prep(cfg: PrepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole stage into ``cfg.output_dir``; returns the report."""

    problems = cfg.problems() + _check_paths(cfg)
    if problems:
        raise UsageError("; ".join(problems))
    preset = get_preset(cfg.model_size or DEFAULT_SIZE)
    tokenizer_name = cfg.tokenizer or preset.base_model
    max_length = cfg.max_length or preset.max_length
    tokenizer = load_target_tokenizer(tokenizer_name)
    fmt = PromptFormat.for_tokenizer(tokenizer, style=cfg.prompt_style)
    t0 = time.time()
    with gc_paused(), atomic_output_dir(cfg.output_dir) as tmp:
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects_fh:
            prep = Prep(cfg, RejectLog(rejects_fh), tokenizer, fmt, progress)
            prep.read()
            prep.check_valid()
            prep.measure_lengths(max_length)
            prep.split()
            prep.decontaminate()
            if not any(s == "train" for s in prep.splits):
                raise DataError(f"0 training examples left after the golden/val/test splits "
                                f"({len(prep.kept)} valid examples); add data or lower "
                                f"--golden-size / --val-fraction / --test-fraction")
        n_train = sum(s == "train" for s in prep.splits)
        training, derivation = derive_training_config(
            n_train, [k.tokens for k in prep.kept], preset, max_length)
        write_jsonl(tmp / "sft_dataset.jsonl", prep.records(golden=False))
        write_jsonl(tmp / "golden_set.jsonl", prep.records(golden=True))
        write_json(tmp / "training_config.json", training, sort_keys=True)
        report = prep.report(training, derivation, tokenizer_name, max_length)
        write_json(tmp / "prep_report.json", report)
        named = {("enriched" if len(cfg.enriched) == 1 else f"enriched_{i}"): p
                 for i, p in enumerate(cfg.enriched)}
        inputs = describe_inputs({k: p for k, p in named.items() if not HubSource.matches(p)})
        inputs.update({k: {"path": p} for k, p in named.items() if HubSource.matches(p)})
        write_manifest(tmp, stage=STAGE, config=cfg.to_dict(), inputs=inputs)
        for path in tmp.iterdir():              # temp files are private (0600); outputs are not
            path.chmod(0o644)
        tmp.chmod(0o755)
    _print_summary(report, cfg.output_dir, time.time() - t0)
    return report
