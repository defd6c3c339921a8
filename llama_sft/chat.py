"""Talking to a fine-tuned adapter (directory or package), or to a base model, from a terminal.

Prompts are built with the prompt format recorded in the adapter directory, exactly as in
training; each question is answered on its own (single turn, like the training examples).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable

from llama_sft.adapter.source import open_adapter
from llama_sft.cli import decoding_problems
from llama_sft.data.records import read_sft_jsonl
from llama_sft.errors import UsageError
from llama_sft.model.generation.batch import generate_batch
from llama_sft.model.loading import load_for_inference

DEMO_PROMPTS = (
    ("Classify the sentiment of this review as positive or negative.",
     "The battery lasts all day and the screen is gorgeous."),
    ("Extract the order number as JSON.", "Hi, my order #48213 arrived damaged."),
    ("Explain in one sentence what fine-tuning a language model means.", ""),
)
QUIT_COMMANDS = ("/quit", "/exit")


@dataclass(frozen=True)
class ChatSettings:
    """Decoding settings for every answer."""

    max_new_tokens: int = 256        # answer length limit
    temperature: float = 0.7         # 0 = greedy
    top_p: float = 0.9               # nucleus sampling mass
    seed: int = 42                   # torch seed set once at start

    def problems(self) -> list[str]:
        return decoding_problems(self.max_new_tokens, self.temperature, self.top_p)


def validate_args(args) -> ChatSettings:
    """All flag problems in one line, before a model is loaded."""
    from pathlib import Path

    settings = ChatSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    problems = settings.problems()
    if not args.adapter_path and not args.base_model:
        problems.append("give --adapter-path (adapter directory or package) or --base-model")
    if args.adapter_path and not Path(args.adapter_path).exists():
        problems.append(f"adapter path {args.adapter_path} does not exist (expected "
                        f"training_output/final_model or a package .tar.gz)")
    if args.demo and args.question:
        problems.append("give either a question or --demo, not both")
    if args.dataset and not args.demo:
        problems.append("--dataset is used only with --demo")
    if args.dataset and not Path(args.dataset).is_file():
        problems.append(f"dataset file not found: {args.dataset}")
    if args.num_demo <= 0:
        problems.append(f"--num-demo must be > 0, got {args.num_demo}")
    if problems:
        raise UsageError("; ".join(problems))
    return settings


def answer(loaded, instruction: str, context: str, settings: ChatSettings):
    """Generate one answer in the training prompt format, streaming it to stdout."""
    from transformers import TextStreamer

    prompt = loaded.prompt_format.encode_prompt(loaded.tokenizer, instruction, context)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_batch(loaded.model, loaded.tokenizer, [prompt],
                          max_new_tokens=settings.max_new_tokens,
                          temperature=settings.temperature, top_p=settings.top_p,
                          streamer=streamer,
                          stop_ids=loaded.prompt_format.stop_ids(loaded.tokenizer))[0]


def demo_prompts(dataset: str | None, count: int) -> list[dict[str, Any]]:
    """Built-in prompts, or the first ``count`` records of ``dataset`` (with their references)."""
    if dataset is None:
        return [{"instruction": i, "context": c} for i, c in DEMO_PROMPTS]

    return read_sft_jsonl(dataset)[:count]


def run_demo(loaded, prompts: list[dict[str, Any]], settings: ChatSettings) -> None:
    for n, record in enumerate(prompts, start=1):
        print(f"\n[{n}/{len(prompts)}] {record['instruction']}")
        if record.get("context"):
            print(f"input: {record['context']}")
        print("answer: ", end="", flush=True)
        answer(loaded, record["instruction"], record.get("context") or "", settings)
        if "response" in record:
            print(f"reference: {record['response']}")


def run_lines(loaded, lines: Iterable[str], context: str, settings: ChatSettings) -> int:
    """Answer one question per line (blank lines skipped); returns how many were answered."""
    count = 0
    for line in lines:
        question = line.strip()
        if not question:
            continue
        print(f"> {question}", flush=True)
        answer(loaded, question, context, settings)
        count += 1
    return count


def run_interactive(loaded, context: str, settings: ChatSettings) -> None:
    print("type a question; /context TEXT sets the input text, /context clears it, "
          "/quit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in QUIT_COMMANDS:
            return
        if line == "/context" or line.startswith("/context "):
            context = line[len("/context"):].strip()
            print(f"(context {'set' if context else 'cleared'})", file=sys.stderr)
        elif line:
            answer(loaded, line, context, settings)


def chat(args) -> int:
    """Answer the question, the demo prompts, stdin's lines, or an interactive session."""
    settings = validate_args(args)
    prompts = demo_prompts(args.dataset, args.num_demo) if args.demo else None
    quantization = "4bit" if args.use_4bit else "8bit" if args.use_8bit else "none"
    if args.adapter_path:
        with open_adapter(args.adapter_path, args.base_model) as adapter:
            loaded = load_for_inference(adapter.path, base_model=args.base_model,
                                        quantization=quantization, dtype=args.dtype)
            _converse(args, loaded, prompts, settings, f"adapter {args.adapter_path} on ")
    else:
        loaded = load_for_inference(None, base_model=args.base_model, quantization=quantization,
                                    dtype=args.dtype)
        _converse(args, loaded, prompts, settings, "")
    return 0


def _converse(args, loaded, prompts, settings: ChatSettings, what: str) -> None:
    import torch

    torch.manual_seed(settings.seed)
    print(f"chatting with {what}{loaded.base_model} "
          f"(prompt style {loaded.prompt_format.style})", file=sys.stderr)
    if prompts is not None:
        run_demo(loaded, prompts, settings)
    elif args.question:
        answer(loaded, args.question, args.context, settings)
    elif sys.stdin.isatty():
        run_interactive(loaded, args.context, settings)
    elif run_lines(loaded, sys.stdin, args.context, settings) == 0:
        raise UsageError("no question given: pass one as an argument, pipe questions "
                         "(one per line) on stdin, or use --demo")
