"""Reliability and security across stages: bad input lines, kills, crashes mid-write, full disks,
NaN steps, hostile adapter directories and packages, and tokens that must never leak.

docs/reliability.md maps each promise to the test that proves it (here or in a stage's test file).
Everything runs on the tiny LLaMA on CPU; a training run here is 2-6 steps.
"""
from __future__ import annotations

import ast
import errno
import io
import json
import os
import random
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import llama_chat
import llama_evaluate
import llama_package
import llama_pilot
import llama_train
import pipeline_sft_prep
from helpers import ROOT, make_records, write_jsonl
from llama_sft.errors import EXIT_DATA, EXIT_GATE, EXIT_IO, EXIT_OK, EXIT_USAGE
from llama_sft.files import read_json, sha256_file, write_manifest
from llama_sft.package.build import build_package
from llama_sft.train.checkpoint import (CHECKPOINT_FILES, STATE_FILE, find_resume_checkpoint,
                                        list_checkpoints)
from llama_sft.train.trainer import Trainer

# One training setup for every run below: LoRA dropout > 0, so the RNG state matters on resume.
RUN = ["--batch-size", "4", "--learning-rate", "5e-3", "--report-to", "none", "--no-progress",
       "--dtype", "float32", "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj",
       "--lora-dropout", "0.1", "--seed", "11", "--max-steps", "6", "--save-steps", "2"]
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs compared bit for bit must use one thread count (subprocesses get OMP_NUM_THREADS=1);
    one thread is also what keeps these runs fast on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft_dataset.jsonl", make_records(48))


