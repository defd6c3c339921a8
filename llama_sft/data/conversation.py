"""Multi-turn conversations: every assistant turn supervised (or only the last), each with the
token that ends it; everything else masked.

A conversation record carries ``messages`` (system / user / assistant, ending on an assistant
turn). Its training example is the tokenization of the whole conversation as the prompt format
renders it (for a chat template: exactly ``apply_chat_template(messages)``). Turn i's supervised
tokens run from the end of its prompt (the conversation up to it, rendered with the generation
prompt, which is what generation is given) through its end-of-turn token, located by character
offsets and checked token by token: the prompt's tokens must be a prefix of the conversation's.
A turn whose check fails (a template that renders earlier turns differently once later ones
follow) is not supervised; when the last turn fails, the conversation is built the single-turn
way instead: its rendered history as the prompt, the last answer and its terminator after it.

Over ``max_length``, policy ``truncate`` removes whole exchanges from the start (the system turn
stays) until the rest fits; it never cuts inside a turn.
"""
from __future__ import annotations

from typing import Any, Sequence

from llama_sft.data.prompt_format import (INSTRUCTION_TEMPLATE, LLAMA2_SYSTEM_TEMPLATE,
                                          LLAMA2_TEMPLATE, PromptFormat)

TRAIN_ON = ("all", "last")


def exchanges(messages: Sequence[dict[str, str]]) -> tuple[list[dict], list[list[dict]]]:
    """(the system turns, the user/assistant exchanges) of a conversation."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest, out = list(messages[len(system):]), []
    for message in rest:
        if message["role"] == "user" or not out:
            out.append([message])
        else:
            out[-1].append(message)
    return system, out


def render_turns(tokenizer, fmt: PromptFormat, messages: Sequence[dict[str, str]]
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and, per assistant turn, (where its prompt ends, where its
    terminator ends) as character offsets into it."""
    if fmt.style == "chat_template":
        return _render_template(tokenizer, fmt, messages)
    return _render_plain(tokenizer, fmt, messages)


