#!/usr/bin/env python3
"""Prep stage: turn enriched records into the files every later stage reads.

    python3 pipeline_sft_prep.py --enriched data/demo_enriched.jsonl --output-dir ./sft_output
    python3 pipeline_sft_prep.py --enriched part1.jsonl part2.csv.gz more.json \\
        --output-dir ./sft_output --min-quality 0.5 --model-size 7b --tokenizer ./llama2-tokenizer
    python3 pipeline_sft_prep.py --enriched qa.jsonl --output-dir ./sft_output \\
        --field-map instruction=question context=passage response=answer category=task

Input: JSONL (one record per line, streamed), a JSON array (read whole: use JSONL for big
inputs), or CSV with a header (streamed); any of them gzipped.
Record shapes are found per record: instruction/context/response (+category), alpaca
instruction/input/output, prompt/completion, chat ``messages`` (one user and one assistant turn,
an optional system turn); ``--field-map`` names other fields. Every other field (source, quality
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
import codecs
import contextlib
import csv
import gc
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import unicodedata
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, NamedTuple

import numpy as np

from llama_io import (EXIT_OK, DataError, UsageError, atomic_output_dir, describe_inputs,
                      run_main, write_json, write_manifest)

STAGE = "prep"
OUTPUT_FILES = ("sft_dataset.jsonl", "golden_set.jsonl", "training_config.json",
                "prep_report.json", "rejects.jsonl", "manifest.json")
INPUT_FORMATS = ("auto", "jsonl", "json", "csv", "tsv")
MAPPABLE_KEYS = ("id", "instruction", "context", "response", "category", "quality", "messages")
QUALITY_FIELDS = ("quality_score", "quality", "score")
DEFAULT_CATEGORY = "general"

# Reasons a record is invalid: these count towards --max-reject-fraction.
INVALID_REASONS = ("not_utf8", "invalid_json", "truncated_line", "not_an_object",
                   "wrong_top_level_type", "invalid_csv", "unknown_shape", "missing_field",
                   "null_field", "wrong_type", "bad_chat", "empty_instruction", "empty_response",
                   "duplicate_id")
# Reasons a valid record is filtered out: counted and reported, never a failure by themselves.
FILTER_REASONS = ("low_quality", "duplicate", "near_duplicate", "too_long", "contaminated")

NUM_PERM = 128               # MinHash permutations
SHINGLE_CHARS = 5            # character shingles for near-duplicate detection
MAX_GOLDEN_SHARE = 0.2       # the golden set never takes more than this share of the kept records
NGRAM_BOILERPLATE_MIN_DF = 10      # an n-gram in more records than this (and than
NGRAM_BOILERPLATE_SHARE = 0.005    # this share of them) is template text, not a leak
EVALS_PER_RUN = 5            # evaluations the derived eval_steps gives over a run
WARMUP_SHARE = 0.05          # share of the run the derived warmup_steps covers
LENGTH_MULTIPLE = 64         # the derived max_length is rounded up to a multiple of this
TOKENIZE_CHUNK = 2048        # records per fast-tokenizer batch call
PREP_CHUNK = 512             # records per task sent to a worker process
LEAK_CHUNK = 2048            # records per contamination-scan task
LEAK_MAX_PAIRS = 1 << 22     # (record, eval record) pairs counted at once by the n-gram check
PREFILTER_MIN_CANDIDATES = 16  # longer candidate lists get the half-signature bound first
PARALLEL_MIN_BYTES = 16 * 2**20   # inputs at least this big use worker processes by default
MAX_AUTO_WORKERS = 8


# ---------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True)
class PrepConfig:
    """The prep options (written to the manifest as the stage's config)."""

    enriched: tuple[str, ...]                 # input files
    output_dir: str = "./sft_output"
    input_format: str = "auto"                # auto | jsonl | json | csv | tsv
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
        if self.prompt_style not in ("auto", "chat_template", "instruction", "llama2"):
            out.append("--prompt-style must be auto, chat_template, instruction or llama2")
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
            from llama_config import PRESETS
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


# ---------------------------------------------------------------------------------------------
# Reading: every input line becomes an Item (a value, or why it could not be read)

@dataclass
class Item:
    file: str
    loc: dict[str, int]                  # {"line": n} (JSONL, CSV) or {"index": i} (JSON array)
    value: Any = None
    reason: str | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    excerpt: str = ""


def open_input(path: Path) -> IO[bytes]:
    """Open a file for binary reading, transparently gunzipping (by magic bytes, not name)."""
    fh = open(path, "rb")
    if fh.peek(2)[:2] == b"\x1f\x8b":
        fh.close()
        return gzip.open(path, "rb")
    return fh


def detect_format(path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    with open_input(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        fh.seek(0)
        first = fh.readline()
        more = any(line.strip() for line in fh)
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        try:                          # one object per line, or one object spanning the file?
            json.loads(first)
            return "jsonl" if more else "json"
        except (ValueError, UnicodeDecodeError):
            return "json" if suffix == ".json" else "jsonl"
    if not head:
        return "jsonl"
    raise UsageError(f"cannot tell the format of {path} (not .jsonl/.json/.csv and it does not "
                     f"start with '[' or '{{'); pass --input-format")


def read_items(path: Path, fmt: str, stats: Counter) -> Iterator[Item]:
    """Yield every record of one input file; blank lines are counted in ``stats``."""
    name = str(path)
    with open_input(path) as fh:
        if fmt == "jsonl":
            yield from _read_jsonl(fh, name, stats)
        elif fmt == "json":
            yield from _read_json_array(fh, name)
        else:
            yield from _read_csv(fh, name, stats, "\t" if fmt == "tsv" else ",")


def _excerpt(text: str, limit: int = 200) -> str:
    return scrub_pii(text)[0][:limit]


RawLine = tuple[int, int, bytes]                  # (line number, byte offset, the line)


def jsonl_lines(fh: IO[bytes], stats: Counter) -> Iterator[RawLine]:
    """The non-blank lines of a JSONL file, unparsed; blank lines are counted in ``stats``."""
    offset = 0
    for lineno, raw in enumerate(fh, start=1):
        start, offset = offset, offset + len(raw)
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw, start = raw[3:], start + 3
        if not raw.strip():
            stats["blank_lines"] += 1
            continue
        yield lineno, start, raw


def parse_jsonl_line(name: str, line: RawLine) -> Item:
    """One JSONL line as an Item: its object, or why it is not one."""
    lineno, start, raw = line
    loc = {"line": lineno}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Item(name, loc, reason="not_utf8",
                    detail=f"invalid UTF-8 at byte offset {start + exc.start} "
                           f"(line {lineno}, byte {exc.start} of the line): {exc.reason}",
                    extra={"byte_offset": start + exc.start},
                    excerpt=_excerpt(raw.decode("utf-8", "replace").rstrip("\r\n")))
    text = text.rstrip("\r\n")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _json_error(name, loc, text, exc)
    if not isinstance(value, dict):
        return Item(name, loc, reason="not_an_object",
                    detail=f"the line holds {_type_name(value)}, not a JSON object",
                    excerpt=_excerpt(text))
    return Item(name, loc, value=value)


def _read_jsonl(fh: IO[bytes], name: str, stats: Counter) -> Iterator[Item]:
    for line in jsonl_lines(fh, stats):
        yield parse_jsonl_line(name, line)


def _json_error(name: str, loc: dict[str, int], text: str, exc: json.JSONDecodeError) -> Item:
    body = text.strip()
    truncated = body.startswith(("{", "[")) and not body.endswith(("}", "]"))
    reason = "truncated_line" if truncated else "invalid_json"
    what = "the JSON is cut off" if truncated else "not valid JSON"
    return Item(name, loc, reason=reason,
                detail=f"{what}: {exc.msg.removesuffix(' at')} at column {exc.colno}",
                excerpt=_excerpt(text))


def _type_name(value: Any) -> str:
    """``an array``, ``a number``: the JSON type of ``value`` with its article."""
    name = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
    if name == "null":
        return name
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _read_json_array(fh: IO[bytes], name: str) -> Iterator[Item]:
    raw = fh.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        yield Item(name, {"line": line}, reason="not_utf8",
                   detail=f"invalid UTF-8 at byte offset {exc.start} (line {line}); the JSON "
                          f"array cannot be read", extra={"byte_offset": exc.start})
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        item = _json_error(name, {"line": exc.lineno}, text, exc)
        item.detail += f" (line {exc.lineno}); the JSON array cannot be read"
        yield item
        return
    if isinstance(data, dict) and _looks_like_record(data):
        data = [data]                 # a file holding a single record
    if not isinstance(data, list):
        yield Item(name, {"line": 1}, reason="wrong_top_level_type",
                   detail=f"the file holds {_type_name(data)}; expected an array of "
                          f"record objects (or JSONL, one object per line)",
                   excerpt=_excerpt(text))
        return
    for index, value in enumerate(data):
        loc = {"index": index}
        if isinstance(value, dict):
            yield Item(name, loc, value=value)
        else:
            yield Item(name, loc, reason="not_an_object",
                       detail=f"array element {index} is {_type_name(value)}, not an object",
                       excerpt=_excerpt(json.dumps(value, ensure_ascii=False)))


def _looks_like_record(value: dict[str, Any]) -> bool:
    return any(k in value for k in ("instruction", "response", "output", "prompt", "completion",
                                    "messages"))


class _TrackedLines:
    """Lines of a binary file decoded for ``csv``, remembering line numbers and byte offsets."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.lineno, self.offset = fh, 0, 0
        self.pending: list[tuple[int, int, str]] = []   # (line, byte offset, text) since last row

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.fh.readline()
        if not raw:
            raise StopIteration
        if self.lineno == 0 and raw.startswith(codecs.BOM_UTF8):
            raw, self.offset = raw[3:], 3
        text = raw.decode("utf-8", "surrogateescape")
        self.lineno += 1
        self.pending.append((self.lineno, self.offset, text))
        self.offset += len(raw)
        return text

    def take(self) -> list[tuple[int, int, str]]:
        lines, self.pending = self.pending, []
        return lines


def _undecodable(lines: list[tuple[int, int, str]]) -> tuple[int, int] | None:
    """(line, byte offset) of the first byte that is not UTF-8, if any."""
    for lineno, offset, text in lines:
        for i, ch in enumerate(text):
            if "\udc80" <= ch <= "\udcff":
                return lineno, offset + len(text[:i].encode("utf-8", "surrogateescape"))
    return None


def _read_csv(fh: IO[bytes], name: str, stats: Counter, delimiter: str) -> Iterator[Item]:
    csv.field_size_limit(2**31 - 1)
    lines = _TrackedLines(fh)
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            span = lines.take()
            yield Item(name, {"line": span[0][0] if span else lines.lineno}, reason="invalid_csv",
                       detail=f"unreadable CSV row: {exc}")
            continue
        span = lines.take()
        loc = {"line": span[0][0]}
        bad = _undecodable(span)
        if header is None:
            if bad:
                raise DataError(f"{name}: the CSV header is not UTF-8 (byte offset {bad[1]})")
            header = [h.strip() for h in row]
            continue
        if not any(cell.strip() for cell in row):
            stats["blank_lines"] += 1
            continue
        text = "".join(t for _, _, t in span)
        if bad:
            yield Item(name, {"line": bad[0]}, reason="not_utf8",
                       detail=f"invalid UTF-8 at byte offset {bad[1]} (line {bad[0]})",
                       extra={"byte_offset": bad[1]},
                       excerpt=_excerpt(text.encode("utf-8", "surrogateescape")
                                        .decode("utf-8", "replace")))
        elif len(row) != len(header):
            yield Item(name, loc, reason="invalid_csv",
                       detail=f"row has {len(row)} fields, the header has {len(header)}",
                       excerpt=_excerpt(text))
        else:
            yield Item(name, loc, value=dict(zip(header, row)))


# ---------------------------------------------------------------------------------------------
# Records: shape detection, validation, cleaning, PII

class RecordError(Exception):
    """Why a record is rejected; ``cleaning`` and ``pii`` say what was cleaned before that."""

    def __init__(self, reason: str, detail: str, cleaning: set[str] | None = None,
                 pii: Counter | None = None):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.cleaning, self.pii = cleaning or set(), pii or Counter()


def detect_shape(value: dict[str, Any], field_map: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The record's shape and where its canonical fields are (``--field-map`` wins)."""
    if "messages" in field_map:
        return "chat", {"messages": field_map["messages"]}
    if "instruction" in field_map and "response" in field_map:
        context = field_map.get("context") or ("input" if "input" in value else "context")
        return "field_map", {"instruction": field_map["instruction"], "context": context,
                             "response": field_map["response"]}
    if "messages" in value:
        shape, mapping = "chat", {"messages": "messages"}
    elif "instruction" in value and "output" in value and "response" not in value:
        shape, mapping = "alpaca", {"instruction": "instruction", "context": "input",
                                    "response": "output"}
    elif "instruction" in value or "response" in value:
        shape, mapping = "instruction_response", {"instruction": "instruction",
                                                  "context": "context", "response": "response"}
    elif "prompt" in value or "completion" in value:
        shape, mapping = "prompt_completion", {"instruction": "prompt", "response": "completion"}
    elif any(field_map.get(k) in value for k in ("instruction", "response")):
        shape, mapping = "field_map", {"instruction": "instruction", "context": "context",
                                       "response": "response"}
    else:
        keys = ", ".join(sorted(map(str, value))[:12]) or "none"
        raise RecordError("unknown_shape", f"no known record shape (keys: {keys}); expected "
                          f"instruction/response, instruction/output, prompt/completion or "
                          f"messages, or pass --field-map")
    for key in ("instruction", "context", "response"):
        if key in field_map:
            mapping[key] = field_map[key]
    return shape, mapping


def _text(value: dict[str, Any], key: str | None, required: bool) -> str:
    if key is None or key not in value:
        if required:
            raise RecordError("missing_field", f"field {key!r} is missing")
        return ""
    text = value[key]
    if text is None:
        if required:
            raise RecordError("null_field", f"field {key!r} is null")
        return ""
    if not isinstance(text, str):
        raise RecordError("wrong_type", f"field {key!r} is {_type_name(text)}, not a string")
    return text


def _from_messages(messages: Any) -> tuple[str, str, str | None]:
    """(user, assistant, system) of a single-turn chat record."""
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"field 'messages' is {_type_name(messages)}, "
                          f"not a list")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RecordError("bad_chat", f"message {i} is not an object with a role")
        if not isinstance(msg.get("content"), str):
            raise RecordError("wrong_type", f"message {i} content is "
                              f"{_type_name(msg.get('content'))}, not a string")
        turns.append((msg["role"], msg["content"]))
    system = turns.pop(0)[1] if turns and turns[0][0] == "system" else None
    roles = [r for r, _ in turns]
    if roles != ["user", "assistant"]:
        raise RecordError("bad_chat", f"expected one user turn then one assistant turn (after an "
                          f"optional system turn), got roles {roles}")
    return turns[0][1], turns[1][1], system


def _raw_quality(value: dict[str, Any], field_map: dict[str, str]) -> Any:
    """The record's quality score as it is in the input (None when it has none)."""
    keys = (field_map["quality"],) if "quality" in field_map else QUALITY_FIELDS
    return next((value[k] for k in keys if k in value), None)


def parse_quality(raw: Any) -> float | None:
    """A quality score as a float; None when absent or not a finite number."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            return None
    if isinstance(raw, (int, float)) and math.isfinite(raw):
        return float(raw)
    return None


def to_record(value: dict[str, Any], field_map: dict[str, str]) -> tuple[dict[str, Any], str, Any]:
    """Schema record (id may be None), its shape and its raw quality value; RecordError if bad."""
    shape, mapping = detect_shape(value, field_map)
    consumed = set(mapping.values())
    metadata_extra: dict[str, Any] = {}
    if shape == "chat":
        instruction, response, system = _from_messages(value[mapping["messages"]])
        context = ""
        if system is not None:
            metadata_extra["system_prompt"] = system
    else:
        instruction = _text(value, mapping.get("instruction"), True)
        response = _text(value, mapping.get("response"), True)
        context = _text(value, mapping.get("context"), False)
    id_key, cat_key = field_map.get("id", "id"), field_map.get("category", "category")
    rec_id = value.get(id_key)
    if isinstance(rec_id, bool) or not isinstance(rec_id, (str, int, type(None))):
        raise RecordError("wrong_type", f"field {id_key!r} is {_type_name(rec_id)}, "
                          f"not a string or number")
    category = value.get(cat_key)
    if category is not None and not isinstance(category, str):
        raise RecordError("wrong_type", f"field {cat_key!r} is {_type_name(category)}, "
                          f"not a string")
    consumed |= {id_key, cat_key}
    metadata = {k: v for k, v in value.items() if k not in consumed}
    metadata.update(metadata_extra)
    record = {"id": str(rec_id).strip() if rec_id is not None and str(rec_id).strip() else None,
              "split": None, "category": category, "instruction": instruction,
              "context": context, "response": response, "metadata": metadata}
    return record, shape, _raw_quality(value, field_map)


_REMOVE_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
_ODD_SPACES = re.compile(r"[^\S \n\t\r\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")  # no-break spaces etc.
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
_TRAILING = re.compile(r"[ \t]+\n")
_MANY_BREAKS = re.compile(r"\n{3,}")


_ALREADY_CLEAN = re.compile(r"(?:[^\S\n ]|[^\x20-\x7e\n]|\n\n\n| \n)")


def clean_text(text: str) -> tuple[str, set[str]]:
    """NFC, no control or zero-width characters, tidy whitespace; returns what changed.

    Inner runs of spaces are kept (indentation in code answers matters).
    """
    if not _ALREADY_CLEAN.search(text) and text == text.strip():
        return text, set()                   # plain printable ASCII: nothing to do (fast path)
    changed = set()
    out = unicodedata.normalize("NFC", text)
    if out != text:
        changed.add("unicode_normalized")
    step = _LINE_BREAKS.sub("\n", out)
    step = _REMOVE_CHARS.sub("", step)
    if step != out:
        changed.add("control_chars_removed")
    out = step
    step = _ODD_SPACES.sub(" ", out)
    step = _MANY_BREAKS.sub("\n\n", _TRAILING.sub("\n", step)).strip()
    if step != out:
        changed.add("whitespace_fixed")
    return step, changed


_THREE_DIGITS = re.compile(r"\d{3}")

# (kind, pattern, replacement, cheap test that must pass before the pattern can match)
PII_PATTERNS: tuple[tuple[str, re.Pattern, str, Any], ...] = (
    ("api_key", re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}"
        r"|github_pat_[A-Za-z0-9_]{22,}|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20}"
        r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"), "[API_KEY]",
     lambda t: True),
    ("api_key", re.compile(r"(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"), "[API_KEY]",
     lambda t: "Bearer " in t),
    ("api_key", re.compile(r"(?i)\b((?:api[_-]?key|password|passwd|secret|token)\s*[=:]\s*)"
                           r"[^\s\"',;]{8,}"), r"\1[API_KEY]", lambda t: "=" in t or ":" in t),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
     "[EMAIL]", lambda t: "@" in t),
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}(?![\w])"), "[PHONE]",
     lambda t: _THREE_DIGITS.search(t) is not None),
)
PII_MIN_CHARS = 6                             # the shortest match: an e-mail like a@b.co


def scrub_pii(text: str, counts: Counter | None = None) -> tuple[str, Counter]:
    """Replace e-mail addresses, phone numbers, API keys and tokens with placeholders; adds what
    it replaced to ``counts`` (a new Counter when not given) and returns it."""
    if counts is None:
        counts = Counter()
    if len(text) < PII_MIN_CHARS:
        return text, counts
    for kind, pattern, placeholder, may_match in PII_PATTERNS:
        if not may_match(text):
            continue
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] += n
    return text, counts


def _strings(value: Any) -> Iterator[str]:
    """Every string value inside ``value`` (dict keys are not scrubbed, so not included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def may_hold_pii(texts: Iterable[str]) -> bool:
    """False only when ``scrub_pii`` would change none of ``texts``.

    The texts are searched once, joined by NUL: every pattern that matches inside one text also
    matches at the same place in the joined string (NUL is not a word character, not a separator
    a pattern accepts, and is where the text's boundaries were), so a joined string with no match
    means no text has one. Most records hold no PII; this replaces a search per field and
    pattern with one per pattern.
    """
    joined = "\x00".join(t for t in texts if len(t) >= PII_MIN_CHARS)
    return bool(joined) and any(may_match(joined) and pattern.search(joined) is not None
                                for _, pattern, _, may_match in PII_PATTERNS)


def _scrub_value(value: Any, counts: Counter) -> Any:
    if isinstance(value, str):
        return scrub_pii(value, counts)[0]
    if isinstance(value, list):
        return [_scrub_value(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, counts) for k, v in value.items()}
    return value


def user_text(record: dict[str, Any]) -> str:
    """The user turn as the prompt formats render it (instruction, blank line, context)."""
    return f"{record['instruction']}\n\n{record['context']}" if record["context"] \
        else record["instruction"]


def exact_key(record: dict[str, Any]) -> bytes:
    """Dedup key: prompt and response with whitespace collapsed (shape-independent)."""
    text = " ".join(user_text(record).split()) + "\x1f" + " ".join(record["response"].split())
    return hashlib.sha1(text.encode("utf-8")).digest()


_NON_WORD = re.compile(r"[^\w\s]+")


def fuzzy_source(record: dict[str, Any]) -> str:
    """The text that near-duplicate and contamination checks compare, before normalizing."""
    return user_text(record) + " " + record["response"]


def normalize_fuzzy(text: str) -> str:
    """Case-folded, punctuation-free, whitespace-collapsed ``text``."""
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


def fuzzy_text(record: dict[str, Any]) -> str:
    """The record's text as near-duplicate checks compare it."""
    return normalize_fuzzy(fuzzy_source(record))


def shingles(text: str, size: int = SHINGLE_CHARS) -> set[bytes]:
    """Distinct ``size``-byte shingles of the UTF-8 text (characters, for ASCII text)."""
    data = text.encode("utf-8")
    if len(data) <= size:
        return {data}
    return {data[i:i + size] for i in range(len(data) - size + 1)}


def _lsh_threshold(threshold: float) -> float:
    """LSH bands tuned a little below the threshold: candidates are verified anyway."""
    return max(0.5, threshold - 0.1)


_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def _fmix64(v: np.ndarray) -> np.ndarray:
    shift, m1, m2 = _FMIX64
    v = v ^ (v >> shift)
    v = v * m1
    v = v ^ (v >> shift)
    v = v * m2
    return v ^ (v >> shift)


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def _fmix32(v: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX32
    v = v ^ (v >> s1)
    v = v * m1
    v = v ^ (v >> s2)
    v = v * m2
    return v ^ (v >> s1)


def shingle_hash(shingle: bytes) -> int:
    """32-bit hash of one shingle: MurmurHash3's 64-bit finalizer of its little-endian integer,
    top half. ``MinHasher`` computes the same for every shingle at once with numpy."""
    value = np.array([int.from_bytes(shingle, "little")], dtype=np.uint64)
    return int(_fmix64(value)[0] >> np.uint64(32))


class MinHasher:
    """MinHash signatures (datasketch's ``affine32`` scheme, ``hashfunc=shingle_hash``) of a
    text's ``SHINGLE_CHARS``-byte shingles, computed for all shingles in a few numpy operations
    instead of one Python call per shingle. A test checks it against datasketch's ``MinHash``.
    """

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.seed = num_perm, seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self._a, self._b = (row[None, :] for row in self.permutations)

    def __call__(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if len(data) <= SHINGLE_CHARS:                # one shingle: the whole text
            value = np.array([int.from_bytes(data.tobytes(), "little")], dtype=np.uint64)
        else:                                         # every window of SHINGLE_CHARS bytes
            n = len(data) - SHINGLE_CHARS + 1
            value = data[:n].astype(np.uint64)
            for i in range(1, SHINGLE_CHARS):
                value |= data[i:i + n].astype(np.uint64) << np.uint64(8 * i)
        hv = (_fmix64(value) >> np.uint64(32)).astype(np.uint32)
        hv = _fmix32(hv)[:, None]                     # datasketch's pre-mix for affine32
        return (hv * self._a + self._b).min(axis=0)


class MinHashBands:
    """LSH banding over MinHash signatures: items that share any whole band are candidates.

    The bands and rows are datasketch's ``MinHashLSH`` tuning for the threshold; the tables are
    plain dicts keyed by the band's bytes (a bucket holds a key, or a list once it has several),
    because datasketch's storage layers made the 200k-record read phase 51.9 s against 36.8 s
    with these.
    A test checks the candidates against ``MinHashLSH``.
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        tuned = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = tuned.b, tuned.r
        self.tables: list[dict[bytes, Any]] = [{} for _ in range(self.bands)]

    def _keys(self, signature: np.ndarray) -> list[bytes]:
        raw, width = signature.tobytes(), self.rows * signature.itemsize
        return [raw[i * width:(i + 1) * width] for i in range(self.bands)]

    def insert(self, key: int, signature: np.ndarray) -> None:
        for band, table in zip(self._keys(signature), self.tables):
            held = table.get(band)
            if held is None:
                table[band] = key
            elif type(held) is list:
                held.append(key)
            else:
                table[band] = [held, key]

    def query(self, signature: np.ndarray) -> list[int]:
        """Keys sharing at least one band with ``signature``, in ascending order."""
        found: set[int] = set()
        for band, table in zip(self._keys(signature), self.tables):
            held = table.get(band)
            if held is None:
                continue
            if type(held) is list:
                found.update(held)
            else:
                found.add(held)
        return sorted(found)


class SignatureStore:
    """MinHash signatures as rows of one growing uint32 matrix: 512 bytes a record instead of a
    numpy object each, and the candidates of a query are compared in one indexing operation."""

    def __init__(self, num_perm: int = NUM_PERM):
        self._rows = np.empty((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def append(self, signature: np.ndarray) -> int:
        if self.size == len(self._rows):
            grown = np.empty((2 * len(self._rows), self._rows.shape[1]), dtype=np.uint32)
            grown[:self.size] = self._rows
            self._rows = grown
        self._rows[self.size] = signature
        self.size += 1
        return self.size - 1

    def __getitem__(self, rows):
        return self._rows[:self.size][rows]

    def head(self, rows, width: int) -> np.ndarray:
        """The first ``width`` values of the given rows."""
        return self._rows[:self.size, :width][rows]


def best_match(signature: np.ndarray, candidates: list[int], store: SignatureStore,
               threshold: float, accept=None) -> tuple[int, float] | None:
    """The candidate (a row of ``store``) whose signature agrees most with ``signature``
    (estimated Jaccard), if at or over ``threshold`` and ``accept(candidate)`` holds. Ties go to
    the earliest candidate.

    Long candidate lists (templated data gives hundreds) are first compared on half of the
    signature: a candidate that could not reach ``threshold`` even if the other half agreed
    entirely is dropped unchecked, which halves the work and changes no result.
    """
    if not candidates:
        return None
    rows = np.asarray(candidates)
    n = len(signature)
    if len(rows) > PREFILTER_MIN_CANDIDATES:
        half = n // 2
        upper = ((store.head(rows, half) == signature[:half]).sum(axis=1) + (n - half)) / n
        rows = rows[upper >= threshold]
    scores = (store[rows] == signature).sum(axis=1) / n
    hits = np.flatnonzero(scores >= threshold)
    for k in hits[np.argsort(-scores[hits], kind="stable")]:
        if accept is None or accept(int(rows[k])):
            return int(rows[k]), float(scores[k])
    return None


def text_jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two texts' character shingles (after fuzzy normalization)."""
    sa, sb = shingles(normalize_fuzzy(a)), shingles(normalize_fuzzy(b))
    return len(sa & sb) / len(sa | sb)


@dataclass
class Prepared:
    """A record after the work that needs no other record (done in worker processes)."""
    record: dict[str, Any]
    shape: str
    raw_quality: Any
    cleaning: set[str]
    pii: dict[str, int]
    key: bytes                    # exact-duplicate key
    signature: np.ndarray         # MinHash of the fuzzy text


def clean_record(record: dict[str, Any], pii_scrub: bool) -> tuple[set[str], Counter]:
    """Clean the text fields and scrub PII in place; what changed and what was scrubbed.
    A record left without instruction or response raises RecordError (which still carries
    what was changed and scrubbed: the report counts the cleaning of every record)."""
    changed: set[str] = set()
    for key in ("instruction", "context", "response"):
        record[key], what = clean_text(record[key])
        changed |= what
    category = clean_text(record["category"] or "")[0]
    record["category"] = category or DEFAULT_CATEGORY
    found: Counter = Counter()
    fields = ("instruction", "context", "response", "metadata")
    if pii_scrub and may_hold_pii(_strings([record[key] for key in fields])):
        for key in fields:
            record[key] = _scrub_value(record[key], found)
    for key in ("instruction", "response"):
        if not record[key]:
            raise RecordError(f"empty_{key}", f"the {key} is empty after cleaning", changed,
                              found)
    return changed, found


class Rejected(NamedTuple):
    """A record that failed validation or cleaning, with what its reject line needs."""
    reason: str
    detail: str
    cleaning: set[str]
    pii: dict[str, int]
    rec_id: str | None
    excerpt: str


def prepare_record(value: dict[str, Any], field_map: dict[str, str], pii_scrub: bool,
                   minhash: MinHasher) -> Prepared:
    """Validate, clean, scrub, key and MinHash one input object (raises RecordError)."""
    record, shape, raw_quality = to_record(value, field_map)
    changed, found = clean_record(record, pii_scrub)
    return Prepared(record, shape, raw_quality, changed, dict(found), exact_key(record),
                    minhash(fuzzy_text(record)))


def prepare_value(value: dict[str, Any], field_map: dict[str, str], pii_scrub: bool,
                  minhash: MinHasher) -> Prepared | Rejected:
    """``prepare_record``, with a RecordError returned as Rejected."""
    try:
        return prepare_record(value, field_map, pii_scrub, minhash)
    except RecordError as exc:
        rec_id = value.get(field_map.get("id", "id"))
        return Rejected(exc.reason, exc.detail, exc.cleaning, dict(exc.pii),
                        str(rec_id) if isinstance(rec_id, (str, int)) else None,
                        _excerpt(json.dumps(value, ensure_ascii=False)))


_WORKER: dict[str, Any] = {}


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off (for a prep run). Prep holds millions of long-lived
    record objects and makes no reference cycles; full collections over them took 14.3 of
    54.5 s reading 300k records, and more the more records are held."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _worker_start() -> None:
    gc.enable()                                       # frozen before the fork: see _fork_pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the main process's to handle


def _worker_init(field_map: dict[str, str], pii_scrub: bool) -> None:
    _worker_start()
    _WORKER.update(field_map=field_map, pii_scrub=pii_scrub, minhash=MinHasher())


@contextlib.contextmanager
def _fork_pool(workers: int, initializer, initargs=()):
    """A pool of ``workers`` forked processes, terminated on exit."""
    import multiprocessing

    # the tokenizer's threads may have run before this fork, and the workers do not tokenize:
    # setting its switch for the fork keeps it from printing a warning in every worker
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = previous or "false"
    # the parent's objects are frozen so that a worker's collections never touch them (which
    # would copy their memory pages into every worker); the initializer re-enables collection
    gc.freeze()
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer, initargs)
    finally:
        gc.unfreeze()
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
    try:
        yield pool
    finally:
        pool.terminate()


def _prepare_chunk(task: tuple[str | None, list]) -> list[Prepared | Rejected | Item]:
    """``prepare_value`` over a chunk in a worker. A task is (None, objects) or (file name,
    raw JSONL lines), which the worker parses; a line that holds no object comes back as its
    reject Item."""
    name, units = task
    args = _WORKER["field_map"], _WORKER["pii_scrub"], _WORKER["minhash"]
    if name is None:
        out = [prepare_value(value, *args) for value in units]
    else:
        out = []
        for line in units:
            item = parse_jsonl_line(name, line)
            out.append(item if item.reason else prepare_value(item.value, *args))
    return out


def _ordered_map(pool, fn, tasks: Iterator[tuple[Any, Any]], in_flight: int):
    """(context, fn(arg)) for each (context, arg) of ``tasks``, in order, computed in ``pool``
    with at most ``in_flight`` tasks queued (``Pool.imap`` would queue all of them at once)."""
    pending: deque = deque()
    for context, arg in tasks:
        pending.append((context, pool.apply_async(fn, (arg,))))
        if len(pending) > in_flight:
            context, result = pending.popleft()
            yield context, result.get()
    while pending:
        context, result = pending.popleft()
        yield context, result.get()


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


class NearDuplicateIndex:
    """MinHash LSH over kept records; a candidate counts only if its estimated Jaccard passes."""

    def __init__(self, threshold: float, store: SignatureStore, num_perm: int = NUM_PERM):
        self.threshold, self.store = threshold, store
        self.minhash = MinHasher(num_perm)
        self.lsh = MinHashBands(_lsh_threshold(threshold), num_perm)
        self.keys: dict[int, Any] = {}

    def best_match(self, signature: np.ndarray, accept=None) -> tuple[int, float] | None:
        """(store row, Jaccard) of the most similar indexed item at or over the threshold."""
        return best_match(signature, self.lsh.query(signature), self.store, self.threshold,
                          accept)

    def add(self, signature: np.ndarray, key: Any) -> int:
        """Store and index ``signature``; returns its row in the store."""
        row = self.store.append(signature)
        self.keys[row] = key
        self.lsh.insert(row, signature)
        return row


# ---------------------------------------------------------------------------------------------
# The run

class RejectLog:
    """Writes ``rejects.jsonl`` as rejects happen and counts them by reason."""

    def __init__(self, fh: IO[str]):
        self.fh = fh
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, detail: str, file: str, loc: dict[str, int], *,
            rec_id: str | None = None, excerpt: str = "", **extra: Any) -> None:
        if reason not in INVALID_REASONS + FILTER_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        entry: dict[str, Any] = {"file": file, **loc, "reason": reason, "detail": detail}
        if rec_id is not None:
            entry["id"] = rec_id
        entry.update(extra)
        if excerpt:
            entry["excerpt"] = excerpt
        self.fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.counts[reason] += 1
        where = ":".join([file, str(loc.get("line", loc.get("index")))])
        self.first.setdefault(reason, where)

    @property
    def invalid(self) -> int:
        return sum(n for r, n in self.counts.items() if r in INVALID_REASONS)

    def top(self, k: int = 3) -> str:
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return ", ".join(f"{r} x{n} (first at {self.first[r]})" for r, n in items) or "none"


@dataclass
class Kept:
    record: dict[str, Any]
    file: str
    loc: dict[str, int]
    quality: float | None
    signature: int = -1                   # row in Prep.signatures
    tokens: int = 0
    supervised: int = 0
    truncated: bool = False


def _round(x: float, nd: int = 4) -> float:
    return float(round(x, nd))


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def length_summary(lengths: list[int]) -> dict[str, Any]:
    values = sorted(lengths)
    if not values:
        return {"examples": 0}
    return {"examples": len(values), "min": values[0], "mean": _round(sum(values) / len(values), 2),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p95": percentile(values, 95), "p99": percentile(values, 99), "max": values[-1]}


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` across categories in proportion to ``sizes`` (largest remainder)."""
    n = sum(sizes.values())
    if n == 0 or total <= 0:
        return {c: 0 for c in sizes}
    exact = {c: total * s / n for c, s in sizes.items()}
    out = {c: min(int(v), sizes[c]) for c, v in exact.items()}
    order = sorted(sizes, key=lambda c: (-(exact[c] - int(exact[c])), c))
    left = total - sum(out.values())
    while left > 0 and any(out[c] < sizes[c] for c in order):
        for c in order:
            if left > 0 and out[c] < sizes[c]:
                out[c] += 1
                left -= 1
    return out


def assign_splits(items: list[tuple[str, float | None, bool]], *, seed: int, val_fraction: float,
                  test_fraction: float, golden_size: int) -> tuple[list[str], dict[str, Any]]:
    """Seeded, category-stratified split of ``items`` = [(category, quality, truncated), ...].

    The golden set is drawn first: per category in proportion, highest quality first (ties
    broken by a seeded draw), never a truncated example, at most 20% of all items. Val and test
    are then seeded draws per category; the rest is train. Returns one split name per item.
    """
    n = len(items)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, (cat, _, _) in enumerate(items):
        by_cat[cat].append(i)
    cats = sorted(by_cat)
    golden_target = min(golden_size, int(n * MAX_GOLDEN_SHARE))
    eligible = {c: [i for i in by_cat[c] if not items[i][2]] for c in cats}
    quotas = allocate(golden_target, {c: len(eligible[c]) for c in cats})
    splits = ["train"] * n
    for c in cats:
        rng = random.Random(f"{seed}:golden:{c}")
        keyed = [(-(items[i][1] if items[i][1] is not None else -1.0), rng.random(), i)
                 for i in eligible[c]]
        for _, _, i in sorted(keyed)[:quotas[c]]:
            splits[i] = "golden"
    rest = {c: [i for i in by_cat[c] if splits[i] != "golden"] for c in cats}
    sizes = {c: len(by_cat[c]) for c in cats}
    val_q = allocate(round(val_fraction * n), sizes)
    test_q = allocate(round(test_fraction * n), sizes)
    for c in cats:
        pool = rest[c][:]
        random.Random(f"{seed}:split:{c}").shuffle(pool)
        room = max(0, len(pool) - 1)               # every category keeps a train example
        n_val = min(val_q[c], room)
        n_test = min(test_q[c], room - n_val)
        for i in pool[:n_val]:
            splits[i] = "val"
        for i in pool[n_val:n_val + n_test]:
            splits[i] = "test"
    info = {"golden_requested": golden_size, "golden_target": golden_target,
            "golden_capped": golden_target < golden_size,
            "golden_per_category": {c: quotas[c] for c in cats}}
    return splits, info


def ngrams(text: str, n: int) -> set[str]:
    words = re.findall(r"\w+", text.casefold())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class SharedGrams:
    """The eval n-gram ids each record shares, record after record (each record's sorted):
    ``counts[i]`` of them for record i."""
    counts: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def of(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


class LeakScan:
    """What the contamination guard needs from one record, given its fuzzy source text and,
    for a train record, its signature row: the eval n-grams it shares, and its closest eval
    near-duplicate. Needs nothing from other train records, so chunks can run in workers."""

    def __init__(self, gram_id: dict[str, int], n_gram: int, lsh: MinHashBands,
                 store: SignatureStore, threshold: float):
        self.gram_id, self.n_gram = gram_id, n_gram
        self.lsh, self.store, self.threshold = lsh, store, threshold

    def __call__(self, chunk: list[tuple[str, int]]
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, float]]]:
        """(shared count per record, the shared ids one record after another, {position in
        chunk: (eval signature row, Jaccard)} for train records with a near-duplicate)."""
        gram_id = self.gram_id
        counts = np.zeros(len(chunk), dtype=np.int64)
        ids: list[int] = []
        near: dict[int, tuple[int, float]] = {}
        for j, (source, row) in enumerate(chunk):
            shared = sorted(gram_id[g] for g in ngrams(normalize_fuzzy(source), self.n_gram)
                            & gram_id.keys())
            counts[j] = len(shared)
            ids.extend(shared)
            if row >= 0:
                signature = self.store[row]
                best = best_match(signature, self.lsh.query(signature), self.store,
                                  self.threshold)
                if best is not None:
                    near[j] = best
        return counts, np.array(ids, dtype=np.int32), near


_LEAK_SCAN: list[LeakScan] = []         # the scan a forked worker runs (set before forking)


def _scan_chunk(chunk: list[tuple[str, int]]):
    return _LEAK_SCAN[0](chunk)


@contextlib.contextmanager
def _leak_pool(scan: LeakScan, workers: int):
    """A pool of ``workers`` forked processes that run ``scan`` (None for 0 workers)."""
    if not workers:
        yield None
        return
    _LEAK_SCAN.append(scan)
    try:
        with _fork_pool(workers, _worker_start) as pool:
            yield pool
    finally:
        _LEAK_SCAN.clear()


def _most_shared_eval(shared: SharedGrams, postings: list[np.ndarray], is_train: np.ndarray,
                      counted: np.ndarray, min_count: int, n_records: int,
                      max_pairs: int = LEAK_MAX_PAIRS) -> dict[int, tuple[int, int]]:
    """{train record: (eval record, shared n-grams)} for the eval record sharing the most
    ``counted`` n-grams with it (the lowest index on a tie), where that is at least
    ``min_count``. The (record, eval record) pairs are counted in a few array operations per
    block of records rather than a loop per record; a block holds at most ``max_pairs`` pairs
    and shared ids (or one record), which bounds the memory."""
    if not postings:
        return {}
    lengths = np.array([len(p) for p in postings], dtype=np.int64)
    csr = np.concatenate([[0], np.cumsum(lengths)[:-1]]), np.concatenate(postings)
    # the pairs each record expands to, plus its ids
    size = np.concatenate([[0], np.cumsum(np.where(counted[shared.ids], lengths[shared.ids], 0))])
    per_record = np.where(is_train, size[shared.offsets[1:]] - size[shared.offsets[:-1]], 0) \
        + shared.counts
    out: dict[int, tuple[int, int]] = {}
    lo, total = 0, np.concatenate([[0], np.cumsum(per_record)])
    while lo < len(per_record):
        hi = max(lo + 1, int(np.searchsorted(total, total[lo] + max_pairs, side="right")) - 1)
        out.update(_most_shared_block(shared, lo, hi, csr, lengths, is_train, counted,
                                      min_count, n_records))
        lo = hi
    return out


def _most_shared_block(shared: SharedGrams, lo: int, hi: int, csr, lengths: np.ndarray,
                       is_train: np.ndarray, counted: np.ndarray, min_count: int,
                       n_records: int) -> dict[int, tuple[int, int]]:
    """``_most_shared_eval`` for records lo..hi-1."""
    starts, flat = csr
    ids = shared.ids[shared.offsets[lo]:shared.offsets[hi]]
    rec = np.repeat(np.arange(lo, hi), shared.counts[lo:hi])
    mask = is_train[rec] & counted[ids]
    rec, gram = rec[mask], ids[mask]
    if not len(gram):
        return {}
    size = lengths[gram]
    first = np.repeat(starts[gram] - (np.cumsum(size) - size), size)
    evals = flat[first + np.arange(int(size.sum()))]
    pairs, count = np.unique(np.repeat(rec, size) * n_records + evals, return_counts=True)
    rec, evals = np.divmod(pairs, n_records)
    order = np.lexsort((evals, -count, rec))           # per record: most shared, lowest index
    rec, evals, count = rec[order], evals[order], count[order]
    best = np.ones(len(rec), dtype=bool)
    best[1:] = rec[1:] != rec[:-1]
    best &= count >= min_count
    return {int(r): (int(j), int(c)) for r, j, c in zip(rec[best], evals[best], count[best])}


def derive_training_config(n_train: int, lengths: list[int], preset, max_length_cap: int
                           ) -> tuple[dict[str, int], dict[str, Any]]:
    """The data-derived RunConfig keys and how they were derived."""
    longest = max(lengths) if lengths else LENGTH_MULTIPLE
    max_length = min(max_length_cap, math.ceil(longest / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    world = max(1, preset.num_gpus)
    per_step = preset.batch_size * preset.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = preset.max_steps or steps_per_epoch * preset.num_epochs
    eval_steps = max(1, math.ceil(total / EVALS_PER_RUN))
    values = {"eval_steps": eval_steps, "max_length": max_length, "save_steps": eval_steps,
              "warmup_steps": max(1, math.ceil(total * WARMUP_SHARE))}
    derivation = {
        "preset": preset.name, "batch_size": preset.batch_size,
        "gradient_accumulation_steps": preset.gradient_accumulation_steps, "world_size": world,
        "examples_per_step": per_step, "train_examples": n_train,
        "steps_per_epoch": steps_per_epoch, "num_epochs": preset.num_epochs,
        "max_steps": preset.max_steps, "total_steps": total,
        "eval_steps_rule": f"ceil(total_steps / {EVALS_PER_RUN}); save_steps = eval_steps",
        "warmup_steps_rule": f"ceil(total_steps * {WARMUP_SHARE})",
        "max_length_rule": f"longest kept example ({longest} tokens) rounded up to a multiple of "
                           f"{LENGTH_MULTIPLE}, capped at --max-length {max_length_cap}, so the "
                           f"trainer truncates nothing",
        "length_percentiles": length_summary(lengths)}
    return values, derivation


class Prep:
    """One prep run, phase by phase (the benchmark times each phase)."""

    def __init__(self, cfg: PrepConfig, rejects: RejectLog, tokenizer=None, prompt_format=None,
                 progress: bool = True):
        self.cfg, self.rejects = cfg, rejects
        self.tokenizer, self.fmt = tokenizer, prompt_format
        self.progress = progress
        self.kept: list[Kept] = []
        self.signatures = SignatureStore()
        self.stats: Counter = Counter()
        self.shapes: Counter = Counter()
        self.cleaning: Counter = Counter()
        self.pii: Counter = Counter()
        self.quality = {"present": 0, "missing": 0, "unparseable": 0}
        self.inputs: list[dict[str, Any]] = []
        self.splits: list[str] = []
        self.split_info: dict[str, Any] = {}
        self.contamination: dict[str, Any] = {}

    def _bar(self, iterable=None, **kwargs):
        from tqdm import tqdm

        return tqdm(iterable, disable=None if self.progress else True, mininterval=0.5,
                    file=sys.stderr, **kwargs)

    # -- phase 1: read, validate, clean, scrub, dedup (streaming)
    def read(self) -> None:
        seen_keys: dict[bytes, str] = {}
        seen_ids: dict[str, str] = {}
        index = NearDuplicateIndex(self.cfg.dedup_threshold, self.signatures)
        workers = self.worker_count()
        init = (self.cfg.field_map, self.cfg.pii_scrub)
        with self._bar(desc="reading", unit=" records") as bar, \
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
        size = sum(Path(name).stat().st_size for name in self.cfg.enriched)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        # one per CPU although the main process needs one too: on 2 CPUs, 2 workers measured
        # faster than 1 (the main process waits on them part of the time)
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
        match = index.best_match(mh, same_answer)
        if match is not None:
            other = index.keys[match[0]]
            self.rejects.add("near_duplicate", f"near-duplicate (Jaccard {match[1]:.2f}, same "
                             f"answer) of {other}", file, loc, rec_id=record["id"],
                             duplicate_of=other)
            return
        if record["id"] is None:
            record["id"] = "rec-" + key.hex()[:12]
        if record["id"] in seen_ids:
            self.rejects.add("duplicate_id", f"id {record['id']!r} was already used at "
                             f"{seen_ids[record['id']]}", file, loc, rec_id=record["id"])
            return
        seen_keys[key] = record["id"]
        seen_ids[record["id"]] = where
        row = index.add(mh, record["id"])
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

    # -- phase 2: token lengths with the target tokenizer and prompt format
    def measure_lengths(self, max_length: int) -> None:
        from llama_dataset import count_tokens_batch, example_lengths

        if self.tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has no EOS token; cannot supervise the end of answers")
        policy = self.cfg.length_policy
        survivors: list[Kept] = []
        with self._bar(total=len(self.kept), desc="tokenizing", unit=" records") as bar:
            for start in range(0, len(self.kept), TOKENIZE_CHUNK):
                chunk = self.kept[start:start + TOKENIZE_CHUNK]
                prompts, responses = count_tokens_batch(self.tokenizer, self.fmt,
                                                        [k.record for k in chunk])
                for kept, n_prompt, n_response in zip(chunk, prompts, responses):
                    measured = example_lengths(n_prompt, n_response, max_length, policy)
                    if measured is None:
                        why = "; fewer than 8 response tokens would remain" \
                            if policy == "truncate" else ""
                        self.rejects.add("too_long", f"{n_prompt + n_response + 1} tokens "
                                         f"(prompt {n_prompt}) > --max-length {max_length} "
                                         f"(policy {policy}{why})",
                                         kept.file, kept.loc, rec_id=kept.record["id"])
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
        """Remove train records that leak a golden or test record.

        A leak is a near duplicate (MinHash Jaccard >= --contamination-threshold) or a long
        shared passage: N or more distinct shared word N-grams (N = --contamination-ngram, so at
        least 2N-1 words of common text), not counting template N-grams that occur in more than
        max(10, 0.5%) of all records (shared instructions are not leaks).
        """
        n_gram = self.cfg.contamination_ngram
        eval_idx = [i for i, s in enumerate(self.splits) if s in ("golden", "test")]
        lsh = MinHashBands(_lsh_threshold(self.cfg.contamination_threshold))
        eval_of_row: dict[int, int] = {}                  # signature row -> kept index
        eval_grams: dict[str, list[int]] = defaultdict(list)
        for i in eval_idx:
            row = self.kept[i].signature
            lsh.insert(row, self.signatures[row])
            eval_of_row[row] = i
            for g in ngrams(fuzzy_text(self.kept[i].record), n_gram):
                eval_grams[g].append(i)
        # an eval n-gram's id is its rank in sorted order, so sorted ids are sorted n-grams
        grams = sorted(eval_grams)
        postings = [np.array(eval_grams[g], dtype=np.int64) for g in grams]
        scan = LeakScan({g: k for k, g in enumerate(grams)}, n_gram, lsh, self.signatures,
                        self.cfg.contamination_threshold)
        shared, near = self._scan(scan)
        df = np.bincount(shared.ids, minlength=len(grams))
        boilerplate_df = max(NGRAM_BOILERPLATE_MIN_DF,
                             int(NGRAM_BOILERPLATE_SHARE * len(self.kept)))
        is_train = np.array([s == "train" for s in self.splits], dtype=bool)
        passages = _most_shared_eval(shared, postings, is_train, df <= boilerplate_df,
                                     n_gram, len(self.kept))
        removed = {"near_duplicate": 0, "ngram_overlap": 0}
        by_split: Counter = Counter()
        drop: set[int] = set()
        for i in np.flatnonzero(is_train).tolist():
            if i in near:
                row, jaccard = near[i]
                other, kind = eval_of_row[row], "near_duplicate"
                detail = f"near-duplicate (Jaccard {jaccard:.2f}) of"
            elif i in passages:
                other, count = passages[i]
                kind = "ngram_overlap"
                example = next(grams[g] for g in shared.of(i)
                               if df[g] <= boilerplate_df and other in eval_grams[grams[g]])
                detail = f"shares {count} {n_gram}-word passages (e.g. '{example}') with"
            else:
                continue
            removed[kind] += 1
            by_split[self.splits[other]] += 1
            drop.add(i)
            kept = self.kept[i]
            self.rejects.add("contaminated", f"{detail} {self.splits[other]} record "
                             f"{self.kept[other].record['id']}", kept.file, kept.loc,
                             rec_id=kept.record["id"], overlaps=self.kept[other].record["id"])
        self.kept = [k for i, k in enumerate(self.kept) if i not in drop]
        self.splits = [s for i, s in enumerate(self.splits) if i not in drop]
        self.contamination = {"removed_from_train": len(drop), **removed,
                              "by_eval_split": dict(sorted(by_split.items())),
                              "checked_against": ["golden", "test"],
                              "near_duplicate_threshold": self.cfg.contamination_threshold,
                              "ngram_words": n_gram, "ngram_min_shared": n_gram,
                              "ngram_boilerplate_df": boilerplate_df}

    def _scan(self, scan: LeakScan) -> tuple[SharedGrams, dict[int, tuple[int, float]]]:
        """``scan`` over every kept record, in worker processes when the read phase used them
        (they are forked after ``scan`` exists, so only the texts travel to them)."""
        tasks = ((start, [(fuzzy_source(k.record), k.signature if split == "train" else -1)
                          for k, split in zip(self.kept[start:start + LEAK_CHUNK],
                                              self.splits[start:start + LEAK_CHUNK])])
                 for start in range(0, len(self.kept), LEAK_CHUNK))
        workers = self.worker_count()
        counts: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        near: dict[int, tuple[int, float]] = {}
        with self._bar(total=len(self.kept), desc="contamination", unit=" records") as bar, \
                _leak_pool(scan, workers) as pool:
            results = _ordered_map(pool, _scan_chunk, tasks, 2 * workers) if pool else \
                ((start, scan(chunk)) for start, chunk in tasks)
            for start, (chunk_counts, chunk_ids, chunk_near) in results:
                counts.append(chunk_counts)
                ids.append(chunk_ids)
                near.update((start + j, match) for j, match in chunk_near.items())
                bar.update(len(chunk_counts))
        return SharedGrams(np.concatenate(counts or [np.zeros(0, np.int64)]),
                           np.concatenate(ids or [np.zeros(0, np.int32)])), near

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
        split_counts = Counter(self.splits)
        categories: dict[str, Counter] = defaultdict(Counter)
        lengths: dict[str, list[int]] = defaultdict(list)
        for kept, split in zip(self.kept, self.splits):
            categories[kept.record["category"]][split] += 1
            lengths[split].append(kept.tokens)
        splits = ("train", "val", "test", "golden")
        qualities = [k.quality for k, s in zip(self.kept, self.splits) if s == "golden"
                     and k.quality is not None]
        return {
            "inputs": self.inputs,
            "counts": {"records_read": self.stats["records"],
                       "blank_lines": self.stats["blank_lines"], "kept": len(self.kept),
                       "rejected": sum(self.rejects.counts.values()),
                       "invalid": self.rejects.invalid,
                       "invalid_fraction": _round(self.rejects.invalid
                                                  / max(1, self.stats["records"])),
                       "max_reject_fraction": self.cfg.max_reject_fraction},
            "rejects_by_reason": dict(sorted(self.rejects.counts.items())),
            "splits": {s: split_counts.get(s, 0) for s in splits},
            "categories": {c: {s: categories[c].get(s, 0) for s in splits}
                           | {"total": sum(categories[c].values())}
                           for c in sorted(categories)},
            "shapes": dict(sorted(self.shapes.items())),
            "cleaning": {k: self.cleaning.get(k, 0) for k in
                         ("unicode_normalized", "control_chars_removed", "whitespace_fixed")},
            "pii": {"enabled": self.cfg.pii_scrub,
                    **{k: self.pii.get(k, 0) for k in ("email", "phone", "api_key", "records")}},
            "dedup": {"exact": self.rejects.counts.get("duplicate", 0),
                      "near": self.rejects.counts.get("near_duplicate", 0),
                      "near_threshold": self.cfg.dedup_threshold, "num_perm": NUM_PERM,
                      "shingle_chars": SHINGLE_CHARS},
            "quality": {**self.quality, "min_quality": self.cfg.min_quality,
                        "filtered": self.rejects.counts.get("low_quality", 0)},
            "length": {"tokenizer": tokenizer_name, "prompt_style": self.fmt.style,
                       "max_length": max_length, "policy": self.cfg.length_policy,
                       "dropped": self.rejects.counts.get("too_long", 0),
                       "truncated": sum(k.truncated for k in self.kept),
                       "all": length_summary([k.tokens for k in self.kept]),
                       "per_split": {s: length_summary(lengths[s]) for s in splits},
                       "supervised_tokens": sum(k.supervised for k in self.kept),
                       "tokens": sum(k.tokens for k in self.kept)},
            "golden": {**self.split_info,
                       "mean_quality": _round(sum(qualities) / len(qualities)) if qualities
                       else None},
            "contamination": self.contamination,
            "training_config": {"values": training, "derivation": derivation},
            "seed": self.cfg.seed,
        }


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
        from llama_model import load_tokenizer

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
    from llama_config import DEFAULT_SIZE, get_preset
    from llama_dataset import PromptFormat

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
        write_manifest(tmp, stage=STAGE, config=cfg.to_dict(), inputs=describe_inputs(
            {("enriched" if len(cfg.enriched) == 1 else f"enriched_{i}"): p
             for i, p in enumerate(cfg.enriched)}))
        for path in tmp.iterdir():              # temp files are private (0600); outputs are not
            path.chmod(0o644)
        tmp.chmod(0o755)
    _print_summary(report, cfg.output_dir, time.time() - t0)
    return report


def _print_summary(report: dict[str, Any], out: str, seconds: float) -> None:
    s, c = report["splits"], report["counts"]
    reasons = ", ".join(f"{r} {n}" for r, n in report["rejects_by_reason"].items()) or "none"
    print(f"kept {c['kept']} of {c['records_read']} records (train {s['train']}, val {s['val']}, "
          f"test {s['test']}, golden {s['golden']}); rejected {c['rejected']} ({reasons})")
    print(f"wrote {out} in {seconds:.1f}s; training config "
          f"{json.dumps(report['training_config']['values'], sort_keys=True)}")
    if report["golden"]["golden_capped"]:
        print(f"warning: golden set capped at {report['golden']['golden_target']} (20% of the kept "
              f"records) instead of --golden-size {report['golden']['golden_requested']}",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Command line

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    d = PrepConfig(enriched=())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--enriched", nargs="+", required=True, metavar="FILE",
                   help="input files: .jsonl, .json (array) or .csv, optionally gzipped")
    p.add_argument("--output-dir", default=d.output_dir, help="directory to (re)write")
    p.add_argument("--input-format", default=d.input_format, choices=INPUT_FORMATS,
                   help="input format (auto: from the file name, then the first byte)")
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
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
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


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    values = vars(args).copy()
    values["enriched"] = tuple(values["enriched"])
    values["field_map"] = parse_field_map(values["field_map"])
    return PrepConfig(**values)


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        run_prep(config_from_args(args))
        return EXIT_OK

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
