"""Reading input files: every record (or unreadable line) becomes an ``Item``.

JSONL (one record per line, streamed), a JSON array (read whole), or CSV/TSV with a header
(streamed); any of them gzipped (found by magic bytes, not by name). Parquet files, Arrow shards
written by ``Dataset.save_to_disk`` and hub datasets (``hf://datasets/ORG/NAME``) are read through
``datasets``, streamed in batches of rows, each row as the plain dict the JSONL reader would give.
``resolve_inputs`` turns ``--enriched`` into what is read: globs expanded, save_to_disk
directories replaced by the Arrow shards of their split, hub ids checked and spelled out with
their split and configuration.
"""
from __future__ import annotations

import codecs
import csv
import datetime
import glob
import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import parse_qsl, urlencode

from llama_sft.errors import DataError, StorageError, UsageError
from llama_sft.prep.pii import scrub_pii


@dataclass
class Item:
    file: str
    loc: dict[str, int]                  # {"line": n} (JSONL, CSV) or {"index": i} (JSON array;
                                         # parquet, Arrow and hub rows, counted from 0)
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
                       excerpt=_excerpt(text.encode("utf-8", "surrogateescape")
                                        .decode("utf-8", "replace")))
        elif len(row) != len(header):
            yield Item(name, loc, reason="invalid_csv",
                       detail=f"row has {len(row)} fields, the header has {len(header)}",
                       excerpt=_excerpt(text))
        else:
            yield Item(name, loc, value=dict(zip(header, row)))


# ---------------------------------------------------------------------------------------------
# parquet, Arrow and hub inputs, read through `datasets`

ROW_FORMATS = ("parquet", "arrow", "hub")     # read row by row by ``read_rows``
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"      # an Arrow IPC stream, as save_to_disk writes it
ROW_BATCH = 1024                               # rows per Arrow batch taken from `datasets`
_HUB_ID = re.compile(r"hf:/{1,2}datasets/(?P<repo>[^?]*)(?:\?(?P<query>.*))?")
_HUB_USAGE = "expected hf://datasets/ORG/NAME (split and configuration: --hf-split / --hf-config)"


@dataclass(frozen=True)
class HubSource:
    """One split of a hub dataset, written ``hf://datasets/ORG/NAME?split=S[&config=C]``."""

    repo_id: str
    split: str
    config: str | None = None

    def __str__(self) -> str:
        query = {"split": self.split, **({"config": self.config} if self.config else {})}
        return f"hf://datasets/{self.repo_id}?{urlencode(query)}"

    @staticmethod
    def matches(text: str) -> bool:
        """Whether ``text`` names a hub dataset (``pathlib`` turns ``hf://`` into ``hf:/``)."""
        return text.startswith("hf:/")

    @classmethod
    def parse(cls, text: str, split: str = "train", config: str | None = None) -> HubSource:
        """The source ``text`` names; a ``?split=...&config=...`` in it wins over the arguments.
        UsageError (exit 2) when it is malformed."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        match = _HUB_ID.fullmatch(text)
        if not match or match["repo"].count("/") != 1:
            raise UsageError(f"malformed hub dataset id {text!r}; {_HUB_USAGE}")
        try:
            validate_repo_id(match["repo"])
            query = dict(parse_qsl(match["query"] or "", strict_parsing=True))
        except (HFValidationError, ValueError) as exc:
            raise UsageError(f"malformed hub dataset id {text!r} ({exc}); {_HUB_USAGE}") from None
        if set(query) - {"split", "config"}:
            raise UsageError(f"malformed hub dataset id {text!r}: only split= and config= may "
                             f"follow the '?'; {_HUB_USAGE}")
        source = cls(match["repo"], query.get("split", split), query.get("config", config))
        if not source.split.strip():
            raise UsageError(f"{text}: --hf-split must name a split")
        return source


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def open_hub(source: HubSource):
    """The split as an ``IterableDataset``: streamed, so a big dataset is never loaded whole;
    with ``HF_HUB_OFFLINE`` set it comes from the datasets cache or not at all."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(f"hf://datasets/{source.repo_id}", source.config,
                                     split=source.split, streaming=True)
    except ConnectionError as exc:
        cache = datasets.config.HF_DATASETS_CACHE
        if datasets.config.HF_HUB_OFFLINE:
            raise StorageError(f"{source} is not in the datasets cache {cache} and HF_HUB_OFFLINE "
                               f"is set, so it cannot be downloaded; run once without "
                               f"HF_HUB_OFFLINE to cache it, or point HF_HOME at a cache that "
                               f"holds it") from None
        raise StorageError(f"cannot reach the Hugging Face Hub for {source} ({_one_line(exc)}); "
                           f"check the network, or set HF_HUB_OFFLINE=1 to read it from the "
                           f"datasets cache {cache}") from None
    except DatasetNotFoundError as exc:
        raise UsageError(f"{source}: {_one_line(exc)}; check the id, or log in (HF_TOKEN) for "
                         f"a gated or private dataset") from None
    except ValueError as exc:                         # an unknown split or configuration
        raise UsageError(f"{source}: {_one_line(exc)}; check --hf-split / --hf-config") from None


