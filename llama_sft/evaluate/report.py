"""The evaluation report: metrics overall and per category, deltas against the base model,
what was evaluated with what (schema: docs/evaluation_report.md)."""
from __future__ import annotations

import collections
import hashlib
import math
from pathlib import Path
from typing import Any, Sequence

from llama_sft.adapter.archive import is_package_archive
from llama_sft.adapter.layout import ADAPTER_WEIGHTS
from llama_sft.evaluate.metrics import mean, summarize_generations
from llama_sft.files import git_commit, library_versions, sha256_file
from llama_sft.model.embedded import resolve_model_path

SCHEMA_VERSION = 1

# Rows of the printed table.
TABLE_METRICS = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "bleu", "chrf",
                 "json_valid", "json_field_accuracy", "stop_rate", "mean_generated_tokens")


def summarize(records: Sequence[dict], samples: Sequence[dict]) -> dict[str, Any]:
    """METRICS over aligned records and their SAMPLE dicts."""
    pairs = [(g, r["response"]) for r, s in zip(records, samples) for g in s["generations"]]
    fitted = [s for s in samples if s["loss"] is not None]
    tokens = sum(s["response_tokens"] for s in fitted)
    loss = sum(s["loss"] * s["response_tokens"] for s in fitted) / tokens if tokens else None
    metrics: dict[str, Any] = {
        "examples": len(samples), "generations": len(pairs), "loss": loss,
        "perplexity": math.exp(loss) if loss is not None else None,
        "loss_examples": len(fitted), "loss_tokens": tokens}
    metrics.update(summarize_generations([g["text"] for g, _ in pairs], [r for _, r in pairs],
                                         [g["scores"] for g, _ in pairs]))
    metrics["stop_rate"] = mean(float(g["stopped"]) for g, _ in pairs)
    metrics["mean_generated_tokens"] = mean(g["generated_tokens"] for g, _ in pairs)
    if any(len(s["generations"]) > 1 for s in samples):
        metrics["exact_match_any"] = mean(max(g["scores"]["exact_match"] for g in s["generations"])
                                          for s in samples)
    return metrics


def category_of(record: dict) -> str:
    return record.get("category") or "uncategorized"


def model_result(records: Sequence[dict], samples: Sequence[dict], speed: dict) -> dict[str, Any]:
    """RESULT: overall and per-category METRICS plus SPEED."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, record in enumerate(records):
        groups[category_of(record)].append(i)
    per_category = {cat: summarize([records[i] for i in idx], [samples[i] for i in idx])
                    for cat, idx in sorted(groups.items())}
    return {"overall": summarize(records, samples), "per_category": per_category, "speed": speed}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_deltas(finetuned: dict, base: dict) -> dict[str, float]:
    return {k: v - base[k] for k, v in finetuned.items()
            if _is_number(v) and _is_number(base.get(k))}


def compare(finetuned: dict, base: dict) -> dict[str, Any]:
    return {"overall": metric_deltas(finetuned["overall"], base["overall"]),
            "per_category": {cat: metric_deltas(m, base["per_category"][cat])
                             for cat, m in finetuned["per_category"].items()}}


def base_model_files(name: str) -> dict[str, Any]:
    """Fingerprint of the base weights: file hashes (directory) or cache revision (hub id)."""

    path = Path(resolve_model_path(name))
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.name == "config.json" or p.name.endswith(".safetensors"))
        return {"path": str(path), "sha256": {p.name: sha256_file(p) for p in files}}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return {"hub_id": name, "revision": Path(cached).parent.name if isinstance(cached, str)
            else None}


def model_info(loaded, adapter_arg: str, training_config: dict[str, Any]) -> dict[str, Any]:
    """What was evaluated: base weights, adapter files, prompt format, training config."""
    adapter = loaded.adapter_dir
    fmt = loaded.prompt_format
    template = fmt.chat_template
    manifest = adapter / "manifest.json"
    info = {"base_model": loaded.base_model,
            "base_model_files": base_model_files(loaded.base_model),
            "adapter_path": str(adapter_arg), "adapter_dir": str(adapter),
            "adapter_weights_sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
            "adapter_manifest_sha256": sha256_file(manifest) if manifest.exists() else None,
            "prompt_format": {"style": fmt.style, "system_prompt": fmt.system_prompt,
                              "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()
                              if template else None},
            "training_config": training_config or None,
            "model_dtype": str(getattr(loaded.model, "dtype", None))}
    if is_package_archive(adapter_arg):
        info["package_sha256"] = sha256_file(adapter_arg)
    return info


def environment_info() -> dict[str, Any]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"versions": library_versions(), "git_commit": git_commit(), "device": device,
            "torch_threads": torch.get_num_threads()}


def build_samples(records, prompts_text, finetuned, base) -> list[dict[str, Any]]:
    samples = []
    for i, record in enumerate(records):
        sample = {"id": record.get("id"), "category": category_of(record),
                  "instruction": record["instruction"], "context": record.get("context") or "",
                  "prompt": prompts_text[i], "reference": record["response"],
                  "finetuned": finetuned[i]}
        if base is not None:
            sample["base"] = base[i]
        samples.append(sample)
    return samples


def format_table(finetuned: dict, base: dict | None) -> str:
    """The main overall metrics as a small text table: fine-tuned, base, delta."""
    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [f"{'metric':<24}{'fine-tuned':>12}{'base':>12}{'delta':>12}"]
    ft, bs = finetuned["overall"], (base or {}).get("overall", {})
    for metric in TABLE_METRICS:
        value, base_value = ft.get(metric), bs.get(metric)
        delta = value - base_value if value is not None and base_value is not None else None
        lines.append(f"{metric:<24}{cell(value):>12}{cell(base_value):>12}{cell(delta):>12}")
    speed = finetuned["speed"]["tokens_per_second"]
    base_speed = base["speed"]["tokens_per_second"] if base else None
    lines.append(f"{'tokens_per_second':<24}{cell(speed):>12}{cell(base_speed):>12}{'':>12}")
    return "\n".join(lines)
