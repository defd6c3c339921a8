"""llama_train.py end to end on the tiny LLaMA: methods, files, resume, early stopping, signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, make_records, write_jsonl

import llama_train
from llama_trainer import CHECKPOINT_FILES

FINAL_LORA_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                    "manifest.json", "metrics_summary.json", "prompt_format.json",
                    "tokenizer.json", "tokenizer_config.json", "training_config.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    sft = write_jsonl(d / "sft_dataset.jsonl", make_records(48) + make_records(8, "val", 100))
    train_only = write_jsonl(d / "train_only.jsonl", make_records(48))
    golden = write_jsonl(d / "golden_set.jsonl", make_records(4, "golden", 200))
    return {"sft": sft, "train_only": train_only, "golden": golden}


def train_args(tiny_model_dir, dataset, out, *extra):
    return ["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-dir", str(out),
            "--batch-size", "4", "--learning-rate", "5e-3", "--report-to", "none", "--no-progress",
            "--dtype", "float32", *map(str, extra)]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_end_to_end_files_and_plain_peft_load(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    rc = llama_train.main(train_args(tiny_model_dir, data["sft"], out, "--golden-set",
                                     data["golden"], "--max-steps", 4, "--eval-steps", 2,
                                     "--save-steps", 2))
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {
        "checkpoint-2", "final_model", "loss_curve.png", "manifest.json", "metrics.jsonl",
        "metrics_summary.json", "training_config.json"}
    final = out / "final_model"
    assert {p.name for p in final.iterdir()} == FINAL_LORA_FILES
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= set(CHECKPOINT_FILES)

    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_examples"] == 48
    assert summary["best_eval_loss"] < summary["first_eval_loss"]
    cfg = json.loads((final / "training_config.json").read_text())
    assert cfg["base_model"] == str(tiny_model_dir) and cfg["max_steps"] == 4

    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, final)
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and any("lora_A" in k for k in saved)
    assert model.active_adapter == "default"


@pytest.mark.parametrize("flag,method", [("--use-4bit", "qlora"), ("--use-8bit", "lora")])
def test_quantized_training_runs_on_cpu(tiny_model_dir, data, tmp_path, flag, method):
    out = tmp_path / "q"
    args = train_args(tiny_model_dir, data["sft"], out, "--max-steps", 2, "--eval-steps", 2, flag)
    args.remove("--dtype"), args.remove("float32")
    assert llama_train.main(args) == 0
    cfg = json.loads((out / "final_model" / "training_config.json").read_text())
    assert cfg["quantization"] == flag[6:] and cfg["method"] == method
    assert (out / "final_model" / "adapter_model.safetensors").exists()


def test_full_finetune_writes_full_weights(tiny_model_dir, data, tmp_path):
    out = tmp_path / "full"
    assert llama_train.main(train_args(tiny_model_dir, data["sft"], out, "--max-steps", 2,
                                       "--method", "full", "--eval-steps", 2)) == 0
    names = {p.name for p in (out / "final_model").iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names


def test_resume_reaches_same_weights_as_uninterrupted(tiny_model_dir, data, tmp_path):
    common = ("--max-steps", 6, "--save-steps", 3, "--lora-dropout", 0.1)
    full = tmp_path / "full"
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], full, *common)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.rename(full / "checkpoint-3", resumed / "checkpoint-3")
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], resumed, *common,
                                       "--resume", "auto")) == 0
    a = load_file(full / "final_model" / "adapter_model.safetensors")
    b = load_file(resumed / "final_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert [r["step"] for r in metrics_rows(resumed)] == [4, 5, 6]


def test_resume_refuses_incomplete_state_and_changed_settings(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ("--max-steps", 4, "--save-steps", 2)
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], out, *base)) == 0
    ckpt = out / "checkpoint-2"
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], out, "--max-steps", 4,
                                       "--learning-rate", "1e-3", "--resume", str(ckpt))) == 2
    assert "learning_rate" in capsys.readouterr().err
    (ckpt / "optimizer.safetensors").unlink()
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], out, *base,
                                       "--resume", "auto")) == 2
    assert "missing optimizer.safetensors" in capsys.readouterr().err


def test_incomplete_checkpoint_is_never_used(tiny_model_dir, data, tmp_path):
    from llama_trainer import find_resume_checkpoint

    out = tmp_path / "run"
    assert llama_train.main(train_args(tiny_model_dir, data["train_only"], out, "--max-steps", 4,
                                       "--save-steps", 2)) == 0
    (out / ".checkpoint-3.tmp").mkdir()               # a crash mid-write
    (out / "checkpoint-5").mkdir()                    # a directory without its state file
    assert find_resume_checkpoint(out, "auto") == out / "checkpoint-2"


def test_early_stopping_keeps_best_weights(tiny_model_dir, data, tmp_path):
    out = tmp_path / "es"
    # A huge learning rate makes eval loss rise after the first evaluation.
    rc = llama_train.main(train_args(tiny_model_dir, data["sft"], out, "--max-steps", 30,
                                     "--eval-steps", 1, "--early-stopping-patience", 2,
                                     "--learning-rate", 3.0, "--warmup-steps", 0))
    assert rc == 0
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < 30
    evals = [r for r in metrics_rows(out) if "eval_loss" in r and r["step"] > 0]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["weights_from_step"] == best["step"]


def test_config_precedence_preset_file_flags(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"max_length": 256, "eval_steps": 7, "lora_r": 8}))
    args = llama_train.build_parser().parse_args(
        ["--dataset", "x", "--output-dir", "o", "--model-size", "7b", "--config", str(cfg_file),
         "--lora-r", "4", "--use-4bit"])
    cfg = llama_train.config_from_args(args)
    assert cfg.data.max_length == 256 and cfg.eval.eval_steps == 7       # file over preset
    assert cfg.lora.lora_r == 4                                          # flag over file
    assert cfg.lora.lora_alpha == 32 and cfg.optim.learning_rate == 2e-5  # preset
    assert cfg.model.quantization == "4bit" and cfg.model.method == "qlora"


@pytest.mark.parametrize("content,needle", [
    ({"learning_rat": 1e-4}, "learning_rat"),
    ({"lora_r": "eight"}, "lora_r"),
    ({"packing": 1}, "packing"),
    ([1, 2], "JSON object"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, data, capsys, content, needle):
    cfg_file = tmp_path / "bad.json"
    cfg_file.write_text(json.dumps(content))
    rc = llama_train.main(["--dataset", str(data["sft"]), "--output-dir", str(tmp_path / "o"),
                           "--config", str(cfg_file)])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_nan_steps_are_skipped_then_abort_without_checkpoint(tiny_model_dir, data, tmp_path,
                                                            monkeypatch):
    import torch

    import llama_trainer

    real = llama_trainer.Trainer.forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, num_items):
        calls["n"] += 1
        loss = real(self, batch, num_items)
        return loss * float("nan") if calls["n"] in (2,) or calls["n"] > 4 else loss

    monkeypatch.setattr(llama_trainer.Trainer, "forward_loss", poisoned)
    out = tmp_path / "nan"
    rc = llama_train.main(train_args(tiny_model_dir, data["train_only"], out, "--max-steps", 20,
                                     "--save-steps", 100))
    assert rc == 1
    rows = metrics_rows(out)
    assert rows[0]["step"] == 1 and rows[-1]["bad_steps"] == 1   # one skipped, then continued
    assert not list(out.glob("checkpoint-*")) and not (out / "final_model").exists()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_sigterm_writes_complete_checkpoint_then_resume(tiny_model_dir, data, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, str(ROOT / "llama_train.py"),
           *train_args(tiny_model_dir, data["train_only"], out, "--max-steps", 400,
                       "--save-steps", 1000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and {p.name for p in ckpts[0].iterdir()} >= set(CHECKPOINT_FILES)
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == int(ckpts[0].name.split("-")[1]) >= 2
    assert "--resume auto" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("packing", [True, False])
def test_supervised_loss_equals_full_logits_loss(tiny_model_dir, packing):
    """Logits only at supervised positions give the same loss as transformers' own."""
    import torch

    from llama_dataset import PromptFormat, collate, encode_records
    from llama_model import load_base_model, load_tokenizer
    from llama_trainer import supervised_loss

    model = load_base_model(str(tiny_model_dir), dtype="float32")
    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = encode_records(tok, PromptFormat.for_tokenizer(tok), make_records(5), 256)
    n = sum(e.num_supervised for e in examples)
    batch = collate(examples, tok.pad_token_id, packing)
    with torch.no_grad():
        reference = model(**batch, use_cache=False).loss
        ours = supervised_loss(model, batch, n)
    assert abs(float(reference) - float(ours)) < 1e-5


