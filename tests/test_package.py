"""llama_package.py: build, verify, extract, merge, push; every refusal on hostile inputs."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import llama_package as lp
import llama_sft.adapter.archive
import llama_sft.package.hub
from llama_sft.adapter.archive import extract_package, verify_package
from llama_sft.errors import EXIT_DATA, EXIT_USAGE, DataError
from llama_sft.files import read_json, sha256_file, write_manifest
from llama_sft.package.build import build_package
from llama_sft.package.contents import find_secret
from llama_sft.package.metadata import _epoch, evaluation_table, summarize_evaluation

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "llama-sft-135m-0.1.0"
ARCHIVE = f"{FOLDER}.tar.gz"
FIXTURE_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                 "prompt_format.json", "tokenizer.json", "tokenizer_config.json"}
PACKAGE_FILES = FIXTURE_FILES | {"metadata.json", "README.md", "requirements.txt", "SHA256SUMS"}
HF_TOKEN_VALUE = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


@pytest.fixture(scope="module")
def package(tiny_adapter_dir, tmp_path_factory) -> Path:
    """One package of the adapter fixture, built once for the read-only tests."""
    return build_package(tiny_adapter_dir, tmp_path_factory.mktemp("packages"))


def archive_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name: str, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def retar(package: Path, out: Path, *, replace: dict[str, bytes] | None = None,
          extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    """A copy of ``package`` with some member contents replaced and members added."""
    members = [(file_info(name), (replace or {}).get(name.split("/", 1)[1], data))
               for name, data in archive_members(package).items()]
    return write_tar(out, members + list(extra))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def rewrite_manifest(adapter: Path, **kwargs) -> None:
    """Re-hash the adapter dir, as if training had written the changed files."""
    manifest = read_json(adapter / "manifest.json")
    write_manifest(adapter, stage="train", config=manifest["config"],
                   created=manifest["created"], **kwargs)


# ---------------------------------------------------------------------------------------------
# Building

def test_help_is_instant_and_lists_defaults():
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "llama_package.py"),
                          "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "(default: ./packages)" in out.stdout and "--push-to-hub" in out.stdout
    assert " torch" not in out.stderr and "transformers" not in out.stderr


def test_main_packages_verifies_and_extracts(tiny_adapter_dir, tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "packages"
    assert lp.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir", str(out_dir)]) == 0
    archive = out_dir / ARCHIVE
    assert capsys.readouterr().out.strip() == str(archive)
    assert {p.name for p in out_dir.iterdir()} == {ARCHIVE, f"{ARCHIVE}.sha256", "manifest.json"}
    umask = os.umask(0)
    os.umask(umask)
    assert (archive.stat().st_mode & 0o777) == 0o666 & ~umask

    members = archive_members(archive)
    assert sorted(members) == sorted(f"{FOLDER}/{f}" for f in PACKAGE_FILES)
    for name in FIXTURE_FILES - {"adapter_config.json"}:
        assert members[f"{FOLDER}/{name}"] == (tiny_adapter_dir / name).read_bytes()
    assert json.loads(members[f"{FOLDER}/adapter_config.json"]) == \
        read_json(tiny_adapter_dir / "adapter_config.json")

    meta = json.loads(members[f"{FOLDER}/metadata.json"])
    fixture_manifest = read_json(tiny_adapter_dir / "manifest.json")
    assert meta["name"] == "llama-sft-135m" and meta["version"] == "0.1.0"
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["model_size"] == "135m" and meta["license"] == "apache-2.0"
    assert meta["created"] == fixture_manifest["created"]
    assert meta["training_config"] == read_json(tiny_adapter_dir / "training_config.json")
    assert meta["adapter"]["r"] == 4 and meta["adapter"]["lora_alpha"] == 8
    assert meta["prompt_style"] == "chat_template"
    assert meta["evaluation"] is None and meta["data"] == {}
    assert meta["files"] == sorted(PACKAGE_FILES)
    assert meta["versions"]["training"] == fixture_manifest["versions"]
    assert set(meta["versions"]["packaging"]) >= {"torch", "transformers", "peft"}

    sums = dict(line.split("  ")[::-1] for line in
                members[f"{FOLDER}/SHA256SUMS"].decode().splitlines())
    assert set(sums) == PACKAGE_FILES - {"SHA256SUMS"}
    readme = members[f"{FOLDER}/README.md"].decode()
    assert f"llama_chat.py --adapter-path {ARCHIVE}" in readme
    assert "PeftModel.from_pretrained(" in readme and "merge_and_unload" in readme
    assert "peft>=" in members[f"{FOLDER}/requirements.txt"].decode()

    manifest = read_json(out_dir / "manifest.json")
    assert manifest["stage"] == "package"
    assert set(manifest["files"]) == {ARCHIVE, f"{ARCHIVE}.sha256"}
    assert manifest["package"]["archive"] == ARCHIVE
    assert manifest["package"]["sha256"] == sha256_file(archive)
    assert manifest["config"]["base_model"] == str(tiny_model_dir)

    assert lp.main(["--verify", str(archive)]) == 0
    assert "ok:" in capsys.readouterr().out
    dest = tmp_path / "unpacked"
    assert lp.main(["--extract", str(archive), "--to", str(dest)]) == 0
    extracted = Path(capsys.readouterr().out.strip())
    assert extracted == dest / FOLDER
    assert {p.name for p in dest.iterdir()} == {FOLDER}
    assert {p.name for p in extracted.iterdir()} == PACKAGE_FILES
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=extracted, check=True)


def test_archive_is_byte_identical_and_normalized(tiny_adapter_dir, package, tmp_path):
    again = build_package(tiny_adapter_dir, tmp_path / "again")
    assert again.read_bytes() == package.read_bytes()
    raw = package.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] == 0          # gzip, no FNAME flag
    assert raw[4:8] == b"\0\0\0\0"                              # no gzip mtime
    created = read_json(tiny_adapter_dir / "manifest.json")["created"]
    with tarfile.open(package) as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in infos} == \
        {(_epoch(created), 0o644, 0, 0, "", "")}


def test_sidecar_works_with_sha256sum(package):
    sidecar = package.with_name(package.name + ".sha256")
    assert sidecar.read_text() == f"{sha256_file(package)}  {package.name}\n"
    done = subprocess.run(["sha256sum", "-c", sidecar.name], cwd=package.parent,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"{package.name}: OK"


def test_extracted_adapter_loads_with_plain_peft_in_fresh_process(package, tiny_adapter_dir,
                                                                  tiny_model_dir, tmp_path):
    import torch

    from llama_sft.model.loading import load_for_inference

    extracted = extract_package(package, tmp_path / "x")
    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    prompt = loaded.prompt_format.encode_prompt(loaded.tokenizer, "What is 2 plus 2?")
    with torch.inference_mode():
        expected = loaded.model.generate(torch.tensor([prompt]), do_sample=False,
                                         max_new_tokens=12, min_new_tokens=12)[0].tolist()
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(extracted)!r}).eval()
AutoTokenizer.from_pretrained({str(extracted)!r})
with torch.inference_mode():
    out = model.generate(torch.tensor([{prompt!r}]), do_sample=False, max_new_tokens=12,
                         min_new_tokens=12)
print(json.dumps(out[0].tolist()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    assert len(expected) == len(prompt) + 12


def test_extracted_package_loads_through_model_module(package, tmp_path):
    from llama_sft.model.loading import load_for_inference

    loaded = load_for_inference(extract_package(package, tmp_path / "x"), dtype="float32")
    assert loaded.prompt_format.style == "chat_template"
    assert loaded.adapter_dir == tmp_path / "x" / FOLDER


def test_users_exact_command_with_a_7b_adapter(copy_dir, tiny_adapter_dir, tmp_path):
    """The documented command, as typed, on an adapter whose records name Llama-2-7b."""
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    cfg = read_json(adapter / "training_config.json")
    cfg.update(model_size="7b", base_model="meta-llama/Llama-2-7b-hf")
    (adapter / "training_config.json").write_text(json.dumps(cfg))
    peft_cfg = read_json(adapter / "adapter_config.json")
    peft_cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (adapter / "adapter_config.json").write_text(json.dumps(peft_cfg))
    rewrite_manifest(adapter)
    work = tmp_path / "work"
    (work / "training_output").mkdir(parents=True)
    shutil.move(adapter, work / "training_output" / "final_model")
    cmd = ("python3 llama_package.py --adapter-path ./training_output/final_model "
           "--base-model meta-llama/Llama-2-7b-hf --model-size 7b --output-dir ./packages")
    argv = cmd.split()[2:]
    done = subprocess.run([sys.executable, str(ROOT / "llama_package.py"), *argv], cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    archive = work / "packages" / "llama-sft-7b-0.1.0.tar.gz"
    meta = json.loads(archive_members(archive)["llama-sft-7b-0.1.0/metadata.json"])
    assert (meta["base_model"], meta["model_size"], meta["license"]) == \
        ("meta-llama/Llama-2-7b-hf", "7b", "llama2")
    assert '"meta-llama/Llama-2-7b-hf"' in \
        archive_members(archive)["llama-sft-7b-0.1.0/README.md"].decode()


def test_embedded_model_adapter_names_the_hub_id_not_the_cache_path(copy_dir, tiny_adapter_dir,
                                                                     tmp_path, capsys):
    """An adapter trained on the embedded model records its local cache dir; the package
    names the hub id, and the user's command with a 7b base is refused in one line."""
    from llama_sft.config.presets import EMBEDDED_MODEL_ID, embedded_model_dir

    adapter = copy_dir(tiny_adapter_dir, "final_model")
    peft_cfg = read_json(adapter / "adapter_config.json")
    peft_cfg["base_model_name_or_path"] = str(embedded_model_dir())
    (adapter / "adapter_config.json").write_text(json.dumps(peft_cfg))
    cfg = read_json(adapter / "training_config.json")
    cfg["base_model"] = EMBEDDED_MODEL_ID
    (adapter / "training_config.json").write_text(json.dumps(cfg))
    rewrite_manifest(adapter)

    code = lp.main(["--adapter-path", str(adapter), "--base-model", "meta-llama/Llama-2-7b-hf",
                    "--model-size", "7b", "--output-dir", str(tmp_path / "refused")])
    assert code == EXIT_USAGE
    assert one_line_error(capsys).endswith(
        f"was trained on {EMBEDDED_MODEL_ID!r}, not 'meta-llama/Llama-2-7b-hf'; "
        f"pass --base-model {EMBEDDED_MODEL_ID} (or leave it out)")
    assert not (tmp_path / "refused").exists()

    for base in (EMBEDDED_MODEL_ID, str(embedded_model_dir())):
        archive = build_package(adapter, tmp_path / "out", base_model=base, model_size="135m")
        members = archive_members(archive)
        assert json.loads(members[f"{FOLDER}/adapter_config.json"])[
            "base_model_name_or_path"] == EMBEDDED_MODEL_ID
        meta = json.loads(members[f"{FOLDER}/metadata.json"])
        assert (meta["base_model"], meta["license"]) == (EMBEDDED_MODEL_ID, "apache-2.0")
        assert str(embedded_model_dir()) not in members[f"{FOLDER}/README.md"].decode()


