"""What every reader yields: an ``Item`` (a record, or why it could not be read), and the
helpers reject lines use to describe a value."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def excerpt(text: str, limit: int = 200) -> str:
    """The first ``limit`` characters of ``text`` with PII replaced (what a reject line shows)."""
    return scrub_pii(text)[0][:limit]


def type_name(value: Any) -> str:
    """``an array``, ``a number``: the JSON type of ``value`` with its article."""
    name = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
    if name == "null":
        return name
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
