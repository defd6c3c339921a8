"""Tokenization: prompt masked, response and its end-of-turn token supervised.

Labels: prompt tokens are ``IGNORE_INDEX`` (-100); the response tokens and the terminator that
follows them (``PromptFormat.terminator_id``: the chat template's end-of-turn token, else EOS) are
supervised. Masking never looks at the pad token id, so a tokenizer whose pad equals its EOS
cannot silently drop EOS from the loss.

The response is tokenized where it stands, after the prompt: a SentencePiece tokenizer (Llama 2)
gives a text tokenized on its own a leading "▁" that it does not have after a newline, so a
response tokenized alone would teach a token that generation never produces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from llama_sft.data.conversation import fit_conversations
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.errors import UsageError

IGNORE_INDEX = -100


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
                   policy: str = "truncate", train_on: str = "all") -> Encoded | None:
    """Tokenize one record: prompt masked, response + terminator supervised.

    Over ``max_length``: policy ``drop`` returns None; ``truncate`` cuts the end of the response
    (the terminator then is not supervised, and ``truncated`` is set) but never the whole
    response: when fewer than 8 response tokens would remain, the example is dropped (None).
    A conversation (a record with ``messages``) goes through ``data.conversation``: every
    assistant turn supervised (``train_on`` all) or the last, and truncation removes whole
    exchanges from the start.
    """
    return encode_batch(tokenizer, fmt, [record], max_length, policy, train_on)[0]


def assemble_example(prompt_ids: Sequence[int], response_ids: Sequence[int], terminator_id: int,
                     max_length: int, policy: str = "truncate") -> Encoded | None:
    """Join tokenized prompt and response (terminator appended) under ``encode_example``'s
    rules."""
    prompt = list(prompt_ids)
    response = list(response_ids) + [terminator_id]
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
                 policy: str = "truncate", train_on: str = "all") -> list[Encoded | None]:
    """``encode_example`` for many records, one fast-tokenizer batch call per side.

    Returns one entry per record (None where ``encode_example`` would return None).
    """
    terminator = _terminator(tokenizer, fmt)
    single = [i for i, r in enumerate(records) if not r.get("messages")]
    prompt_ids, response_ids = tokenize_batch(tokenizer, fmt, [records[i] for i in single])
    out: list[Encoded | None] = [None] * len(records)
    for i, p, r in zip(single, prompt_ids, response_ids):
        out[i] = assemble_example(p, r, terminator, max_length, policy)
    chats = [i for i, r in enumerate(records) if r.get("messages")]
    fitted = fit_conversations(tokenizer, fmt, [records[i]["messages"] for i in chats],
                               max_length, policy, train_on)
    for i, fit in zip(chats, fitted):
        out[i] = None if fit is None else Encoded(fit[0], fit[1], fit[2] > 0)
    return out


def measure_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]],
                  max_length: int, policy: str = "truncate"
                  ) -> list[tuple[int, int, bool] | str]:
    """Per record (tokens, supervised tokens, truncated) as ``encode_batch`` would encode it,
    or why it does not fit; for callers that need no ids (the prep stage)."""
    single = [i for i, r in enumerate(records) if not r.get("messages")]
    prompts, responses = count_tokens_batch(tokenizer, fmt, [records[i] for i in single])
    out: list[tuple[int, int, bool] | str] = [""] * len(records)
    why = "; fewer than 8 response tokens would remain" if policy == "truncate" else ""
    for i, n_prompt, n_response in zip(single, prompts, responses):
        out[i] = example_lengths(n_prompt, n_response, max_length, policy) or (
            f"{n_prompt + n_response + 1} tokens (prompt {n_prompt}) > --max-length "
            f"{max_length} (policy {policy}{why})")
    chats = [i for i, r in enumerate(records) if r.get("messages")]
    fitted = fit_conversations(tokenizer, fmt, [records[i]["messages"] for i in chats],
                               max_length, policy)
    for i, fit in zip(chats, fitted):
        out[i] = (len(fit[0]), sum(t != IGNORE_INDEX for t in fit[1]), fit[2] > 0) if fit else \
            (f"conversation over --max-length {max_length} (policy {policy}; truncation keeps "
             f"whole exchanges and the last one)")
    return out


def _terminator(tokenizer, fmt: PromptFormat) -> int:
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token; cannot supervise the end of answers")
    return fmt.terminator_id(tokenizer)


def tokenize_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]]
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and response ids (no terminator) of many records, one batch call per side.

    The response ids are those of the full text (prompt, ``fmt.response_prefix``, response)
    after the prompt's ids. Where the prompt's ids are not a prefix of the full text's (a merge
    across the boundary, which the built-in prompt styles never produce), the response is
    tokenized on its own.
    """
    if not records:
        return [], []
    prompts = [fmt.render(tokenizer, r["instruction"], r.get("context") or "") for r in records]
    fulls = [p + fmt.response_prefix + r["response"] for p, r in zip(prompts, records)]
    prompt_ids = _encode_many(tokenizer, prompts, fmt.adds_special_tokens)
    full_ids = _encode_many(tokenizer, fulls, fmt.adds_special_tokens)
    responses = []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        if f[:len(p)] == p:
            responses.append(f[len(p):])
        else:
            text = fmt.response_prefix + records[i]["response"]
            responses.append(_encode_many(tokenizer, [text], False)[0])
    return prompt_ids, responses


def count_tokens_batch(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]]
                       ) -> tuple[list[int], list[int]]:
    """The lengths of ``tokenize_batch``'s prompt and response ids."""
    prompts, responses = tokenize_batch(tokenizer, fmt, records)
    return [len(p) for p in prompts], [len(r) for r in responses]


def _plain_backend(tokenizer):
    """A fast tokenizer's Rust backend when calling it directly gives what the transformers
    wrapper would (it neither pads nor truncates), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        return backend
    return None


def _encode_many(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts; a fast tokenizer's Rust backend is called directly (the
    transformers wrapper costs several times the backend call) unless the backend would pad or
    truncate (settings a tokenizer.json can carry and the wrapper switches off).
    ``encode_batch_fast`` skips the character offsets, which ids do not need."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
    ids = tokenizer(texts, add_special_tokens=add_special_tokens,
                    return_attention_mask=False)["input_ids"]
    return [list(x) for x in ids]


def _encode_many_with_ends(tokenizer, texts: list[str], add_special_tokens: bool
                           ) -> list[tuple[list[int], list[int]]]:
    """(ids, each token's end offset in its text) of many texts, as ``_encode_many`` calls the
    tokenizer (with the offsets it skips there)."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [(e.ids, [end for _, end in e.offsets])
                for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens,
                        return_attention_mask=False, return_offsets_mapping=True)
    return [(list(ids), [end for _, end in offsets])
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])]


def example_lengths(prompt_len: int, response_len: int, max_length: int,
                    policy: str = "truncate") -> tuple[int, int, bool] | None:
    """(tokens, supervised tokens, truncated) of ``assemble_example`` on a prompt and a response
    of these lengths, or None where it returns None; for callers that need no ids."""
    response = response_len + 1                      # the terminator
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
                   max_length: int, policy: str = "truncate", train_on: str = "all"
                   ) -> tuple[list[Encoded], int]:
    """Encode many records; returns the kept examples and how many were dropped.

    Dropped: empty (whitespace-only) responses, examples over ``max_length`` that ``policy``
    drops, and any example left with zero supervised tokens.
    """
    kept, dropped = [], 0
    for record in records:
        if not record["response"].strip():
            dropped += 1              # an empty answer would only teach the model to stop
            continue
        enc = encode_example(tokenizer, fmt, record, max_length, policy, train_on)
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
