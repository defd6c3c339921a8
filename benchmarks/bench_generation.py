#!/usr/bin/env python3
"""Batched vs one-at-a-time generation: speed, and whether greedy outputs are identical.

    python3 benchmarks/bench_generation.py                         # embedded SmolLM2-135M, fp32
    python3 benchmarks/bench_generation.py --tiny                  # a random tiny LLaMA (seconds)
    python3 benchmarks/bench_generation.py --model DIR --dtype bfloat16 --batch-size 16 \\
        --num-prompts 32 --max-new-tokens 128

Both runs use ``generate_many`` (``llama_sft.model.generation.batch``: left padding, KV cache,
greedy) on the same prompts (the golden set's records, or the first --num-prompts, built with the
chat template exactly as llama_evaluate.py builds them): one prompt at a time, then continuously
batched with at most --batch-size rows decoding at once. The result goes to
``benchmarks/results/generation.json`` with the machine it ran on. Measure the identity check in
float32: in bf16, left padding changes the numerics enough that some greedy outputs differ; the
result counts how many differ and where the first differing token is.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_sft.errors import UsageError, run_main  # noqa: E402
from llama_sft.files import write_json  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "generation.json"
DEFAULT_GOLDEN = ROOT / "sft_output" / "golden_set.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None,
                       help="model directory or hub id; None: the embedded SmolLM2-135M-Instruct")
    which.add_argument("--tiny", action="store_true",
                       help="a random 2-layer LLaMA with the embedded tokenizer (a quick check)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (float32 for the identity check)")
    parser.add_argument("--golden-set", default=str(DEFAULT_GOLDEN),
                        help="JSONL with instruction/context records (pipeline_sft_prep output)")
    parser.add_argument("--num-prompts", type=int, default=0,
                        help="records taken from the start of --golden-set (0: all)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="most prompts decoded at once in the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="generation limit (128: llama_evaluate.py's default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: torch's default); on a busy machine fewer "
                             "threads than cores avoids oversubscription")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="result JSON file")
    return parser


def machine_info() -> dict[str, Any]:
    import torch

    from llama_sft.files import library_versions

    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "versions": library_versions()}


def timed_generation(model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int,
                     max_new_tokens: int) -> tuple[list[list[int]], float, int]:
    """Token ids per prompt, the wall time and the prefill calls, at most ``batch_size`` prompts
    at a time (``generate_many``; 1: each prompt generated on its own)."""
    from tqdm.auto import tqdm

    from llama_sft.model.generation.batch import generate_many

    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"batch size {batch_size}", unit="prompt",
              leave=False) as bar:
        if batch_size == 1:
            results, prefills = [], 0
            for prompt in prompts:
                results += generate_many(model, tokenizer, [prompt], batch_size=1,
                                         max_new_tokens=max_new_tokens)[0]
                prefills += 1
                bar.update(1)
        else:
            results, prefills = generate_many(model, tokenizer, prompts, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, on_done=bar.update)
    return [r.token_ids for r in results], time.perf_counter() - start, prefills


def compare_outputs(one: list[list[int]], batched: list[list[int]]) -> list[dict[str, int]]:
    """Prompts whose token ids differ, with the first differing position."""
    differ = []
    for index, (a, b) in enumerate(zip(one, batched)):
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differ.append({"prompt": index, "first_diff_token": first})
    return differ


def benchmark(model_path: str, args) -> dict[str, Any]:
    import torch

    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.model.loading import load_base_model, load_tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(model_path)
    model = load_base_model(model_path, dtype=args.dtype, device_map="auto")
    model.eval()
    fmt = PromptFormat.for_tokenizer(tokenizer)
    records = read_sft_jsonl(args.golden_set)[:args.num_prompts or None]
    if not records:
        raise UsageError(f"{args.golden_set} holds no records")
    prompts = [fmt.encode_prompt(tokenizer, r["instruction"], r.get("context") or "")
               for r in records]
    timed_generation(model, tokenizer, prompts[:1], 1, 2)  # warm-up
    one, one_s, _ = timed_generation(model, tokenizer, prompts, 1, args.max_new_tokens)
    batched, batched_s, prefills = timed_generation(model, tokenizer, prompts, args.batch_size,
                                                    args.max_new_tokens)
    one_tokens, batched_tokens = sum(map(len, one)), sum(map(len, batched))
    differ = compare_outputs(one, batched)
    one_tps, batched_tps = one_tokens / one_s, batched_tokens / batched_s
    return {
        "model": model_path, "dtype": args.dtype, "golden_set": str(args.golden_set),
        "num_prompts": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "one_at_a_time": {"seconds": one_s, "generated_tokens": one_tokens,
                          "tokens_per_second": one_tps},
        "batched": {"seconds": batched_s, "generated_tokens": batched_tokens,
                    "tokens_per_second": batched_tps, "prefill_calls": prefills},
        "speedup": batched_tps / one_tps,
        "identical": not differ, "num_differ": len(differ), "differ": differ,
        "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        values = {name: getattr(args, name) for name in ("batch_size", "max_new_tokens", "threads")}
        problems = [f"--{name.replace('_', '-')} must be > 0, got {value}"
                    for name, value in values.items() if value is not None and value <= 0]
        if args.num_prompts < 0:
            problems.append(f"--num-prompts must be >= 0, got {args.num_prompts}")
        if problems:
            raise UsageError("; ".join(problems))
        from llama_sft.config.presets import EMBEDDED_MODEL_ID
        from llama_sft.model.tiny import save_tiny_llama

        with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
            model_path = str(save_tiny_llama(Path(tmp))) if args.tiny else \
                args.model or EMBEDDED_MODEL_ID
            result = benchmark(model_path, args)
        if args.tiny:
            result["model"] = "tiny random LLaMA (2 layers, hidden 64)"
        write_json(args.output, result)
        print(f"one at a time: {result['one_at_a_time']['tokens_per_second']:.1f} tokens/s; "
              f"batched (batch {args.batch_size}): {result['batched']['tokens_per_second']:.1f} "
              f"tokens/s; speed-up x{result['speedup']:.2f}")
        print(f"greedy outputs identical: {result['identical']} "
              f"({result['num_differ']} of {result['num_prompts']} differ, {args.dtype})")
        print(f"result written to {args.output}")
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