def train_argv(tiny_model_dir, dataset, out, *extra) -> list[str]:
    return ["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-dir",
            str(out), *RUN, *map(str, extra)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoint-2, checkpoint-4, final_model/ after step 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert llama_train.main(train_argv(tiny_model_dir, dataset, out)) == EXIT_OK
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def adapter_weights(out: Path) -> dict:
    return load_file(out / "final_model" / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= tol, key


def tree_hashes(*dirs: Path) -> dict[str, str]:
    return {f"{d.name}/{p.relative_to(d)}": sha256_file(p)
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) >= 1
    return lines[-1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(wrapper: str, argv: list[str], log: Path) -> subprocess.Popen:
    """``llama_train.main(argv)`` in a child process, after ``wrapper`` (test-only patches)."""
    code = f"{wrapper}\nimport llama_train\nsys.exit(llama_train.main(sys.argv[1:]))\n"
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT,
                                env=subprocess_env(), stdout=fh, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------------------------------------
# 1, 2. A damaged line in a pipeline file stops every reader: file:line (+ byte offset), exit 65

GOOD_LINE = json.dumps(make_records(1)[0]).encode()


def _truncated(lines: list[bytes]) -> tuple[bytes, str]:
    return GOOD_LINE[: len(GOOD_LINE) // 2], "not valid JSON"


def _latin1(lines: list[bytes]) -> tuple[bytes, str]:
    bad = json.dumps({"instruction": "Translate caf\u00e9", "response": "coffee"},
                     ensure_ascii=False).encode("latin-1")
    in_line = bad.index(b"\xe9")
    offset = sum(len(line) + 1 for line in lines) + in_line
    return bad, f"not UTF-8 at byte offset {offset} (byte {in_line} of the line)"


@pytest.mark.parametrize("damage", [_truncated, _latin1], ids=["truncated", "not-utf8"])
def test_damaged_line_stops_train_pilot_and_evaluate(tiny_model_dir, tiny_adapter_dir, tmp_path,
                                                     capsys, damage):
    good = [json.dumps(r).encode() for r in make_records(6)]
    bad, message = damage(good)
    data = tmp_path / "sft_dataset.jsonl"
    data.write_bytes(b"\n".join(good + [bad]) + b"\n")         # the bad line is line 7
    golden = tmp_path / "golden_set.jsonl"
    golden_good = good[:2]
    golden.write_bytes(b"\n".join(golden_good + [damage(golden_good)[0]]) + b"\n")  # line 3
    golden_message = damage(golden_good)[1]

    out = tmp_path / "train"
    assert llama_train.main(train_argv(tiny_model_dir, data, out)) == EXIT_DATA
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {data}:7: {message}"), err
    assert not out.exists()

    pilot = tmp_path / "pilot"
    assert llama_pilot.main(["--golden-set", str(golden), "--output-dir", str(pilot),
                             "--base-model", str(tiny_model_dir), "--max-steps", "2"]) == EXIT_DATA
    assert one_line(capsys.readouterr().err).startswith(f"error: {golden}:3: {golden_message}")
    assert not pilot.exists()

    report = tmp_path / "report.json"
    assert llama_evaluate.main(["--adapter-path", str(tiny_adapter_dir), "--dataset", str(golden),
                                "--output", str(report)]) == EXIT_DATA
    assert one_line(capsys.readouterr().err).startswith(f"error: {golden}:3: {golden_message}")
    assert not report.exists()


# ---------------------------------------------------------------------------------------------
# 4, 5. Empty and overlong examples in training: dropped or truncated, counted, never trained on
#       without supervised tokens

def test_empty_and_overlong_examples_are_dropped_or_truncated_and_counted(tiny_model_dir,
                                                                          tmp_path, monkeypatch):
    records = make_records(12)
    records += [dict(records[0], id="empty", response=""),
                dict(records[1], id="blank", response="  \n "),
                dict(records[2], id="long-prompt", context="word " * 300),
                dict(records[3], id="long-answer", response="word " * 300)]
    data = write_jsonl(tmp_path / "sft_dataset.jsonl", records)
    seen = []
    real = Trainer.train_step

    def recording(self, micro):
        seen.extend(e for mb in micro for e in mb)
        return real(self, micro)

    monkeypatch.setattr(Trainer, "train_step", recording)
    out = tmp_path / "run"
    assert llama_train.main(train_argv(tiny_model_dir, data, out, "--max-steps", 4,
                                       "--max-length", 128)) == EXIT_OK
    summary = read_json(out / "metrics_summary.json")
    assert summary["train_examples"] == 13
    assert summary["dropped_examples"] == {"train": 3, "eval": 0}   # empty, blank, long prompt
    assert summary["token_stats"]["truncated"] == 1
    assert summary["token_stats"]["max_length"] == 128
    assert len({tuple(e.input_ids) for e in seen}) == 13             # one epoch, every example
    assert min(e.num_supervised for e in seen) >= 1
    cut = [e for e in seen if e.truncated]
    assert len(cut) == 1 and len(cut[0]) == 128 and cut[0].num_supervised >= 8


# ---------------------------------------------------------------------------------------------
# 6. An empty or all-invalid dataset is "0 valid examples", exit 65, in training too

@pytest.mark.parametrize("content, message", [
    (b"", "0 valid examples in"),
    (b"\n\n", "0 valid examples in"),
    (json.dumps(make_records(2)).encode() + b"\n", "expected a JSON object, got list"),
    (b"\n".join(json.dumps(dict(r, response=" ")).encode() for r in make_records(3)) + b"\n",
     "0 trainable examples"),
], ids=["empty", "blank-lines", "array", "all-empty-responses"])
def test_dataset_without_valid_examples_is_exit_65_in_training(tiny_model_dir, tmp_path, capsys,
                                                               content, message):
    data = tmp_path / "sft_dataset.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    assert llama_train.main(train_argv(tiny_model_dir, data, out)) == EXIT_DATA
    assert message in one_line(capsys.readouterr().err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 8. Same seed, same losses; another seed, other losses

def test_same_seed_gives_identical_losses_and_weights(tiny_model_dir, dataset, reference,
                                                      tmp_path):
    again = tmp_path / "again"
    assert llama_train.main(train_argv(tiny_model_dir, dataset, again)) == EXIT_OK
    first = losses(reference)
    assert sorted(first) == list(range(1, STEPS + 1))
    assert losses(again) == first                                   # exactly, every step
    assert_same_weights(adapter_weights(again), adapter_weights(reference), tol=0.0)

    other = tmp_path / "other-seed"
    assert llama_train.main(train_argv(tiny_model_dir, dataset, other, "--seed", 12,
                                       "--max-steps", 2)) == EXIT_OK
    assert losses(other)[1] != first[1]


# ---------------------------------------------------------------------------------------------
# 9. kill -9 mid-training, then --resume auto: the same weights and data order

SLOW_AFTER_FIRST_CHECKPOINT = """
import sys, time
from llama_sft.train.trainer import Trainer
real = Trainer.train_step
def slow(self, micro):
    time.sleep(60 if self.state["step"] >= 2 else 0)  # the kill lands inside step 3
    return real(self, micro)
Trainer.train_step = slow
"""


def test_kill_9_then_resume_auto_matches_uninterrupted_run(tiny_model_dir, dataset, reference,
                                                           tmp_path):
    out = tmp_path / "killed"
    proc = run_script(SLOW_AFTER_FIRST_CHECKPOINT, train_argv(tiny_model_dir, dataset, out),
                      tmp_path / "child.log")
    deadline = time.time() + 180
    while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / "final_model").exists()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')                   # as if killed in the middle of a row

    assert llama_train.main(train_argv(tiny_model_dir, dataset, out, "--resume", "auto")) == 0
    assert_same_weights(adapter_weights(out), adapter_weights(reference))
    resumed, uninterrupted = losses(out), losses(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))             # every step once
    for step in range(3, STEPS + 1):                                # same batches after resume
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6, step
    state = read_json(out / "checkpoint-4" / STATE_FILE)
    assert (state["epoch"], state["micro_in_epoch"]) == (0, 4)


# ---------------------------------------------------------------------------------------------
# 11. A crash while a checkpoint is being written: that checkpoint is never used

DIE_WHILE_WRITING_CHECKPOINT_4 = """
import os, signal, sys
import safetensors.torch
real = safetensors.torch.save_file
def dying(tensors, filename, *args, **kwargs):
    real(tensors, filename, *args, **kwargs)
    if ".checkpoint-4.tmp" in str(filename) and str(filename).endswith("optimizer.safetensors"):
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = dying
"""


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_model_dir, dataset,
                                                                        reference, tmp_path):
    out = tmp_path / "crashed"
    proc = run_script(DIE_WHILE_WRITING_CHECKPOINT_4, train_argv(tiny_model_dir, dataset, out),
                      tmp_path / "child.log")
    assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    partial = out / ".checkpoint-4.tmp"
    assert {p.name for p in partial.iterdir()} == {"weights.safetensors",
                                                   "optimizer.safetensors"}
    assert not (out / "checkpoint-4").exists()
    assert find_resume_checkpoint(out, "auto") == out / "checkpoint-2"

    assert llama_train.main(train_argv(tiny_model_dir, dataset, out, "--resume", "auto")) == 0
    assert_same_weights(adapter_weights(out), adapter_weights(reference))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert set(CHECKPOINT_FILES) <= {p.name for p in (out / "checkpoint-4").iterdir()}


# ---------------------------------------------------------------------------------------------
# 12. Disk full while saving: exit 74, earlier checkpoints and final_model intact

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_keeps_everything_earlier(tiny_model_dir, dataset, reference,
                                                         tmp_path, monkeypatch, capsys):
    import peft.peft_model
    import safetensors.torch

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    keep = [out / "checkpoint-2", out / "checkpoint-4", out / "final_model"]
    before = tree_hashes(*keep)
    entries = sorted(p.name for p in out.iterdir())

    # a checkpoint: resume at step 2, checkpoint-4 cannot be written; with --save-total-limit 1
    # a successful save would have rotated checkpoint-2 away
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _no_space)
        rc = llama_train.main(train_argv(tiny_model_dir, dataset, out, "--resume",
                                         out / "checkpoint-2", "--save-total-limit", 1))
    assert rc == EXIT_IO
    assert one_line(capsys.readouterr().err) == (
        "error: disk full while writing checkpoint-4; earlier checkpoints are intact. Free space "
        "or lower --save-total-limit")
    assert tree_hashes(*keep) == before
    assert sorted(p.name for p in out.iterdir()) == entries          # no .tmp left, none deleted

    # final_model: resume at step 4, the adapter cannot be written at the end
    with monkeypatch.context() as m:
        m.setattr(peft.peft_model, "safe_save_file", _no_space)
        rc = llama_train.main(train_argv(tiny_model_dir, dataset, out, "--resume", "auto"))
    assert rc == EXIT_IO
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: could not write {out / 'final_model'} (disk full)")
    assert "--resume auto" in err
    assert tree_hashes(*keep) == before
    assert sorted(p.name for p in out.iterdir()) == entries


# ---------------------------------------------------------------------------------------------
# 13. A checkpoint without its optimizer or RNG state (or with a damaged file) is refused

def _drop_rng_file(ckpt: Path) -> None:
    (ckpt / "rng.safetensors").unlink()


def _drop_python_rng(ckpt: Path) -> None:
    state = read_json(ckpt / STATE_FILE)
    del state["python_rng"]
    (ckpt / STATE_FILE).write_text(json.dumps(state))


def _drop_torch_rng(ckpt: Path) -> None:
    from safetensors.torch import save_file

    rng = load_file(ckpt / "rng.safetensors")
    save_file({k: v for k, v in rng.items() if k != "torch"} or
              {"unrelated": rng["torch"][:1]}, ckpt / "rng.safetensors")


def _drop_optimizer_meta(ckpt: Path) -> None:
    (ckpt / "optimizer.json").write_text(json.dumps({"scheduler": {}}))


def _damage_optimizer(ckpt: Path) -> None:
    path = ckpt / "optimizer.safetensors"
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage, code, message", [
    (_drop_rng_file, EXIT_USAGE, "missing rng.safetensors"),
    (_drop_python_rng, EXIT_USAGE, "the checkpoint lacks python_rng"),
    (_drop_torch_rng, EXIT_USAGE, "lacks rng.safetensors:torch (the RNG state)"),
    (_drop_optimizer_meta, EXIT_USAGE, "lacks optimizer.json:optimizer"),
    (_damage_optimizer, EXIT_DATA, "optimizer.safetensors is damaged"),
], ids=["rng-file", "python-rng", "torch-rng", "optimizer-meta", "damaged-optimizer"])
def test_checkpoint_without_its_state_is_refused(tiny_model_dir, dataset, reference, tmp_path,
                                                 capsys, damage, code, message):
    out = tmp_path / "run"
    ckpt = out / "checkpoint-2"
    shutil.copytree(reference / "checkpoint-2", ckpt)
    damage(ckpt)
    before = tree_hashes(ckpt)
    assert llama_train.main(train_argv(tiny_model_dir, dataset, out, "--resume", "auto")) == code
    err = one_line(capsys.readouterr().err)
    assert message in err and "cannot resume from" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"] # nothing trained or written
    assert tree_hashes(ckpt) == before


