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

from llama_sft.prep.items import excerpt, type_name
from llama_sft.prep.minhash import MinHasher
from llama_sft.prep.normalize import clean_text, normalize_fuzzy
from llama_sft.prep.pii import _scrub_value, _strings, may_hold_pii

QUALITY_FIELDS = ("quality_score", "quality", "score")
DEFAULT_CATEGORY = "general"
CONVERSATION_SHAPES = {"messages": "chat", "conversations": "sharegpt"}   # field -> shape
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
         "ai": "assistant"}   # OpenAI and ShareGPT role names (any case) -> the three we keep


class RecordError(Exception):
    """Why a record is rejected; ``cleaning`` and ``pii`` say what was cleaned before that."""

    def __init__(self, reason: str, detail: str, cleaning: set[str] | None = None,
                 pii: Counter | None = None):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.cleaning, self.pii = cleaning or set(), pii or Counter()


def detect_shape(value: dict[str, Any], field_map: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The record's shape and where its canonical fields are (``--field-map`` wins)."""
    for key, shape in CONVERSATION_SHAPES.items():
        if key in field_map:
            return shape, {key: field_map[key]}
    if "instruction" in field_map and "response" in field_map:
        context = field_map.get("context") or ("input" if "input" in value else "context")
        return "field_map", {"instruction": field_map["instruction"], "context": context,
                             "response": field_map["response"]}
    conversation = next((k for k in CONVERSATION_SHAPES if k in value), None)
    if conversation is not None:
        shape, mapping = CONVERSATION_SHAPES[conversation], {conversation: conversation}
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
                          f"instruction/response, instruction/output, prompt/completion, "
                          f"messages or conversations, or pass --field-map")
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
        raise RecordError("wrong_type", f"field {key!r} is {type_name(text)}, not a string")
    return text


def _turn(i: int, message: Any) -> tuple[str, str]:
    """Message ``i`` as (role, content), its role one of system/user/assistant; reads OpenAI
    (role/content) and ShareGPT (from/value) keys alike."""
    if not isinstance(message, dict):
        raise RecordError("bad_chat", f"message {i} is {type_name(message)}, not an object")
    role = message.get("role", message.get("from"))
    if not isinstance(role, str) or role.strip().lower() not in ROLES:
        found = "no role ('role' or 'from')" if role is None else f"unknown role {role!r}"
        raise RecordError("bad_chat", f"message {i} has {found}; expected one of "
                          f"{', '.join(ROLES)}")
    content = message["content"] if "content" in message else message.get("value")
    if not isinstance(content, str):
        raise RecordError("wrong_type", f"message {i} content is {type_name(content)}, "
                          f"not a string")
    return ROLES[role.strip().lower()], content


def _check_order(roles: list[str]) -> None:
    """RecordError unless ``roles`` are an optional system turn, then user and assistant turns
    alternating from a user turn to an assistant turn (details name the message's index)."""
    previous = None
    for i, role in enumerate(roles):
        if role == "system" and i:
            raise RecordError("bad_chat", f"message {i} is a system turn; only the first "
                              f"message may be one")
        if previous in (None, "system") and role == "assistant":
            raise RecordError("bad_chat", f"message {i} is an assistant turn; the conversation "
                              f"must start with a user turn (after an optional system turn)")
        if role == previous:
            raise RecordError("bad_chat", f"message {i} is a second {role} turn in a row; "
                              f"expected one user turn then one assistant turn, alternating")
        previous = role
    if "assistant" not in roles:
        raise RecordError("bad_chat", "the conversation has no assistant turn")
    if previous == "user":
        raise RecordError("bad_chat", f"message {len(roles) - 1} is a user turn; the "
                          f"conversation must end on an assistant turn")


def _conversation(value: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """The conversation in ``value[field]`` as validated (role, content) turns."""
    if field not in value:
        raise RecordError("missing_field", f"field {field!r} is missing")
    messages = value[field]
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"field {field!r} is {type_name(messages)}, "
                          f"not a list")
    turns = [_turn(i, message) for i, message in enumerate(messages)]
    _check_order([role for role, _ in turns])
    return turns


