"""SFT records: reading, prompt formatting, tokenization with masked prompts, collators.

The record schema (one JSON object per line in ``sft_dataset.jsonl`` and ``golden_set.jsonl``)::

    {"id": str, "split": "train"|"val"|"test"|"golden", "category": str,
     "instruction": str, "context": str, "response": str, "metadata": {...}}

Labels: prompt tokens are ``IGNORE_INDEX`` (-100); the response tokens and the final EOS are
supervised. Masking never looks at the pad token id, so a tokenizer whose pad equals its EOS
cannot silently drop EOS from the loss.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from llama_io import DataError, UsageError

IGNORE_INDEX = -100
PROMPT_FORMAT_FILE = "prompt_format.json"
SPLITS = ("train", "val", "test", "golden")
REQUIRED_FIELDS = ("instruction", "response")

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_CONTEXT_TEMPLATE = ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
                                "### Response:\n")
LLAMA2_TEMPLATE = "[INST] {user} [/INST] "
LLAMA2_SYSTEM_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] "


# ---------------------------------------------------------------------------------------------
# Reading

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


# ---------------------------------------------------------------------------------------------
# Prompt format

_SENTINEL = "\ue000"                     # a private-use character no template mentions
_TEMPLATE_PROBES = ("x", "  padded both ends \n", "line one\n\nline two\n\n",
                    "{{ braces }} {% tag %} [INST] <|im_end|> </s> <s>", "naïve — 日本語 ✓")

@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is built from instruction + context; saved as ``prompt_format.json``."""

    style: str                          # chat_template | instruction | llama2
    chat_template: str | None = None    # the Jinja template, for style chat_template
    system_prompt: str | None = None    # optional system message

    def __post_init__(self):
        if self.style not in ("chat_template", "instruction", "llama2"):
            raise UsageError(f"unknown prompt style {self.style!r}")
        if self.style == "chat_template" and not self.chat_template:
            raise UsageError("prompt style chat_template needs a chat template")

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer should add BOS itself (the chat template writes its own)."""
        return self.style != "chat_template"

    @classmethod
    def for_tokenizer(cls, tokenizer, style: str = "auto", system_prompt: str | None = None):
        """The chat template when the tokenizer has one, else the instruction template."""
        template = getattr(tokenizer, "chat_template", None)
        if style == "auto":
            style = "chat_template" if template else "instruction"
        return cls(style=style, chat_template=template if style == "chat_template" else None,
                   system_prompt=system_prompt)

    def user_message(self, instruction: str, context: str = "") -> str:
        return f"{instruction}\n\n{context}" if context else instruction

    def render(self, tokenizer, instruction: str, context: str = "") -> str:
        """The prompt text up to where the response starts."""
        if self.style == "instruction":
            template = INSTRUCTION_CONTEXT_TEMPLATE if context else INSTRUCTION_TEMPLATE
            return template.format(instruction=instruction, context=context)
        user = self.user_message(instruction, context)
        if self.style == "llama2":
            if self.system_prompt:
                return LLAMA2_SYSTEM_TEMPLATE.format(system=self.system_prompt, user=user)
            return LLAMA2_TEMPLATE.format(user=user)
        split = self._template_split(tokenizer)
        return split[0] + user + split[1] if split else self._apply_template(tokenizer, user)

    def _apply_template(self, tokenizer, user: str) -> str:
        messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                             tokenize=False, add_generation_prompt=True)

    def _template_split(self, tokenizer) -> tuple[str, str] | None:
        """(text before, text after) the user message, when the chat template inserts the message
        verbatim; None when it edits or inspects it (then every prompt is rendered in full).

        Rendering the Jinja template costs ~60 us a record, a third of prep's tokenize phase; the
        split is checked on probe messages (whitespace at the ends, blank lines, template syntax,
        special-token text, non-ASCII) before it is trusted.
        """
        cached = self.__dict__.get("_split")
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        rendered = self._apply_template(tokenizer, _SENTINEL)
        split = None
        if rendered.count(_SENTINEL) == 1:
            before, after = rendered.split(_SENTINEL)
            if all(self._apply_template(tokenizer, probe) == before + probe + after
                   for probe in _TEMPLATE_PROBES):
                split = (before, after)
        self.__dict__["_split"] = (tokenizer, split)      # a cache, not a field: not saved
        return split

    def encode_prompt(self, tokenizer, instruction: str, context: str = "") -> list[int]:
        text = self.render(tokenizer, instruction, context)
        return list(tokenizer(text, add_special_tokens=self.adds_special_tokens)["input_ids"])

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PROMPT_FORMAT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PromptFormat":
        path = Path(directory) / PROMPT_FORMAT_FILE
        if not path.exists():
            raise UsageError(f"{directory} has no {PROMPT_FORMAT_FILE}; it is not a directory "
                             f"written by llama_train.py")
        data = json.loads(path.read_text(encoding="utf-8"))
        unknown = set(data) - {"style", "chat_template", "system_prompt"}
        if unknown:
            raise DataError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Tokenization

@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(tokenizer, fmt: PromptFormat, record: dict[str, Any], max_length: int,
                   policy: str = "truncate") -> Encoded | None:
    """Tokenize one record: prompt masked, response + EOS supervised.

    Over ``max_length``: policy ``drop`` returns None; ``truncate`` cuts the end of the response
    (EOS then is not supervised, and ``truncated`` is set) but never the whole response: when
    fewer than 8 response tokens would remain, the example is dropped (None).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; cannot supervise the end of answers")
    prompt = fmt.encode_prompt(tokenizer, record["instruction"], record.get("context") or "")
    response = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
    return assemble_example(prompt, response, eos, max_length, policy)


