"""llama_train.py under ``accelerate launch`` with 2 CPU processes (gloo), against 1 process.

The 2-process runs use the real config files in configs/accelerate/ and the real training loop;
1 process with --batch-size 2B and 2 processes with --batch-size B see the same examples per
optimizer step, so in fp32 their loss curves and adapters agree to rounding.

accelerate enables FSDP only for GPU-type process groups, while torch's FSDP2 (fully_shard) runs
on gloo too. Launched as a script, this file switches accelerate's state from MULTI_CPU to FSDP
(with the plugin accelerate launch built from fsdp.yaml) before calling llama_train.main, so the
FSDP2 path of the trainer (sharded DTensor parameters, gathered saves) runs on CPU. That switch is
the only thing here that differs from a GPU launch.

DeepSpeed ZeRO-3 needs no switch: deepspeed_zero3.yaml launches llama_train.py itself, with
DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and without ACCELERATE_USE_CPU, which would turn
DeepSpeed off; the trainer then joins a gloo group. These tests skip when deepspeed is not
installed (`make setup` installs it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, make_records, write_jsonl

CONFIGS = ROOT / "configs" / "accelerate"
COMMON = ("--report-to", "none", "--no-progress", "--dtype", "float32", "--max-steps", "4",
          "--eval-steps", "2", "--save-steps", "2", "--learning-rate", "5e-3",
          "--lora-dropout", "0", "--gradient-accumulation-steps", "2")
PER_DEVICE = 2          # 2 processes x 2 examples x 2 micro-steps = 8 examples per step
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (make setup installs deepspeed==0.19.8)")
RUN_FILES = {"checkpoint-2", "final_model", "loss_curve.png", "manifest.json", "metrics.jsonl",
             "metrics_summary.json", "training_config.json"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, *args: str, timeout: int = 600, log: Path | None = None,
           env_extra: dict[str, str] | None = None):
    """accelerate launch --config_file configs/accelerate/<config> with 2 CPU processes; with
    ``log``, started in the background with its stderr going to that file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", **(env_extra or {})}
    if config.startswith("deepspeed"):     # llama_train.py as a user runs it, DeepSpeed on CPU
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("ACCELERATE_USE_CPU", None)
        script = ROOT / "llama_train.py"
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        script = Path(__file__)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIGS / config), "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), str(script), *args]
    if log is not None:
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh,
                                    start_new_session=True)   # killable as one group
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert (a[key].float() - b[key].float()).abs().max().item() <= atol, key


