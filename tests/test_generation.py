"""llama_model.generate_batch: the greedy loop that drops finished rows gives generate()'s ids."""
from __future__ import annotations

import pytest
import torch

from llama_model import generate_batch, greedy_shrinking, load_base_model, load_tokenizer


def left_padded(prompts, pad):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def reference(model, ids, mask, max_new_tokens, eos, pad):
    """model.generate's greedy ids per row, cut after the first EOS."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                         temperature=None, top_p=None, top_k=None)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype="float32").eval()
    return model, load_tokenizer(str(tiny_model_dir))


def test_rows_leave_at_eos_and_keep_generate_ids(tiny):
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "A much longer prompt about lamps "
                                             "and their light", "Short", "Numbers 1 2 3 4")]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    # A random model rarely emits its EOS; use as "EOS" a token that greedy decoding reaches at
    # different steps in different rows, so rows really leave the batch at different times.
    free = reference(model, ids, mask, 24, eos=-1, pad=tok.pad_token_id)
    first = [{t: row.index(t) for t in row} for row in free]
    eos = min(t for t in set().union(*first)
              if len({f.get(t) for f in first}) > 1)      # rows reach it at different steps
    want = reference(model, ids, mask, 24, eos=eos, pad=tok.pad_token_id)
    got = greedy_shrinking(model, ids, mask, 24, eos)
    assert got == want
    assert len({len(row) for row in got}) > 1 and min(map(len, got)) < 24


def test_generate_batch_on_the_embedded_model_matches_generate(embedded_dir):
    from llama_dataset import PromptFormat

    tok = load_tokenizer(str(embedded_dir))
    model = load_base_model(str(embedded_dir), dtype="float32").eval()
    fmt = PromptFormat.for_tokenizer(tok)
    questions = [("What is 2 + 2? Answer with a number.", ""), ("Say hi.", ""),
                 ("Classify the sentiment as positive or negative.", "I love this lamp!"),
                 ("Name a colour.", "")]
    prompts = [fmt.encode_prompt(tok, q, c) for q, c in questions]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    want = reference(model, ids, mask, 20, eos=tok.eos_token_id, pad=tok.pad_token_id)
    got = generate_batch(model, tok, prompts, max_new_tokens=20)
    assert [g.token_ids for g in got] == [[t for t in row if t != tok.eos_token_id] for row in want]
    assert [g.stopped for g in got] == [tok.eos_token_id in row for row in want]
    assert any(g.stopped for g in got)          # real EOS reached: rows did leave the batch


def test_processor_config_falls_back_to_generate(tiny):
    model, tok = tiny
    prompts = [tok("Hello there")["input_ids"], tok("Numbers 1 2 3")["input_ids"]]
    model.generation_config.repetition_penalty = 1.3
    try:
        got = generate_batch(model, tok, prompts, max_new_tokens=12)
        ids, mask = left_padded(prompts, tok.pad_token_id)
        plain = greedy_shrinking(model, ids, mask, 12, tok.eos_token_id)
        assert [g.token_ids for g in got] != [[t for t in r if t != tok.eos_token_id]
                                               for r in plain]
    finally:
        model.generation_config.repetition_penalty = 1.0
