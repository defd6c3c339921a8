#!/usr/bin/env python3
"""Talk to a fine-tuned adapter (directory or package), or to a base model, from the terminal.

    python3 llama_chat.py --adapter-path ./training_output/final_model          # interactive
    python3 llama_chat.py --adapter-path ./training_output/final_model "What is LoRA?"
    python3 llama_chat.py --adapter-path ./packages/llama-sft-135m-0.1.0.tar.gz \\
        "Classify the sentiment as positive or negative." --context "It broke on day one."
    python3 llama_chat.py --adapter-path ./training_output/final_model --demo
    python3 llama_chat.py --adapter-path ./training_output/final_model --demo \\
        --dataset ./sft_output/golden_set.jsonl --num-demo 5
    printf 'question one\\nquestion two\\n' | python3 llama_chat.py --adapter-path DIR
    python3 llama_chat.py --base-model HuggingFaceTB/SmolLM2-135M-Instruct "Hello"   # no adapter

Prompts are built with the prompt format recorded in the adapter directory, exactly as in
training; each question is answered on its own (single turn, like the training examples).
Answers stream token by token. With no question: an interactive session when stdin is a
terminal (``/context TEXT`` sets the input text for the next questions, ``/context`` clears it,
``/quit`` or Ctrl-D leaves), otherwise one question per line of stdin.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

from llama_io import UsageError, run_main
from llama_model import add_decoding_flags, decoding_problems

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("question", nargs="?", default=None,
                        help="answer this one instruction and exit; None: interactive "
                             "(or one question per stdin line when stdin is not a terminal)")
    parser.add_argument("--adapter-path", default=None,
                        help="adapter directory (training_output/final_model) or package .tar.gz")
    parser.add_argument("--base-model", default=None,
                        help="base model; None: the one recorded with the adapter (give it alone "
                             "to talk to the base model)")
    parser.add_argument("--context", default="", help="input text that goes with the question")
    parser.add_argument("--demo", action="store_true",
                        help="answer built-in example prompts (or the first --dataset records)")
    parser.add_argument("--dataset", default=None,
                        help="with --demo: SFT JSONL file whose first records are the prompts")
    parser.add_argument("--num-demo", type=int, default=3,
                        help="records --demo takes from --dataset")
    defaults = ChatSettings()
    add_decoding_flags(parser, max_new_tokens=defaults.max_new_tokens,
                       temperature=defaults.temperature, top_p=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="torch seed")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true", help="load the base model in 4-bit nf4")
    quant.add_argument("--use-8bit", action="store_true", help="load the base model in 8-bit")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype (auto: bf16 where supported)")
    return parser


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

    from llama_model import generate_batch

    prompt = loaded.prompt_format.encode_prompt(loaded.tokenizer, instruction, context)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_batch(loaded.model, loaded.tokenizer, [prompt],
                          max_new_tokens=settings.max_new_tokens,
                          temperature=settings.temperature, top_p=settings.top_p,
                          streamer=streamer)[0]


def demo_prompts(dataset: str | None, count: int) -> list[dict[str, Any]]:
    """Built-in prompts, or the first ``count`` records of ``dataset`` (with their references)."""
    if dataset is None:
        return [{"instruction": i, "context": c} for i, c in DEMO_PROMPTS]
    from llama_dataset import read_sft_jsonl

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


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        from llama_evaluate import adapter_source
        from llama_model import load_for_inference

        args = build_parser().parse_args(argv)
        settings = validate_args(args)
        prompts = demo_prompts(args.dataset, args.num_demo) if args.demo else None
        quantization = "4bit" if args.use_4bit else "8bit" if args.use_8bit else "none"
        source = adapter_source(args.adapter_path, args.base_model) if args.adapter_path \
            else nullcontext()
        with source as adapter:
            loaded = load_for_inference(adapter, base_model=args.base_model,
                                        quantization=quantization, dtype=args.dtype)
            import torch

            torch.manual_seed(settings.seed)
            what = f"adapter {args.adapter_path} on " if adapter else ""
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
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