def assert_matches_reference(out: Path, ref: Path, world_size: int = 2) -> None:
    """Same files, loss curve, eval losses, adapter format and values as the 1-process run."""
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert {p.name for p in (out / "final_model").iterdir()} == \
        {p.name for p in (ref / "final_model").iterdir()}
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    rows, ref_rows = metrics_rows(out), metrics_rows(ref)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ref_losses = [(r["step"], r["loss"]) for r in ref_rows if "loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [1, 2, 3, 4]  # one writer
    assert [v for _, v in losses] == pytest.approx([v for _, v in ref_losses], rel=1e-4)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    ref_evals = [(r["step"], r["eval_loss"]) for r in ref_rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [s for s, _ in ref_evals] == [0, 2, 4]
    assert [v for _, v in evals] == pytest.approx([v for _, v in ref_evals], rel=1e-4)
    summary = json.loads((out / "metrics_summary.json").read_text())
    ref_summary = json.loads((ref / "metrics_summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"]) == (world_size, 8)
    assert (ref_summary["world_size"], ref_summary["global_batch"]) == (1, 8)
    assert summary["tokens_seen"] == ref_summary["tokens_seen"]
    adapter, ref_adapter = (load_weights(d / "final_model" / "adapter_model.safetensors")
                            for d in (out, ref))
    assert adapter and all(".lora_" in k for k in adapter)
    assert_close(adapter, ref_adapter, atol=1e-4)
    cfg, ref_cfg = (json.loads((d / "final_model" / "adapter_config.json").read_text())
                    for d in (out, ref))
    for c in (cfg, ref_cfg):            # PEFT keeps target_modules as a set: order varies
        c["target_modules"] = sorted(c["target_modules"])
    assert cfg == ref_cfg

    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == world_size and state["step"] == 2
    assert set(load_weights(ckpt / "rng.safetensors")) == {"torch", "torch_rank0", "torch_rank1"}
    assert_close(load_weights(ckpt / "optimizer.safetensors"),
                 load_weights(ref / "checkpoint-2" / "optimizer.safetensors"), atol=1e-4)
    assert_close(load_weights(ckpt / "weights.safetensors"),
                 load_weights(ref / "checkpoint-2" / "weights.safetensors"), atol=1e-4)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out / "final_model")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".lora_" in k}
    assert_close(loaded, adapter, atol=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-data")
    # 5 eval examples: 3 on rank 0, 2 on rank 1, so FSDP's padded evaluation round runs.
    sft = write_jsonl(d / "sft_dataset.jsonl", make_records(32) + make_records(5, "val", 100))
    config = d / "config.json"
    config.write_text(json.dumps({"num_eval_samples": 2, "max_new_tokens": 8}))
    return {"sft": sft, "config": config}


def run_args(tiny_model_dir, data, out, batch_size, *extra) -> list[str]:
    return ["--base-model", str(tiny_model_dir), "--dataset", str(data["sft"]),
            "--config", str(data["config"]), "--output-dir", str(out),
            "--batch-size", str(batch_size), *COMMON, *map(str, extra)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """1 process, per-device batch 4: the same 8 examples per step as 2 x 2 x 2."""
    import llama_train

    out = tmp_path_factory.mktemp("dist") / "one"
    assert llama_train.main(run_args(tiny_model_dir, data, out, 2 * PER_DEVICE)) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "fsdp"
    proc = launch("fsdp.yaml", *run_args(tiny_model_dir, data, out, PER_DEVICE),
                  env_extra={"PLACEMENT_LOG": str(out.parent / "placement.jsonl")})
    return out, proc.stderr


def test_fsdp_processes_but_the_main_one_never_hold_the_whole_model(fsdp_run):
    """cpu_ram_efficient_loading (fsdp.yaml): only the main process loads the weights; the
    others build the model on the meta device and get their shards from it."""
    out, _ = fsdp_run
    rows = [json.loads(line) for line in (out.parent / "placement.jsonl").read_text().splitlines()]
    assert {row["rank"]: row["devices"] for row in rows} == {0: ["cpu"], 1: ["meta"]}


def test_fsdp_two_processes_match_one_process(reference, fsdp_run):
    out, log = fsdp_run
    sharded = re.search(r"distributed: FSDP over 2 processes \(gloo\); (\d+)/(\d+) parameter "
                        r"tensors sharded", log)
    assert sharded and sharded.group(1) == sharded.group(2), log[-3000:]
    assert log.count("global batch 2 (per device) x 2 (accumulation) x 2 (processes) = "
                     "8 examples") == 1
    assert_matches_reference(out, reference)


def test_resume_on_another_world_size_is_refused(tiny_model_dir, data, fsdp_run, tmp_path,
                                                 capsys):
    import llama_train

    out = tmp_path / "resume"
    out.mkdir()
    shutil.copytree(fsdp_run[0] / "checkpoint-2", out / "checkpoint-2")
    rc = llama_train.main(run_args(tiny_model_dir, data, out, PER_DEVICE, "--resume", "auto"))
    assert rc == 2
    assert "written with 2 processes, now 1" in capsys.readouterr().err
    assert not (out / "final_model").exists()


def test_processes_without_a_backend_are_refused(tiny_model_dir, data, tmp_path, capsys,
                                                 monkeypatch):
    """Several processes that each believe they are alone would race on one --output-dir."""
    import llama_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "alone"
    assert llama_train.main(run_args(tiny_model_dir, data, out, PER_DEVICE)) == 2
    assert "accelerate started no distributed backend" in capsys.readouterr().err
    assert not (out / "final_model").exists()


@pytest.mark.parametrize("kind,fsdp2,message", [
    ("FSDP", False, "FSDP version 1 is not supported"),
    ("MEGATRON_LM", False, "distributed type MEGATRON_LM is not supported"),
])
def test_unsupported_engines_are_refused_before_loading(kind, fsdp2, message):
    """FSDP1 and Megatron launches are not run here; their accelerator state is imitated."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llama_sft.errors import UsageError
    from llama_sft.train.distributed import check_distributed_setup

    fake = SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=fsdp2,
                           num_processes=2)
    with pytest.raises(UsageError, match=message):
        check_distributed_setup(fake)
    for ok in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        check_distributed_setup(SimpleNamespace(distributed_type=ok, is_fsdp2=True,
                                                num_processes=2))


def test_deepspeed_settings_that_contradict_the_run_are_refused():
    """The engine's accumulation and clipping come from the run config; a yaml or DeepSpeed JSON
    that says otherwise, another ZeRO stage, 4-bit weights or a config-file optimizer stop the
    launch before the model is loaded, all problems in one message."""
    from llama_sft.config.settings import resolve_config
    from llama_sft.train.distributed import deepspeed_config_problems, deepspeed_env_problems

    cfg = resolve_config(model_size="135m", overrides={"gradient_accumulation_steps": 2})
    assert deepspeed_env_problems(cfg, {}) == []
    assert deepspeed_env_problems(cfg, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
                                        "ACCELERATE_GRADIENT_CLIPPING": "1.0"}) == []
    env_problems = deepspeed_env_problems(cfg, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "16",
                                                "ACCELERATE_GRADIENT_CLIPPING": "0.5"})
    assert [p.split(":")[0] for p in env_problems] == ["gradient_accumulation_steps",
                                                       "gradient_clipping"]
    assert "16 in the accelerate config/flags, 2 in the run config" in env_problems[0]
    ok = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2,
          "gradient_clipping": 1.0, "train_batch_size": "auto"}
    assert deepspeed_config_problems(cfg, ok) == []
    bad = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4,
           "gradient_clipping": "auto", "optimizer": {"type": "AdamW"}}
    qlora = resolve_config(model_size="135m", overrides={"gradient_accumulation_steps": 2,
                                                         "quantization": "4bit"})
    problems = deepspeed_config_problems(qlora, bad)
    assert len(problems) == 4, problems
    assert "only ZeRO stage 3" in problems[0] and "fsdp_qlora.yaml" in problems[1]
    assert "gradient_accumulation_steps: 4 in the DeepSpeed config, 2" in problems[2]
    assert problems[3].startswith("the DeepSpeed config sets its optimizer; the trainer brings")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_model_dir, data, reference,
                                             tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "ddp"
    proc = launch("ddp.yaml", *run_args(tiny_model_dir, data, out, PER_DEVICE))
    assert "distributed: MULTI_CPU over 2 processes (gloo); 0/" in proc.stderr
    assert_matches_reference(out, reference)


@pytest.mark.slow
def test_fsdp_resume_reaches_the_uninterrupted_weights(tiny_model_dir, data, fsdp_run,
                                                       tmp_path):
    full = fsdp_run[0]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    launch("fsdp.yaml", *run_args(tiny_model_dir, data, out, PER_DEVICE, "--resume", "auto"))
    assert [r["step"] for r in metrics_rows(out) if "loss" in r] == [3, 4]
    assert_close(load_weights(out / "final_model" / "adapter_model.safetensors"),
                 load_weights(full / "final_model" / "adapter_model.safetensors"), atol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_all_ranks_at_one_step(tiny_model_dir, data, tmp_path):
    """Rank 1 alone gets SIGTERM; the ranks agree, write one complete checkpoint, exit 130."""
    import signal
    import time

    import psutil

    out, log = tmp_path / "sigterm", tmp_path / "sigterm.log"
    args = run_args(tiny_model_dir, data, out, PER_DEVICE, "--eval-steps", 1000,
                    "--save-steps", 1000)          # later flags win
    args[args.index("--max-steps") + 1] = "400"
    proc = launch("fsdp.yaml", *args, log=log)
    try:
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < 3:  # eval + 2 steps
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if c.environ().get("RANK") == "1"
                 and "test_distributed.py" in " ".join(c.cmdline())]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert "stopped by SIGTERM" in err and "stopped by a signal to another process" in err
    (ckpt,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    last = [r["step"] for r in metrics_rows(out) if "loss" in r][-1]
    assert state["step"] == last and state["world_size"] == 2 and 2 <= last < 400
    assert not (out / "final_model").exists()


@pytest.mark.slow
def test_fsdp_qlora_shards_the_4bit_weights(tiny_model_dir, data, reference, tmp_path):
    """fsdp_qlora.yaml on CPU: 4-bit weights stored as floats shard like any parameter.

    bitsandbytes' CPU kernels differ from the unsharded path by bf16 rounding, so this
    checks that training runs sharded and writes the same adapter format, not exact losses.
    """
    out = tmp_path / "fsdp_qlora"
    args = [a for a in run_args(tiny_model_dir, data, out, PER_DEVICE, "--use-4bit")
            if a not in ("--dtype", "float32")]
    proc = launch("fsdp_qlora.yaml", *args)
    sharded = re.search(r"FSDP over 2 processes \(gloo\); (\d+)/(\d+) parameter tensors "
                        r"sharded", proc.stderr)
    assert sharded and sharded.group(1) == sharded.group(2)
    cfg = json.loads((out / "final_model" / "training_config.json").read_text())
    assert (cfg["quantization"], cfg["method"]) == ("4bit", "qlora")
    adapter = load_weights(out / "final_model" / "adapter_model.safetensors")
    ref = load_weights(reference / "final_model" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in ref.items()}
    losses = [r["loss"] for r in metrics_rows(out) if "loss" in r]
    ref_losses = [r["loss"] for r in metrics_rows(reference) if "loss" in r]
    assert losses == pytest.approx(ref_losses, rel=0.01)  # 4-bit vs fp32 weights


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "zero3"
    proc = launch("deepspeed_zero3.yaml", *run_args(tiny_model_dir, data, out, PER_DEVICE))
    return out, proc.stderr


@needs_deepspeed
def test_zero3_two_processes_match_one_process(reference, zero3_run):
    """ZeRO-3 (partitioned parameters, engine-owned accumulation, clipping and AdamW step)
    against 1 process: same losses, eval losses, checkpoint and adapter as FSDP and DDP."""
    from llama_sft.model.loading import load_for_inference

    out, log = zero3_run
    sharded = re.search(r"distributed: DEEPSPEED over 2 processes \(gloo\); (\d+)/(\d+) "
                        r"parameter tensors sharded", log)
    assert sharded and sharded.group(1) == sharded.group(2), log[-3000:]
    assert "FutureWarning" not in log
    assert_matches_reference(out, reference)
    loaded = load_for_inference(out / "final_model", dtype="float32")
    lora = {k.replace(".default", ""): v for k, v in loaded.model.state_dict().items()
            if ".lora_" in k}
    assert_close(lora, load_weights(out / "final_model" / "adapter_model.safetensors"), atol=0.0)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_resume_reaches_the_uninterrupted_weights(tiny_model_dir, data, zero3_run,
                                                        tmp_path):
    """Weights into both partitioned copies, AdamW moments into ZeRO-3's flat partitions."""
    full = zero3_run[0]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    proc = launch("deepspeed_zero3.yaml",
                  *run_args(tiny_model_dir, data, out, PER_DEVICE, "--resume", "auto"))
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in metrics_rows(out) if "loss" in r] == [3, 4]
    assert [r["loss"] for r in metrics_rows(out) if "loss" in r] == \
        [r["loss"] for r in metrics_rows(full) if "loss" in r][2:]
    assert_close(load_weights(out / "final_model" / "adapter_model.safetensors"),
                 load_weights(full / "final_model" / "adapter_model.safetensors"), atol=1e-6)


def _enable_fsdp_on_cpu() -> None:
    """Switch accelerate from MULTI_CPU to FSDP when accelerate launch asked for FSDP."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _log_placement(path: str) -> None:
    """Record, per process, the devices of the base model's parameters as loaded."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        row = {"rank": int(os.environ["RANK"]),
               "devices": sorted({p.device.type for p in model.parameters()})}
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return model

    transformers.AutoModelForCausalLM.from_pretrained = spy


if __name__ == "__main__":      # a worker process started by launch()
    sys.path.insert(0, str(ROOT))
    _enable_fsdp_on_cpu()
    if os.environ.get("PLACEMENT_LOG"):
        _log_placement(os.environ["PLACEMENT_LOG"])
    import llama_train
    sys.exit(llama_train.main(sys.argv[1:]))
