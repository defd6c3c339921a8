"""llama_train.py end to end on the tiny LLaMA: methods, files, resume, early stopping, signals."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import llama_train
from helpers import ROOT, make_records, write_jsonl
from llama_sft.config.flags import config_from_args
from llama_sft.train.checkpoint import CHECKPOINT_FILES
from llama_sft.train.trainer import Trainer

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
    from llama_sft.train.checkpoint import find_resume_checkpoint

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
    cfg = config_from_args(args)
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

    real = Trainer.forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, num_items):
        calls["n"] += 1
        loss = real(self, batch, num_items)
        return loss * float("nan") if calls["n"] in (2,) or calls["n"] > 4 else loss

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)
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

    from llama_sft.data.collate import collate
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.tokenize import encode_records
    from llama_sft.model.loading import load_base_model, load_tokenizer
    from llama_sft.train.loss import supervised_loss

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

    from llama_sft.data.collate import collate
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.tokenize import encode_records
    from llama_sft.model.loading import load_base_model, load_tokenizer
    from llama_sft.train.loss import supervised_loss

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


def test_callbacks_hear_every_step_evaluation_and_checkpoint(tiny_model_dir, data, tmp_path):
    """A TrainerCallback gets the run's events in order: the rows it is given are the rows of
    metrics.jsonl, each checkpoint once it is complete, and the end once."""
    from llama_sft.config.settings import resolve_config
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.train.build import build_trainer
    from llama_sft.train.callbacks import TrainerCallback

    class Events(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_train_begin(self, trainer, resumed):
            self.seen.append(("begin", resumed))

        def on_step_end(self, trainer, row, stats):
            assert stats["tokens"] > 0 and stats["supervised_tokens"] > 0
            self.seen.append(("step", row))

        def on_evaluate(self, trainer, row):
            self.seen.append(("eval", row))

        def on_checkpoint(self, trainer, path):
            assert (path / "trainer_state.json").is_file()
            self.seen.append(("checkpoint", path.name))

        def on_train_end(self, trainer):
            self.seen.append(("end", None))

    cfg = resolve_config("135m", overrides={
        "base_model": str(tiny_model_dir), "dtype": "float32", "max_steps": 4, "eval_steps": 2,
        "save_steps": 2, "batch_size": 4, "learning_rate": 5e-3})
    records = read_sft_jsonl(data["sft"])
    events = Events()
    trainer = build_trainer(cfg, tmp_path / "run", train_records=records[:48],
                            eval_records=records[48:], sample_records=[], progress=False,
                            callbacks=[events])
    trainer.run()
    kinds = [kind for kind, _ in events.seen]
    assert kinds == ["begin", "eval", "step", "step", "eval", "checkpoint", "step", "step",
                     "eval", "end"]
    assert events.seen[0] == ("begin", False) and events.seen[5] == ("checkpoint", "checkpoint-2")
    rows = [row for kind, row in events.seen if kind in ("step", "eval")]
    assert rows == metrics_rows(tmp_path / "run")


def test_every_setting_has_a_training_flag():
    """The training flags are made from the run-config fields: each setting has one (but the
    quantization, set by --use-4bit/--use-8bit), typed, with the field's choices."""
    from llama_sft.config.settings import SECTIONS

    parser = llama_train.build_parser()
    flags = {a.dest: a for a in parser._actions}
    fields = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    for f in fields:
        if f.name == "quantization":
            assert f.name not in flags
            continue
        assert f.name in flags and flags[f.name].default is None, f.name
        assert f.metadata["help"] in flags[f.name].help
        if f.metadata.get("choices"):
            assert tuple(flags[f.name].choices) == f.metadata["choices"]
    args = parser.parse_args(["--dataset", "d.jsonl", "--output-dir", "o", "--lr-scheduler",
                              "linear", "--kernels", "none", "--no-packing",
                              "--max-grad-norm", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.optim.lr_scheduler, cfg.model.kernels, cfg.data.packing, cfg.optim.max_grad_norm) \
        == ("linear", (), False, 0.5)
