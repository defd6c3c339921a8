#!/usr/bin/env python3
"""Evaluate a fine-tuned adapter on a golden set, optionally against its base model.

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \\
        --dataset ./sft_output/golden_set.jsonl --output ./final_evaluation.json --num-samples 50
    python3 llama_evaluate.py --base-model meta-llama/Llama-2-7b-hf \\
        --adapter-path ./training_output/final_model --dataset ./sft_output/golden_set.jsonl \\
        --output ./final_evaluation.json --num-samples 50 --use-4bit
    python3 llama_evaluate.py --adapter-path ./packages/my-model.tar.gz \\
        --dataset ./sft_output/sft_dataset.jsonl --split test --output ./eval_test.json \\
        --num-samples 0 --compare-base --fail-under exact_match=0.5 rouge_l=0.6

The base model and prompt format are the ones recorded in the adapter directory (``--base-model``
only has to be given to double-check; a different one is refused). ``--adapter-path`` may also be
a package archive written by ``llama_package.py``. Generation is batched (left padding, KV cache,
greedy unless ``--temperature`` > 0; a greedy batch takes a waiting prompt as each answer
finishes). The report schema is ``REPORT_SCHEMA`` below and ``docs/evaluation_report.md``.

Exit codes: 0 ok, 1 a ``--fail-under`` gate failed (the report is still written and says which),
2 usage or config error (bad adapter path, base model mismatch), 65 bad data, 74 I/O error.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from llama_dataset import SPLITS, read_sft_jsonl
from llama_io import (EXIT_GATE, DataError, PipelineError, UsageError, git_commit,
                      library_versions, now_iso, read_json, run_main, sha256_file,
                      verify_file_against_manifest, verify_manifest, write_json)
from llama_metrics import mean, score_example, summarize_generations
from llama_model import add_decoding_flags, decoding_problems

SCHEMA_VERSION = 1
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
DEFAULT_MAX_LENGTH = 2048
# Metrics --fail-under accepts: higher is better for all of them.
GATE_METRICS = ("exact_match", "exact_match_strict", "token_f1", "rouge_l", "bleu", "chrf",
                "json_valid", "json_field_accuracy", "stop_rate")
# Rows of the printed table.
TABLE_METRICS = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "bleu", "chrf",
                 "json_valid", "json_field_accuracy", "stop_rate", "mean_generated_tokens")

REPORT_SCHEMA = """\
{
  "schema_version": 1,
  "stage": "evaluate",
  "created": ISO-8601 UTC time,
  "settings": {                       # the resolved run settings
    "base_model", "adapter_path", "dataset", "split" (null = all records), "num_samples"
    (0 = all), "quantization" ("none"|"4bit"|"8bit"), "dtype", "max_length", "batch_size",
    "max_new_tokens", "temperature" (0 = greedy), "top_p", "num_return_sequences", "seed",
    "compare_base", "fail_under": {metric: threshold}
  },
  "model": {
    "base_model", "base_model_files": {"path", "sha256": {file: sha256}} for a local
    directory | {"hub_id", "revision"} for a hub id (revision from the local cache, or null),
    "adapter_path" (as given), "adapter_dir" (where it was loaded from),
    "package_sha256" (only when --adapter-path is a .tar.gz package),
    "adapter_weights_sha256", "adapter_manifest_sha256",
    "prompt_format": {"style", "system_prompt", "chat_template_sha256"},
    "training_config": the adapter's training_config.json, "model_dtype"
  },
  "data": {"path", "sha256", "split", "records_matching", "evaluated",
           "categories": {category: count}},
  "environment": {"versions": {package: version}, "git_commit", "device", "torch_threads"},
  "finetuned": RESULT,
  "base": RESULT | null,              # with --compare-base: the adapter disabled, same prompts
  "delta": {"overall": {metric: finetuned - base}, "per_category": {category: {...}}} | null,
  "gates": {"passed": bool, "checks": [{"metric", "threshold", "value", "base", "passed",
            "reasons": [str]}]},
  "samples": [{"id", "category", "instruction", "context", "prompt" (rendered text),
               "reference", "finetuned": SAMPLE, "base": SAMPLE (with --compare-base)}]
}
RESULT = {"overall": METRICS, "per_category": {category: METRICS}, "speed": SPEED}
METRICS = {
  "examples", "generations" (examples x num_return_sequences),
  "loss" (teacher-forced mean NLL per reference token incl. EOS, prompt masked as in training),
  "perplexity" (exp(loss)), "loss_examples" (examples that fit --max-length), "loss_tokens",
  "exact_match", "exact_match_strict", "token_f1", "rouge_l"   (means in [0, 1]),
  "bleu", "chrf"                       (sacrebleu corpus scores, 0-100),
  "json_examples" (generations whose reference is a JSON object/array),
  "json_valid", "json_field_accuracy"  (over those; null when there are none),
  "json_fields": {field: accuracy},
  "stop_rate" (share of generations that ended with EOS before --max-new-tokens),
  "mean_generated_tokens",
  "exact_match_any" (only with num_return_sequences > 1: any of the k matched)
}
SPEED = {"generated_tokens", "seconds", "tokens_per_second", "batch_size",
         "prefill_calls" (batched forward passes over new prompts), "seconds_per_example"}
