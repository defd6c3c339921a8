#!/usr/bin/env python3
"""Package a trained adapter into a reproducible, verifiable archive; verify and extract packages.

    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages
    python3 llama_package.py --adapter-path ./training_output/final_model \\
        --base-model meta-llama/Llama-2-7b-hf --model-size 7b --output-dir ./packages
    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages \\
        --name support-bot --version 1.2.0 --evaluation ./final_evaluation.json --merge --gguf
    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages \\
        --push-to-hub your-name/support-bot            # needs `huggingface-cli login` or HF_TOKEN
    python3 llama_package.py --adapter-path ./packages/support-bot-1.2.0.tar.gz \\
        --output-dir ./merged --merge                   # merge (or re-package) a package
    python3 llama_package.py --verify ./packages/support-bot-1.2.0.tar.gz
    python3 llama_package.py --extract ./packages/support-bot-1.2.0.tar.gz --to ./unpacked

``--base-model`` and ``--model-size`` default to what the adapter directory records; naming another
base is an error (exit 2). ``--adapter-path`` may also be a package (verified, then extracted to a
temporary directory); re-packaging a package gives the same bytes.

The archive ``<name>-<version>.tar.gz`` holds one folder ``<name>-<version>/`` with only
allowlisted files: the adapter (``adapter_config.json``,
``adapter_model.safetensors``), tokenizer files and chat template, ``prompt_format.json``,
``metadata.json``, a generated ``README.md``, ``requirements.txt``, ``evaluation.json`` (when
``--evaluation`` is given) and ``SHA256SUMS``. Pickles, optimizer states, ``wandb/``, ``.env``,
``.netrc``, links leaving the adapter dir and token-shaped strings fail the build, naming the file.
The same inputs give a byte-identical archive; ``<archive>.sha256`` beside it works with
``sha256sum -c``. ``--merge`` also writes ``<name>-<version>-merged/`` (LoRA folded into the base,
safetensors, loads with plain ``AutoModelForCausalLM``); ``--gguf`` writes
``<name>-<version>.f16.gguf`` from the merged model (LLaMA with plain RoPE and a byte-level BPE
tokenizer, e.g. SmolLM2 or Llama 3; others: llama.cpp's convert_hf_to_gguf.py). The output dir
gets ``manifest.json`` (stage "package").

``--verify`` checks gzip/tar integrity, the allowlist, member types and paths, size caps and every
checksum without writing anything. ``--extract`` verifies first, then extracts with tarfile's
``data`` filter into a temporary directory that is renamed into place, so a failed extraction leaves
nothing. Damaged or hostile archives exit 65 with one line saying why.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from llama_io import (SECRET_ENV_VARS, DataError, UsageError, atomic_output_dir,
                      describe_inputs, library_versions, read_json, run_main, sha256_file,
                      verify_file_against_manifest, verify_manifest, write_json, write_manifest,
                      write_text_atomic)

log = logging.getLogger("llama_package")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "added_tokens.json", "vocab.json",
                   "merges.txt")
PROMPT_FORMAT = "prompt_format.json"
COPIED_FILES = ADAPTER_FILES + TOKENIZER_FILES + (PROMPT_FORMAT,)
METADATA = "metadata.json"
SUMS = "SHA256SUMS"
EVALUATION = "evaluation.json"
GENERATED_FILES = (METADATA, "README.md", "requirements.txt", SUMS)
ALLOWED_FILES = frozenset(COPIED_FILES + GENERATED_FILES + (EVALUATION,))
REQUIRED_FILES = ADAPTER_FILES + ("tokenizer_config.json", PROMPT_FORMAT, METADATA, SUMS)
# Read into metadata.json, never copied.
RECORD_FILES = ("training_config.json", "manifest.json", "metrics_summary.json", METADATA, SUMS)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
PACKAGE_FORMAT = "llama-sft-package"
PACKAGE_FORMAT_VERSION = 1

DEFAULT_MAX_BYTES = 32 * 1024 ** 3     # total uncompressed size an archive may declare
DEFAULT_MAX_MEMBERS = 64               # the allowlist has 16 names
SMALL_FILE_CAP = 16 * 1024 ** 2        # SHA256SUMS and metadata.json are read into memory
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")

# Files an adapter dir must never ship. Pickle-based formats can run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz",
                   ".distcp", ".dill")
SECRET_FILES = (".env", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc")
# Token shapes: Hugging Face tokens, W&B API keys (40 hex next to "wandb"), generic api_key=...
TOKEN_PATTERNS = (
    ("a Hugging Face token", re.compile(rb"hf_[A-Za-z0-9]{30,}")),
    ("a W&B API key", re.compile(rb"(?is)wandb.{0,64}?(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")),
    ("an api_key value",
     re.compile(rb"(?i)api[_-]?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-./+]{12,}")),
)
SCAN_CHUNK = 1 << 20
SCAN_OVERLAP = 256


# ---------------------------------------------------------------------------------------------
# Checking the adapter directory

def _danger(rel: str, path: Path) -> str | None:
    """Why a file in the adapter dir must not be packaged (None when it is not dangerous)."""
    name = path.name.lower()
    parts = [p.lower() for p in PurePosixPath(rel).parts]
    if "wandb" in parts:
        return "W&B run files (wandb/)"
    if name == "training_args.bin":
        return "training arguments pickle"
    if name in SECRET_FILES or name.startswith(".env."):
        return "secrets file"
    if any(p.startswith(("checkpoint-", "global_step")) for p in parts):
        return "training checkpoint (optimizer state)"
    if "optimizer" in name or "scheduler" in name or name.startswith("rng_state"):
        return "optimizer/scheduler state"
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle file"
    return None


def _symlink_problem(path: Path, root: Path) -> str | None:
    target = os.readlink(path)
    if os.path.isabs(target):
        return f"absolute symlink to {target}"
    if not path.resolve().is_relative_to(root):
        return f"symlink leaving the adapter dir ({target})"
    return None


def inspect_adapter_dir(adapter_dir: Path) -> tuple[list[str], list[str]]:
    """(allowlisted files present, problems). Walks everything, following no links."""
    root = adapter_dir.resolve()
    present, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            reason = _danger(rel, path)
            if stat.S_ISLNK(mode):
                reason = _symlink_problem(path, root) or reason
                if reason is None and not path.exists():
                    reason = "broken symlink"
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                reason = "not a regular file (device, fifo or socket)"
            if reason:
                problems.append(f"{rel}: {reason}")
            elif stat.S_ISDIR(mode) or (stat.S_ISLNK(mode) and path.is_dir()):
                continue
            elif rel in COPIED_FILES:
                present.append(rel)
            elif rel not in RECORD_FILES:
                log.info("skipping %s (not in the package allowlist)", rel)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()
                       and _danger((here / d).relative_to(root).as_posix(), here / d) is None]
    return present, problems


def find_secret(path: Path) -> str | None:
    """The kind of token found in ``path`` (token-shaped strings or a live env token), or None."""
    literals = [os.environ[v].encode() for v in SECRET_ENV_VARS
                if len(os.environ.get(v, "")) >= 8]
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(SCAN_CHUNK):
            window = tail + block
            for kind, pattern in TOKEN_PATTERNS:
                if pattern.search(window):
                    return kind
            if any(lit in window for lit in literals):
                return "the value of a token environment variable"
            tail = window[-SCAN_OVERLAP:]
    return None


# ---------------------------------------------------------------------------------------------
# Metadata, README, requirements

def _epoch(created: str | None) -> int:
    try:
        stamp = _dt.datetime.fromisoformat(str(created))
    except ValueError:
        return 0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    return max(0, int(stamp.timestamp()))


def data_hashes(adapter_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Input hashes from the adapter's and its training run's manifests (file names only)."""
    sources = [manifest]
    parent = adapter_dir.parent / "manifest.json"
    if parent.is_file():
        parent_manifest = read_json(parent)
        if isinstance(parent_manifest, dict) and parent_manifest.get("stage") == "train":
            sources.append(parent_manifest)
    hashes: dict[str, Any] = {}
    for source in sources:
        for key, entry in (source.get("inputs") or {}).items():
            if not isinstance(entry, dict):
                continue
            kept = {k: entry[k] for k in ("sha256", "bytes", "manifest_sha256") if k in entry}
            if kept and key not in hashes:
                hashes[key] = {"file": Path(str(entry.get("path", ""))).name, **kept}
    return hashes