@pytest.mark.parametrize("argv, expected", [
    (["--base-model", "meta-llama/Llama-2-7b-hf", "--model-size", "7b"], "was trained on"),
    (["--model-size", "7b"], "--model-size 135m"),
    (["--model-size", "99b"], "unknown model size"),
    (["--name", "../evil"], "--name"),
])
def test_mismatch_or_bad_flags_is_one_line_exit_2(tiny_adapter_dir, tmp_path, capsys, argv,
                                                  expected):
    code = lp.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir",
                    str(tmp_path / "out"), *argv])
    assert code == EXIT_USAGE
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_adapter_and_missing_mode_exit_2(tmp_path, capsys):
    assert lp.main(["--adapter-path", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "does not exist" in one_line_error(capsys)
    assert lp.main([]) == EXIT_USAGE
    assert "--adapter-path" in one_line_error(capsys)
    assert lp.main(["--extract", str(tmp_path / "x.tar.gz")]) == EXIT_USAGE
    assert "--to" in one_line_error(capsys)


def test_evaluation_and_data_hashes_go_into_metadata_and_readme(copy_dir, tiny_adapter_dir,
                                                                tmp_path):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    dataset = tmp_path / "sft_dataset.jsonl"
    dataset.write_text('{"instruction": "a", "response": "b"}\n')
    from llama_sft.files import describe_inputs
    rewrite_manifest(adapter, inputs=describe_inputs({"dataset": dataset}))
    report = tmp_path / "final_evaluation.json"
    report.write_text(json.dumps({  # the llama_evaluate.py schema, abridged
        "schema_version": 1, "created": "2026-01-02T03:04:05+00:00",
        "data": {"path": "golden_set.jsonl", "sha256": "c" * 64, "evaluated": 8},
        "finetuned": {"overall": {"examples": 8, "exact_match": 0.75, "rouge_l": 0.5,
                                  "json_valid": None},
                      "per_category": {"qa": {"examples": 4, "exact_match": 1.0}},
                      "speed": {"tokens_per_second": 99.0}},
        "base": {"overall": {"examples": 8, "exact_match": 0.25, "rouge_l": 0.125}},
        "delta": {"overall": {"examples": 0, "exact_match": 0.5, "rouge_l": 0.375}},
        "gates": {"passed": True, "checks": []}, "samples": [{"prompt": "x"}]}))
    archive = build_package(adapter, tmp_path / "out", name="bot", version="2.0",
                               evaluation=report)
    members = archive_members(archive)
    assert members["bot-2.0/evaluation.json"] == report.read_bytes()
    meta = json.loads(members["bot-2.0/metadata.json"])
    assert meta["data"] == {"dataset": {"file": "sft_dataset.jsonl",
                                        "bytes": dataset.stat().st_size,
                                        "sha256": sha256_file(dataset)}}
    assert meta["evaluation"] == {
        "finetuned": {"examples": 8, "exact_match": 0.75, "rouge_l": 0.5},
        "base": {"examples": 8, "exact_match": 0.25, "rouge_l": 0.125},
        "delta": {"examples": 0, "exact_match": 0.5, "rouge_l": 0.375},
        "per_category": {"qa": {"examples": 4, "exact_match": 1.0}},
        "created": "2026-01-02T03:04:05+00:00", "evaluated_examples": 8,
        "dataset_sha256": "c" * 64, "gates_passed": True}
    readme = members["bot-2.0/README.md"].decode()
    assert "| exact_match | 0.7500 | 0.2500 | 0.5000 |" in readme
    assert "python3 llama_chat.py --adapter-path bot-2.0.tar.gz" in readme
    assert read_json(tmp_path / "out" / "manifest.json")["inputs"]["evaluation"]["sha256"] == \
        sha256_file(report)


def test_harmless_unknown_files_are_skipped_with_a_log_line(copy_dir, tiny_adapter_dir,
                                                             tmp_path, caplog):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    (adapter / "notes.txt").write_text("trained on a Tuesday\n")
    (adapter / "inside.json").symlink_to("prompt_format.json")
    rewrite_manifest(adapter)
    with caplog.at_level("INFO", logger="llama_package"):
        archive = build_package(adapter, tmp_path / "out")
    assert "skipping notes.txt (not in the package allowlist)" in caplog.text
    assert "skipping inside.json (not in the package allowlist)" in caplog.text
    names = {n.split("/", 1)[1] for n in archive_members(archive)}
    assert names == PACKAGE_FILES


def test_a_package_repackages_to_the_same_bytes(copy_dir, tiny_adapter_dir, tmp_path):
    """--adapter-path accepts a package (as the README's merge command uses it)."""
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    (adapter / "metrics_summary.json").write_text('{"steps": 80, "best_eval_loss": 1.5}')
    rewrite_manifest(adapter)
    package = build_package(adapter, tmp_path / "first")
    meta = json.loads(archive_members(package)[f"{FOLDER}/metadata.json"])
    assert meta["training_metrics"] == {"steps": 80, "best_eval_loss": 1.5}
    again = build_package(package, tmp_path / "out")
    assert again.read_bytes() == package.read_bytes()
    assert read_json(tmp_path / "out" / "manifest.json")["inputs"]["adapter"]["sha256"] == \
        sha256_file(package)
    extracted = extract_package(package, tmp_path / "x")
    (extracted / "prompt_format.json").write_text('{"style": "instruction"}\n')
    with pytest.raises(DataError, match="prompt_format.json does not match SHA256SUMS"):
        build_package(extracted, tmp_path / "out2")


def test_changed_adapter_file_fails_against_its_manifest(copy_dir, tiny_adapter_dir, tmp_path,
                                                         capsys):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    (adapter / "prompt_format.json").write_text('{"style": "instruction"}\n')
    code = lp.main(["--adapter-path", str(adapter), "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_DATA
    assert "prompt_format.json changed" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Refusals while building: dangerous files fail naming the file, and nothing is written

def _symlink_out(adapter: Path) -> str:
    (adapter.parent / "outside.txt").write_text("secret")
    (adapter / "tokenizer.model").symlink_to("../outside.txt")
    return "tokenizer.model: symlink leaving the adapter dir"


def _symlink_abs(adapter: Path) -> str:
    (adapter / "vocab.json").symlink_to("/etc/hostname")
    return "vocab.json: absolute symlink"


def _training_args(adapter: Path) -> str:
    (adapter / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    return "training_args.bin: training arguments pickle"


def _pickle(adapter: Path) -> str:
    (adapter / "stats.pkl").write_bytes(b"\x80\x04K\x01.")
    return "stats.pkl: pickle file"


def _optimizer(adapter: Path) -> str:
    (adapter / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    return "optimizer.pt: optimizer/scheduler state"


def _wandb(adapter: Path) -> str:
    (adapter / "wandb" / "run-1").mkdir(parents=True)
    (adapter / "wandb" / "run-1" / "config.yaml").write_text("a: 1\n")
    return "wandb: W&B run files"


def _dotenv(adapter: Path) -> str:
    (adapter / ".env").write_text("HF_TOKEN=x\n")
    return ".env: secrets file"


def _netrc(adapter: Path) -> str:
    (adapter / "sub").mkdir()
    (adapter / "sub" / ".netrc").write_text("machine api.wandb.ai\n")
    return "sub/.netrc: secrets file"


def _fifo(adapter: Path) -> str:
    os.mkfifo(adapter / "tokenizer.model")
    return "tokenizer.model: not a regular file"


@pytest.mark.parametrize("make", [_symlink_out, _symlink_abs, _training_args, _pickle, _optimizer,
                                  _wandb, _dotenv, _netrc, _fifo])
def test_dangerous_adapter_dir_fails_naming_the_file(copy_dir, tiny_adapter_dir, tmp_path,
                                                     capsys, make):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    expected = make(adapter)
    out_dir = tmp_path / "out"
    code = lp.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir)])
    assert code == EXIT_DATA
    err = one_line_error(capsys)
    assert expected in err and "refusing to package" in err
    assert not out_dir.exists()


def test_all_dangerous_files_are_reported_at_once(copy_dir, tiny_adapter_dir, tmp_path):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    _training_args(adapter)
    _dotenv(adapter)
    with pytest.raises(DataError, match=r"\.env: secrets file; training_args\.bin"):
        build_package(adapter, tmp_path / "out")


@pytest.mark.parametrize("secret, kind", [
    (HF_TOKEN_VALUE, "a Hugging Face token"),
    ("wandb key: " + "0123456789abcdef" * 2 + "01234567", "a W&B API key"),
    ("api_key=sk-live-abcdefghijklmnop", "an api_key value"),
])
def test_token_shaped_content_fails_naming_the_file(copy_dir, tiny_adapter_dir, tmp_path, capsys,
                                                    secret, kind):
    adapter = copy_dir(tiny_adapter_dir, "final_model")
    fmt = read_json(adapter / "prompt_format.json")
    fmt["system_prompt"] = f"You are helpful. {secret}"
    (adapter / "prompt_format.json").write_text(json.dumps(fmt))
    rewrite_manifest(adapter)
    out_dir = tmp_path / "out"
    assert lp.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir)]) == EXIT_DATA
    err = one_line_error(capsys)
    assert f"prompt_format.json: {kind}" in err
    assert secret not in err
    assert not list(out_dir.glob("*.tar.gz")) and not list(out_dir.glob(".*"))


