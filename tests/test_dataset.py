"""llama_dataset: masking and EOS, truncation, batch encoding, collators, packing, reading."""
from __future__ import annotations

import copy
import itertools
import json
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_records, write_jsonl
from llama_sft.data.collate import pack_collate, pad_collate
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.records import read_sft_jsonl
from llama_sft.data.tokenize import (IGNORE_INDEX, Encoded, assemble_example, count_tokens_batch,
                                     encode_batch, encode_example, encode_records, example_lengths,
                                     token_stats)
from llama_sft.errors import DataError, UsageError

PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text as users write it: any assigned printable character, spaces, tabs and newlines.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"),
                             whitelist_characters="\n\t"),
               min_size=0, max_size=60)
NONEMPTY = TEXT.filter(lambda s: s.strip() != "")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from llama_sft.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def formats(tok):
    return {style: PromptFormat.for_tokenizer(tok, style=style)
            for style in ("chat_template", "instruction", "llama2")}


def in_context(tok, fmt, record) -> tuple[list[int], list[int]]:
    """Prompt ids, and the response's ids as the full text (prompt, prefix, response) has them."""
    text = fmt.render(tok, record["instruction"], record.get("context") or "")
    prompt = fmt.encode_prompt(tok, record["instruction"], record.get("context") or "")
    full = tok(text + fmt.response_prefix + record["response"],
               add_special_tokens=fmt.adds_special_tokens)["input_ids"]
    assert full[:len(prompt)] == prompt
    return prompt, full[len(prompt):]


def check_masking(tok, fmt, record, enc):
    """The invariants every encoded example satisfies."""
    prompt, response = in_context(tok, fmt, record)
    n = len(prompt)
    assert enc.input_ids[:n] == prompt
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]
    assert len(enc.labels) == len(enc.input_ids)
    return prompt, response


# ---------------------------------------------------------------------------------------------
# masking and EOS

def test_prompt_is_masked_and_response_plus_eos_supervised(tok, formats):
    record = {"instruction": "Classify the sentiment.", "context": "Great lamp!",
              "response": "positive"}
    for fmt in formats.values():
        enc = encode_example(tok, fmt, record, 512)
        prompt, response = check_masking(tok, fmt, record, enc)
        assert enc.input_ids == prompt + response + [tok.eos_token_id]
        assert enc.labels[-1] == tok.eos_token_id
        assert enc.num_supervised == len(response) + 1 and not enc.truncated
    chat = formats["chat_template"].render(tok, record["instruction"], record["context"])
    assert chat.endswith("<|im_start|>assistant\n") and "Classify the sentiment.\n\nGreat lamp!" in chat
    assert formats["instruction"].render(tok, "Do it", "").startswith("### Instruction:\nDo it")


@given(instruction=NONEMPTY, context=TEXT)
@PROPERTY
def test_chat_prompt_fast_path_renders_what_the_template_renders(tok, formats, instruction,
                                                                 context):
    fmt = formats["chat_template"]
    assert fmt._template_split(tok) is not None           # SmolLM2's template: verbatim
    user = fmt.user_message(instruction, context)
    assert fmt.render(tok, instruction, context) == fmt._apply_template(tok, user)


@pytest.mark.parametrize("content", ["message['content'] | trim",
                                     "message['content'] if 'x' not in message['content'] "
                                     "else message['content'] | upper"])
def test_chat_template_that_edits_the_message_is_rendered_in_full(tok, content):
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                "{{ " + content + " }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    fmt = PromptFormat(style="chat_template", chat_template=template)
    assert fmt._template_split(tok) is None
    for text in (" padded ", "a box"):
        assert fmt.render(tok, text) == tok.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=template, tokenize=False,
            add_generation_prompt=True)


def test_batch_encoding_matches_the_tokenizer_call(tok, formats):
    from llama_sft.data.tokenize import tokenize_batch

    records = make_records(12)
    for fmt in formats.values():
        prompts, responses = tokenize_batch(tok, fmt, records)
        for record, p_ids, r_ids in zip(records, prompts, responses):
            assert (p_ids, r_ids) == in_context(tok, fmt, record)
        assert count_tokens_batch(tok, fmt, records) == ([len(p) for p in prompts],
                                                         [len(r) for r in responses])
    truncating = copy.deepcopy(tok)          # a tokenizer.json may ship with truncation on
    truncating.backend_tokenizer.enable_truncation(max_length=4)
    prompts, responses = tokenize_batch(truncating, formats["instruction"], records)
    assert responses == tokenize_batch(tok, formats["instruction"], records)[1]
    assert max(map(len, prompts)) > 4
    assert count_tokens_batch(truncating, formats["instruction"], records)[0] == \
        [len(p) for p in prompts]


