"""SFT records as the prep stage writes them: the schema and the checked reader.

One JSON object per line in ``sft_dataset.jsonl`` and ``golden_set.jsonl``::

    {"id": str, "split": "train"|"val"|"test"|"golden", "category": str,
     "instruction": str, "context": str, "response": str, "metadata": {...}}

A multi-turn conversation also has ``"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]`` (after ``response``), ending on an assistant turn; its ``instruction`` and
``response`` are the last user and assistant turns.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llama_sft.errors import DataError, UsageError

SPLITS = ("train", "val", "test", "golden")
REQUIRED_FIELDS = ("instruction", "response")
ROLES = ("system", "user", "assistant")


def read_sft_jsonl(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Read SFT records written by the prep stage; ``split`` keeps only that split.

    A malformed line is an error naming ``file:line`` (exit 65), and for bytes that are not
    UTF-8 also the byte offset in the file: these files are produced by the pipeline, so damage
    here means the file was edited or truncated.
    """
    import jsonlines

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"dataset file not found: {path}")
    records = []
    with open(path, "rb") as fh:
        lines = _TrackedLines(fh)
        try:
            for record in jsonlines.Reader(lines).iter(skip_empty=True):
                _check_record(record, path, lines.lineno)
                if split is None or record.get("split") == split:
                    records.append(record)
        except jsonlines.InvalidLineError as exc:
            cause = exc.__cause__
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(f"{path}:{exc.lineno}: not UTF-8 at byte offset "
                                f"{lines.start + cause.start} (byte {cause.start} of the line)"
                                ) from None
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({cause or exc})") from None
    return records


class _TrackedLines:
    """The lines of a binary file, remembering the current line's number and byte offset."""

    def __init__(self, fh):
        self.fh, self.lineno, self.start, self._end = fh, 0, 0, 0

    def __iter__(self):
        for raw in self.fh:
            self.lineno += 1
            self.start, self._end = self._end, self._end + len(raw)
            yield raw


def _check_record(record: Any, path: Path, lineno: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    for key in REQUIRED_FIELDS:
        if not isinstance(record.get(key), str):
            raise DataError(f"{path}:{lineno}: field {key!r} missing or not a string")
    messages = record.get("messages")
    if messages is not None and not (
            isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"
            and all(isinstance(m, dict) and m.get("role") in ROLES
                    and isinstance(m.get("content"), str) for m in messages)):
        raise DataError(f"{path}:{lineno}: field 'messages' must be a list of "
                        f"{{role: {'|'.join(ROLES)}, content: str}} ending on an assistant turn")