def test_qlora_gradients_match_the_dequantized_model(tiny_model_dir):
    """Backward through bitsandbytes' CPU 4-bit path gives the LoRA gradients of the same model
    with the dequantized weights in fp32 (so QLoRA on CPU trains what it claims to)."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model

    from llama_dataset import PromptFormat, collate, encode_records
    from llama_model import load_base_model, load_tokenizer
    from llama_trainer import supervised_loss

    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = encode_records(tok, PromptFormat.for_tokenizer(tok), make_records(4), 256)
    batch = collate(examples, tok.pad_token_id, True)
    n = sum(e.num_supervised for e in examples)
    quantized = load_base_model(str(tiny_model_dir), dtype="float32", quantization="4bit")
    reference = load_base_model(str(tiny_model_dir), dtype="float32")
    qmods = dict(quantized.named_modules())
    for name, module in reference.named_modules():
        weight = getattr(qmods.get(name), "weight", None)
        if hasattr(weight, "quant_state"):
            module.weight.data = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, lora_dropout=0.0)
    grads = []
    for model in (quantized, reference):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora)
        supervised_loss(peft_model, batch, n).backward()
        grads.append({k: p.grad for k, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for key, ref in grads[1].items():
        assert (grads[0][key] - ref).abs().max() <= 0.02 * ref.abs().max(), key


def test_gpu_preset_on_cpu_is_refused_before_loading(data, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "7b"
    rc = llama_train.main(["--model-size", "7b", "--dataset", str(data["sft"]), "--output-dir",
                           str(out), "--use-4bit", "--use-wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA GPU with 16 GB" in err and err.count("\n") == 1
    assert not out.exists()



FAULTS_SCRIPT = """
import resource, sys
import torch
import llama_model
if sys.argv[1] == "retain":
    assert llama_model.retain_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for mib in (8, 12, 16, 20, 24):          # growing buffers, each written and freed
    before = faults()
    buffer = torch.ones(mib << 18)
    del buffer
    counts.append(faults() - before)
