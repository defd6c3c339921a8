"""How training computes: the dtype on each kind of hardware, fp16 loss scaling, 4-bit counts."""
from __future__ import annotations

import json

import pytest

import llama_train
from helpers import make_records, write_jsonl
from llama_sft.config.hardware import choose_dtype, detect_hardware
from llama_sft.train.callbacks import TrainerCallback
from llama_sft.train.precision import choose_precision


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU as torch would report it (there is none here): ``native`` says whether it
    computes bf16 natively (Ampere and newer) or only by emulation (T4, V100)."""
    import torch

    def install(native: bool):
        props = type("Props", (), {"name": "Fake GPU", "total_memory": 16e9, "major": 8 if native
                                   else 7, "minor": 0})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native or including_emulation)
    return install


@pytest.mark.parametrize("native", [True, False])
def test_emulated_bf16_gpus_get_fp16_with_loss_scaling(fake_gpu, native):
    import torch

    fake_gpu(native)
    expected = torch.bfloat16 if native else torch.float16
    assert choose_dtype("auto") == expected
    assert detect_hardware()["bf16"] is native
    precision = choose_precision("auto", "lora", "cuda")
    assert (precision.weights, precision.autocast, precision.loss_scaling) == \
        (expected, expected, not native)
    full = choose_precision("auto", "full", "cuda")          # fp32 master weights, 16-bit compute
    assert (full.weights, full.autocast) == (torch.float32, expected)


def test_cpu_precision_is_what_the_cpu_kernels_were_measured_with():
    import torch

    assert choose_precision("auto", "lora", "cpu") == choose_precision("bfloat16", "lora", "cpu")
    cpu = choose_precision("auto", "lora", "cpu")
    assert (cpu.weights, cpu.autocast, cpu.loss_scaling) == (torch.bfloat16, None, False)
    fp16 = choose_precision("float16", "lora", "cpu")
    assert (fp16.weights, fp16.autocast, fp16.loss_scaling) == (torch.float16, torch.float16, True)


class Overflow(TrainerCallback):
    """Makes one LoRA gradient infinite in ``step``'s backward (as an fp16 overflow would)."""

    def __init__(self, step: int):
        self.step, self.hooked = step, False

    def on_train_begin(self, trainer, resumed):
        _, param = trainer.trainable[0]

        def hook(grad):
            if trainer.state["step"] + 1 == self.step and not self.hooked:
                self.hooked = True
                return grad * float("inf")
            return grad
        param.register_hook(hook)


def _run(tiny_model_dir, data, out, dtype: str, callbacks=()):
    from llama_sft.config.flags import config_from_args
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.train.build import build_trainer

    args = llama_train.build_parser().parse_args([
        "--base-model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out),
        "--dtype", dtype, "--batch-size", "4", "--learning-rate", "5e-3", "--lora-dropout", "0",
        "--max-steps", "4", "--report-to", "none", "--no-progress"])
    trainer = build_trainer(config_from_args(args), out, train_records=read_sft_jsonl(data),
                            eval_records=[], sample_records=[], progress=False,
                            callbacks=callbacks)
    trainer.run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp16_overflow_is_skipped_the_scale_backs_off_and_clipping_sees_true_gradients(
        tiny_model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "sft_dataset.jsonl", make_records(32))
    fp16 = _run(tiny_model_dir, data, tmp_path / "fp16", "float16", [Overflow(step=2)])
    fp32 = _run(tiny_model_dir, data, tmp_path / "fp32", "float32")
    assert "fp16 gradients overflowed, step skipped" in capfd.readouterr().err
    assert [r["step"] for r in fp16] == [1, 2, 3, 4]          # the run went on to the end
    assert all(r["bad_steps"] == 0 for r in fp16)            # an overflow is not divergence
    scales = [r["loss_scale"] for r in fp16]
    assert scales[1] == scales[0] / 2                        # backed off after the overflow
    assert "loss_scale" not in fp32[0]
    # the norm is of the unscaled gradients (scaled ones would be 65,536 times larger)
    assert fp16[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=0.05)
    assert fp16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.01)


def test_four_bit_weights_count_their_parameters(tiny_model_dir):
    """A 4-bit model counts as many parameters as the same model in full precision."""
    from llama_sft.model.loading import count_parameters, load_base_model

    full = count_parameters(load_base_model(str(tiny_model_dir), dtype="float32"))[1]
    four_bit = load_base_model(str(tiny_model_dir), dtype="bfloat16", quantization="4bit")
    assert any(type(p).__name__ == "Params4bit" for p in four_bit.parameters())
    assert count_parameters(four_bit)[1] == full
