"""The real Llama families on tiny random-weight models: Llama 2 (SentencePiece, no pad, no chat
template, ``[INST]``) and Llama 3 (128k BPE, ``<|eot_id|>`` ending instruct turns while the base's
EOS is ``<|end_of_text|>``), checked where fine-tuning pipelines fail silently: a double BOS, an
end-of-turn token never supervised, a response's first token tokenized apart from its prompt, a
pad that masks EOS, generation stopping on the wrong token."""
from __future__ import annotations

import json

import pytest

from helpers import make_records
from llama_sft.data.collate import pack_collate, pad_collate
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import IGNORE_INDEX, encode_example, tokenize_batch
from llama_sft.model.llamacpp_source import VOCABS, read_test_vectors, vocab_file
from llama_sft.model.loading import load_tokenizer
from llama_sft.pilot.checks import data_checks

# (family, prompt style, the terminator's text)
CASES = [("llama2", "instruction", "</s>"), ("llama2", "llama2", "</s>"),
         ("llama3", "chat_template", "<|eot_id|>"), ("llama3", "instruction", "<|end_of_text|>"),
         ("llama3", "llama2", "<|end_of_text|>")]
RECORD = {"instruction": "When will my order ship?", "context": "Order #1234, placed Monday.",
          "response": "shipping takes 3 days"}


@pytest.fixture(scope="module")
def toks(family_dirs):
    return {family: load_tokenizer(str(family_dirs[family])) for family in VOCABS}


@pytest.mark.parametrize("family", sorted(VOCABS))
def test_tokenizer_agrees_with_llama_cpp_test_vectors(toks, family):
    vectors = read_test_vectors(vocab_file(family))
    assert len(vectors) >= 40
    for text, ids in vectors:
        assert toks[family](text, add_special_tokens=False)["input_ids"] == ids, repr(text)


def test_families_are_shaped_like_their_models(family_dirs, toks):
    llama2 = json.loads((family_dirs["llama2"] / "config.json").read_text())
    llama3 = json.loads((family_dirs["llama3"] / "config.json").read_text())
    assert llama2["vocab_size"] == 32000 and llama3["vocab_size"] == 128256
    assert llama2["num_key_value_heads"] == llama2["num_attention_heads"]        # MHA
    assert llama3["num_key_value_heads"] < llama3["num_attention_heads"]         # GQA
    assert llama3["rope_parameters"]["rope_type"] == "llama3"
    assert toks["llama2"].chat_template is None and toks["llama3"].chat_template
    # no pad token in either vocabulary: Llama 2 pads with <unk>, Llama 3 with its EOS
    assert toks["llama2"].pad_token == "<unk>"
    assert toks["llama3"].pad_token_id == toks["llama3"].eos_token_id == 128001


@pytest.mark.parametrize("family,style,terminator", CASES)
def test_labels_token_by_token(toks, family, style, terminator):
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok, style=style)
    term = tok.convert_tokens_to_ids(terminator)
    assert fmt.terminator_id(tok) == term
    assert set(fmt.stop_ids(tok)) == {term, tok.eos_token_id}
    enc = encode_example(tok, fmt, RECORD, 512)
    prompt = fmt.encode_prompt(tok, RECORD["instruction"], RECORD["context"])
    n = len(prompt)
    assert enc.input_ids[:n] == prompt and enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:] and enc.labels[-1] == term
    # BOS exactly once, first
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    # the supervised tokens are the response as the full text tokenizes it, then the terminator
    text = fmt.render(tok, RECORD["instruction"], RECORD["context"])
    full = tok(text + fmt.response_prefix + RECORD["response"],
               add_special_tokens=fmt.adds_special_tokens)["input_ids"]
    assert enc.input_ids[:-1] == full
    assert tok.decode(enc.labels[n:-1]) .strip() == RECORD["response"]
    # nothing but the terminator is special among the supervised tokens
    assert [t for t in enc.labels[n:] if t in tok.all_special_ids or t >= 128000] == [term]


def test_sentencepiece_boundary(toks):
    """Llama 2: the response's first token is the one it has inside the full text."""
    tok = toks["llama2"]
    fmt = PromptFormat.for_tokenizer(tok, style="instruction")       # the prompt ends in "\n"
    _, responses = tokenize_batch(tok, fmt, [RECORD])
    first = tok.convert_ids_to_tokens(responses[0][:2])
    alone = tok.convert_ids_to_tokens(tok(RECORD["response"], add_special_tokens=False)
                                      ["input_ids"][:2])
    assert first == ["sh", "ipping"] and alone == ["▁sh", "ipping"]  # alone would be wrong
    fmt = PromptFormat.for_tokenizer(tok, style="llama2")            # "[/INST]" then " answer"
    _, responses = tokenize_batch(tok, fmt, [RECORD])
    assert tok.convert_ids_to_tokens(responses[0][:2]) == ["▁sh", "ipping"]
    assert fmt.render(tok, "hi").endswith("[/INST]")


