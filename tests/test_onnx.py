"""ONNX export of a merged model: onnxruntime's logits and greedy tokens match torch's."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROMPTS = [("What is the capital of France?", ""),
           ("Summarize the text.", "The quick brown fox jumps over the lazy dog."),
           ("Write a haiku about rain. 日本語 ✓", "")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(merged dir, ONNX dir, torch model, tokenizer, prompt ids) for the tiny LLaMA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.model.tiny import save_tiny_llama
    from llama_sft.package.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    merged = save_tiny_llama(root / "tiny")
    # At init scale the attention is near uniform and greedy tokens hardly depend on order or
    # position (a decoding step at the wrong position still matches); larger attention weights
    # make them depend on both.
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                param.mul_(8)
    model.save_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt_format = PromptFormat.for_tokenizer(tokenizer)
    prompt_format.save(merged)
    out = export_onnx(merged, root / "onnx")
    model.eval()
    prompts = [prompt_format.encode_prompt(tokenizer, *p) for p in PROMPTS]
    return merged, out, model, tokenizer, prompts


def test_export_writes_model_and_what_loads_it(exported):
    from llama_sft.data.prompt_format import PromptFormat

    merged, out, _, _, _ = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.onnx",
        "model.onnx.data", "prompt_format.json", "tokenizer.json", "tokenizer_config.json"]
    assert PromptFormat.load(out) == PromptFormat.load(merged)
    assert (out / "config.json").read_bytes() == (merged / "config.json").read_bytes()
    assert not list(out.parent.glob(".onnx.tmp-*"))


def test_logits_match_torch(exported):
    import torch

    from llama_sft.package.onnx_export import onnx_logits

    _, out, model, _, prompts = exported
    for ids in prompts:
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        got = onnx_logits(out, ids)
        assert got.shape == expected.shape == (len(ids), model.config.vocab_size)
        assert np.abs(got - expected).max() < 1e-3


def test_greedy_tokens_match_torch(exported):
    import torch

    from llama_sft.package.onnx_export import onnx_generate

    _, out, model, tokenizer, prompts = exported
    eos = tokenizer.eos_token_id
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                       do_sample=False, max_new_tokens=16, eos_token_id=eos,
                                       pad_token_id=eos)[0, len(ids):].tolist()
        expected = generated[:generated.index(eos)] if eos in generated else generated
        assert len(expected) > 0
        assert onnx_generate(out, ids, 16, {eos}) == expected
    # A stop token is left out, and nothing after it is generated.
    first = onnx_generate(out, prompts[0], 16, set())
    assert onnx_generate(out, prompts[0], 16, {first[3]}) == first[:first.index(first[3])]
    assert onnx_generate(out, prompts[0], 5, set()) == first[:5]


def test_cache_path_matches_no_cache_path(exported):
    """The graph's documented inputs and outputs, used with plain onnxruntime: the prompt in one
    pass, then one token at a time over the returned cache, gives the no-cache logits."""
    import onnxruntime as ort

    from llama_sft.package.onnx_export import onnx_generate, onnx_logits

    _, out, _, _, prompts = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    assert len(past) == 4               # 2 layers, key and value
    ids = prompts[1] + onnx_generate(out, prompts[1], 8, set())
    steps, start = [ids[:len(prompts[1])]] + [[t] for t in ids[len(prompts[1]):]], 0
    logits = []
    for step in steps:
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {
            "input_ids": np.array([step]), "attention_mask": np.ones((1, start + len(step)), np.int64),
            "position_ids": np.arange(start, start + len(step))[None], **past})))
        past = {n.replace("present.", "past_key_values."): v for n, v in outputs.items()
                if n.startswith("present.")}
        start += len(step)
        logits.append(outputs["logits"][0])
    assert past["past_key_values.0.key"].shape[2] == len(ids)
    no_cache = onnx_logits(out, ids)
    assert np.abs(np.concatenate(logits) - no_cache).max() < 1e-4
    # Greedy decoding over the cache picked the no-cache argmax at every generated position.
    assert no_cache[len(prompts[1]) - 1:-1].argmax(-1).tolist() == ids[len(prompts[1]):]
