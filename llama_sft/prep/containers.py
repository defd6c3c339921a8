"""Parquet files, Arrow shards written by ``Dataset.save_to_disk`` and hub datasets
(``hf://datasets/ORG/NAME``), read through ``datasets``: streamed in batches of rows, each row as
the plain dict the JSONL reader would give. ``resolve_inputs`` turns ``--enriched`` into what is
read: globs expanded, save_to_disk directories replaced by the Arrow shards of their split, hub
ids checked and spelled out with their split and configuration.
"""
from __future__ import annotations

import datetime
import glob
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode

from llama_sft.errors import DataError, StorageError, UsageError
from llama_sft.prep.items import Item

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
    74) and written out with their split and configuration. Usage problems are reported
    together."""
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