@pytest.mark.parametrize("family,style,terminator", CASES)
def test_pilot_data_checks_pass_for_every_family_and_style(toks, family, style, terminator):
    """The prompt round-trips through the tokenizer, every example supervises its terminator."""
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok, style=style)
    checks = data_checks(tok, fmt, make_records(12), 512, (0.0, 1.0))
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize("family", sorted(VOCABS))
def test_pad_absent_does_not_mask_the_terminator(toks, family):
    tok = toks[family]
    fmt = PromptFormat.for_tokenizer(tok, style="instruction")
    encs = [encode_example(tok, fmt, r, 512) for r in make_records(3)]
    batch = pad_collate(encs, pad_id=tok.pad_token_id)
    for row, enc in enumerate(encs):
        labels = batch["labels"][row].tolist()
        assert labels[len(enc) - 1] == tok.eos_token_id
        assert labels[len(enc):] == [IGNORE_INDEX] * (len(labels) - len(enc))
    packed = pack_collate(encs)["labels"][0].tolist()
    assert packed.count(tok.eos_token_id) == len(encs)


def test_generation_stops_on_the_end_of_turn_token(family_dirs, toks):
    """Generation ends at the first stop token, which for Llama 3's template is <|eot_id|>."""
    from llama_sft.model.generation.batch import generate_batch
    from llama_sft.model.loading import load_base_model

    tok = toks["llama3"]
    model = load_base_model(str(family_dirs["llama3"]), dtype="float32")
    fmt = PromptFormat.for_tokenizer(tok)
    assert fmt.stop_ids(tok) == (128009, 128001)
    prompt = fmt.encode_prompt(tok, "Say something")
    free = generate_batch(model, tok, [prompt], max_new_tokens=8, stop_ids=[-1])[0]
    assert len(free.token_ids) == 8 and not free.stopped
    stop = free.token_ids[3]
    cut = generate_batch(model, tok, [prompt], max_new_tokens=8, stop_ids=[stop])[0]
    assert cut.stopped and cut.token_ids == free.token_ids[:free.token_ids.index(stop)]


@pytest.mark.parametrize("family", sorted(VOCABS))
def test_chain_on_each_family(family, family_dirs, tmp_path):
    """prep -> pilot -> train -> evaluate -> package on the family's tiny model."""
    import llama_evaluate
    import llama_package
    import llama_pilot
    import llama_train
    import pipeline_sft_prep
    from helpers import ROOT

    lines = (ROOT / "data" / "demo_enriched.jsonl").read_bytes().splitlines(keepends=True)[:200]
    enriched = tmp_path / "enriched.jsonl"
    enriched.write_bytes(b"".join(lines))
    model = str(family_dirs[family])
    sft, pilot, train = tmp_path / "sft", tmp_path / "pilot", tmp_path / "train"
    assert pipeline_sft_prep.main(["--enriched", str(enriched), "--output-dir", str(sft),
                                   "--tokenizer", model, "--golden-size", "12"]) == 0
    common = ["--base-model", model, "--report-to", "none", "--no-progress", "--batch-size", "4",
              "--dtype", "float32"]
    assert llama_pilot.main(["--golden-set", str(sft / "golden_set.jsonl"), "--output-dir",
                             str(pilot), "--max-steps", "3", "--num-samples", "2",
                             "--max-new-tokens", "4", "--min-loss-drop", "-100",
                             "--max-final-loss", "1000", "--min-stop-rate", "0", *common]) == 0
    report = json.loads((pilot / "pilot_evaluation.json").read_text())
    data = {c["name"]: c for c in report["checks"] if c["group"] == "data"}
    assert data["examples_without_eos_label"]["value"] == 0
    assert data["prompt_roundtrip_failures"]["value"] == 0
    assert llama_train.main(["--dataset", str(sft / "sft_dataset.jsonl"), "--golden-set",
                             str(sft / "golden_set.jsonl"), "--output-dir", str(train),
                             "--config", str(sft / "training_config.json"), "--max-steps", "3",
                             "--eval-steps", "3", *common]) == 0
    final = train / "final_model"
    style = json.loads((final / "prompt_format.json").read_text())["style"]
    assert style == {"llama2": "instruction", "llama3": "chat_template"}[family]
    out = tmp_path / "final_evaluation.json"
    assert llama_evaluate.main(["--adapter-path", str(final), "--dataset",
                                str(sft / "golden_set.jsonl"), "--num-samples", "4",
                                "--max-new-tokens", "4", "--output", str(out),
                                "--dtype", "float32"]) == 0
    assert json.loads(out.read_text())["finetuned"]["overall"]["examples"] == 4
    assert llama_package.main(["--adapter-path", str(final), "--output-dir",
                               str(tmp_path / "packages"), "--evaluation", str(out)]) == 0
    archive = next((tmp_path / "packages").glob("*.tar.gz"))
    assert llama_package.main(["--verify", str(archive)]) == 0
