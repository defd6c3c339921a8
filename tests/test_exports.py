"""Every export proven by the runtime that consumes it: GGUF files (llama.cpp's converter and
quantizer) loaded and run by llama.cpp, for each family; the merged model they come from carries
the fine-tuning; metadata, SHA256SUMS and ``--verify`` cover them."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import llama_package
from helpers import hf_greedy, make_records, random_adapter
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.package import gguf

FAMILY_STYLES = {"smollm2": "chat_template", "llama2": "llama2", "llama3": "chat_template"}
CLEAR_MARGIN = 0.02      # top-2 logit gap above f16 rounding (about 5e-4 on these models)


@pytest.fixture(scope="module")
def packaged(family_dirs, tmp_path_factory):
    """Per family: a random adapter packaged with --merge --gguf f16,q8_0 (built lazily)."""
    class Lazy(dict):
        def __missing__(self, family):
            wd = tmp_path_factory.mktemp(f"export-{family}")
            adapter = random_adapter(family_dirs[family], wd / "final_model",
                                     style=FAMILY_STYLES[family],
                                     target_modules=("q_proj", "v_proj", "down_proj"))
            rc = llama_package.main(["--adapter-path", str(adapter), "--output-dir",
                                     str(wd / "packages"), "--merge", "--gguf", "f16,q8_0"])
            assert rc == 0
            self[family] = wd / "packages"
            return self[family]
    return Lazy()


def _prompts(family_dir, style):
    from llama_sft.model.loading import load_tokenizer

    tok = load_tokenizer(str(family_dir))
    fmt = PromptFormat.for_tokenizer(tok, style=style)
    return tok, fmt, [fmt.encode_prompt(tok, r["instruction"], r["context"])
                      for r in make_records(6)]


@pytest.mark.parametrize("family", ["smollm2", "llama2", "llama3"])
def test_gguf_runs_in_llama_cpp_as_the_fine_tuned_model_does(family, family_dirs, packaged):
    import torch
    from transformers import AutoModelForCausalLM

    from llama_sft.model.loading import load_for_inference

    packages = packaged[family]
    folder = "llama-sft-135m-0.1.0"
    f16, q8 = packages / f"{folder}.f16.gguf", packages / f"{folder}.q8_0.gguf"
    tok, fmt, prompts = _prompts(family_dirs[family], FAMILY_STYLES[family])
    tuned = load_for_inference(packages.parent / "final_model", dtype="float32",
                               device_map=None).model
    base = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    llm = gguf.load(f16)
    # llama.cpp tokenizes the prompt text as transformers does (BOS once, the template's specials)
    for record in make_records(6):
        text = fmt.render(tok, record["instruction"], record["context"])
        ids = fmt.encode_prompt(tok, record["instruction"], record["context"])
        assert llm.tokenize(text.encode(), add_bos=fmt.adds_special_tokens, special=True) == ids
    compared = 0
    for prompt in prompts:
        # logits: the GGUF is the fine-tuned model, not the base it was merged into
        llm.reset()
        llm.eval(prompt)
        cpp = np.asarray(llm.scores[len(prompt) - 1])
        with torch.no_grad():
            want = tuned(torch.tensor([prompt])).logits[0, -1].numpy()
            was = base(torch.tensor([prompt])).logits[0, -1].numpy()
        err, moved = np.abs(cpp - want).max(), np.abs(was - want).max()
        assert err < 2e-3 * np.abs(want).max() and moved > 20 * err, (err, moved)
        # greedy: identical up to the first step whose top-2 gap is within rounding (random
        # weights make near-ties common; past one, the two runs may rightly part)
        tokens, gaps = hf_greedy(tuned, prompt, 16)
        clear = next((i for i, g in enumerate(gaps) if g < CLEAR_MARGIN), len(gaps))
        assert gguf.greedy(llm, prompt, 16, stop_ids=[])[:clear] == tokens[:clear]
        compared += clear
    assert compared >= 8, f"only {compared} greedy tokens had clear margins"
    quantized = gguf.load(q8)
    agree = np.mean([gguf.greedy(quantized, p, 16, []) == hf_greedy(tuned, p, 16)[0]
                     for p in prompts])
    print(f"{family}: f16 greedy identical on all {compared} clear-margin tokens; q8_0: all 16 "
          f"tokens identical on {agree:.0%} of {len(prompts)} prompts")


@pytest.mark.parametrize("family", ["llama3"])
def test_exports_are_listed_summed_and_verified(family, packaged):
    packages = packaged[family]
    folder = "llama-sft-135m-0.1.0"
    archive = packages / f"{folder}.tar.gz"
    import tarfile
    with tarfile.open(archive) as tar:
        metadata = json.load(tar.extractfile(f"{folder}/metadata.json"))
        readme = tar.extractfile(f"{folder}/README.md").read().decode()
    exports = {e["path"]: e for e in metadata["exports"]}
    assert {f"{folder}.f16.gguf", f"{folder}.q8_0.gguf",
            f"{folder}-merged/model.safetensors"} <= set(exports)
    assert {e["kind"] for e in exports.values()} == {"gguf", "merged"}
    assert metadata["stop_token_ids"] == [128009, 128001]
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=packages, capture_output=True,
                          text=True)
    assert sums.returncode == 0 and sums.stdout.count(": OK") == len(exports) + 1
    assert llama_package.main(["--verify", str(archive)]) == 0
    assert "llama_cpp.server --model" in readme and "vllm serve" in readme
    assert "create_chat_completion" in readme and "eos_token_id=[128009, 128001]" in readme
    # a damaged export fails verification, naming it
    gguf_file = packages / f"{folder}.q8_0.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 1
    gguf_file.chmod(0o644)
    gguf_file.write_bytes(bytes(data))
    assert llama_package.main(["--verify", str(archive)]) == 65


def test_gguf_types_are_checked_before_any_work(tiny_adapter_dir, tmp_path, capsys):
    rc = llama_package.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir",
                             str(tmp_path / "p"), "--gguf", "q3_weird"])
    assert rc == 2 and "--gguf takes f16, q8_0, q4_k_m" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("family", ["llama3"])
def test_onnx_export_matches_the_fine_tuned_model(family, family_dirs, tmp_path):
    """--onnx: onnxruntime logits within 1e-3 of torch (fp32), greedy decoding with the KV cache
    identical, and the export carries the fine-tuning."""
    import torch

    from llama_sft.model.loading import load_for_inference
    from llama_sft.package.onnx_export import onnx_generate, onnx_logits

    adapter = random_adapter(family_dirs[family], tmp_path / "final_model",
                             style=FAMILY_STYLES[family])
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir",
                               str(tmp_path / "packages"), "--onnx"]) == 0
    onnx_dir = tmp_path / "packages" / "llama-sft-135m-0.1.0-onnx"
    assert not (tmp_path / "packages" / "llama-sft-135m-0.1.0-merged").exists()
    tuned = load_for_inference(adapter, dtype="float32", device_map=None).model
    tok, fmt, prompts = _prompts(family_dirs[family], FAMILY_STYLES[family])
    for prompt in prompts[:3]:
        with torch.no_grad():
            want = tuned(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(onnx_logits(onnx_dir, prompt) - want).max() < 1e-3
        tokens, _ = hf_greedy(tuned, prompt, 16)
        assert onnx_generate(onnx_dir, prompt, 16, stop_ids=set()) == tokens
    sums = (tmp_path / "packages" / "SHA256SUMS").read_text()
    assert "llama-sft-135m-0.1.0-onnx/model.onnx" in sums