def assemble_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int,
                     max_length: int, policy: str = "truncate") -> Encoded | None:
    """Join tokenized prompt and response (EOS appended) under ``encode_example``'s rules."""
    prompt = list(prompt_ids)
    response = list(response_ids) + [eos_id]
    truncated = False
    if len(prompt) + len(response) > max_length:
        if policy == "drop":
            return None
        keep = max_length - len(prompt)
        if keep < min(8, len(response)):
            return None
        response, truncated = response[:keep], True
    if not response:
        return None
    return Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response, truncated)


def encode_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]], max_length: int,
                 policy: str = "truncate") -> list[Encoded | None]:
    """``encode_example`` for many records at once, one fast-tokenizer batch call per side.

    Returns one entry per record (None where ``encode_example`` would return None); the token
    ids are identical to ``encode_example``'s.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; cannot supervise the end of answers")
    prompt_ids, response_ids = tokenize_batch(tokenizer, fmt, records)
    return [assemble_example(p, r, eos, max_length, policy)
            for p, r in zip(prompt_ids, response_ids)]


def tokenize_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]]
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and response ids (no EOS) of many records, one batch call per side."""
    return _encode_sides(tokenizer, fmt, records, None)


def count_tokens_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]]
                       ) -> tuple[list[int], list[int]]:
    """The lengths of ``tokenize_batch``'s prompt and response ids, without building the id
    lists where the Rust backend is called."""
    return _encode_sides(tokenizer, fmt, records, len)


def _encode_sides(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]], take):
    if not records:
        return [], []
    prompts = [fmt.render(tokenizer, r["instruction"], r.get("context") or "") for r in records]
    return (_encode_many(tokenizer, prompts, fmt.adds_special_tokens, take),
            _encode_many(tokenizer, [r["response"] for r in records], False, take))


