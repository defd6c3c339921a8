"""Multi-turn conversations in training: every assistant turn supervised with its end-of-turn
token and everything else masked, the tokens equal to the chat template's, whole exchanges removed
from the start when too long, the history as the prompt in evaluation."""
from __future__ import annotations

import pytest

from llama_sft.data.collate import pack_collate
from llama_sft.data.conversation import (TRAIN_ON, encode_conversation, encode_conversations,
                                         fit_conversation, fit_conversations, history_prompt)
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import IGNORE_INDEX, encode_batch, encode_example, measure_batch
from llama_sft.model.loading import load_tokenizer
from llama_sft.pilot.checks import _turns_supervised, data_checks

MESSAGES = [{"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": "Where is order 1234?"},
            {"role": "assistant", "content": "It shipped on Monday."},
            {"role": "user", "content": "When will it arrive?"},
            {"role": "assistant", "content": "On Thursday."},
            {"role": "user", "content": "Which city?"},
            {"role": "assistant", "content": "Lyon."}]
RECORD = {"id": "c1", "instruction": "Which city?", "context": "", "response": "Lyon.",
          "messages": MESSAGES}
ANSWERS = ["It shipped on Monday.", "On Thursday.", "Lyon."]
# drops earlier answers once a later turn follows (as reasoning templates drop earlier thinking)
HISTORY_DROPPING = (
    "{% for message in messages %}{% if message['role'] != 'assistant' or loop.last %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# family, style
CASES = [("smollm2", "chat_template"), ("llama3", "chat_template"), ("llama2", "llama2"),
         ("llama2", "instruction"), ("smollm2", "instruction")]


@pytest.fixture(scope="module")
def toks(family_dirs):
    return {family: load_tokenizer(str(family_dirs[family]))
            for family in ("smollm2", "llama2", "llama3")}


def runs(ids, labels):
    """The supervised runs of an example, as token lists."""
    out, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            out, run = out + [run], []
    return out + ([run] if run else [])


@pytest.mark.parametrize("family,style", CASES)
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_every_assistant_turn_supervised_with_its_terminator(toks, family, style, train_on):
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok, style=style)
    ids, labels = encode_conversation(tok, fmt, MESSAGES, train_on)
    got = runs(ids, labels)
    want = ANSWERS if train_on == "all" else ANSWERS[-1:]
    assert len(got) == len(want)
    for run, answer in zip(got, want):
        assert run[-1] == fmt.terminator_id(tok)                      # end-of-turn supervised
        assert tok.decode(run[:-1]).strip() == answer                  # and nothing but the turn
    assert ids.count(tok.bos_token_id) == (3 if style == "llama2" else 1) or \
        tok.bos_token_id is None or family == "smollm2"
    # the last turn's prompt is the history, exactly as generation gets it
    prompt = tok(history_prompt(tok, fmt, MESSAGES),
                 add_special_tokens=fmt.adds_special_tokens)["input_ids"]
    assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX
    assert labels[len(prompt)] != IGNORE_INDEX
    assert fmt.encode_record_prompt(tok, RECORD) == prompt


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
def test_training_tokens_equal_the_chat_template(toks, family):
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok)
    ids, _ = encode_conversation(tok, fmt, MESSAGES)
    assert ids == list(tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))


def test_a_template_that_edits_messages(toks):
    """A template that trims every message: the tokens are still the template's, and each
    assistant turn is supervised as the template rendered it."""
    tok = toks["smollm2"]
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                "{{ message['content'] | trim }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = PromptFormat(style="chat_template", chat_template=template)
    padded = [dict(m, content=f"  {m['content']}  ") for m in MESSAGES]
    ids, labels = encode_conversation(tok, fmt, padded)
    assert ids == list(tok.apply_chat_template(padded, chat_template=template, tokenize=True,
                                               return_dict=False))
    assert [tok.decode(r[:-1]) for r in runs(ids, labels)] == ANSWERS


def test_a_template_that_renders_history_differently_supervises_the_last_turn(toks):
    """A template that drops earlier answers once a later turn follows (as reasoning templates
    drop earlier thinking): earlier turns cannot be located, the last one is still trained."""
    tok = toks["smollm2"]
    fmt = PromptFormat(style="chat_template", chat_template=HISTORY_DROPPING)
    ids, labels = encode_conversation(tok, fmt, MESSAGES)
    assert [tok.decode(r[:-1]) for r in runs(ids, labels)] == ANSWERS[-1:]


