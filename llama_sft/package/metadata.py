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
`metadata.json` (training config, data hashes, library versions, the exports and their sha256),
`requirements.txt`{eval_file} and `SHA256SUMS` (check with `sha256sum -c SHA256SUMS` inside this
folder).

Answers end with token {stop_ids} (`stop_token_ids` in `metadata.json`): stop generation there.

## Load with transformers + peft

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{folder}")
base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, "{folder}")
{prompt_line}
out = model.generate(**inputs, max_new_tokens=256, do_sample=False, eos_token_id={stop_list})
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`PromptFormat.load("{folder}").encode_prompt(tokenizer, instruction, context)` (from
`llama_dataset.py`) builds prompts exactly as training did.

## Chat with it

```bash
python3 llama_chat.py --adapter-path {folder}.tar.gz "your question"
python3 llama_package.py --extract {folder}.tar.gz --to ./unpacked    # verified extraction
```

## Serve it with vLLM (GPU)

```bash
vllm serve {base_model} --enable-lora --lora-modules {name}={folder}
```

## Merge into a full model

```bash
python3 llama_package.py --adapter-path {folder}.tar.gz --output-dir ./merged --merge
```

or in Python: `model.merge_and_unload().save_pretrained("merged", safe_serialization=True)`
(load the base unquantized in bf16/fp16 first; never merge into a 4-bit model).
{export_sections}
## Evaluation

{evaluation_table}
"""


PROMPT_LINES = {
    "chat_template": 'inputs = tokenizer.apply_chat_template([{"role": "user", "content": '
                     '"Hello"}], add_generation_prompt=True, return_tensors="pt", '
                     'return_dict=True)',
    "instruction": 'inputs = tokenizer("### Instruction:\\nHello\\n\\n### Response:\\n", '
                   'return_tensors="pt")',
    "llama2": 'inputs = tokenizer("[INST] Hello [/INST]", return_tensors="pt")',
}
PROMPT_TEXTS = {"instruction": "### Instruction:\\nHello\\n\\n### Response:\\n",
                "llama2": "[INST] Hello [/INST]"}

MERGED_SECTION = """
## The merged model (`{path}`)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
{prompt_line}
out = model.generate(**inputs, max_new_tokens=256, do_sample=False, eos_token_id={stop_list})
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""

GGUF_SECTION = """
## GGUF for llama.cpp (`{files}`)

Made by llama.cpp's own converter and quantizer. In Python (`pip install llama-cpp-python`):

```python
from llama_cpp import Llama
llm = Llama(model_path="{path}", n_ctx=4096)
{gguf_call}
```

As an OpenAI-compatible server, then any OpenAI client on `http://127.0.0.1:8000/v1`:

```bash
python3 -m llama_cpp.server --model {path} --chat_format chat_template.default --host 127.0.0.1 --port 8000
llama-server -m {path} --host 127.0.0.1 --port 8000        # llama.cpp's own binary
```
"""

GGUF_CALLS = {
    "chat_template": 'out = llm.create_chat_completion([{{"role": "user", "content": "Hello"}}], '
                     'temperature=0, max_tokens=256)\nprint(out["choices"][0]["message"]'
                     '["content"])',
    "text": 'out = llm({prompt!r}, temperature=0, max_tokens=256)\n'
            'print(out["choices"][0]["text"])',
}

ONNX_SECTION = """
## ONNX for onnxruntime (`{path}/`)

fp32, with the KV cache as inputs and outputs (`past_key_values.<layer>.key/value` in,
`present.<layer>.key/value` out). Greedy decoding with `pip install onnxruntime transformers`:

```python
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer
d = "{path}"; tok = AutoTokenizer.from_pretrained(d); s = ort.InferenceSession(f"{{d}}/model.onnx")
{onnx_ids}
past = {{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in s.get_inputs() if i.name.startswith("past")}}
new, out, n, stop = ids, [], 0, {stop_list}
while len(out) < 256 and not set(out) & set(stop):
    logits, *present = s.run(None, {{"input_ids": np.array([new]), "attention_mask": np.ones((1, n + len(new)), np.int64), "position_ids": np.arange(n, n + len(new))[None], **past}})
    n, past, new = n + len(new), dict(zip(past, present)), [int(logits[0, -1].argmax())]; out += new
print(tok.decode(out, skip_special_tokens=True))
```
"""