def _encode_many(tokenizer, texts: list[str], add_special_tokens: bool, take=None) -> list:
    """Token ids of many texts (``take`` of them, e.g. ``len``, when given); a fast tokenizer's
    Rust backend is called directly (the transformers wrapper took 4x as long as the backend
    call on the same texts) unless the backend would pad or truncate (settings a tokenizer.json
    can carry and the wrapper switches off). ``encode_batch_fast`` skips the character offsets,
    which ids do not need (it took 0.8x the time of ``encode_batch`` on 100k prep records)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode(texts, add_special_tokens=add_special_tokens)
        return [take(e) for e in encodings] if take else [e.ids for e in encodings]
    ids = tokenizer(texts, add_special_tokens=add_special_tokens,
                    return_attention_mask=False)["input_ids"]
    return [take(x) for x in ids] if take else [list(x) for x in ids]


def example_lengths(prompt_len: int, response_len: int, max_length: int,
                    policy: str = "truncate") -> tuple[int, int, bool] | None:
    """(tokens, supervised tokens, truncated) of ``assemble_example`` on a prompt and a response
    of these lengths, or None where it returns None; for callers that need no ids."""
    response = response_len + 1                      # EOS
    truncated = False
    if prompt_len + response > max_length:
        if policy == "drop":
            return None
        keep = max_length - prompt_len
        if keep < min(8, response):
            return None
        response, truncated = keep, True
    return prompt_len + response, response, truncated


def encode_records(tokenizer, fmt: PromptFormat, records: Iterable[dict[str, Any]],
                   max_length: int, policy: str = "truncate") -> tuple[list[Encoded], int]:
    """Encode many records; returns the kept examples and how many were dropped.

    Dropped: empty (whitespace-only) responses, examples over ``max_length`` that ``policy``
    drops, and any example left with zero supervised tokens.
    """
    kept, dropped = [], 0
    for record in records:
        if not record["response"].strip():
            dropped += 1              # an empty answer would only teach the model to stop
            continue
        enc = encode_example(tokenizer, fmt, record, max_length, policy)
        if enc is None or enc.num_supervised == 0:
            dropped += 1
        else:
            kept.append(enc)
    return kept, dropped


def token_stats(examples: Sequence[Encoded]) -> dict[str, Any]:
    """Lengths and the supervised-token ratio of encoded examples."""
    if not examples:
        return {"examples": 0, "tokens": 0, "supervised_tokens": 0, "supervised_ratio": 0.0}
    lengths = sorted(len(e) for e in examples)
    supervised = sum(e.num_supervised for e in examples)
    tokens = sum(lengths)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"examples": len(examples), "tokens": tokens, "supervised_tokens": supervised,
            "supervised_ratio": supervised / tokens, "min_length": lengths[0],
            "mean_length": tokens / len(lengths), "p50_length": pct(0.5),
            "p95_length": pct(0.95), "max_length": lengths[-1],
            "truncated": sum(e.truncated for e in examples)}


# ---------------------------------------------------------------------------------------------
# Collators

def pad_collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example; padding has attention 0 and label -100."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_collate(batch: Sequence[Encoded]) -> dict[str, Any]:
    """Padding-free packing: one row, position_ids restart at 0 for every example.

    The model sees no attention mask; transformers derives the block-diagonal mask from the
    position_ids, so no example attends to another (forward with ``use_cache=False``). Each
    example starts with a masked prompt token, so no label crosses a boundary. The example
    boundaries also go along as ``cu_seq_lens_q/k`` (transformers' varlen names), which
    ``llama_model.packed_attention`` uses to attend per example directly; other attention
    implementations ignore them.
    """
    import itertools

    import torch

    ids = [t for e in batch for t in e.input_ids]
    labels = [t for e in batch for t in e.labels]
    positions = [p for e in batch for p in range(len(e))]
    bounds = torch.tensor([0, *itertools.accumulate(len(e) for e in batch)], dtype=torch.int32)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds}


def collate(batch: Sequence[Encoded], pad_id: int, packing: bool) -> dict[str, Any]:
    return pack_collate(batch) if packing else pad_collate(batch, pad_id)