def _numeric(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    if isinstance(d.get("overall"), dict):
        d = d["overall"]
    return {k: v for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _first_block(report: dict, keys: tuple[str, ...]) -> dict:
    return next((report[k] for k in keys if _numeric(report.get(k))), {})


def summarize_evaluation(report: Any) -> dict[str, Any]:
    """Main metrics of a llama_evaluate.py report (fine-tuned, base, delta, per category).

    Reads the documented report schema (``finetuned``/``base``/``delta`` each with ``overall``
    and ``per_category``) and, leniently, flat ``{metric: value}`` reports.
    """
    if not isinstance(report, dict):
        raise DataError("the evaluation report must be a JSON object")
    tuned_block = _first_block(report, ("finetuned", "fine_tuned", "adapter", "model", "overall",
                                        "metrics", "summary"))
    finetuned = _numeric(tuned_block) or _numeric(report)
    base = _numeric(_first_block(report, ("base", "baseline")))
    delta = _numeric(_first_block(report, ("delta", "deltas")))
    if base and not delta:
        delta = {k: finetuned[k] - base[k] for k in finetuned if k in base}
    categories = tuned_block.get("per_category") or report.get("per_category") or {}
    per_category = {c: _numeric(v) for c, v in sorted(categories.items()) if _numeric(v)} \
        if isinstance(categories, dict) else {}
    data = report.get("data") if isinstance(report.get("data"), dict) else {}
    gates = report.get("gates") if isinstance(report.get("gates"), dict) else {}
    return {"finetuned": finetuned, "base": base or None, "delta": delta or None,
            "per_category": per_category or None, "created": report.get("created"),
            "evaluated_examples": data.get("evaluated"), "dataset_sha256": data.get("sha256"),
            "gates_passed": gates.get("passed")}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def evaluation_table(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("finetuned"):
        return "No evaluation report was packaged (pass `--evaluation report.json`)."
    base, delta = summary.get("base") or {}, summary.get("delta") or {}
    lines = ["| metric | fine-tuned | base | delta |", "|---|---|---|---|"]
    for metric, value in summary["finetuned"].items():
        lines.append(f"| {metric} | {_fmt(value)} | {_fmt(base.get(metric))} | "
                     f"{_fmt(delta.get(metric))} |")
    return "\n".join(lines)


README_TEMPLATE = """# {name} {version}

A LoRA adapter fine-tuned (supervised, {method}) on **{base_model}** (preset `{model_size}`),
packaged by `llama_package.py`. Base model license: **{license}** (its terms apply to using
this adapter with it).
Packaged from a training run created {created}.

Files: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), the tokenizer and
chat template, `prompt_format.json` (how prompts were built in training: style `{prompt_style}`),
`metadata.json` (training config, data hashes, library versions), `requirements.txt`{eval_file} and
`SHA256SUMS` (check with `sha256sum -c SHA256SUMS` inside this folder).

## Load with transformers + peft

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tokenizer = AutoTokenizer.from_pretrained("{folder}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model}"), "{folder}")
{prompt_line}
```

Build prompts as training did: `prompt_format.json` says which template (with `llama_dataset.py`:
`PromptFormat.load("{folder}").encode_prompt(tokenizer, instruction, context)`).

## Chat with it

```bash
python3 llama_chat.py --adapter-path {folder}.tar.gz "your question"
python3 llama_package.py --extract {folder}.tar.gz --to ./unpacked    # verified extraction
```

## Merge into a full model

```bash
python3 llama_package.py --adapter-path {folder}.tar.gz --output-dir ./merged --merge
```

or in Python: `model.merge_and_unload().save_pretrained("merged", safe_serialization=True)`
(load the base unquantized in bf16/fp16 first; never merge into a 4-bit model).

## Evaluation

{evaluation_table}
"""


PROMPT_LINES = {
    "chat_template": 'inputs = tokenizer.apply_chat_template([{"role": "user", "content": '
                     '"Hello"}], add_generation_prompt=True, return_tensors="pt", '
                     'return_dict=True)',
    "instruction": 'inputs = tokenizer("### Instruction:\\nHello\\n\\n### Response:\\n", '
                   'return_tensors="pt")',
    "llama2": 'inputs = tokenizer("[INST] Hello [/INST] ", return_tensors="pt")',
}


def render_readme(metadata: dict[str, Any]) -> str:
    folder = f"{metadata['name']}-{metadata['version']}"
    prompt_line = PROMPT_LINES.get(metadata["prompt_style"], PROMPT_LINES["instruction"])
    return README_TEMPLATE.format(
        name=metadata["name"], version=metadata["version"], folder=folder,
        base_model=metadata["base_model"], model_size=metadata["model_size"],
        license=metadata["license"], method=metadata["training_config"].get("method", "lora"),
        created=metadata["created"], prompt_style=metadata["prompt_style"],
        eval_file=", `evaluation.json` (the full evaluation report)"
        if metadata.get("evaluation") else "",
        evaluation_table=evaluation_table(metadata.get("evaluation")), prompt_line=prompt_line)


def render_requirements(versions: dict[str, str], quantization: str) -> str:
    def minor(pkg: str, fallback: str) -> str:
        return ".".join(versions.get(pkg, fallback).split("+")[0].split(".")[:2])

    lines = ["# The minimum to load this adapter (see README.md).",
             "torch>=2.1", f"transformers>={minor('transformers', '4.45')}",
             f"peft>={minor('peft', '0.13')}", "safetensors>=0.4"]
    if quantization != "none":
        lines.append("bitsandbytes>=0.43  # only to load the base model in 4-bit/8-bit on CUDA")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Building

def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise UsageError(f"--{kind} {value!r} must be letters, digits and . _ + - only "
                         f"(at most 100 characters, starting with a letter or digit)")
    return value


def _package_base_id(base: str) -> str:
    """A hub id for the embedded model's local directory; anything else unchanged."""
    from llama_config import EMBEDDED_MODEL_ID
    from llama_model import embedded_model_dir

    with contextlib.suppress(OSError):
        if Path(base).resolve() == embedded_model_dir().resolve():
            return EMBEDDED_MODEL_ID
    return base


def read_adapter_records(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training config, manifest) of a final_model/ dir, checked against its manifest.

    An extracted package (no manifest.json, but SHA256SUMS and metadata.json) is checked against
    SHA256SUMS instead, and its metadata.json stands in for both records.
    """
    if (adapter_dir / "manifest.json").exists() or not (adapter_dir / SUMS).is_file():
        manifest = verify_manifest(adapter_dir)
        cfg_path = adapter_dir / "training_config.json"
        training_config = read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(training_config, dict):
            raise DataError(f"{cfg_path} must hold a JSON object")
        return training_config, manifest
    sums = _parse_sums(adapter_dir, (adapter_dir / SUMS).read_bytes())
    for name, digest in sums.items():
        if name not in ALLOWED_FILES or sha256_file(adapter_dir / name) != digest:
            raise DataError(f"{adapter_dir / name} does not match {SUMS}; extract the package "
                            f"again")
    meta = read_json(adapter_dir / METADATA)
    training_config = {**(meta.get("training_config") or {}),
                       "model_size": meta.get("model_size"), "base_model": meta.get("base_model")}
    inputs = {k: {"path": v.get("file", ""), **v} for k, v in (meta.get("data") or {}).items()}
    manifest = {"created": meta.get("created"), "config": training_config, "inputs": inputs,
                "versions": (meta.get("versions") or {}).get("training") or {},
                "git_commit": meta.get("pipeline_git_commit"),
                "training_metrics": meta.get("training_metrics")}
    return training_config, manifest


def resolve_package_target(adapter_dir: Path, training_config: dict[str, Any],
                           base_model: str | None, model_size: str | None) -> tuple[str, str]:
    """(base model, model size); mismatches with what the adapter records are usage errors."""
    from llama_config import DEFAULT_SIZE, get_preset, preset_for_base_model
    from llama_model import check_adapter_dir, recorded_base_model

    recorded = _package_base_id(training_config.get("base_model")
                                or recorded_base_model(adapter_dir))
    requested = _package_base_id(base_model) if base_model else recorded
    if requested != recorded and Path(requested).resolve() != Path(recorded).resolve():
        raise UsageError(f"adapter {adapter_dir} was trained on {recorded!r}, not {base_model!r}; "
                         f"pass --base-model {recorded} (or leave it out)")
    check_adapter_dir(adapter_dir, recorded)
    recorded_size = training_config.get("model_size")
    if model_size and recorded_size and get_preset(model_size).name != recorded_size:
        raise UsageError(f"adapter {adapter_dir} was trained with --model-size {recorded_size}, "
                         f"not {model_size}; pass --model-size {recorded_size}")
    preset = preset_for_base_model(recorded)
    size = model_size or recorded_size or (preset.name if preset else DEFAULT_SIZE)
    return recorded, get_preset(size).name


def build_metadata(*, name: str, version: str, base_model: str, model_size: str,
                   adapter_dir: Path, manifest: dict[str, Any], training_config: dict[str, Any],
                   evaluation: dict[str, Any] | None, files: list[str]) -> dict[str, Any]:
    from llama_config import get_preset

    adapter_cfg = read_json(adapter_dir / "adapter_config.json")
    prompt_format = read_json(adapter_dir / PROMPT_FORMAT)
    metrics_path = adapter_dir / "metrics_summary.json"
    return {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        "name": name, "version": version, "created": manifest.get("created"),
        "base_model": base_model, "base_model_revision": adapter_cfg.get("revision")
        or training_config.get("base_model_revision"),
        "model_size": model_size, "license": get_preset(model_size).license,
        "prompt_style": prompt_format.get("style") if isinstance(prompt_format, dict) else None,
        "adapter": {k: adapter_cfg.get(k) for k in ("peft_type", "task_type", "r", "lora_alpha",
                                                     "lora_dropout", "target_modules")},
        "training_config": training_config or manifest.get("config") or {},
        "training_metrics": read_json(metrics_path) if metrics_path.is_file()
        else manifest.get("training_metrics"),
        "data": data_hashes(adapter_dir, manifest),
        "evaluation": evaluation,
        "versions": {"training": manifest.get("versions") or {}, "packaging": library_versions()},
        "pipeline_git_commit": manifest.get("git_commit"),
        "files": files,
    }


def _stage_files(adapter_dir: Path, present: list[str], folder: Path) -> None:
    for rel in present:
        shutil.copyfile(adapter_dir / rel, folder / rel)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    recorded = cfg.get("base_model_name_or_path")
    if recorded and _package_base_id(recorded) != recorded:
        cfg["base_model_name_or_path"] = _package_base_id(recorded)  # no local cache paths
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_sums(folder: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.name != SUMS]
    (folder / SUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _readable(path: Path) -> None:
    """mkstemp/mkdtemp give 0600/0700; published outputs get the usual modes (less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_archive(folder: Path, archive: Path, mtime: int) -> None:
    """A reproducible .tar.gz of ``folder``: sorted, fixed owner/mode/mtime, bare gzip header."""
    from tqdm import tqdm

    members = sorted(p.name for p in folder.iterdir())
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in tqdm(members, desc="archiving", unit="file", disable=None):
                info = tarfile.TarInfo(f"{folder.name}/{name}")
                info.size = (folder / name).stat().st_size
                info.mtime, info.mode, info.uid, info.gid = mtime, 0o644, 0, 0
                info.uname = info.gname = ""
                with open(folder / name, "rb") as fh:
                    tar.addfile(info, fh)
        _readable(Path(tmp))
        os.replace(tmp, archive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class PackagePlan:
    """Everything checked before anything is written."""

    adapter_dir: Path
    output_dir: Path
    base_model: str
    model_size: str
    name: str
    version: str
    training_config: dict[str, Any]
    manifest: dict[str, Any]
    present: list[str]
    evaluation_path: Path | None
    evaluation: dict[str, Any] | None

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def archive(self) -> Path:
        return self.output_dir / f"{self.folder_name}.tar.gz"

    @property
    def files(self) -> list[str]:
        extra = {EVALUATION} if self.evaluation_path else set()
        return sorted(set(self.present) | set(GENERATED_FILES) | extra)


def plan_package(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                 base_model: str | None = None, model_size: str | None = None,
                 name: str | None = None, version: str = "0.1.0",
                 evaluation: str | os.PathLike | None = None) -> PackagePlan:
    """Validate the adapter dir and options; refuse dangerous content, naming every file.

    The directory is inspected (no links followed, nothing read) before any file in it is read.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"adapter path {adapter_dir} does not exist or is not a directory")
    adapter_dir = adapter_dir.resolve()
    present, problems = inspect_adapter_dir(adapter_dir)
    if problems:
        raise DataError(f"refusing to package {adapter_dir}: {'; '.join(problems)}")
    missing = [f for f in ADAPTER_FILES + ("tokenizer_config.json", PROMPT_FORMAT)
               if f not in present]
    if missing:
        raise DataError(f"{adapter_dir} lacks {', '.join(missing)}; it was not written by "
                        f"llama_train.py")
    training_config, manifest = read_adapter_records(adapter_dir)
    base, size = resolve_package_target(adapter_dir, training_config, base_model, model_size)
    name = _check_name("name", name or f"llama-sft-{size}")
    version = _check_name("version", version)
    packaged_eval = adapter_dir / EVALUATION
    eval_path = Path(evaluation) if evaluation else (
        packaged_eval if packaged_eval.is_file() and (adapter_dir / SUMS).is_file() else None)
    if eval_path is not None and not eval_path.is_file():
        raise UsageError(f"evaluation report {eval_path} not found")
    summary = None
    if eval_path is not None:
        verify_file_against_manifest(eval_path)
        summary = summarize_evaluation(read_json(eval_path))
    return PackagePlan(adapter_dir, Path(output_dir), base, size, name, version, training_config,
                       manifest, present, eval_path, summary)


def stage_package(plan: PackagePlan, stage: Path) -> Path:
    """Write the package folder under ``stage``; refuse it when any file holds a token."""
    folder = stage / plan.folder_name
    folder.mkdir()
    _stage_files(plan.adapter_dir, plan.present, folder)
    if plan.evaluation_path is not None:
        shutil.copyfile(plan.evaluation_path, folder / EVALUATION)
    metadata = build_metadata(name=plan.name, version=plan.version, base_model=plan.base_model,
                              model_size=plan.model_size, adapter_dir=plan.adapter_dir,
                              manifest=plan.manifest, training_config=plan.training_config,
                              evaluation=plan.evaluation, files=plan.files)
    write_json(folder / METADATA, metadata, sort_keys=True)
    (folder / "README.md").write_text(render_readme(metadata), encoding="utf-8")
    (folder / "requirements.txt").write_text(render_requirements(
        metadata["versions"]["packaging"], plan.training_config.get("quantization", "none")),
        encoding="utf-8")
    write_sums(folder)
    leaks = [f"{p.name}: {kind}" for p in sorted(folder.iterdir()) if (kind := find_secret(p))]
    if leaks:
        raise DataError(f"refusing to package {plan.adapter_dir}: token-shaped content in "
                        f"{'; '.join(leaks)}; remove the secret and re-run")
    return folder


@contextlib.contextmanager
def _output_dir(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed; remove it again on failure when this call created it."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def is_package_archive(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def _adapter_source(adapter_path: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """(adapter dir, what to name as the input): a package archive is verified and extracted."""
    if not is_package_archive(adapter_path):
        yield Path(adapter_path), Path(adapter_path)
        return
    with tempfile.TemporaryDirectory(prefix="llama_package-") as tmp:
        yield extract_package(adapter_path, tmp), Path(adapter_path)


def build_package(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                  base_model: str | None = None, model_size: str | None = None,
                  name: str | None = None, version: str = "0.1.0",
                  evaluation: str | os.PathLike | None = None, merge: bool = False,
                  gguf: bool = False, merge_dtype: str = "auto") -> Path:
    """Package ``adapter_dir`` into ``output_dir/<name>-<version>.tar.gz`` (+ .sha256, manifest).

    ``adapter_dir`` is a final_model/ dir, an extracted package, or a package archive.
    """
    with _adapter_source(adapter_dir) as (source_dir, source):
        plan = plan_package(source_dir, output_dir, base_model=base_model, model_size=model_size,
                            name=name, version=version, evaluation=evaluation)
        archive = plan.archive
        with _output_dir(plan.output_dir), tempfile.TemporaryDirectory(
                dir=plan.output_dir, prefix=f".{plan.folder_name}.stage-") as stage:
            folder = stage_package(plan, Path(stage))
            write_archive(folder, archive, _epoch(plan.manifest.get("created")))
            digest = sha256_file(archive)
            sidecar = archive.with_name(archive.name + ".sha256")
            write_text_atomic(sidecar, f"{digest}  {archive.name}\n")
            _readable(sidecar)
            log.info("wrote %s (sha256 %s)", archive, digest)
            extras = export_models(plan, folder, Path(stage), merge=merge, gguf=gguf,
                                   dtype=_merge_dtype(merge_dtype, plan.training_config))
        inputs = {"adapter": source}
        if plan.evaluation_path is not None:
            inputs["evaluation"] = plan.evaluation_path
        described = describe_inputs(inputs)
    write_manifest(plan.output_dir, stage="package", inputs=described,
                   config={"name": plan.name, "version": plan.version,
                           "base_model": plan.base_model, "model_size": plan.model_size,
                           "merge": merge, "gguf": gguf},
                   extra={"package": {"archive": archive.name, "sha256": digest,
                                      "files": plan.files, **extras}})
    _readable(plan.output_dir / "manifest.json")
    return archive


# ---------------------------------------------------------------------------------------------
# Merging and GGUF

def _merge_dtype(requested: str, training_config: dict[str, Any]) -> str:
    if requested != "auto":
        return requested
    return training_config.get("dtype", "auto") or "auto"


def export_models(plan: PackagePlan, folder: Path, stage: Path, *, merge: bool, gguf: bool,
                  dtype: str) -> dict[str, str]:
    """The merged model (``--merge``) and the GGUF file (``--gguf``) beside the archive."""
    if not (merge or gguf):
        return {}
    extras = {}
    merged_dir = plan.output_dir / f"{plan.folder_name}-merged" if merge else stage / "merged"
    merged = merge_adapter(folder, plan.base_model, merged_dir, dtype=dtype)
    if merge:
        extras["merged_model"] = merged.name
    if gguf:
        out = plan.output_dir / f"{plan.folder_name}.f16.gguf"
        extras["gguf"] = export_gguf(merged, out).name
    return extras


def merge_adapter(adapter_dir: Path, base_model: str, out_dir: Path, *,
                  dtype: str = "auto") -> Path:
    """Fold the LoRA weights into the (unquantized) base and save a plain safetensors model."""
    from llama_model import load_for_inference

    log.info("merging the adapter into %s (%s) ...", base_model, dtype)
    loaded = load_for_inference(adapter_dir, base_model=base_model, dtype=dtype)
    merged = loaded.model.merge_and_unload()
    with atomic_output_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        loaded.prompt_format.save(tmp)
        for path in (tmp, *tmp.iterdir()):
            _readable(path)
    log.info("wrote %s", out_dir)
    return out_dir


def _gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [])
              if p.get("type") == "Split"]
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import \
            GGUF_PRE_TOKENIZER_SPLITS
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if splits == [regex]:
                return name
    raise UsageError("--gguf supports byte-level BPE tokenizers (SmolLM2, Llama 3); for this "
                     "one use llama.cpp's convert_hf_to_gguf.py on the merged model")


def _gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _permute_qk(weights, n_head: int):
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when loading)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_tensor(tensor_map, hf_name: str, data, n_head: int, n_kv: int):
    """(GGUF name, array): matrices in f16 with q/k permuted, norms in f32."""
    import numpy as np

    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UsageError(f"--gguf: tensor {hf_name} has no GGUF name; use llama.cpp's "
                         f"convert_hf_to_gguf.py")
    if hf_name.endswith("q_proj.weight"):
        data = _permute_qk(data, n_head)
    elif hf_name.endswith("k_proj.weight"):
        data = _permute_qk(data, n_kv)
    return name, np.ascontiguousarray(data.astype(np.float16) if data.ndim > 1 else data)


def export_gguf(merged_dir: Path, out_path: Path) -> Path:
    """Export a merged LLaMA model (plain RoPE, byte-level BPE tokenizer) to GGUF f16."""
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(merged_dir)
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise UsageError(f"--gguf exports LLaMA models with plain RoPE; {merged_dir} is "
                         f"{config.model_type} ({rope.get('rope_type')}); use llama.cpp's "
                         f"convert_hf_to_gguf.py")
    pre = _gguf_pre_tokenizer(json.loads((merged_dir / "tokenizer.json").read_text("utf-8")))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(out_path.name.removesuffix(".f16.gguf"))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        tokens, types = _gguf_vocab(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(
            writer, quiet=True)
        for shard in sorted(merged_dir.glob("*.safetensors")):
            with safe_open(shard, "pt") as fh:
                for hf_name in tqdm(sorted(fh.keys()), desc=f"gguf {shard.name}", unit="tensor",
                                    disable=None):
                    data = fh.get_tensor(hf_name).float().numpy()
                    writer.add_tensor(*_gguf_tensor(tensor_map, hf_name, data, n_head, n_kv))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _readable(Path(tmp))
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("wrote %s", out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# Verifying and extracting

class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` decompressed bytes were read."""

    def __init__(self, fh, limit: int, archive: Path):
        super().__init__()
        self._fh, self._limit, self._archive, self._count = fh, limit, archive, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._count += len(data)
        if self._count > self._limit:
            raise DataError(f"{self._archive}: decompresses to more than {self._limit} bytes "
                            f"(size cap); refusing it as a decompression bomb")
        return data


@contextlib.contextmanager
def _open_tar(archive: Path, max_bytes: int, max_members: int) -> Iterator[tarfile.TarFile]:
    overhead = (max_members + 8) * 2048 + 20480  # headers, padding and end blocks
    with gzip.open(archive, "rb") as gz:
        reader = _CappedReader(gz, max_bytes + overhead, archive)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            yield tar
        while reader.read(SCAN_CHUNK):  # to the end of the gzip stream, so its CRC is checked
            pass


@contextlib.contextmanager
def _archive_errors(archive: Path) -> Iterator[None]:
    import zlib

    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{archive} is not an intact .tar.gz ({exc or type(exc).__name__}); "
                        f"download or build it again") from None


class _MemberCheck:
    """Checks tar members one by one: type, path, allowlist, count and total size."""

    def __init__(self, archive: Path, max_bytes: int, max_members: int):
        self.archive, self.max_bytes, self.max_members = archive, max_bytes, max_members
        self.top: str | None = None
        self.count = self.total = 0
        self.seen: set[str] = set()

    def fail(self, member: tarfile.TarInfo, why: str) -> DataError:
        return DataError(f"{self.archive}: member {member.name!r} {why}; refusing the archive")

    def __call__(self, member: tarfile.TarInfo) -> str | None:
        """The file name inside the package folder (None for the folder entry itself)."""
        self.count += 1
        if self.count > self.max_members:
            raise DataError(f"{self.archive}: more than {self.max_members} members; refusing it")
        if member.issym() or member.islnk():
            raise self.fail(member, f"is a link (to {member.linkname!r})")
        if member.isdev() or not (member.isfile() or member.isdir()):
            raise self.fail(member, "is a device or special file")
        name = member.name
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise self.fail(member, "has an absolute path")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if ".." in parts:
            raise self.fail(member, "leaves the extraction directory (path traversal)")
        self.top = self.top or parts[0]
        if parts[0] != self.top:
            raise self.fail(member, f"is outside the package folder {self.top!r}")
        if member.isdir():
            if len(parts) != 1:
                raise self.fail(member, "is a directory not in the package allowlist")
            return None
        if len(parts) != 2 or parts[1] not in ALLOWED_FILES:
            raise self.fail(member, "is not in the package allowlist")
        if parts[1] in self.seen:
            raise self.fail(member, "appears twice")
        self.seen.add(parts[1])
        self.total += member.size
        if self.total > self.max_bytes:
            raise DataError(f"{self.archive}: members total more than {self.max_bytes} bytes "
                            f"(size cap); refusing it as a decompression bomb")
        return parts[1]


def _hash_stream(fh, keep: bool) -> tuple[str, bytes | None]:
    digest, kept = hashlib.sha256(), bytearray()
    while block := fh.read(SCAN_CHUNK):
        digest.update(block)
        if keep and len(kept) < SMALL_FILE_CAP:
            kept.extend(block)
    return digest.hexdigest(), bytes(kept) if keep else None


def _parse_sums(archive: Path, text: bytes) -> dict[str, str]:
    sums = {}
    for lineno, line in enumerate(text.decode("utf-8", "replace").splitlines(), start=1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not match:
            raise DataError(f"{archive}: {SUMS} line {lineno} is malformed")
        sums[match.group(2)] = match.group(1)
    return sums


def _check_sidecar(archive: Path) -> str:
    digest = sha256_file(archive)
    sidecar = archive.with_name(archive.name + ".sha256")
    if sidecar.is_file():
        recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()[:1]
        if recorded != [digest]:
            raise DataError(f"{archive} does not match {sidecar.name} (sha256 differs); the "
                            f"download is damaged or was altered")
    return digest


def verify_package(archive: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_members: int = DEFAULT_MAX_MEMBERS) -> dict[str, Any]:
    """Check integrity, allowlist and every checksum of a package (raises DataError).

    Nothing is written. A ``<archive>.sha256`` beside the archive is checked too.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise UsageError(f"package {archive} not found")
    digest = _check_sidecar(archive)
    check = _MemberCheck(archive, max_bytes, max_members)
    hashes: dict[str, str] = {}
    small: dict[str, bytes] = {}
    with _archive_errors(archive), _open_tar(archive, max_bytes, max_members) as tar:
        for member in tar:
            name = check(member)
            if name is None:
                continue
            fh = tar.extractfile(member)
            hashes[name], content = _hash_stream(fh, keep=name in (SUMS, METADATA))
            if content is not None:
                small[name] = content
    if check.top is None:
        raise DataError(f"{archive} is empty")
    missing = [f for f in REQUIRED_FILES if f not in hashes]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; it is not a package from "
                        f"llama_package.py")
    sums = _parse_sums(archive, small[SUMS])
    listed, present = set(sums), set(hashes) - {SUMS}
    if listed != present:
        odd = sorted(listed ^ present)
        raise DataError(f"{archive}: {SUMS} and the archive disagree on {', '.join(odd)}")
    for name in sorted(present):
        if sums[name] != hashes[name]:
            raise DataError(f"{archive}: checksum mismatch for {name} (the file was altered)")
    try:
        metadata = json.loads(small[METADATA])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{archive}: {METADATA} is not valid JSON ({exc})") from None
    return {"archive": str(archive), "sha256": digest, "folder": check.top,
            "name": metadata.get("name"), "version": metadata.get("version"),
            "base_model": metadata.get("base_model"), "model_size": metadata.get("model_size"),
            "files": dict(sorted(hashes.items())), "bytes": check.total,
            "members": check.count}


def extract_package(archive: str | os.PathLike, dest: str | os.PathLike, *,
                    max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS,
                    overwrite: bool = False) -> Path:
    """Verify, then extract into ``dest/<name>-<version>/``; returns that (adapter) directory.

    Extraction goes into a temporary directory inside ``dest`` that is renamed into place, so a
    failure leaves nothing (``dest`` itself is removed again when this call created it).
    """
    archive = Path(archive)
    info = verify_package(archive, max_bytes=max_bytes, max_members=max_members)
    dest = Path(dest)
    final = dest / info["folder"]
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists; remove it or pass --overwrite")
    created = [p for p in (dest, *dest.parents) if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{info['folder']}.extract-"))
    try:
        check = _MemberCheck(archive, max_bytes, max_members)
        with _archive_errors(archive), _open_tar(archive, max_bytes, max_members) as tar:
            for member in tar:
                check(member)
                tar.extract(member, tmp, filter="data")
        extracted = tmp / info["folder"]
        for name, digest in info["files"].items():
            if sha256_file(extracted / name) != digest:
                raise DataError(f"{archive} changed while it was being extracted ({name})")
        if final.exists():
            os.replace(final, tmp / "replaced")  # removed with tmp below
        os.replace(extracted, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Hub

def _default_hub_api():
    """An authenticated HfApi; the token is never printed."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UsageError("--push-to-hub needs a Hugging Face token: run `hf auth login` "
                         "(or `huggingface-cli login`) or set HF_TOKEN")
    return HfApi(token=token)


def push_to_hub(archive: str | os.PathLike, repo_id: str, *, private: bool = True,
                api=None) -> str:
    """Upload the package's files (a loadable adapter repo) plus the archive and its checksum."""
    archive = Path(archive)
    api = api or _default_hub_api()
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_package(archive, tmp)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=f"Add {folder.name}")
        for path in (archive, archive.with_name(archive.name + ".sha256")):
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id,
                            repo_type="model", commit_message=f"Add {path.name}")
    log.info("pushed %s to https://huggingface.co/%s", folder.name, repo_id)
    return f"https://huggingface.co/{repo_id}"


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--adapter-path",
                      help="adapter dir to package (final_model/), or a package to re-package "
                           "(e.g. with --merge)")
    mode.add_argument("--verify", metavar="PACKAGE", help="verify a package archive and exit")
    mode.add_argument("--extract", metavar="PACKAGE", help="verify and extract a package (--to)")
    parser.add_argument("--to", metavar="DIR", help="with --extract: where to put the package "
                        "folder")
    parser.add_argument("--base-model", default=None,
                        help="base model id (None: the one the adapter dir records)")
    parser.add_argument("--model-size", default=None,
                        help="preset name (None: the one the adapter dir records)")
    parser.add_argument("--output-dir", default="./packages", help="where the package goes")
    parser.add_argument("--name", default=None, help="package name (None: llama-sft-<size>)")
    parser.add_argument("--version", default="0.1.0", help="package version")
    parser.add_argument("--evaluation", default=None, metavar="REPORT",
                        help="llama_evaluate.py report to include and summarize")
    parser.add_argument("--merge", action="store_true",
                        help="also write a merged full model (safetensors)")
    parser.add_argument("--merge-dtype", default="auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help="dtype of the merged model (auto: the training dtype, else bf16/fp16)")
    parser.add_argument("--gguf", action="store_true",
                        help="also export the merged model to GGUF (f16)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the package to this hub repo (needs a token)")
    parser.add_argument("--public", action="store_true",
                        help="with --push-to-hub: create a public repo, not a private one")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="verify/extract: cap on total uncompressed size")
    parser.add_argument("--max-members", type=int, default=DEFAULT_MAX_MEMBERS,
                        help="verify/extract: cap on archive members")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --extract: replace an existing extracted folder")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    caps = {"max_bytes": args.max_bytes, "max_members": args.max_members}
    if args.verify:
        info = verify_package(args.verify, **caps)
        print(f"ok: {args.verify}: {len(info['files'])} files, {info['bytes']} bytes; checksums "
              f"and allowlist verified (sha256 {info['sha256']})")
        return 0
    if args.extract:
        if not args.to:
            raise UsageError("--extract needs --to DIR")
        print(extract_package(args.extract, args.to, overwrite=args.overwrite, **caps))
        return 0
    if not args.adapter_path:
        raise UsageError("give --adapter-path DIR (to package), --verify PACKAGE or "
                         "--extract PACKAGE --to DIR")
    hub_api = _default_hub_api() if args.push_to_hub else None  # no token: fail before work
    archive = build_package(args.adapter_path, args.output_dir, base_model=args.base_model,
                            model_size=args.model_size, name=args.name, version=args.version,
                            evaluation=args.evaluation, merge=args.merge, gguf=args.gguf,
                            merge_dtype=args.merge_dtype)
    if hub_api is not None:
        push_to_hub(archive, args.push_to_hub, private=not args.public, api=hub_api)
    print(archive)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
