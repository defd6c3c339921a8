"""Contract tests: the preset table, config resolution, --help of every script, README sync."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT
from llama_sft.config.hardware import environment_check, lora_parameter_count
from llama_sft.config.presets import PRESETS, Preset, get_preset
from llama_sft.config.settings import resolve_config
from llama_sft.errors import ConfigError

SCRIPTS = ["pipeline_sft_prep.py", "llama_config.py", "llama_pilot.py", "llama_train.py",
           "llama_evaluate.py", "llama_package.py", "llama_chat.py", "llama_dataset.py",
           "run_pipeline.py"]


@pytest.mark.parametrize("size,gpu_gb,gpu,r,alpha,bs,accum", [
    ("7b", 16, "RTX 3090 (24GB) or better", 16, 32, 4, 4),
    ("13b", 24, "A100 (40GB) or better", 32, 64, 2, 8),
    ("70b", 80, "Multiple A100 (80GB) or H100", 64, 128, 1, 16),
])
def test_user_guide_rows_are_exact(size, gpu_gb, gpu, r, alpha, bs, accum):
    p = get_preset(size)
    assert (p.min_gpu_memory_gb, p.recommended_gpu) == (gpu_gb, gpu)
    assert (p.lora_r, p.lora_alpha, p.lora_dropout) == (r, alpha, 0.05)
    assert (p.batch_size, p.gradient_accumulation_steps) == (bs, accum)
    assert (p.learning_rate, p.num_epochs, p.max_length) == (2e-5, 3, 2048)
    assert p.base_model == f"meta-llama/Llama-2-{size}-hf"


@pytest.mark.parametrize("size", list(PRESETS))
def test_every_preset_resolves_and_validates(size):
    cfg = resolve_config(size)
    p = PRESETS[size]
    assert cfg.base_model == p.base_model and cfg.lora.lora_r == p.lora_r
    assert cfg.model.quantization == p.quantization
    assert cfg.model.gradient_checkpointing == p.gradient_checkpointing
    assert tuple(cfg.lora.lora_target_modules) == p.lora_target_modules
    assert p.params > 0 and p.hidden_size % p.num_heads == 0
    # the flat dict round-trips through the config-file path
    assert resolve_config(size, file_values=cfg.to_dict()).to_dict() == cfg.to_dict()


def test_unknown_size_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid sizes: 135m, 1b, 3b, 7b, 8b, 13b, 70b"):
        get_preset("7B-chat")


@pytest.mark.parametrize("values,message", [
    ({"lora_rank": 8}, "unknown key"), ({"batch_size": "4"}, "'batch_size' must be int"),
    ({"learning_rate": True}, "must be float"), ({"max_steps": None, "lora_r": None}, "lora_r"),
    ({"method": "dora"}, "method must be one of"),
])
def test_bad_file_values_fail_loudly(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("7b", file_values=values)


def test_full_method_with_explicit_quantization_is_rejected():
    with pytest.raises(ConfigError, match="cannot train a quantized model"):
        resolve_config("135m", overrides={"method": "full", "quantization": "4bit"})
    # the 7b preset's default 4-bit gives way to an explicit full fine-tune
    assert resolve_config("7b", overrides={"method": "full"}).model.quantization == "none"


def test_lora_parameter_count_matches_peft(tiny_model_dir):
    """The memory estimate's LoRA count equals what peft actually creates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = model.config
    preset = Preset(
        name="tiny", base_model="x", params=1, min_gpu_memory_gb=0, recommended_gpu="", lora_r=4,
        lora_alpha=8, lora_dropout=0, batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-3, num_epochs=1, max_length=64, gradient_checkpointing=False,
        quantization="none", hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        intermediate_size=c.intermediate_size, num_kv_heads=c.num_key_value_heads,
        num_heads=c.num_attention_heads)
    targets = preset.lora_target_modules
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(preset, 4, targets) == trainable


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_fast(script):
    """--help works and imports no torch (what makes it slow): the check runs as the process
    exits, after argparse has printed the help."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else "
            "'no torch'))\n"
            f"sys.argv = [{script!r}, '--help']\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    assert out.stdout.rstrip().endswith("no torch")


def test_table_json_and_readme_agree():
    table = subprocess.run([sys.executable, "llama_config.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.rstrip()
    assert table in (ROOT / "README.md").read_text()
    data = json.loads(subprocess.run([sys.executable, "llama_config.py", "--json"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout)
    assert data["70b"]["min_gpu_memory_gb"] == 80 and set(data) == set(PRESETS)


def test_check_passes_for_embedded_and_refuses_7b_without_gpu(embedded_dir):
    ok = subprocess.run([sys.executable, "llama_config.py", "--check"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "embedded model" in ok.stdout and "hf auth" in ok.stdout
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bad = subprocess.run([sys.executable, "llama_config.py", "--check", "--model-size", "7b"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "needs a CUDA GPU with 16" in bad.stderr


def test_check_never_prints_the_token(monkeypatch):
    secret = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    rows, _ = environment_check("135m")
    assert secret not in json.dumps(rows)
    assert dict((r[0], r[1]) for r in rows)["hf auth"] == "configured (environment)"