def test_token_in_evaluation_report_fails(tiny_adapter_dir, tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"exact_match": 1.0, "note": "live token here"}))
    monkeypatch.setenv("WANDB_API_KEY", "live token here")
    with pytest.raises(DataError, match="evaluation.json: the value of a token environment"):
        build_package(tiny_adapter_dir, tmp_path / "out", evaluation=report)


def test_git_commit_hashes_are_not_mistaken_for_keys(tmp_path):
    plain = tmp_path / "metadata.json"
    plain.write_text(json.dumps({"pipeline_git_commit": "a" * 40, "sha256": "b" * 64}))
    assert find_secret(plain) is None


# ---------------------------------------------------------------------------------------------
# Verifying and extracting hostile archives: exit 65, one line, nothing left behind

def _corrupt_truncated(package: Path, out: Path) -> tuple[Path, dict, str]:
    out.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    return out, {}, "not an intact .tar.gz"


def _corrupt_garbage(package: Path, out: Path) -> tuple[Path, dict, str]:
    out.write_bytes(b"this is not gzip at all" * 50)
    return out, {}, "not an intact .tar.gz"


def _corrupt_flipped_byte(package: Path, out: Path) -> tuple[Path, dict, str]:
    raw = bytearray(package.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    out.write_bytes(bytes(raw))
    return out, {}, "not an intact .tar.gz"


def _checksum_mismatch(package: Path, out: Path) -> tuple[Path, dict, str]:
    retar(package, out, replace={"prompt_format.json": b'{"style": "instruction"}\n'})
    return out, {}, "checksum mismatch for prompt_format.json"


def _unlisted_file(package: Path, out: Path) -> tuple[Path, dict, str]:
    retar(package, out, extra=[(file_info(f"{FOLDER}/evaluation.json"), b"{}")])
    return out, {}, "disagree on evaluation.json"


def _not_allowlisted(package: Path, out: Path) -> tuple[Path, dict, str]:
    retar(package, out, extra=[(file_info(f"{FOLDER}/training_args.bin"), b"\x80\x04.")])
    return out, {}, "not in the package allowlist"


def _traversal(package: Path, out: Path) -> tuple[Path, dict, str]:
    retar(package, out, extra=[(file_info(f"{FOLDER}/../../evil.sh"), b"rm -rf ~")])
    return out, {}, "path traversal"


def _absolute(package: Path, out: Path) -> tuple[Path, dict, str]:
    retar(package, out, extra=[(file_info("/tmp/evil.sh"), b"rm -rf ~")])
    return out, {}, "absolute path"


def _symlink_member(package: Path, out: Path) -> tuple[Path, dict, str]:
    link = file_info(f"{FOLDER}/vocab.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    retar(package, out, extra=[(link, None)])
    return out, {}, "is a link (to '/etc/passwd')"


def _hardlink_member(package: Path, out: Path) -> tuple[Path, dict, str]:
    link = file_info(f"{FOLDER}/vocab.json", type=tarfile.LNKTYPE, linkname="/etc/passwd")
    retar(package, out, extra=[(link, None)])
    return out, {}, "is a link"


def _device_member(package: Path, out: Path) -> tuple[Path, dict, str]:
    dev = file_info(f"{FOLDER}/vocab.json", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
    retar(package, out, extra=[(dev, None)])
    return out, {}, "is a device or special file"


def _too_many_members(package: Path, out: Path) -> tuple[Path, dict, str]:
    return package, {"max_members": 5}, "more than 5 members"


def _size_cap(package: Path, out: Path) -> tuple[Path, dict, str]:
    return package, {"max_bytes": 100_000}, "decompression bomb"


def _gzip_bomb(package: Path, out: Path) -> tuple[Path, dict, str]:
    info = file_info(f"{FOLDER}/tokenizer.model")
    write_tar(out, [(info, bytes(64 * 1024 * 1024))])
    assert out.stat().st_size < 1024 * 1024
    return out, {"max_bytes": 1024 * 1024}, "decompression bomb"


def _sidecar_mismatch(package: Path, out: Path) -> tuple[Path, dict, str]:
    shutil.copyfile(package, out)
    out.with_name(out.name + ".sha256").write_text(f"{'0' * 64}  {out.name}\n")
    return out, {}, "does not match"


HOSTILE = [_corrupt_truncated, _corrupt_garbage, _corrupt_flipped_byte, _checksum_mismatch,
           _unlisted_file, _not_allowlisted, _traversal, _absolute, _symlink_member,
           _hardlink_member, _device_member, _too_many_members, _size_cap, _gzip_bomb,
           _sidecar_mismatch]


@pytest.mark.parametrize("make", HOSTILE, ids=[f.__name__.strip("_") for f in HOSTILE])
def test_hostile_archive_is_refused_and_extraction_leaves_nothing(package, tmp_path, capsys,
                                                                  make):
    archive, caps, expected = make(package, tmp_path / "hostile.tar.gz")
    with pytest.raises(DataError) as excinfo:
        verify_package(archive, **caps)
    assert expected in str(excinfo.value)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in caps.items()]
    assert lp.main(["--verify", str(archive), *flags]) == EXIT_DATA
    assert expected in one_line_error(capsys)

    dest = tmp_path / "dest" / "inner"
    assert lp.main(["--extract", str(archive), "--to", str(dest), *flags]) == EXIT_DATA
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "evil.sh").exists() and not Path("/tmp/evil.sh").exists()


def test_failure_during_extraction_leaves_nothing(package, tmp_path, monkeypatch):
    dest = tmp_path / "existing"
    dest.mkdir()
    monkeypatch.setattr(llama_sft.adapter.archive, "sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(llama_sft.adapter.archive, "_check_sidecar", lambda archive: "0" * 64)
    with pytest.raises(DataError, match="changed while it was being extracted"):
        extract_package(package, dest)
    assert list(dest.iterdir()) == []


def test_extract_refuses_to_overwrite_unless_asked(package, tmp_path, capsys):
    first = extract_package(package, tmp_path)
    (first / "stray.txt").write_text("x")
    assert lp.main(["--extract", str(package), "--to", str(tmp_path)]) == EXIT_USAGE
    assert "already exists" in one_line_error(capsys)
    assert lp.main(["--extract", str(package), "--to", str(tmp_path), "--overwrite"]) == 0
    assert not (first / "stray.txt").exists()
    assert {p.name for p in first.iterdir()} == PACKAGE_FILES


def test_verify_reports_contents(package):
    info = verify_package(package)
    assert info["folder"] == FOLDER and info["name"] == "llama-sft-135m"
    assert set(info["files"]) == PACKAGE_FILES
    assert info["members"] == len(PACKAGE_FILES)
    assert info["sha256"] == sha256_file(package)


# ---------------------------------------------------------------------------------------------
# Merge and hub

@pytest.fixture(scope="module")
def merged_package(tiny_adapter_dir, tmp_path_factory) -> Path:
    """``--merge --gguf`` through main(), once: the output dir."""
    out_dir = tmp_path_factory.mktemp("merged") / "packages"
    assert lp.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir", str(out_dir),
                    "--merge", "--gguf"]) == 0
    return out_dir


