"""Reading input files: every record (or unreadable line) becomes an ``Item``.

JSONL (one record per line, streamed), a JSON array (read whole), or CSV/TSV with a header
(streamed); any of them gzipped (found by magic bytes, not by name). Parquet files, Arrow shards
and hub datasets go to ``prep.containers`` (through ``datasets``); ``detect_format`` and
``read_items`` dispatch every kind.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import json
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterator

from llama_sft.errors import DataError, UsageError
from llama_sft.prep.containers import ARROW_STREAM_MAGIC, ROW_FORMATS, HubSource, read_rows
from llama_sft.prep.items import Item, excerpt, type_name


def open_input(path: Path) -> IO[bytes]:
    """Open a file for binary reading, transparently gunzipping (by magic bytes, not name)."""
    fh = open(path, "rb")
    if fh.peek(2)[:2] == b"\x1f\x8b":
        fh.close()
        return gzip.open(path, "rb")
    return fh


def detect_format(path: Path, requested: str = "auto") -> str:
    if HubSource.matches(str(path)):
        return "hub"
    if requested != "auto":
        return requested
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".parquet", ".arrow"):
        return suffix[1:]
    with open_input(path) as fh:
        magic = fh.read(4)
        if magic == b"PAR1":
            return "parquet"
        if magic == ARROW_STREAM_MAGIC:
            return "arrow"
        fh.seek(0)
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
    if fmt in ROW_FORMATS:
        yield from read_rows(path, fmt)
        return
    name = str(path)
    with open_input(path) as fh:
        if fmt == "jsonl":
            yield from _read_jsonl(fh, name, stats)
        elif fmt == "json":
            yield from _read_json_array(fh, name)
        else:
            yield from _read_csv(fh, name, stats, "\t" if fmt == "tsv" else ",")


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
                    excerpt=excerpt(raw.decode("utf-8", "replace").rstrip("\r\n")))
    text = text.rstrip("\r\n")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _json_error(name, loc, text, exc)
    if not isinstance(value, dict):
        return Item(name, loc, reason="not_an_object",
                    detail=f"the line holds {type_name(value)}, not a JSON object",
                    excerpt=excerpt(text))
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
                excerpt=excerpt(text))


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
                   detail=f"the file holds {type_name(data)}; expected an array of "
                          f"record objects (or JSONL, one object per line)",
                   excerpt=excerpt(text))
        return
    for index, value in enumerate(data):
        loc = {"index": index}
        if isinstance(value, dict):
            yield Item(name, loc, value=value)
        else:
            yield Item(name, loc, reason="not_an_object",
                       detail=f"array element {index} is {type_name(value)}, not an object",
                       excerpt=excerpt(json.dumps(value, ensure_ascii=False)))


def _looks_like_record(value: dict[str, Any]) -> bool:
    return any(k in value for k in ("instruction", "response", "output", "prompt", "completion",
                                    "messages", "conversations"))


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
                       excerpt=excerpt(text.encode("utf-8", "surrogateescape")
                                        .decode("utf-8", "replace")))
        elif len(row) != len(header):
            yield Item(name, loc, reason="invalid_csv",
                       detail=f"row has {len(row)} fields, the header has {len(header)}",
                       excerpt=excerpt(text))
        else:
            yield Item(name, loc, value=dict(zip(header, row)))
