"""The prep stage's first phase: every input record read, validated, cleaned, PII-scrubbed and
checked against the records kept before it (exact and near duplicates, duplicate ids), in input
order, with the per-record work in worker processes for large inputs."""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llama_sft.cli import progress_bar
from llama_sft.errors import DataError
from llama_sft.prep.containers import HubSource
from llama_sft.prep.items import Item
from llama_sft.prep.minhash import MinHasher, NearDuplicateIndex, SignatureStore, text_jaccard
from llama_sft.prep.one_word import SHORT_RECORD_CHARS, ShortPrompt, short_prompt
from llama_sft.prep.options import MAX_AUTO_WORKERS, PARALLEL_MIN_BYTES, PrepConfig
from llama_sft.prep.readers import detect_format, jsonl_lines, open_input, read_items
from llama_sft.prep.records import Prepared, Rejected, parse_quality, prepare_value, user_text
from llama_sft.prep.report import RejectLog
from llama_sft.prep.workers import (PREP_CHUNK, _chunks, _fork_pool, _ordered_map, _prepare_chunk,
                                    _worker_init)


def _short_prompt(record: dict[str, Any]) -> ShortPrompt | None:
    """A short record's prompt keyed for the one-word near-duplicate check; None if long."""
    if len(record["instruction"]) + len(record["context"]) + len(record["response"]) \
            > SHORT_RECORD_CHARS:
        return None
    return short_prompt(user_text(record), record["response"])


@dataclass
class Kept:
    record: dict[str, Any]
    file: str
    loc: dict[str, int]
    quality: float | None
    signature: int = -1                   # row in Intake.signatures
    tokens: int = 0
    supervised: int = 0
    truncated: bool = False


