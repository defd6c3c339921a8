"""Talking to a fine-tuned adapter (directory or package), to a base model, or to a model behind
an OpenAI-compatible server (llama.cpp's, vLLM), from a terminal.

Prompts are built with the prompt format recorded in the adapter directory, exactly as in
training; each question is answered on its own (single turn, like the training examples). A
server gets the same prompts through ``llama_sft.serve.ask``: chat messages that its chat
template renders, or the rendered prompt text for the instruction and llama2 styles.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llama_sft.adapter.source import open_adapter
from llama_sft.cli import decoding_problems
from llama_sft.data.prompt_format import PromptFormat
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


@dataclass(frozen=True)
class ServedModel:
    """A model behind an OpenAI-compatible server, asked in an adapter's prompt format."""

    url: str                            # base URL, e.g. http://127.0.0.1:8000
    model: str                          # the model name requests ask for
    prompt_format: PromptFormat | None  # None: the server's own chat template, no system prompt

    @property
    def style(self) -> str:
        return self.prompt_format.style if self.prompt_format else "the server's chat template"

    def answer(self, instruction: str, context: str, settings: ChatSettings) -> str:
        """One answer, streamed to stdout as it arrives."""
        from llama_sft.serve import ask

        reply = ask(self.url, self.prompt_format, instruction, context,
                    max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                    top_p=settings.top_p, seed=settings.seed, model=self.model,
                    on_text=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        return reply.text


def validate_args(args) -> ChatSettings:
    """All flag problems in one line, before a model is loaded."""
    settings = ChatSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    problems = settings.problems()
    if not args.adapter_path and not args.base_model and not args.server:
        problems.append("give --adapter-path (adapter directory or package), --base-model or "
                        "--server URL")
    if args.adapter_path and not Path(args.adapter_path).exists():
        problems.append(f"adapter path {args.adapter_path} does not exist (expected "
                        f"training_output/final_model or a package .tar.gz)")
    if args.server:
        problems += _server_problems(args)
    elif args.server_model:
        problems.append("--server-model is used only with --server")
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


def _server_problems(args) -> list[str]:
    """Flags that choose how a model is loaded here mean nothing to a server."""
    from llama_sft.serve import base_url

    found = []
    try:
        base_url(args.server)
    except UsageError as exc:
        found.append(str(exc))
    local = [flag for flag, given in (("--base-model", args.base_model),
                                      ("--use-4bit", args.use_4bit), ("--use-8bit", args.use_8bit),
                                      ("--dtype", args.dtype != "auto")) if given]
    if local:
        found.append(f"{', '.join(local)} load a model here; with --server the server has the "
                     f"model (--adapter-path only gives the prompt format)")
    return found


def connect(server: str, adapter_path: str | None, model: str | None) -> ServedModel:
    """The server at ``server`` (asked which model it serves unless ``model`` is given), with
    the prompt format of ``adapter_path`` when given (a package is verified first)."""
    from llama_sft.serve import base_url, served_model

    url = base_url(server)
    prompt_format = None
    if adapter_path:
        with open_adapter(adapter_path) as adapter:
            prompt_format = PromptFormat.load(adapter.path)
    return ServedModel(url, model or served_model(url), prompt_format)


def answer(loaded, instruction: str, context: str, settings: ChatSettings):
    """Generate one answer in the training prompt format, streaming it to stdout (``loaded``:
    the model loaded here, or a ``ServedModel``)."""
    if isinstance(loaded, ServedModel):
        return loaded.answer(instruction, context, settings)
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
    if args.server:
        served = connect(args.server, args.adapter_path, args.server_model)
        _converse(args, served, prompts, settings, "")
        return 0
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
    if isinstance(loaded, ServedModel):     # sampled on the server, with the request's seed
        print(f"chatting with {loaded.model} at {loaded.url} (prompt style {loaded.style})",
              file=sys.stderr)
    else:
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
