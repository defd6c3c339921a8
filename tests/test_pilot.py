"""llama_pilot.py: a healthy run says go; deliberately broken setups fail the right check."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

import llama_pilot
import llama_sft.data.tokenize
from helpers import make_records, write_jsonl
from llama_sft.data.tokenize import IGNORE_INDEX, encode_example
from llama_sft.pilot.resources import _fit


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pilot") / "golden_set.jsonl",
                       make_records(6, "golden", 300))


def pilot_args(tiny_model_dir, golden, out, *extra):
    return ["--golden-set", str(golden), "--output-dir", str(out), "--base-model",
            str(tiny_model_dir), "--batch-size", "6", "--report-to", "none", "--no-progress",
            "--dtype", "float32", "--num-samples", "6", "--max-new-tokens", "24",
            *map(str, extra)]


def report(out):
    return json.loads((out / "pilot_evaluation.json").read_text())


def test_healthy_pilot_says_go(tiny_model_dir, golden, tmp_path, capsys):
    out = tmp_path / "pilot"
    rc = llama_pilot.main(pilot_args(tiny_model_dir, golden, out, "--method", "full",
                                     "--learning-rate", "1e-2", "--max-steps", "40"))
    rep = report(out)
    assert rc == 0, rep["failed_checks"]
    assert rep["verdict"] == "go" and rep["failed_checks"] == []
    names = {c["name"] for c in rep["checks"]}
    assert names == {"supervised_token_ratio", "examples_without_eos_label", "zero_label_examples",
                     "prompt_roundtrip_failures", "conversation_turn_failures", "loss_drop",
                     "non_finite_steps",
                     "grad_norm_finite", "final_eval_loss", "stop_rate", "memory_fit"}
    assert rep["resources"]["tokens_per_s"] > 0 and rep["resources"]["peak_memory_mb"] > 0
    assert len(rep["samples"]) == 6 and {"prompt", "reference", "generation"} <= set(rep["samples"][0])
    assert (out / "final_model" / "model.safetensors").exists()
    assert "pilot verdict: GO" in capsys.readouterr().out


def test_eos_masked_out_fails_the_data_check(tiny_model_dir, golden, tmp_path, monkeypatch):
    real = encode_example

    def drop_eos_label(tokenizer, fmt, record, max_length, policy="truncate", train_on="all"):
        enc = real(tokenizer, fmt, record, max_length, policy, train_on)
        return replace(enc, labels=enc.labels[:-1] + [IGNORE_INDEX])

    monkeypatch.setattr(llama_sft.data.tokenize, "encode_example", drop_eos_label)
    out = tmp_path / "pilot"
    assert llama_pilot.main(pilot_args(tiny_model_dir, golden, out, "--max-steps", "3")) == 1
    rep = report(out)
    assert rep["verdict"] == "no-go"
    assert rep["failed_checks"][0] == "examples_without_eos_label" or \
        "examples_without_eos_label" in rep["failed_checks"]
    check = next(c for c in rep["checks"] if c["name"] == "examples_without_eos_label")
    assert check["value"] == 6 and not check["passed"]


def test_zero_learning_rate_fails_the_learning_check(tiny_model_dir, golden, tmp_path):
    out = tmp_path / "pilot"
    assert llama_pilot.main(pilot_args(tiny_model_dir, golden, out, "--max-steps", "4",
                                       "--learning-rate", "0")) == 1
    rep = report(out)
    assert "loss_drop" in rep["failed_checks"]
    assert next(c for c in rep["checks"] if c["name"] == "loss_drop")["value"] == pytest.approx(0, abs=1e-6)
    assert rep["checks"][0]["passed"] is False  # failing checks are listed first


def test_all_responses_masked_is_no_go_before_training(tiny_model_dir, golden, tmp_path,
                                                       monkeypatch):
    real = encode_example

    def mask_everything(tokenizer, fmt, record, max_length, policy="truncate", train_on="all"):
        enc = real(tokenizer, fmt, record, max_length, policy, train_on)
        return replace(enc, labels=[IGNORE_INDEX] * len(enc.labels))

    monkeypatch.setattr(llama_sft.data.tokenize, "encode_example", mask_everything)
    out = tmp_path / "pilot"
    assert llama_pilot.main(pilot_args(tiny_model_dir, golden, out)) == 1
    rep = report(out)
    zero = next(c for c in rep["checks"] if c["name"] == "zero_label_examples")
    assert zero["value"] == 6 and not zero["passed"]
    assert "train_summary" not in rep and not (out / "final_model").exists()


def test_memory_fit_suggests_a_setup_that_fits():
    from llama_sft.config.presets import PRESETS

    fit = _fit(PRESETS["13b"], budget_gb=14.0)
    assert not fit["fits"]
    assert fit["suggestion"]["quantization"] == "4bit" and fit["suggestion"]["estimate_gb"] <= 14
    assert fit["suggestion"]["batch_size"] * fit["suggestion"]["gradient_accumulation_steps"] == 16
    too_small = _fit(PRESETS["13b"], budget_gb=8.0)
    assert "FSDP over 2 GPUs" in too_small["suggestion"]


def test_gpu_presets_do_not_fit_a_machine_without_cuda():
    """However much RAM there is, a preset made for GPUs cannot train here (train refuses it)."""
    from llama_sft.config.presets import PRESETS

    for name, preset in PRESETS.items():
        fit = _fit(preset, budget_gb=1000.0, cuda=False)
        assert fit["fits"] is (preset.min_gpu_memory_gb == 0), name
        if not fit["fits"]:
            assert "needs a CUDA GPU" in fit["suggestion"]


def test_memory_estimate_parts():
    """The estimate's parts for 7B QLoRA at one 2,048-token example: the 4-bit linears and the
    fp32 embeddings/LM head k-bit training keeps, and the per-device share under FSDP."""
    from llama_sft.config.hardware import CUDA_CONTEXT_GB, estimate_training_memory
    from llama_sft.config.presets import PRESETS

    p = PRESETS["7b"]
    kw = dict(method="lora", lora_r=16, lora_targets=p.lora_target_modules, batch_size=1,
              max_length=2048, gradient_checkpointing=True)
    qlora = estimate_training_memory(p, quantization="4bit", **kw)
    outer = 2 * 32000 * 4096
    assert qlora["weights_gb"] == pytest.approx(((p.params - outer) * 0.55 + outer * 4) / 1e9,
                                                abs=1e-3)
    assert qlora["total_gb"] == pytest.approx(qlora["allocated_gb"] + CUDA_CONTEXT_GB)
    assert qlora["dequantization_gb"] > 0 and qlora["logits_gb"] > 0
    bf16 = estimate_training_memory(p, quantization="none", **kw)
    sharded = estimate_training_memory(p, quantization="none", world_size=2, **kw)
    assert sharded["weights_gb"] == pytest.approx(bf16["weights_gb"] / 2, abs=1e-3)
    # a 4-bit model is loaded whole on each device before FSDP shards it
    assert estimate_training_memory(p, quantization="4bit", world_size=2, **kw)["weights_gb"] \
        == qlora["weights_gb"]