class Intake:
    """The read phase: ``kept`` (with their MinHash rows in ``signatures``) and the counts the
    report needs; every other record goes to ``rejects`` with its reason."""

    def __init__(self, cfg: PrepConfig, rejects: RejectLog, progress: bool = True):
        self.cfg, self.rejects, self.progress = cfg, rejects, progress
        self.kept: list[Kept] = []
        self.signatures = SignatureStore()
        self.stats: Counter = Counter()
        self.shapes: Counter = Counter()
        self.cleaning: Counter = Counter()
        self.pii: Counter = Counter()
        self.quality = {"present": 0, "missing": 0, "unparseable": 0}
        self.inputs: list[dict[str, Any]] = []

    def read(self) -> None:
        """Every record of every input: read, validated, cleaned, scrubbed, deduplicated."""
        seen_keys: dict[bytes, str] = {}
        seen_ids: dict[str, str] = {}
        index = NearDuplicateIndex(self.cfg.dedup_threshold, self.signatures)
        workers = self.worker_count()
        init = (self.cfg.field_map, self.cfg.pii_scrub)
        with progress_bar(self.progress, desc="reading", unit=" records") as bar, \
                _fork_pool(workers, _worker_init, init) if workers \
                else contextlib.nullcontext() as pool:
            for name in self.cfg.enriched:
                path = Path(name)
                fmt = detect_format(path, self.cfg.input_format)
                before = self.stats["records"]
                blank = self.stats["blank_lines"]
                if pool is None:
                    results = self._prepare_here(read_items(path, fmt, self.stats),
                                                 index.minhash)
                elif fmt == "jsonl":
                    results = self._prepare_lines_in_pool(path, pool, workers)
                else:
                    results = self._prepare_in_pool(read_items(path, fmt, self.stats),
                                                    pool, workers)
                for file, loc, result in results:
                    self.stats["records"] += 1
                    bar.update(1)
                    self._take(file, loc, result, seen_keys, seen_ids, index)
                self.inputs.append({"path": name, "format": fmt,
                                    "records": self.stats["records"] - before,
                                    "blank_lines": self.stats["blank_lines"] - blank})

    def worker_count(self) -> int:
        """Worker processes for this run: --workers, or by input size and CPU count; 0 where
        processes cannot be forked (spawning would re-run the caller's main module)."""
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            return 0
        if self.cfg.workers is not None:
            return self.cfg.workers
        size = sum(Path(name).stat().st_size for name in self.cfg.enriched
                   if not HubSource.matches(name))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        # one per CPU although the main process needs one too: it waits on them part of the time
        return min(cpus, MAX_AUTO_WORKERS) if size >= PARALLEL_MIN_BYTES and cpus > 1 else 0

    # each yields (file, loc, result) in input order; a result is what _take accepts
    def _prepare_here(self, items: Iterator[Item], minhash: MinHasher):
        for item in items:
            yield item.file, item.loc, item if item.reason else prepare_value(
                item.value, self.cfg.field_map, self.cfg.pii_scrub, minhash)

    def _prepare_in_pool(self, items: Iterator[Item], pool, workers: int):
        tasks = ((chunk, (None, [item.value for item in chunk if not item.reason]))
                 for chunk in _chunks(items, PREP_CHUNK))
        for chunk, results in _ordered_map(pool, _prepare_chunk, tasks, 2 * workers):
            prepared = iter(results)
            for item in chunk:
                yield item.file, item.loc, item if item.reason else next(prepared)

    def _prepare_lines_in_pool(self, path: Path, pool, workers: int):
        """JSONL lines go to the workers unparsed: parsing there takes it off the main
        process, which the dedup decisions keep busy."""
        name = str(path)
        with open_input(path) as fh:
            tasks = ((chunk, (name, chunk)) for chunk in _chunks(jsonl_lines(fh, self.stats),
                                                                 PREP_CHUNK))
            for chunk, results in _ordered_map(pool, _prepare_chunk, tasks, 2 * workers):
                for (lineno, _, _), result in zip(chunk, results):
                    yield name, {"line": lineno}, result

    def _take(self, file: str, loc: dict[str, int], result: Prepared | Rejected | Item,
              seen_keys: dict[bytes, str], seen_ids: dict[str, str],
              index: NearDuplicateIndex) -> None:
        if isinstance(result, Item):                          # unreadable: no record at all
            self.rejects.add(result.reason, result.detail, result.file, result.loc,
                             excerpt=result.excerpt, **result.extra)
            return
        if isinstance(result, Rejected):
            self._count_cleaning(result.cleaning, result.pii)
            self.rejects.add(result.reason, result.detail, file, loc, rec_id=result.rec_id,
                             excerpt=result.excerpt)
            return
        prepared = result
        record = prepared.record
        self._count_cleaning(prepared.cleaning, prepared.pii)
        self.shapes[prepared.shape] += 1
        quality = self._quality(prepared.raw_quality)
        where = f"{file}:{loc.get('line', loc.get('index'))}"
        if self.cfg.min_quality is not None and quality is not None \
                and quality < self.cfg.min_quality:
            self.rejects.add("low_quality", f"quality {quality:g} < --min-quality "
                             f"{self.cfg.min_quality:g}", file, loc, rec_id=record["id"])
            return
        key = prepared.key
        if key in seen_keys:
            self.rejects.add("duplicate", "same prompt and response as an earlier record "
                             "(after normalization)", file, loc, rec_id=record["id"],
                             duplicate_of=seen_keys[key])
            return
        mh = prepared.signature
        # while reading, store row i belongs to self.kept[i] (both grow only here)
        same_answer = lambda row: text_jaccard(  # noqa: E731
            record["response"], self.kept[row].record["response"]) >= self.cfg.dedup_threshold
        short = _short_prompt(record)
        match = index.best_match(mh, same_answer, short)
        if match is not None:
            other = index.keys[match.row]
            self.stats["near_one_word"] += match.one_word
            apart = "prompt one word apart, " if match.one_word else ""
            self.rejects.add("near_duplicate", f"near-duplicate ({apart}Jaccard "
                             f"{match.jaccard:.2f}, same answer) of {other}", file, loc,
                             rec_id=record["id"], duplicate_of=other)
            return
        if record["id"] is None:
            record["id"] = "rec-" + key.hex()[:12]
        if record["id"] in seen_ids:
            self.rejects.add("duplicate_id", f"id {record['id']!r} was already used at "
                             f"{seen_ids[record['id']]}", file, loc, rec_id=record["id"])
            return
        seen_keys[key] = record["id"]
        seen_ids[record["id"]] = where
        row = index.add(mh, record["id"], short)
        self.kept.append(Kept(record, file, loc, quality, row))

    def _count_cleaning(self, cleaning: set[str], pii: dict[str, int]) -> None:
        self.cleaning.update(cleaning)
        if pii:
            self.pii.update(pii)
            self.pii["records"] += 1

    def _quality(self, raw: Any) -> float | None:
        quality = parse_quality(raw)
        if quality is not None:
            self.quality["present"] += 1
        elif raw is None:
            self.quality["missing"] += 1
        else:
            self.quality["unparseable"] += 1
        return quality

    def check_valid(self) -> None:
        """Fail (exit 65) on zero valid records or too many invalid ones."""
        files = ", ".join(self.cfg.enriched)
        if not self.kept:
            raise DataError(f"0 valid examples in {files}; top reject reasons: "
                            f"{self.rejects.top()}")
        read = max(1, self.stats["records"])
        share = self.rejects.invalid / read
        if share > self.cfg.max_reject_fraction:
            raise DataError(f"{self.rejects.invalid} of {self.stats['records']} records "
                            f"({share:.1%}) are invalid, over --max-reject-fraction "
                            f"{self.cfg.max_reject_fraction:g}; top reasons: {self.rejects.top()}")