def _export_sections(metadata: dict[str, Any], prompt_line: str, stop_list: str) -> str:
    exports = metadata.get("exports") or []
    style = metadata["prompt_style"]
    sections = []
    merged = sorted({e["path"].split("/")[0] for e in exports if e["kind"] == "merged"})
    for path in merged:
        sections.append(MERGED_SECTION.format(path=path, prompt_line=prompt_line,
                                              stop_list=stop_list))
    ggufs = [e["path"] for e in exports if e["kind"] == "gguf"]
    if ggufs:
        call = GGUF_CALLS["chat_template"] if style == "chat_template" else \
            GGUF_CALLS["text"].format(prompt=PROMPT_TEXTS.get(style, PROMPT_TEXTS["instruction"])
                                      .encode().decode("unicode_escape"))
        sections.append(GGUF_SECTION.format(files="`, `".join(ggufs), path=ggufs[-1],
                                            gguf_call=call))
    for path in sorted({e["path"].split("/")[0] for e in exports if e["kind"] == "onnx"}):
        ids = ('ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], '
               'add_generation_prompt=True, return_dict=False)' if style == "chat_template"
               else f'ids = tok({PROMPT_TEXTS.get(style, PROMPT_TEXTS["instruction"])!r})'
                    f'["input_ids"]'.replace("\\\\n", "\\n"))
        sections.append(ONNX_SECTION.format(path=path, onnx_ids=ids, stop_list=stop_list))
    return "".join(sections)


def render_readme(metadata: dict[str, Any]) -> str:
    folder = f"{metadata['name']}-{metadata['version']}"
    prompt_line = PROMPT_LINES.get(metadata["prompt_style"], PROMPT_LINES["instruction"])
    stops = metadata.get("stop_token_ids") or []
    stop_list = str(list(stops))
    return README_TEMPLATE.format(
        name=metadata["name"], version=metadata["version"], folder=folder,
        base_model=metadata["base_model"], model_size=metadata["model_size"],
        license=metadata["license"], method=metadata["training_config"].get("method", "lora"),
        created=metadata["created"], prompt_style=metadata["prompt_style"],
        eval_file=", `evaluation.json` (the full evaluation report)"
        if metadata.get("evaluation") else "",
        evaluation_table=evaluation_table(metadata.get("evaluation")), prompt_line=prompt_line,
        stop_ids=" or ".join(map(str, stops)) or "EOS", stop_list=stop_list,
        export_sections=_export_sections(metadata, prompt_line, stop_list))


def render_requirements(versions: dict[str, str], quantization: str) -> str:
    def minor(pkg: str, fallback: str) -> str:
        return ".".join(versions.get(pkg, fallback).split("+")[0].split(".")[:2])

    lines = ["# The minimum to load this adapter (see README.md).",
             "torch>=2.1", f"transformers>={minor('transformers', '4.45')}",
             f"peft>={minor('peft', '0.13')}", "safetensors>=0.4"]
    if quantization != "none":
        lines.append("bitsandbytes>=0.43  # only to load the base model in 4-bit/8-bit on CUDA")
    return "\n".join(lines) + "\n"


def stop_token_ids(adapter_dir: Path) -> list[int]:
    """The tokens that end an answer of this adapter (the prompt format's end-of-turn and EOS)."""
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.model.loading import load_tokenizer

    return list(PromptFormat.load(adapter_dir).stop_ids(load_tokenizer(str(adapter_dir))))


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
        "stop_token_ids": stop_token_ids(adapter_dir),
        "files": files,
    }