def test_merge_writes_a_plain_model_with_the_same_greedy_outputs(tiny_adapter_dir,
                                                                  merged_package):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llama_sft.model.generation.batch import generate_batch
    from llama_sft.model.loading import load_for_inference

    merged_dir = merged_package / f"{FOLDER}-merged"
    assert {p.name for p in merged_package.iterdir()} == {
        ARCHIVE, f"{ARCHIVE}.sha256", "manifest.json", merged_dir.name, f"{FOLDER}.f16.gguf",
        "SHA256SUMS"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "prompt_format.json"} <= \
        {p.name for p in merged_dir.iterdir()}
    with safe_open(merged_dir / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]
    manifest = read_json(merged_package / "manifest.json")
    exports = {e["path"]: e["kind"] for e in manifest["package"]["exports"]}
    assert exports[f"{merged_dir.name}/model.safetensors"] == "merged"
    assert exports[f"{FOLDER}.f16.gguf"] == "gguf"
    assert f"{merged_dir.name}/model.safetensors" in manifest["files"]

    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    prompts = [loaded.prompt_format.encode_prompt(loaded.tokenizer, q)
               for q in ("What is 2 plus 2?", "Classify: great product", "Extract the order")]
    want = generate_batch(loaded.model, loaded.tokenizer, prompts, max_new_tokens=10)
    got = generate_batch(merged, loaded.tokenizer, prompts, max_new_tokens=10)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(w.token_ids) > 0 for w in want)