SAMPLE = {"loss" (null when over --max-length), "response_tokens",
          "generations": [{"text", "generated_tokens", "stopped",
                           "scores": {"exact_match", "exact_match_strict", "token_f1", "rouge_l",
                                      "bleu" (sentence), "chrf" (sentence), "json_valid",
                                      "json_field_accuracy"}}]}
"""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (one setting per flag)."""

    max_new_tokens: int = 128        # generation limit per answer
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 1.0               # nucleus sampling mass (sampling only)
    num_return_sequences: int = 1    # answers per prompt (sampling only when > 1)
    batch_size: int = 8              # most prompts decoding at once / per loss forward pass
    seed: int = 42                   # torch seed set before each model's pass

    def problems(self) -> list[str]:
        found = decoding_problems(self.max_new_tokens, self.temperature, self.top_p)
        for name in ("num_return_sequences", "batch_size"):
            if getattr(self, name) <= 0:
                found.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.num_return_sequences > 1 and self.temperature == 0:
            found.append("--num-return-sequences > 1 needs sampling: give --temperature > 0")
        return found


# ---------------------------------------------------------------------------------------------
# Arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapter-path", required=True,
                        help="adapter directory (training_output/final_model) or package .tar.gz")
    parser.add_argument("--base-model", default=None,
                        help="base model; None: the one recorded in the adapter directory")
    parser.add_argument("--dataset", required=True, help="SFT JSONL file (golden_set.jsonl, ...)")
    parser.add_argument("--output", required=True, help="report JSON file to write")
    parser.add_argument("--split", default=None,
                        help="evaluate only records of this split (train/val/test/golden); "
                             "None: every record in the file")
    parser.add_argument("--num-samples", type=int, default=50,
                        help="evaluate the first N records (0 = all)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true", help="load the base model in 4-bit nf4")
    quant.add_argument("--use-8bit", action="store_true", help="load the base model in 8-bit")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype (auto: bf16 where supported)")
    parser.add_argument("--compare-base", action="store_true",
                        help="also evaluate the base model (adapter disabled) and report deltas")
    parser.add_argument("--fail-under", nargs="+", action="extend", default=[],
                        metavar="METRIC=VALUE",
                        help=f"exit 1 when a metric is under VALUE (or, with --compare-base, "
                             f"under the base model); metrics: {', '.join(GATE_METRICS)}")
    parser.add_argument("--max-length", type=int, default=None,
                        help="token limit for the teacher-forced loss; None: the adapter's "
                             f"training max_length (else {DEFAULT_MAX_LENGTH})")
    defaults = GenerationSettings()
    add_decoding_flags(parser, max_new_tokens=defaults.max_new_tokens,
                       temperature=defaults.temperature, top_p=defaults.top_p)
    parser.add_argument("--num-return-sequences", type=int,
                        default=defaults.num_return_sequences,
                        help="answers per prompt (needs --temperature > 0 when > 1)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="most prompts decoding at once (greedy decoding refills finished "
                             "rows from the waiting prompts) and per loss forward pass")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="torch seed set before each model's generation pass")
    return parser