print(sum(counts[1:]))
"""


def test_retained_memory_is_reused_without_page_faults():
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")

    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, check=True,
                              capture_output=True, text=True)
        return int(proc.stdout.split()[-1])

    default, retained = faults("default"), faults("retain")
    # By default each buffer is mapped fresh from the kernel, every page faulted in (4,096 faults
    # for 16 MiB); retained, freed memory is reused and only the growth faults in.
    assert default > 12000
    assert retained < 0.6 * default

def test_lora_dropout_is_swapped_and_is_inverted_dropout(tiny_model_dir):
    """attach_lora swaps every LoRA input dropout for MaskDropout, which drops with probability p,
    scales the kept values by 1/(1-p), follows torch's seed, passes gradients through the mask
    only, and is the identity in eval mode."""
    import torch

    from llama_config import LoraSettings
    from llama_model import attach_lora, load_base_model, mask_dropout_class

    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="float32"),
                        LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1),
                        quantized=False, gradient_checkpointing=False)
    MaskDropout = mask_dropout_class()
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.lora_dropout["default"], MaskDropout)
                               for m in lora_layers)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())

    drop = MaskDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.003                      # 1e6 draws: sd of the rate is 3e-4
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                 # d(sum y)/dx = mask * scale
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert not torch.equal(drop(x), y)                     # the next call draws a new mask
    assert drop.eval()(x) is x
    # p = 1/512: decided by the low byte alone (8-bit draws would drop none or twice as many)
    with torch.no_grad():
        dropped = int((MaskDropout(1 / 512).train()(x) == 0).sum())
    assert abs(dropped - 1953) < 200                       # 1e6 * p, sd 44


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("outs", [(4,), (4, 2, 3)])
def test_fused_lora_function_gradients_are_exact(with_bias, with_mask, outs):
    """llama_model's fused LoRA linear, for one linear and for three sharing their input:
    forward is x W_i^T + b_i + s_i((m_i*x)(d_i A_i)^T)B_i^T side by side, and torch's
    finite-difference check accepts its backward for the input and every adapter matrix."""
    import torch

    from llama_model import lora_linear_function

    fn = lora_linear_function()
    gen = torch.Generator().manual_seed(0)
    n = len(outs)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    a = [torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in outs]
    b = [torch.randn(o, 3, dtype=torch.float64, generator=gen, requires_grad=True) for o in outs]
    weight = torch.randn(sum(outs), 5, dtype=torch.float64, generator=gen)
    bias = torch.randn(sum(outs), dtype=torch.float64, generator=gen) if with_bias else None
    masks = [(torch.rand(7, 5, generator=gen) > 0.3).double() if with_mask else None
             for _ in outs]
    scales = tuple(((1.25 + i) if with_mask else 1.0, 2.0 - 0.5 * i) for i in range(n))
    out = fn.apply(x, weight, bias, scales, *a, *b, *masks)
    expected = x @ weight.T + (0 if bias is None else bias)
    adapters = [s * ((x if m is None else x * m) @ (d * ai).T) @ bi.T
                for (d, s), ai, bi, m in zip(scales, a, b, masks)]
    assert torch.allclose(out, expected + torch.cat(adapters, dim=1), atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, *ab: fn.apply(x, weight, bias, scales, *ab, *masks), (x, *a, *b))


def _lora_grads(model, batch, seed):
    import torch

    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {k: p.grad.float().clone() for k, p in model.named_parameters()
                         if p.requires_grad}


def _set_lora_forward(model, fused: bool) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    from llama_model import fused_lora_class

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__class__ = fused_lora_class() if fused else LoraLinear


def test_fused_lora_forward_matches_peft(tiny_model_dir, monkeypatch):
    """attach_lora gives every LoRA linear the fused forward, q/k/v and gate/up computed
    together. In fp32 it reproduces peft's own forward, dropout masks included (same seed, same
    loss and gradients); in bf16 its error against the fp32 result is of the size of peft's own
    bf16 error. Small inputs, disabled adapters, merged weights and autocast go through peft's
    forward."""
    import torch

    import llama_model
    from llama_config import LoraSettings
    from llama_model import attach_lora, fused_lora_class, load_base_model

    grouped = []
    group_forward = llama_model.LoraSiblings.forward

    def counted(self, x, adapter):
        out = group_forward(self, x, adapter)
        if out is not None:
            grouped.append(len(self.modules))
        return out

    monkeypatch.setattr(llama_model.LoraSiblings, "forward", counted)

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # 1024 tokens: every LoRA input (width 64 or 128) reaches the fused path's MIN_NUMEL
    ids = torch.randint(0, 500, (2, 512), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = attach_lora(load_base_model(str(tiny_model_dir), dtype=dtype),
                            LoraSettings(lora_r=8, lora_alpha=16, lora_dropout=0.1,
                                         lora_target_modules=targets),
                            quantized=False, gradient_checkpointing=False)
        if dtype == "float32":
            assert sum(type(m) is fused_lora_class() for m in model.modules()) == 14
            attn = model.base_model.model.model.layers[0].self_attn
            siblings = attn.q_proj.lora_siblings
            assert siblings is attn.v_proj.lora_siblings
            assert siblings.stacked_weight().shape[0] == sum(
                getattr(attn, n).out_features for n in ("q_proj", "k_proj", "v_proj"))
            moved = attn.k_proj.base_layer.weight                 # a weight replaced elsewhere
            attn.k_proj.base_layer.weight = torch.nn.Parameter(moved.clone(), requires_grad=False)
            assert siblings.stacked_weight() is None
            attn.k_proj.base_layer.weight = moved
            assert torch.equal(attn.k_proj.base_layer.weight, load_base_model(
                str(tiny_model_dir), dtype=dtype).model.layers[0].self_attn.k_proj.weight)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            gen = torch.Generator().manual_seed(2)
            state.update({k: torch.randn(v.shape, generator=gen) * 0.05
                          for k, v in state.items() if "lora_B" in k})
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        model.train()
        for fused in (True, False):
            _set_lora_forward(model, fused)
            grouped.clear()
            results[dtype, fused] = _lora_grads(model, batch, seed=5)
            # 2 layers x (q/k/v + gate/up) computed as groups when fused
            assert sorted(grouped) == ([2, 2, 3, 3] if fused else [])
        if dtype == "float32":
            _set_lora_forward(model, True)
            layer = next(m for m in model.modules() if type(m) is fused_lora_class())
            x = torch.randn(layer.MIN_NUMEL // layer.in_features, layer.in_features)
            assert layer._fusable_adapter(x, (), {}) == "default"
            assert layer._fusable_adapter(x[:-1], (), {}) is None               # too small
            assert layer._fusable_adapter(x.bfloat16(), (), {}) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer._fusable_adapter(x, (), {}) is None
            model.eval()
            with torch.no_grad():
                fused_eval = model(**batch).logits
                with model.disable_adapter():
                    assert layer._fusable_adapter(x, (), {}) is None
                    base = model(**batch).logits
                assert not torch.allclose(fused_eval, base, atol=1e-3)     # the adapter is live
                model.merge_adapter()
                assert layer._fusable_adapter(x, (), {}) is None
                assert torch.allclose(model(**batch).logits, fused_eval, atol=1e-4)

    def rel(grads, ref):
        return max(float((grads[k] - ref[k]).norm() / ref[k].norm()) for k in ref)

    (loss_f, grads_f), (loss_p, grads_p) = results["float32", True], results["float32", False]
    assert loss_f == pytest.approx(loss_p, rel=1e-6) and rel(grads_f, grads_p) < 1e-5
    fused_err = rel(results["bfloat16", True][1], grads_p)
    peft_err = rel(results["bfloat16", False][1], grads_p)
    assert fused_err < 2 * peft_err + 0.01, (fused_err, peft_err)


def test_packed_attention_matches_the_masked_sdpa_path(tiny_model_dir):
    """Per-example attention on a packed row (llama_model.packed_attention, given the collate's
    cu_seq_lens) gives the loss and gradients of transformers' SDPA with the block-diagonal mask,
    and falls back to that SDPA when no boundaries are passed."""
    import torch

    from llama_dataset import PromptFormat, encode_records, pack_collate
    from llama_model import load_base_model, load_tokenizer, packed_attention
    from llama_trainer import supervised_loss

    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = encode_records(tok, PromptFormat.for_tokenizer(tok), make_records(6), 256)
    batch = pack_collate(examples)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    n = sum(e.num_supervised for e in examples)
    results = {}
    for impl in ("sdpa", packed_attention()):
        model = load_base_model(str(tiny_model_dir), dtype="float32", attn_implementation=impl)
        assert model.config._attn_implementation == impl
        loss = supervised_loss(model, batch, n)
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        with torch.no_grad():
            plain = {k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")}
            fallback = supervised_loss(model, plain, n)
        results[impl] = (loss.item(), grad, fallback.item())
    (loss_a, grad_a, fb_a), (loss_b, grad_b, fb_b) = results.values()
    assert abs(loss_a - loss_b) < 1e-5 and abs(fb_a - fb_b) < 1e-6
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fast_rms_norm_is_transformers_norm_bit_for_bit(dtype):
    """FastRMSNorm (fast_rms_norms swaps it in for every LlamaRMSNorm) gives transformers' outputs
    and gradients, for the input and the weight, bit for bit."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llama_model import fast_rms_norms

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype)
    x = (torch.randn(3, 50, 96, generator=gen) * 4 + 1).to(dtype)
    grad_out = torch.randn(3, 50, 96, generator=gen).to(dtype)
    results = []
    for fast in (False, True):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
        holder = torch.nn.Sequential(norm)
        if fast:
            assert fast_rms_norms(holder) == 1 and type(norm) is not LlamaRMSNorm
        inp = x.clone().requires_grad_()
        out = holder(inp)
        out.backward(grad_out)
        results.append((out, inp.grad, norm.weight.grad))
    for plain, fast in zip(*results):
        assert fast.dtype == plain.dtype and torch.equal(fast, plain)