def test_gguf_loads_back_with_transformers_and_matches_the_merged_logits(merged_package):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = merged_package / f"{FOLDER}-merged"
    gguf_name = f"{FOLDER}.f16.gguf"
    from_gguf = AutoModelForCausalLM.from_pretrained(merged_package, gguf_file=gguf_name,
                                                     dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    text = "<|im_start|>user\nExtract the order number: #1042, ünïcode  ok\n<|im_end|>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    gguf_tokenizer = AutoTokenizer.from_pretrained(merged_package, gguf_file=gguf_name)
    assert gguf_tokenizer(text)["input_ids"] == ids[0].tolist()
    assert gguf_tokenizer.eos_token == tokenizer.eos_token
    with torch.inference_mode():
        exact = reference(ids).logits
        for param in reference.parameters():    # the f16 rounding GGUF f16 stores
            if param.ndim > 1:
                param.copy_(param.half().float())
        rounded = reference(ids).logits
        got = from_gguf(ids).logits
    assert torch.allclose(got, rounded, atol=1e-5)
    assert torch.allclose(got, exact, atol=1e-2)
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_summarize_evaluation_reads_flat_reports_too():
    summary = summarize_evaluation({"exact_match": 0.5, "bleu": 12.0, "ok": True})
    assert summary["finetuned"] == {"exact_match": 0.5, "bleu": 12.0}
    assert summary["base"] is None and summary["delta"] is None
    assert "| bleu | 12.0000 |  |  |" in evaluation_table(summary)
    with pytest.raises(DataError):
        summarize_evaluation([1, 2])


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        kw["files"] = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kw))

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw))