# ---------------------------------------------------------------------------------------------
# 14. Non-finite steps are skipped and counted; persistent ones abort, and no checkpoint ever
#     holds a non-finite weight

def test_inf_steps_skipped_then_abort_and_every_checkpoint_is_finite(tiny_model_dir, dataset,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    import torch

    real = Trainer.forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, num_items):
        calls["n"] += 1
        loss = real(self, batch, num_items)
        return loss * float("inf") if calls["n"] == 2 or calls["n"] >= 5 else loss

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_bad_steps": 2}))
    out = tmp_path / "run"
    rc = llama_train.main(train_argv(tiny_model_dir, dataset, out, "--max-steps", 10,
                                     "--save-steps", 1, "--config", config))
    assert rc == EXIT_GATE
    err = capsys.readouterr().err
    assert "step 2: non-finite loss/grad, step skipped (1/2)" in err
    assert one_line(err) == ("error: training diverged: 3 non-finite steps, over max_bad_steps 2; "
                             "nothing non-finite was saved (newest checkpoint: checkpoint-3). "
                             "Lower --learning-rate or check the data")
    rows = metrics(out)
    assert [(r["step"], r["bad_steps"]) for r in rows] == [(1, 0), (2, 1), (3, 1)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2",
                                                       "checkpoint-3"]
    for ckpt in list_checkpoints(out):
        for name in ("weights.safetensors", "optimizer.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(ckpt / name).values())
    assert read_json(out / "checkpoint-3" / STATE_FILE)["bad_steps"] == 1
    assert not (out / "final_model").exists()


# ---------------------------------------------------------------------------------------------
# 17. A corrupt or altered package is refused by evaluate and chat before anything is extracted

def _rewrite_member(archive: Path, out: Path, name: str, data: bytes) -> Path:
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            content = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("/" + name):
                content, member.size = data, len(data)
            dst.addfile(member, io.BytesIO(content) if content is not None else None)
    return out


@pytest.mark.parametrize("kind", ["altered", "truncated"])
def test_bad_package_is_refused_by_evaluate_and_chat_before_extraction(tiny_adapter_dir, tmp_path,
                                                                       monkeypatch, capsys, kind):
    package = build_package(tiny_adapter_dir, tmp_path / "packages")
    bad = tmp_path / "bad.tar.gz"
    if kind == "altered":
        _rewrite_member(package, bad, "prompt_format.json", b'{"style": "instruction"}\n')
        expected = "checksum mismatch for prompt_format.json"
    else:
        bad.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
        expected = "not an intact .tar.gz"
    extracted = []
    real_extract = tarfile.TarFile.extract
    monkeypatch.setattr(tarfile.TarFile, "extract",
                        lambda self, member, *a, **k: extracted.append(member) or
                        real_extract(self, member, *a, **k))
    report = tmp_path / "report.json"
    assert llama_evaluate.main(["--adapter-path", str(bad), "--dataset",
                                str(write_jsonl(tmp_path / "g.jsonl", make_records(2))),
                                "--output", str(report)]) == EXIT_DATA
    assert expected in one_line(capsys.readouterr().err)
    assert llama_chat.main(["--adapter-path", str(bad), "hello"]) == EXIT_DATA
    assert expected in one_line(capsys.readouterr().err)
    assert extracted == [] and not report.exists()


# ---------------------------------------------------------------------------------------------
# 20. Adapter dirs that could run code or read files elsewhere are refused by every loader

def _auto_map(adapter: Path) -> tuple[str, str]:
    cfg = read_json(adapter / "adapter_config.json")
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    msg = "adapter_config.json has auto_map (custom code); refusing to load it"
    return msg, msg


def _tokenizer_auto_map(adapter: Path) -> tuple[str, str]:
    cfg = read_json(adapter / "tokenizer_config.json")
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    msg = "tokenizer_config.json has auto_map (custom tokenizer code)"
    return msg, msg


def _tokenizer_symlink_out(adapter: Path) -> tuple[str, str]:
    outside = adapter.parent / "elsewhere"
    outside.mkdir()
    (adapter / "tokenizer.json").rename(outside / "tokenizer.json")
    (adapter / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    return ("tokenizer.json points outside the adapter directory",
            "tokenizer.json: absolute symlink")


def _tokenizer_file_out(adapter: Path) -> tuple[str, str]:
    outside = adapter.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(adapter / "tokenizer.json", outside / "tokenizer.json")
    cfg = read_json(adapter / "tokenizer_config.json")
    cfg["tokenizer_file"] = "../elsewhere/tokenizer.json"
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    msg = ("tokenizer_config.json: tokenizer_file names a file outside the adapter directory "
           "(../elsewhere/tokenizer.json)")
    return msg, msg


HOSTILE_ADAPTERS = [_auto_map, _tokenizer_auto_map, _tokenizer_symlink_out, _tokenizer_file_out]


@pytest.mark.parametrize("make", HOSTILE_ADAPTERS,
                         ids=[f.__name__.strip("_") for f in HOSTILE_ADAPTERS])
def test_hostile_adapter_dir_is_refused_by_evaluate_chat_and_package(copy_dir, tiny_adapter_dir,
                                                                     tmp_path, capsys, make):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    loader_msg, package_msg = make(adapter)
    manifest = read_json(adapter / "manifest.json")        # as if training had written it so
    write_manifest(adapter, stage="train", config=manifest["config"], created=manifest["created"])
    golden = write_jsonl(tmp_path / "golden_set.jsonl", make_records(2, "golden"))

    report = tmp_path / "report.json"
    assert llama_evaluate.main(["--adapter-path", str(adapter), "--dataset", str(golden),
                                "--output", str(report)]) == EXIT_DATA
    assert loader_msg in one_line(capsys.readouterr().err)
    assert not report.exists()
    assert llama_chat.main(["--adapter-path", str(adapter), "hello"]) == EXIT_DATA
    assert loader_msg in one_line(capsys.readouterr().err)
    packages = tmp_path / "packages"
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir",
                               str(packages)]) == EXIT_DATA
    assert package_msg in one_line(capsys.readouterr().err)
    assert not packages.exists()