def arrow_shards(directory: Path, split: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` directory, in order (of ``split`` for a
    ``DatasetDict``); memory-mapped by ``datasets``, nothing is read yet."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(directory))
    except FileNotFoundError:
        raise UsageError(f"{directory} is a directory but not one written by "
                         f"Dataset.save_to_disk; for a folder of files pass a glob such as "
                         f"'{directory}/*.parquet'") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise UsageError(f"{directory} has no split {split!r} (its splits: "
                             f"{', '.join(data)}); pass --hf-split")
        data = data[split]
    return [entry["filename"] for entry in data.cache_files]


def resolve_inputs(names: tuple[str, ...] | list[str], split: str = "train",
                   config: str | None = None) -> tuple[str, ...]:
    """``--enriched`` as the stage reads it: globs expanded (sorted), save_to_disk directories
    replaced by their Arrow shards, hub ids checked (offline and not cached: StorageError, exit
    74) and written out with their split and configuration. Usage problems are reported together."""
    resolved: list[str] = []
    problems: list[str] = []
    for name in names:
        try:
            resolved += _resolve_input(name, split, config)
        except UsageError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("; ".join(problems))
    return tuple(resolved)


def _resolve_input(name: str, split: str, config: str | None) -> list[str]:
    if name.startswith("hf:"):
        source = HubSource.parse(name, split, config)
        open_hub(source)                  # fails now, before a tokenizer is loaded, if unreadable
        return [str(source)]
    path = Path(name)
    if any(ch in name for ch in "*?[") and not path.exists():
        matches = sorted(glob.glob(name, recursive=True))
        if not matches:
            raise UsageError(f"no input matches {name!r}")
        return [found for match in matches for found in _resolve_input(match, split, config)]
    if path.is_dir():
        return arrow_shards(path, split)
    return [name]


class _NotPlain(ValueError):
    """A row value that has no JSON equivalent."""


def _plain(value: Any) -> Any:
    """A value of ``pyarrow``'s ``to_pylist`` as JSON holds it (dict, list, str, int, float, bool,
    None): structs are dicts already, lists of structs lists of dicts; dates and times become
    ISO strings, durations seconds, decimals floats, binary UTF-8 text."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _NotPlain("binary data that is not UTF-8 text") from None
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    raise _NotPlain(f"a {type(value).__name__}")


def _row_item(name: str, index: int, row: dict[str, Any]) -> Item:
    loc = {"index": index}
    value = {}
    for key, cell in row.items():
        try:
            value[str(key)] = _plain(cell)
        except _NotPlain as exc:
            return Item(name, loc, reason="wrong_type",
                        detail=f"field {key!r} holds {exc}, which JSON cannot hold")
    return Item(name, loc, value=value)


def read_rows(path: Path | str, fmt: str) -> Iterator[Item]:
    """Every row of a parquet file, an Arrow shard or a hub split, streamed in Arrow batches
    (never loaded whole); ``loc`` is the row's index, from 0."""
    import pyarrow as pa
    from datasets import IterableDataset

    if fmt == "hub":
        source = HubSource.parse(str(path))
        name, rows = str(source), open_hub(source)
    else:
        name = str(path)
    try:
        if fmt == "parquet":
            rows = IterableDataset.from_parquet(glob.escape(name))
        elif fmt == "arrow":
            rows = IterableDataset.from_file(name)
        index = 0                     # Arrow batches: the stored values, not decoded by features
        for batch in rows.with_format("arrow").iter(batch_size=ROW_BATCH):
            for row in batch.to_pylist():
                yield _row_item(name, index, row)
                index += 1
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{name}: cannot read it as {fmt}: {_one_line(exc)}") from None