def parse_gates(specs: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """``["exact_match=0.5", ...]`` -> ({metric: threshold}, problems)."""
    gates, problems = {}, []
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or name not in GATE_METRICS:
            problems.append(f"--fail-under {spec!r}: expected METRIC=VALUE with METRIC one of "
                            f"{', '.join(GATE_METRICS)}")
            continue
        try:
            gates[name] = float(value)
        except ValueError:
            problems.append(f"--fail-under {spec!r}: {value!r} is not a number")
    return gates, problems


def validate_args(args) -> tuple[GenerationSettings, dict[str, float]]:
    """Check every flag before anything is loaded; report all problems in one line."""
    gen = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p,
                             args.num_return_sequences, args.batch_size, args.seed)
    problems = gen.problems()
    gates, gate_problems = parse_gates(args.fail_under)
    problems += gate_problems
    if args.num_samples < 0:
        problems.append(f"--num-samples must be >= 0 (0 = all), got {args.num_samples}")
    if args.max_length is not None and args.max_length <= 0:
        problems.append(f"--max-length must be > 0, got {args.max_length}")
    if args.split is not None and args.split not in SPLITS:
        problems.append(f"--split must be one of {', '.join(SPLITS)}; got {args.split!r}")
    if not Path(args.adapter_path).exists():
        problems.append(f"adapter path {args.adapter_path} does not exist (expected "
                        f"training_output/final_model or a package .tar.gz)")
    if not Path(args.dataset).is_file():
        problems.append(f"dataset file not found: {args.dataset}")
    if Path(args.output).is_dir():
        problems.append(f"--output {args.output} is a directory; give a .json file path")
    if problems:
        raise UsageError("; ".join(problems))
    return gen, gates


def select_records(path: str, split: str | None, num_samples: int) -> tuple[list[dict], int]:
    """The first ``num_samples`` records (all with 0) of ``split``, and how many matched."""
    verify_file_against_manifest(path)
    records = read_sft_jsonl(path, split)
    if not records:
        where = f" with split {split!r}; check --split" if split else ""
        raise DataError(f"{path} has no records{where}")
    return (records[:num_samples] if num_samples else records), len(records)


