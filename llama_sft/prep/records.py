"""From an input object to a clean schema record: shape detection, validation, cleaning, PII
scrubbing, and the keys duplicate checks compare."""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from llama_sft.prep.minhash import MinHasher, normalize_fuzzy
from llama_sft.prep.normalize import clean_text
from llama_sft.prep.pii import _scrub_value, _strings, may_hold_pii
from llama_sft.prep.readers import _excerpt, _type_name

QUALITY_FIELDS = ("quality_score", "quality", "score")
DEFAULT_CATEGORY = "general"


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


def user_text(record: dict[str, Any]) -> str:
    """The user turn as the prompt formats render it (instruction, blank line, context)."""
    return f"{record['instruction']}\n\n{record['context']}" if record["context"] \
        else record["instruction"]


def exact_key(record: dict[str, Any]) -> bytes:
    """Dedup key: prompt and response with whitespace collapsed (shape-independent)."""
    text = " ".join(user_text(record).split()) + "\x1f" + " ".join(record["response"].split())
    return hashlib.sha1(text.encode("utf-8")).digest()


def fuzzy_source(record: dict[str, Any]) -> str:
    """The text that near-duplicate and contamination checks compare, before normalizing."""
    return user_text(record) + " " + record["response"]


def fuzzy_text(record: dict[str, Any]) -> str:
    """The record's text as near-duplicate checks compare it."""
    return normalize_fuzzy(fuzzy_source(record))


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