def history_prompt(tokenizer, fmt: PromptFormat, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for the conversation's last answer: everything before it."""
    if fmt.style == "chat_template":
        return fmt.apply_messages(tokenizer, list(messages[:-1]), add_generation_prompt=True)
    text, spans = _render_plain(tokenizer, fmt, messages)
    return text[:spans[-1][0]]


def _render_template(tokenizer, fmt: PromptFormat, messages):
    full = fmt.apply_messages(tokenizer, list(messages))
    term_text = tokenizer.convert_ids_to_tokens(fmt.terminator_id(tokenizer))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = fmt.apply_messages(tokenizer, list(messages[:i]), add_generation_prompt=True)
        turn = full if i == len(messages) - 1 else \
            fmt.apply_messages(tokenizer, list(messages[:i + 1]))
        at = turn.find(term_text, len(prompt))
        if not (turn.startswith(prompt) and full.startswith(turn[:at]) and at >= 0):
            spans.append(None)
            continue
        spans.append((len(prompt), at + len(term_text)))
    return full, spans


def _render_plain(tokenizer, fmt: PromptFormat, messages):
    """Instruction style: the instruction template per exchange, each answer followed by EOS;
    llama2 style: Meta's multi-turn format, ``[INST] user [/INST] answer </s><s>[INST] ...``."""
    system, turns = exchanges(messages)
    system_text = system[0]["content"] if system else fmt.system_prompt
    eos, bos = tokenizer.eos_token, tokenizer.bos_token or ""
    text, spans = "", []
    for n, (user, *answer) in enumerate(turns):
        if fmt.style == "llama2":
            template = LLAMA2_SYSTEM_TEMPLATE if n == 0 and system_text else LLAMA2_TEMPLATE
            text += (bos if n else "") + template.format(system=system_text, user=user["content"])
        else:
            text += INSTRUCTION_TEMPLATE.format(instruction=user["content"])
            if n == 0 and system_text:
                text = f"{system_text}\n\n" + text
        for message in answer:
            start = len(text)
            text += fmt.response_prefix + message["content"] + eos
            spans.append((start, len(text)))
            text += "" if fmt.style == "llama2" else "\n\n"
    return text, spans


def encode_conversation(tokenizer, fmt: PromptFormat, messages: Sequence[dict[str, str]],
                        train_on: str = "all") -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation: the chosen assistant turns and their terminators
    supervised, every other token masked (-100)."""
    return encode_conversations(tokenizer, fmt, [messages], train_on)[0]


def encode_conversations(tokenizer, fmt: PromptFormat,
                         conversations: Sequence[Sequence[dict[str, str]]], train_on: str = "all"
                         ) -> list[tuple[list[int], list[int]]]:
    """``encode_conversation`` of many conversations, with one tokenizer call for their texts and
    one for their turns' prompts."""
    from llama_sft.data.tokenize import _encode_many, _encode_many_with_ends

    special = fmt.adds_special_tokens
    rendered = [render_turns(tokenizer, fmt, messages) for messages in conversations]
    encoded = _encode_many_with_ends(tokenizer, [text for text, _ in rendered], special)
    chosen = [[(i, span) for i, span in enumerate(spans) if span is not None
               and (train_on == "all" or i == len(spans) - 1)] for _, spans in rendered]
    prompt_ids = iter(_encode_many(tokenizer, [text[:span[0]] for (text, _), picks in
                                               zip(rendered, chosen) for _, span in picks],
                                   special))
    terminator = fmt.terminator_id(tokenizer)
    out = []
    for messages, (_, spans), (ids, ends), picks in zip(conversations, rendered, encoded, chosen):
        labels = _turn_labels(ids, ends, [(i, span, next(prompt_ids)) for i, span in picks],
                              terminator, len(spans) - 1)
        out.append((ids, labels) if labels is not None else
                   _last_turn_only(tokenizer, fmt, messages))
    return out


def _turn_labels(ids: list[int], ends: list[int], turns, terminator: int, last: int
                 ) -> list[int] | None:
    """Labels supervising each of ``turns`` ((index, span, its prompt's ids)) that checks out:
    its prompt's ids a prefix of ``ids``, its span ending on ``terminator``. None when turn
    ``last`` (the final answer) is not among them."""
    from llama_sft.data.tokenize import IGNORE_INDEX

    labels = [IGNORE_INDEX] * len(ids)
    last_ok = False
    for i, span, prompt in turns:
        end = next((j for j, off in enumerate(ends) if off >= span[1]), len(ids) - 1) + 1
        if ids[:len(prompt)] != prompt or ids[end - 1] != terminator:
            continue
        labels[len(prompt):end] = ids[len(prompt):end]
        last_ok = last_ok or i == last
    return labels if last_ok else None


def _last_turn_only(tokenizer, fmt, messages):
    from llama_sft.data.tokenize import IGNORE_INDEX, _encode_many

    prompt_text = history_prompt(tokenizer, fmt, messages)
    prompt = _encode_many(tokenizer, [prompt_text], fmt.adds_special_tokens)[0]
    full = _encode_many(tokenizer, [prompt_text + fmt.response_prefix + messages[-1]["content"]],
                        fmt.adds_special_tokens)[0]
    answer = full[len(prompt):] if full[:len(prompt)] == prompt else \
        _encode_many(tokenizer, [fmt.response_prefix + messages[-1]["content"]], False)[0]
    answer = answer + [fmt.terminator_id(tokenizer)]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def fit_conversation(tokenizer, fmt: PromptFormat, messages: Sequence[dict[str, Any]],
                     max_length: int, policy: str = "truncate", train_on: str = "all"
                     ) -> tuple[list[int], list[int], int] | None:
    """``encode_conversation`` within ``max_length``: (ids, labels, exchanges removed), or None
    (policy ``drop``, or not even the last exchange fits, or nothing is supervised)."""
    return fit_conversations(tokenizer, fmt, [messages], max_length, policy, train_on)[0]


def fit_conversations(tokenizer, fmt: PromptFormat,
                      conversations: Sequence[Sequence[dict[str, Any]]], max_length: int,
                      policy: str = "truncate", train_on: str = "all"
                      ) -> list[tuple[list[int], list[int], int] | None]:
    """``fit_conversation`` of many: each round encodes, in one batch, the conversations still
    over ``max_length`` with one more exchange removed."""
    from llama_sft.data.tokenize import IGNORE_INDEX

    split = [exchanges(messages) for messages in conversations]
    out: list[tuple[list[int], list[int], int] | None] = [None] * len(conversations)
    pending, removed = list(range(len(conversations))), 0
    while pending:
        kept = [split[i][0] + [m for turn in split[i][1][removed:] for m in turn]
                for i in pending]
        over = []
        for i, (ids, labels) in zip(pending, encode_conversations(tokenizer, fmt, kept,
                                                                   train_on)):
            if len(ids) <= max_length:
                if any(label != IGNORE_INDEX for label in labels):
                    out[i] = (ids, labels, removed)
            elif policy == "truncate" and removed + 1 < len(split[i][1]):
                over.append(i)
        pending, removed = over, removed + 1
    return out