def test_eos_survives_when_pad_equals_eos(tok, formats):
    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    assert same.pad_token_id == same.eos_token_id
    fmt = formats["chat_template"]
    recs = [{"instruction": "Say hi", "response": "hi"},
            {"instruction": "Say a longer greeting please", "response": "good morning to you"}]
    encs = [encode_example(same, fmt, r, 512) for r in recs]
    assert all(e.labels[-1] == same.eos_token_id for e in encs)
    batch = pad_collate(encs, pad_id=same.pad_token_id)
    short = len(encs[0])
    labels = batch["labels"][0].tolist()
    assert labels[short - 1] == same.eos_token_id                  # EOS supervised ...
    assert labels[short:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - short)  # ... pads not
    assert batch["input_ids"][0, short:].eq(same.eos_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (len(labels) - short)
    packed = pack_collate(encs)
    assert packed["labels"][0].tolist().count(same.eos_token_id) == 2


def test_a_tokenizer_without_eos_is_a_usage_error(formats):
    no_eos = SimpleNamespace(eos_token_id=None)
    with pytest.raises(UsageError, match="no EOS token"):
        encode_example(no_eos, formats["instruction"], {"instruction": "a", "response": "b"}, 64)
    with pytest.raises(UsageError, match="no EOS token"):
        encode_batch(no_eos, formats["instruction"], [{"instruction": "a", "response": "b"}], 64)


@PROPERTY
@given(instruction=NONEMPTY, context=TEXT, response=NONEMPTY,
       style=st.sampled_from(["chat_template", "instruction", "llama2"]))
def test_masking_property(tok, formats, instruction, context, response, style):
    fmt = formats[style]
    record = {"instruction": instruction, "context": context, "response": response}
    enc = encode_example(tok, fmt, record, 4096)
    prompt, response_ids = check_masking(tok, fmt, record, enc)
    assert enc.input_ids[len(prompt):] == response_ids + [tok.eos_token_id]
    assert enc.num_supervised == len(response_ids) + 1
    assert tok.decode(response_ids, clean_up_tokenization_spaces=False) == \
        fmt.response_prefix + response
    assert encode_batch(tok, fmt, [record], 4096) == [enc]


@PROPERTY
@given(instruction=NONEMPTY, response=NONEMPTY, max_length=st.integers(16, 90),
       policy=st.sampled_from(["truncate", "drop"]))
def test_length_policies_property(tok, formats, instruction, response, max_length, policy):
    fmt = formats["instruction"]
    record = {"instruction": instruction, "context": "", "response": response}
    prompt, response_ids = in_context(tok, fmt, record)
    full = len(prompt) + len(response_ids) + 1
    enc = encode_example(tok, fmt, record, max_length, policy)
    assert encode_batch(tok, fmt, [record], max_length, policy) == [enc]
    if full <= max_length:
        assert enc is not None and len(enc) == full and not enc.truncated
        return
    if policy == "drop" or max_length - len(prompt) < min(8, full - len(prompt)):
        assert enc is None
        return
    assert enc.truncated and len(enc) == max_length
    assert enc.num_supervised == max_length - len(prompt) >= 8      # never the whole response
    assert enc.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_assemble_example_rules():
    assert assemble_example([1, 2], [3, 4], 9, 10) == Encoded([1, 2, 3, 4, 9],
                                                             [-100, -100, 3, 4, 9])
    cut = assemble_example([1] * 4, list(range(20)), 9, 14, "truncate")
    assert cut.truncated and cut.input_ids == [1] * 4 + list(range(10)) and cut.num_supervised == 10
    assert assemble_example([1] * 10, list(range(20)), 9, 14, "truncate") is None  # 4 < 8 left
    assert assemble_example([1] * 4, list(range(20)), 9, 14, "drop") is None


def test_example_lengths_agree_with_assemble_example():
    for n_prompt, n_response, max_length, policy in itertools.product(
            range(16), range(16), range(1, 24), ("drop", "truncate")):
        enc = assemble_example([1] * n_prompt, [2] * n_response, 9, max_length, policy)
        expected = None if enc is None else (len(enc), enc.num_supervised, enc.truncated)
        assert example_lengths(n_prompt, n_response, max_length, policy) == expected


def test_encode_records_counts_drops_and_token_stats(tok, formats):
    fmt = formats["instruction"]
    recs = make_records(6) + [{"instruction": "x", "response": "word " * 200}]
    kept, dropped = encode_records(tok, fmt, recs, 64, "drop")
    assert (len(kept), dropped) == (6, 1)
    stats = token_stats(kept)
    lengths = sorted(len(e) for e in kept)
    assert stats["examples"] == 6 and stats["tokens"] == sum(lengths)
    assert stats["min_length"] == lengths[0] and stats["max_length"] == lengths[-1]
    assert stats["supervised_tokens"] == sum(e.num_supervised for e in kept)
    assert 0 < stats["supervised_ratio"] < 1 and stats["truncated"] == 0
    assert token_stats([]) == {"examples": 0, "tokens": 0, "supervised_tokens": 0,
                               "supervised_ratio": 0.0}


# ---------------------------------------------------------------------------------------------
# collators and packing

def test_pad_and_pack_collate_layout():
    a, b = Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8, 9], [-100, 9])
    pad = pad_collate([a, b], pad_id=0)
    assert pad["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert pad["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert pad["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    pack = pack_collate([a, b])
    assert pack["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert pack["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert pack["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in pack


def test_packed_logits_equal_unpacked(tiny_model_dir, tok, formats):
    import torch

    from llama_sft.model.loading import load_base_model

    model = load_base_model(str(tiny_model_dir), dtype="float32").eval()
    fmt = formats["chat_template"]
    encs = [encode_example(tok, fmt, r, 512) for r in make_records(4)]
    assert len({len(e) for e in encs}) > 1                        # different lengths
    batch = pack_collate(encs)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        start = 0
        for enc in encs:
            alone = model(input_ids=torch.tensor([enc.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(enc)], alone, atol=1e-5, rtol=0)
            start += len(enc)
    assert start == packed.shape[0]


# ---------------------------------------------------------------------------------------------
# reading prep output and the prompt format file

def test_read_sft_jsonl_and_split_filter(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_records(4, "train") + make_records(2, "val", 4))
    assert len(read_sft_jsonl(path)) == 6
    assert [r["id"] for r in read_sft_jsonl(path, split="val")] == ["ex-00004", "ex-00005"]


@pytest.mark.parametrize("line,message", [
    (b'{"instruction": "a", "response": ', "d.jsonl:2: not valid JSON"),
    (b'[1, 2]', "d.jsonl:2: expected a JSON object, got list"),
    (b'{"instruction": "a"}', "d.jsonl:2: field 'response' missing or not a string"),
    (b'{"instruction": "a", "response": 3}', "d.jsonl:2: field 'response' missing or not"),
    (b'{"instruction": "caf\xe9", "response": "b"}', "not UTF-8 at byte"),
])
def test_read_sft_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(make_records(1)[0]).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=message):
        read_sft_jsonl(path)


def test_read_sft_jsonl_missing_file(tmp_path):
    with pytest.raises(UsageError, match="dataset file not found"):
        read_sft_jsonl(tmp_path / "none.jsonl")


def test_prompt_format_roundtrip_and_validation(tmp_path, formats):
    fmt = formats["chat_template"]
    fmt.save(tmp_path)
    assert PromptFormat.load(tmp_path) == fmt
    (tmp_path / "prompt_format.json").write_text(json.dumps({"style": "instruction", "x": 1}))
    with pytest.raises(DataError, match="unknown keys"):
        PromptFormat.load(tmp_path)
    with pytest.raises(UsageError, match="has no prompt_format.json"):
        PromptFormat.load(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="unknown prompt style"):
        PromptFormat(style="alpaca")
    with pytest.raises(UsageError, match="needs a chat template"):
        PromptFormat(style="chat_template")


def test_dataset_script_counts_splits_and_marks_supervised_tokens(tiny_model_dir, tmp_path,
                                                                  capsys):
    """llama_dataset.py: per-split counts from the same tokenization training uses, and --show
    prints the supervised part (the response and its EOS) between >>> and <<<."""
    import llama_dataset
    from llama_sft.model.loading import load_tokenizer

    records = make_records(6) + make_records(2, "val", 50)
    data = write_jsonl(tmp_path / "sft_dataset.jsonl", records)
    assert llama_dataset.main([str(data), "--tokenizer", str(tiny_model_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(str(tiny_model_dir))
    fmt = PromptFormat.for_tokenizer(tok)
    expected = token_stats(encode_records(tok, fmt, records[:6], 512)[0])
    assert stats["splits"]["train"] == {**expected, "dropped": 0, "without_eos_label": 0}
    assert stats["splits"]["val"]["examples"] == 2

    assert llama_dataset.main([str(data), "--tokenizer", str(tiny_model_dir), "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert f">>>{records[0]['response']}{tok.eos_token}<<<" in shown
    assert records[0]["instruction"] in shown.split(">>>")[0]
