"""A package's generated files: ``metadata.json``, ``README.md`` and ``requirements.txt``."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from llama_sft.adapter.layout import PACKAGE_FORMAT, PACKAGE_FORMAT_VERSION, PROMPT_FORMAT
from llama_sft.config.presets import get_preset
from llama_sft.errors import DataError
from llama_sft.files import library_versions, read_json


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


def build_metadata(*, name: str, version: str, base_model: str, model_size: str,
                   adapter_dir: Path, manifest: dict[str, Any], training_config: dict[str, Any],
                   evaluation: dict[str, Any] | None, files: list[str]) -> dict[str, Any]:

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
