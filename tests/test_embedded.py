"""The embedded default model: materialized once, verified, loadable with plain transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from helpers import ROOT
from llama_sft.config.presets import embedded_model_dir
from llama_sft.model.embedded import (EMBEDDED_GGUF, HASHES_FILE, embedded_model_status,
                                      resolve_model_path)


def test_plain_transformers_load_offline_and_answer(embedded_dir):
    """Loads with plain Auto* classes with the hub off, has a chat template, answers correctly."""
    code = f"""
import os, torch
assert os.environ["HF_HUB_OFFLINE"] == "1"
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(embedded_dir)!r})
model = AutoModelForCausalLM.from_pretrained({str(embedded_dir)!r})
assert type(model).__name__ == "LlamaForCausalLM"
assert tok.chat_template
msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=20, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(sum(p.numel() for p in model.parameters()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    answer, params = out.stdout.strip().splitlines()[-2:]
    assert "Paris" in answer
    assert int(params) == 134_515_008


def test_materialization_is_verified_and_rebuilt_when_damaged(tmp_path, monkeypatch, embedded_dir):
    """A copy with a changed file is detected; a killed conversion leaves no trusted directory."""
    monkeypatch.setenv("LLAMA_SFT_CACHE", str(tmp_path))
    target = embedded_model_dir()
    assert embedded_model_status() == "not materialized"
    target.parent.mkdir(parents=True)
    # a half-written temporary directory (as a killed conversion leaves) is not trusted
    (target.parent / f".{target.name}.tmp-123").mkdir()
    assert embedded_model_status() == "not materialized"
    shutil.copytree(embedded_dir, target)
    assert embedded_model_status().startswith("ready")
    with open(target / "config.json", "a") as fh:
        fh.write(" ")
    assert embedded_model_status() == "damaged (config.json changed)"
    (target / HASHES_FILE).unlink()
    assert embedded_model_status() == "damaged (no hash list)"


def test_embedded_path_command_prints_the_directory(embedded_dir):
    out = subprocess.run([sys.executable, "-m", "llama_sft.model.embedded"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.strip() == str(embedded_dir)
    hashes = json.loads((embedded_dir / HASHES_FILE).read_text())
    assert hashes["source"] == EMBEDDED_GGUF and "model.safetensors" in hashes["files"]


def test_resolve_model_path_maps_only_the_embedded_id(embedded_dir):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == str(embedded_dir)
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