def test_truncation_removes_whole_exchanges_from_the_start(toks):
    tok = toks["smollm2"]
    fmt = PromptFormat.for_tokenizer(tok)
    full, _ = encode_conversation(tok, fmt, MESSAGES)
    without_first, _ = encode_conversation(tok, fmt, MESSAGES[:1] + MESSAGES[3:])
    only_last, _ = encode_conversation(tok, fmt, MESSAGES[:1] + MESSAGES[5:])
    assert fit_conversation(tok, fmt, MESSAGES, len(full))[2] == 0
    ids, labels, removed = fit_conversation(tok, fmt, MESSAGES, len(full) - 1)
    assert removed == 1 and ids == without_first
    assert [tok.decode(r[:-1]) for r in runs(ids, labels)] == ANSWERS[1:]
    assert fit_conversation(tok, fmt, MESSAGES, len(only_last))[2] == 2
    assert fit_conversation(tok, fmt, MESSAGES, len(only_last) - 1) is None   # never mid-turn
    assert fit_conversation(tok, fmt, MESSAGES, len(full) - 1, policy="drop") is None
    enc = encode_example(tok, fmt, RECORD, len(full) - 1)
    assert enc.truncated and enc.input_ids == without_first
    assert measure_batch(tok, fmt, [RECORD], len(full) - 1) == [
        (len(without_first), enc.num_supervised, True)]


@pytest.mark.parametrize("template", [None, HISTORY_DROPPING])
def test_a_batch_of_conversations_encodes_each_as_alone(toks, template):
    """One batch of conversations of different lengths, some over the limit (truncated or
    dropped), some with turns that cannot be located: each comes out as it does on its own."""
    tok = toks["smollm2"]
    fmt = PromptFormat.for_tokenizer(tok) if template is None else \
        PromptFormat(style="chat_template", chat_template=template)
    batch = [MESSAGES, MESSAGES[:3], MESSAGES[:1] + MESSAGES[3:], MESSAGES[1:5], MESSAGES]
    limit = len(encode_conversation(tok, fmt, MESSAGES)[0]) - 1      # the long ones truncate
    for policy in ("truncate", "drop"):
        for train_on in TRAIN_ON:
            alone = [fit_conversation(tok, fmt, m, limit, policy, train_on) for m in batch]
            assert fit_conversations(tok, fmt, batch, limit, policy, train_on) == alone
            assert (alone[0] is None) == (policy == "drop") and alone[1] is not None
    assert encode_conversations(tok, fmt, batch) == [encode_conversation(tok, fmt, m)
                                                     for m in batch]


def test_conversations_and_single_turn_records_batch_and_pack_together(toks):
    tok = toks["llama3"]
    fmt = PromptFormat.for_tokenizer(tok)
    single = {"instruction": "Say hi", "context": "", "response": "hi"}
    encs = encode_batch(tok, fmt, [single, RECORD, single], 512)
    assert encs[0] == encs[2] == encode_example(tok, fmt, single, 512)
    assert encs[1] == encode_example(tok, fmt, RECORD, 512)
    packed = pack_collate(encs)
    assert packed["labels"][0].tolist().count(fmt.terminator_id(tok)) == 2 + len(ANSWERS)


@pytest.mark.parametrize("family,style", CASES)
def test_pilot_checks_hold_per_turn(toks, family, style):
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok, style=style)
    checks = {c.name: c for c in data_checks(tok, fmt, [RECORD] * 3, 512, (0.0, 1.0))}
    assert all(c.passed for c in checks.values()), checks
    enc = encode_example(tok, fmt, RECORD, 512)
    terminator = fmt.terminator_id(tok)
    assert _turns_supervised(tok, terminator, MESSAGES, enc)
    first = enc.labels.index(next(t for t in enc.labels if t != IGNORE_INDEX))
    masked = enc.labels[:first] + [IGNORE_INDEX] * 3 + enc.labels[first + 3:]
    assert not _turns_supervised(tok, terminator, MESSAGES, type(enc)(enc.input_ids, masked))
    prompt_too = [t if t == IGNORE_INDEX else t for t in enc.labels]
    prompt_too[first - 1] = enc.input_ids[first - 1]                   # a prompt token leaks in
    assert not _turns_supervised(tok, terminator, MESSAGES, type(enc)(enc.input_ids, prompt_too))