PRODUCT_SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("llama_sft/**/*.py"),
                          *ROOT.glob("benchmarks/*.py"), *ROOT.glob("data/*.py")])


def test_trust_remote_code_is_never_enabled(tiny_adapter_dir, monkeypatch):
    assert len(PRODUCT_SOURCES) >= 10
    assert ROOT / "llama_sft" / "model" / "loading.py" in PRODUCT_SOURCES   # the package too
    for path in PRODUCT_SOURCES:
        text = path.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text.replace(" ", ""), path.name
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "trust_remote_code":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, \
                        f"{path.name}:{node.lineno}"
            if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                assert all(kw.arg is not None for kw in node.keywords), \
                    f"{path.name}:{node.lineno}: **kwargs could smuggle trust_remote_code in"

    # and at run time: every loading call the model module makes passes no such flag
    import peft
    import transformers

    from llama_sft.model.loading import load_for_inference

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, peft.PeftModel):
        real = cls.from_pretrained

        def spy(*args, _real=real, _cls=cls, **kwargs):
            calls.append((_cls.__name__, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    assert loaded.adapter_dir == tiny_adapter_dir
    assert {name for name, _ in calls} == {"AutoTokenizer", "AutoModelForCausalLM", "PeftModel"}
    assert not any(kwargs.get("trust_remote_code") for _, kwargs in calls)


# ---------------------------------------------------------------------------------------------
# Tokens from the environment never reach logs, metrics, W&B, manifests, reports or packages

def _files_text(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (package archives decompressed, member by member)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found[str(path)] = path.read_bytes()
        if path.name.endswith(".tar.gz"):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    found[f"{path}!{member.name}"] = tar.extractfile(member).read()
    return found


def test_tokens_never_leak_into_outputs_or_logs(tiny_model_dir, tmp_path, monkeypatch, capfd,
                                               caplog):
    monkeypatch.syspath_prepend(str(ROOT / "data"))
    import make_demo_data

    hf_token = "hf_" + "".join(random.SystemRandom().choices(string.ascii_letters, k=34))
    wandb_key = secrets.token_hex(20)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level("DEBUG")
    work = tmp_path / "work"
    tiny = str(tiny_model_dir)

    enriched = write_jsonl(work / "enriched.jsonl", list(make_demo_data.clean_records(40, 5)))
    sft = work / "sft_output"
    assert pipeline_sft_prep.main(["--enriched", str(enriched), "--output-dir", str(sft),
                                   "--tokenizer", tiny, "--golden-size", "6"]) == EXIT_OK
    config = {**read_json(sft / "training_config.json"), "max_new_tokens": 8,
              "num_eval_samples": 2}
    (work / "config.json").write_text(json.dumps(config))
    train = work / "training_output"
    assert llama_train.main(["--dataset", str(sft / "sft_dataset.jsonl"), "--golden-set",
                             str(sft / "golden_set.jsonl"), "--output-dir", str(train),
                             "--config", str(work / "config.json"), "--base-model", tiny,
                             "--max-steps", "2", "--eval-steps", "2", "--batch-size", "4",
                             "--dtype", "float32", "--no-progress", "--use-wandb"]) == EXIT_OK
    report = work / "final_evaluation.json"
    assert llama_evaluate.main(["--adapter-path", str(train / "final_model"), "--dataset",
                                str(sft / "golden_set.jsonl"), "--num-samples", "3",
                                "--max-new-tokens", "4", "--dtype", "float32",
                                "--output", str(report)]) == EXIT_OK
    packages = work / "packages"
    assert llama_package.main(["--adapter-path", str(train / "final_model"), "--output-dir",
                               str(packages), "--evaluation", str(report)]) == EXIT_OK

    files = _files_text(work)
    wandb_runs = [name for name in files if "/wandb/" in name and name.endswith(".wandb")]
    assert any(b"max_bad_steps" in files[name] for name in wandb_runs)   # the W&B run config
    assert any("/tensorboard/" in name for name in files)
    assert any("!" in name for name in files)                   # the package's members
    captured = capfd.readouterr()
    logs = {"stdout": captured.out.encode(), "stderr": captured.err.encode(),
            "logging": caplog.text.encode()}
    assert b"done: 2 steps" in logs["stdout"]
    for token in (hf_token, wandb_key):
        leaks = [name for name, data in {**files, **logs}.items() if token.encode() in data]
        assert leaks == [], f"a token leaked into {leaks}"
