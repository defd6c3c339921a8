"""Generation: continuous greedy batching gives generate()'s ids for every prompt."""
from __future__ import annotations

import pytest
import torch

from llama_sft.model.generation.batch import generate_batch, generate_many
from llama_sft.model.generation.cache import growing_cache_layer_class
from llama_sft.model.generation.continuous import greedy_continuous
from llama_sft.model.loading import load_base_model, load_tokenizer


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


def alone(model, prompts, max_new_tokens, eos, pad):
    """model.generate's greedy ids for each prompt on its own (no padding at all)."""
    return [reference(model, *left_padded([p], pad), max_new_tokens, eos, pad)[0]
            for p in prompts]


def shared_eos(rows):
    """A token that greedy decoding reaches at different steps in different rows: a random
    model rarely emits its EOS, and this one makes rows leave the batch at different times."""
    first = [{t: row.index(t) for t in row} for row in rows]
    return min(t for t in set().union(*first)
               if sum(t in f for f in first) >= 2 and len({f.get(t) for f in first}) > 1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype="float32").eval()
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def chatty():
    """A random 2-layer LLaMA over 12 token ids whose greedy answers vary (weights at twice the
    usual scale), so a chosen "EOS" ends rows at different steps, and prompts of 1-11 ids.
    float64: padding then changes sums only by rounding, far below any gap between top logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                         max_position_embeddings=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 / p.shape[1] ** 0.5)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 12, (n,), generator=gen).tolist() for n in (3, 11, 2, 7, 9, 1, 5, 8)]
    return model, prompts


def test_rows_leave_at_eos_and_keep_generate_ids(chatty):
    model, prompts = chatty
    prompts = prompts[:4]
    ids, mask = left_padded(prompts, 0)
    eos = shared_eos(reference(model, ids, mask, 24, eos=-1, pad=0))
    want = reference(model, ids, mask, 24, eos=eos, pad=0)
    got = greedy_continuous(model, prompts, max_new_tokens=24, stop_ids={eos}, pad_id=0,
                            batch_size=len(prompts))
    assert got == want
    assert len({len(row) for row in got}) > 1 and min(map(len, got)) < 24


@pytest.mark.parametrize("batch_size,prefill_tokens", [(3, 2048), (2, 2048), (5, 12)])
def test_waiting_prompts_join_the_running_batch(chatty, batch_size, prefill_tokens):
    """Rows that join a running batch (left-padded into its cache, finished rows' places
    refilled, dead cache columns dropped) get the ids each prompt gets alone."""
    model, prompts = chatty
    eos = shared_eos(alone(model, prompts, 20, eos=-1, pad=0))
    want = alone(model, prompts, 20, eos, 0)
    got, prefills = greedy_continuous(model, prompts, max_new_tokens=20, stop_ids={eos}, pad_id=0,
                                      batch_size=batch_size, count_prefills=True,
                                      prefill_tokens=prefill_tokens)
    assert got == want
    assert sum(eos in row for row in got) >= 2          # rows really left before the limit
    assert prefills >= -(-len(prompts) // batch_size)   # later prompts joined in later calls


def test_growing_cache_layer_matches_concatenation():
    """Appends into preallocated room, row moves and dropped columns give the tensors a plain
    concatenating cache would hold, and decode steps write in place."""
    layer = growing_cache_layer_class()()
    gen = torch.Generator().manual_seed(0)
    step = [torch.randn(4, 2, 5, 3, generator=gen) for _ in range(2)]
    want = [t.clone() for t in step]
    keys, values = layer.update(*step)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1])
    for _ in range(3):
        step = [torch.randn(4, 2, 1, 3, generator=gen) for _ in range(2)]
        before = layer.storage[0].data_ptr()
        keys, values = layer.update(*step)
        want = [torch.cat([w, s], dim=2) for w, s in zip(want, step)]
        assert torch.equal(keys, want[0]) and torch.equal(values, want[1])
        assert layer.storage[0].data_ptr() == before          # no new storage per step
    layer.move_rows([1], [3], 3)                               # row 1 left; row 3 takes its place
    want = [w[[0, 3, 2]] for w in want]
    assert torch.equal(layer.keys, want[0]) and torch.equal(layer.values, want[1])
    layer.drop_columns(2)
    want = [w[:, :, 2:] for w in want]
    assert torch.equal(layer.keys, want[0]) and layer.get_seq_length() == 6
    for _ in range(layer.HEADROOM + 2):                        # past the room: storage regrows
        step = [torch.randn(3, 2, 1, 3, generator=gen) for _ in range(2)]
        layer.update(*step)
        want = [torch.cat([w, s], dim=2) for w, s in zip(want, step)]
    assert torch.equal(layer.keys, want[0]) and torch.equal(layer.values, want[1])
    layer.batch_select_indices(torch.tensor([2, 0]))          # DynamicLayer's own selection
    step = [torch.randn(2, 2, 1, 3, generator=gen) for _ in range(2)]
    layer.update(*step)
    want = [torch.cat([w[[2, 0]], s], dim=2) for w, s in zip(want, step)]
    assert torch.equal(layer.keys, want[0]) and torch.equal(layer.values, want[1])


def test_generate_many_on_the_embedded_model_matches_generate(embedded_dir):
    from llama_sft.data.prompt_format import PromptFormat

    tok = load_tokenizer(str(embedded_dir))
    model = load_base_model(str(embedded_dir), dtype="float32").eval()
    fmt = PromptFormat.for_tokenizer(tok)
    questions = [("What is 2 + 2? Answer with a number.", ""), ("Say hi.", ""),
                 ("Classify the sentiment as positive or negative.", "I love this lamp!"),
                 ("Name a colour.", ""), ("Answer yes or no: is water wet?", "")]
    prompts = [fmt.encode_prompt(tok, q, c) for q, c in questions]
    want = alone(model, prompts, 20, tok.eos_token_id, tok.pad_token_id)
    done = []
    got, prefills = generate_many(model, tok, prompts, batch_size=2, max_new_tokens=20,
                                  on_done=done.append)
    assert [g.token_ids for g in got] == [[t for t in row if t != tok.eos_token_id]
                                          for row in want]
    assert [g.stopped for g in got] == [tok.eos_token_id in row for row in want]
    assert any(g.stopped for g in got)          # real EOS reached: rows did leave the batch
    assert sum(done) == len(prompts) and prefills >= 3
    one = generate_batch(model, tok, prompts[:2], max_new_tokens=20)
    assert [g.token_ids for g in one] == [g.token_ids for g in got[:2]]


def test_processor_config_falls_back_to_generate(tiny):
    model, tok = tiny
    prompts = [tok("Hello there")["input_ids"], tok("Numbers 1 2 3")["input_ids"]]
    model.generation_config.repetition_penalty = 1.3
    try:
        got = generate_batch(model, tok, prompts, max_new_tokens=12)
        plain = greedy_continuous(model, prompts, max_new_tokens=12, stop_ids={tok.eos_token_id},
                                  pad_id=tok.pad_token_id, batch_size=2)
        assert [g.token_ids for g in got] != [[t for t in r if t != tok.eos_token_id]
                                               for r in plain]
        many, _ = generate_many(model, tok, prompts, batch_size=1, max_new_tokens=12)
        assert [g.token_ids for g in many] == [g.token_ids for g in got]
    finally:
        model.generation_config.repetition_penalty = 1.0