def _conversation_fields(turns: list[tuple[str, str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(text fields, metadata additions) of a validated conversation. One exchange gives the
    record a single-turn chat always gave (system prompt in metadata), so old inputs keep their
    outputs; more also keep every turn under ``messages``, system turn first. Either way the
    last exchange is the instruction and the response."""
    fields = {"instruction": turns[-2][1], "context": "", "response": turns[-1][1]}
    has_system = turns[0][0] == "system"
    if len(turns) - has_system > 2:
        fields["messages"] = [{"role": role, "content": content} for role, content in turns]
        return fields, {}
    return fields, ({"system_prompt": turns[0][1]} if has_system else {})


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
    conversation = next((k for k in CONVERSATION_SHAPES if k in mapping), None)
    if conversation is not None:
        fields, metadata_extra = _conversation_fields(_conversation(value, mapping[conversation]))
    else:
        fields = {"instruction": _text(value, mapping.get("instruction"), True),
                  "context": _text(value, mapping.get("context"), False),
                  "response": _text(value, mapping.get("response"), True)}
    id_key, cat_key = field_map.get("id", "id"), field_map.get("category", "category")
    rec_id = value.get(id_key)
    if isinstance(rec_id, bool) or not isinstance(rec_id, (str, int, type(None))):
        raise RecordError("wrong_type", f"field {id_key!r} is {type_name(rec_id)}, "
                          f"not a string or number")
    category = value.get(cat_key)
    if category is not None and not isinstance(category, str):
        raise RecordError("wrong_type", f"field {cat_key!r} is {type_name(category)}, "
                          f"not a string")
    consumed |= {id_key, cat_key}
    metadata = {k: v for k, v in value.items() if k not in consumed}
    metadata.update(metadata_extra)
    record = {"id": str(rec_id).strip() if rec_id is not None and str(rec_id).strip() else None,
              "split": None, "category": category, **fields, "metadata": metadata}
    return record, shape, _raw_quality(value, field_map)


def user_text(record: dict[str, Any]) -> str:
    """The prompt: the user turn as the prompt formats render it (instruction, blank line,
    context); for a multi-turn record every turn before the last answer, each after its role,
    so the keys below cover the whole conversation and swapping user and assistant text
    changes them."""
    if "messages" in record:
        return "\n\n".join(f"{turn['role']}: {turn['content']}"
                           for turn in record["messages"][:-1])
    return f"{record['instruction']}\n\n{record['context']}" if record["context"] \
        else record["instruction"]


def exact_key(record: dict[str, Any]) -> bytes:
    """Dedup key: prompt (``user_text``) and response with whitespace collapsed
    (shape-independent)."""
    text = " ".join(user_text(record).split()) + "\x1f" + " ".join(record["response"].split())
    return hashlib.sha1(text.encode("utf-8")).digest()


def fuzzy_source(record: dict[str, Any]) -> str:
    """The text that near-duplicate and contamination checks compare, before normalizing: the
    prompt (``user_text``, the whole conversation before the last answer) and the response."""
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
    """Clean the text fields (and every turn of a multi-turn record) and scrub PII in place;
    what changed and what was scrubbed. A record left without instruction or response, or with
    an empty user or assistant turn, raises RecordError (which still carries what was changed
    and scrubbed: the report counts the cleaning of every record)."""
    changed: set[str] = set()
    for key in ("instruction", "context", "response"):
        record[key], what = clean_text(record[key])
        changed |= what
    for turn in record.get("messages", ()):
        turn["content"], what = clean_text(turn["content"])
        changed |= what
    category = clean_text(record["category"] or "")[0]
    record["category"] = category or DEFAULT_CATEGORY
    found: Counter = Counter()
    fields = _scrubbed_fields(record)
    if pii_scrub and may_hold_pii(_strings([record[key] for key in fields])):
        for key in fields:
            record[key] = _scrub_value(record[key], found)
    if "messages" in record:
        record["instruction"] = record["messages"][-2]["content"]
        record["response"] = record["messages"][-1]["content"]
    _check_not_empty(record, changed, found)
    return changed, found


def _scrubbed_fields(record: dict[str, Any]) -> tuple[str, ...]:
    """The fields PII scrubbing reads: a multi-turn record's instruction and response are its
    last turns, scrubbed (and counted) once there."""
    if "messages" in record:
        return ("context", "messages", "metadata")
    return ("instruction", "context", "response", "metadata")


def _check_not_empty(record: dict[str, Any], changed: set[str], found: Counter) -> None:
    """RecordError for an empty user or assistant turn, instruction or response."""
    for i, turn in enumerate(record.get("messages", ())):
        if not turn["content"] and turn["role"] != "system":
            reason = "empty_response" if turn["role"] == "assistant" else "empty_instruction"
            raise RecordError(reason, f"message {i}: the {turn['role']} turn is empty after "
                              f"cleaning", changed, found)
    for key in ("instruction", "response"):
        if not record[key]:
            raise RecordError(f"empty_{key}", f"the {key} is empty after cleaning", changed,
                              found)


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
                        excerpt(json.dumps(value, ensure_ascii=False)))