def is_package_archive(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and Path(path).name.endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def adapter_source(path: str | os.PathLike, base_model: str | None = None) -> Iterator[Path]:
    """The adapter directory for ``path``: itself, or a package archive extracted to a temp dir.

    Checked before any model library is imported: the adapter files, the base model it was
    trained on (when ``base_model`` is given), and a directory's manifest; a package is verified
    (every checksum) by ``llama_package.extract_package`` as it is extracted.
    """
    from llama_model import check_adapter_dir

    path = Path(path)
    if not is_package_archive(path):
        if path.is_dir():  # else load_for_inference says what is wrong
            check_adapter_dir(path, base_model)
            verify_manifest(path)
        yield path
        return
    try:
        from llama_package import extract_package
    except ImportError:
        raise UsageError(f"{path} is a package archive but llama_package.py is not available "
                         f"to extract it") from None
    with tempfile.TemporaryDirectory(prefix="llama-adapter-") as tmp:
        adapter = Path(extract_package(path, Path(tmp)))
        check_adapter_dir(adapter, base_model)
        yield adapter


# ---------------------------------------------------------------------------------------------
# Running a model over the records

def teacher_forced_losses(model, tokenizer, fmt, records: Sequence[dict], max_length: int,
                          batch_size: int, desc: str = "loss") -> list[tuple[float, int] | None]:
    """Per record (sum of NLL over the reference tokens, token count); None when it does not fit.

    Tokenized exactly as in training (``encode_example``: prompt masked, response + EOS
    supervised), right-padded with ``pad_collate``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from llama_dataset import IGNORE_INDEX, encode_example, pad_collate
    from llama_model import length_batches

    encoded = [encode_example(tokenizer, fmt, r, max_length) for r in records]
    valid = [i for i, e in enumerate(encoded) if e is not None and e.num_supervised]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[tuple[float, int] | None] = [None] * len(records)
    for batch in tqdm(length_batches([len(encoded[i]) for i in valid], batch_size), desc=desc,
                      unit="batch", leave=False):
        rows = [valid[j] for j in batch]
        tensors = pad_collate([encoded[i] for i in rows], pad)
        with torch.inference_mode():
            logits = model(input_ids=tensors["input_ids"].to(device),
                           attention_mask=tensors["attention_mask"].to(device)).logits
        labels = tensors["labels"][:, 1:].to(device)
        for row, index in enumerate(rows):
            keep = labels[row] != IGNORE_INDEX
            nll = F.cross_entropy(logits[row, :-1][keep].float(), labels[row][keep],
                                  reduction="sum")
            results[index] = (float(nll), int(keep.sum()))
    return results


def generate_all(model, tokenizer, prompts: Sequence[Sequence[int]], gen: GenerationSettings,
                 desc: str = "generate") -> tuple[list[list[Any]], dict[str, Any]]:
    """Generations per prompt (``num_return_sequences`` each) and the speed figures."""
    from tqdm.auto import tqdm

    from llama_model import generate_many

    k = gen.num_return_sequences
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        results, prefills = generate_many(
            model, tokenizer, prompts, batch_size=gen.batch_size,
            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
            num_return_sequences=k, on_done=bar.update)
    seconds = time.perf_counter() - start
    outputs = [results[i * k:(i + 1) * k] for i in range(len(prompts))]
    tokens = sum(len(g.token_ids) for g in results)
    speed = {"generated_tokens": tokens, "seconds": seconds,
             "tokens_per_second": tokens / seconds if seconds else None,
             "batch_size": gen.batch_size, "prefill_calls": prefills,
             "seconds_per_example": seconds / len(prompts) if prompts else None}
    return outputs, speed


def run_model(model, tokenizer, fmt, records: Sequence[dict], prompts: Sequence[Sequence[int]],
              gen: GenerationSettings, max_length: int, label: str) -> tuple[list[dict], dict]:
    """Loss and generations for every record: per-example SAMPLE dicts and the speed figures."""
    import torch

    losses = teacher_forced_losses(model, tokenizer, fmt, records, max_length, gen.batch_size,
                                   desc=f"{label} loss")
    torch.manual_seed(gen.seed)
    outputs, speed = generate_all(model, tokenizer, prompts, gen, desc=f"{label} generate")
    samples = []
    for record, loss, generations in zip(records, losses, outputs):
        samples.append({
            "loss": None if loss is None else loss[0] / loss[1],
            "response_tokens": None if loss is None else loss[1],
            "generations": [{"text": g.text, "generated_tokens": len(g.token_ids),
                             "stopped": g.stopped,
                             "scores": score_example(g.text, record["response"])}
                            for g in generations]})
    return samples, speed


# ---------------------------------------------------------------------------------------------
# Aggregation

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


def check_gates(gates: dict[str, float], finetuned: dict, base: dict | None) -> dict[str, Any]:
    """Each gated metric must reach its threshold and, with a base result, not be under it."""
    checks = []
    for metric, threshold in gates.items():
        value = finetuned.get(metric)
        base_value = base.get(metric) if base is not None else None
        reasons = []
        if value is None:
            reasons.append(f"{metric} was not computed (no JSON references in the evaluated set)")
        else:
            if value < threshold:
                reasons.append(f"{metric} {value:.4g} < {threshold:g}")
            if base_value is not None and value < base_value:
                reasons.append(f"{metric} {value:.4g} is under the base model's {base_value:.4g}")
        checks.append({"metric": metric, "threshold": threshold, "value": value,
                       "base": base_value, "passed": not reasons, "reasons": reasons})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


# ---------------------------------------------------------------------------------------------
# Report

def base_model_files(name: str) -> dict[str, Any]:
    """Fingerprint of the base weights: file hashes (directory) or cache revision (hub id)."""
    from llama_model import resolve_model_path

    path = Path(resolve_model_path(name))
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.name == "config.json" or p.name.endswith(".safetensors"))
        return {"path": str(path), "sha256": {p.name: sha256_file(p) for p in files}}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return {"hub_id": name, "revision": Path(cached).parent.name if isinstance(cached, str)
            else None}


def model_info(loaded, adapter_arg: str) -> dict[str, Any]:
    import hashlib

    from llama_model import ADAPTER_WEIGHTS

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
            "training_config": training_config(adapter),
            "model_dtype": str(getattr(loaded.model, "dtype", None))}
    if is_package_archive(adapter_arg):
        info["package_sha256"] = sha256_file(adapter_arg)
    return info


def training_config(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter's resolved training config (a package keeps it inside metadata.json)."""
    config_path = adapter_dir / "training_config.json"
    if config_path.is_file():
        return read_json(config_path)
    metadata_path = adapter_dir / "metadata.json"
    return read_json(metadata_path).get("training_config") if metadata_path.is_file() else None


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


def evaluate(args, gen: GenerationSettings, gates: dict[str, float]) -> dict[str, Any]:
    """Load, run the fine-tuned (and base) model, and build the report dict."""
    from llama_model import load_for_inference

    records, matching = select_records(args.dataset, args.split, args.num_samples)
    quantization = "4bit" if args.use_4bit else "8bit" if args.use_8bit else "none"
    with adapter_source(args.adapter_path, args.base_model) as adapter_dir:
        loaded = load_for_inference(adapter_dir, base_model=args.base_model,
                                    quantization=quantization, dtype=args.dtype)
        info = model_info(loaded, args.adapter_path)
        trained = info["training_config"] or {}
        max_length = args.max_length or trained.get("max_length") or DEFAULT_MAX_LENGTH
        tok, fmt = loaded.tokenizer, loaded.prompt_format
        prompts_text = [fmt.render(tok, r["instruction"], r.get("context") or "") for r in records]
        prompts = [fmt.encode_prompt(tok, r["instruction"], r.get("context") or "")
                   for r in records]
        ft_samples, ft_speed = run_model(loaded.model, tok, fmt, records, prompts, gen,
                                         max_length, "fine-tuned")
        base_samples = base_speed = None
        if args.compare_base:
            with loaded.model.disable_adapter():
                base_samples, base_speed = run_model(loaded.model, tok, fmt, records, prompts,
                                                     gen, max_length, "base")
    finetuned = model_result(records, ft_samples, ft_speed)
    base = model_result(records, base_samples, base_speed) if base_samples is not None else None
    settings = {"base_model": loaded.base_model, "adapter_path": str(args.adapter_path),
                "dataset": str(args.dataset), "split": args.split,
                "num_samples": args.num_samples, "quantization": quantization,
                "dtype": args.dtype, "max_length": max_length, **asdict(gen),
                "compare_base": args.compare_base, "fail_under": gates}
    data = {"path": str(args.dataset), "sha256": sha256_file(args.dataset), "split": args.split,
            "records_matching": matching, "evaluated": len(records),
            "categories": dict(sorted(collections.Counter(map(category_of, records)).items()))}
    return {"schema_version": SCHEMA_VERSION, "stage": "evaluate", "created": now_iso(),
            "settings": settings, "model": info, "data": data, "environment": environment_info(),
            "finetuned": finetuned, "base": base,
            "delta": compare(finetuned, base) if base is not None else None,
            "gates": check_gates(gates, finetuned["overall"],
                                 base["overall"] if base is not None else None),
            "samples": build_samples(records, prompts_text, ft_samples, base_samples)}


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        gen, gates = validate_args(args)
        report = evaluate(args, gen, gates)
        write_json(args.output, report)
        print(format_table(report["finetuned"], report["base"]))
        print(f"report written to {args.output}")
        if not report["gates"]["passed"]:
            failed = [reason for c in report["gates"]["checks"] for reason in c["reasons"]]
            raise PipelineError(f"evaluation gate failed: {'; '.join(failed)} "
                                f"(report: {args.output})", EXIT_GATE)
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