def test_push_to_hub_uploads_through_the_client_and_never_prints_the_token(
        tiny_adapter_dir, tmp_path, monkeypatch, capsys, caplog):
    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN_VALUE)
    monkeypatch.setattr(llama_sft.package.hub, "_default_hub_api", lambda: fake)
    out_dir = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert lp.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir", str(out_dir),
                        "--push-to-hub", "me/bot"]) == 0
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder", "upload_file",
                                          "upload_file"]
    assert fake.calls[0][1] == {"repo_id": "me/bot", "repo_type": "model", "private": True,
                                "exist_ok": True}
    assert set(fake.calls[1][1]["files"]) == PACKAGE_FILES
    assert [c[1]["path_in_repo"] for c in fake.calls[2:]] == [ARCHIVE, f"{ARCHIVE}.sha256"]
    captured = capsys.readouterr()
    assert HF_TOKEN_VALUE not in captured.out + captured.err + caplog.text
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert HF_TOKEN_VALUE.encode() not in path.read_bytes()
    with tarfile.open(out_dir / ARCHIVE) as tar:
        for m in tar.getmembers():
            assert HF_TOKEN_VALUE.encode() not in tar.extractfile(m).read()


def test_push_to_hub_without_a_token_is_a_usage_error(tiny_adapter_dir, tmp_path, monkeypatch,
                                                      capsys):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    code = lp.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir", str(tmp_path / "o"),
                    "--push-to-hub", "me/bot"])
    assert code == EXIT_USAGE
    assert "huggingface-cli login" in one_line_error(capsys)
