#!/usr/bin/env python3
"""Talk to a fine-tuned adapter (directory or package), a base model or a server, from a terminal.

    python3 llama_chat.py --adapter-path ./training_output/final_model          # interactive
    python3 llama_chat.py --adapter-path ./training_output/final_model "What is LoRA?"
    python3 llama_chat.py --adapter-path ./packages/llama-sft-135m-0.1.0.tar.gz \\
        "Classify the sentiment as positive or negative." --context "It broke on day one."
    python3 llama_chat.py --adapter-path ./training_output/final_model --demo
    python3 llama_chat.py --adapter-path ./training_output/final_model --demo \\
        --dataset ./sft_output/golden_set.jsonl --num-demo 5
    printf 'question one\\nquestion two\\n' | python3 llama_chat.py --adapter-path DIR
    python3 llama_chat.py --base-model HuggingFaceTB/SmolLM2-135M-Instruct "Hello"   # no adapter

    # a deployed model: llama.cpp's server on the package's GGUF, or vLLM with the adapter
    python3 -m llama_cpp.server --model packages/llama-sft-135m-0.1.0.f16.gguf \\
        --chat_format chat_template.default --host 127.0.0.1 --port 8000
    python3 llama_chat.py --server http://127.0.0.1:8000 \\
        --adapter-path ./packages/llama-sft-135m-0.1.0.tar.gz "What is LoRA?"
    python3 llama_chat.py --server http://127.0.0.1:8000 --demo --temperature 0

Prompts are built with the prompt format recorded in the adapter directory, exactly as in
training; each question is answered on its own (single turn, like the training examples).
Answers stream token by token. With no question: an interactive session when stdin is a
terminal (``/context TEXT`` sets the input text for the next questions, ``/context`` clears it,
``/quit`` or Ctrl-D leaves), otherwise one question per line of stdin.

With ``--server URL`` no model is loaded here: every question goes to that OpenAI-compatible
server (llama.cpp's ``llama_cpp.server``, vLLM) in the same prompt format, so one client talks to
local and deployed models alike. ``--adapter-path`` then only gives the prompt format (and its
system prompt); without it the server's own chat template is used.
"""
from __future__ import annotations

import argparse
import sys

from llama_sft.chat import ChatSettings, chat
from llama_sft.cli import add_decoding_flags
from llama_sft.errors import run_main


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
    parser.add_argument("--server", default=None, metavar="URL",
                        help="ask the OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000) "
                             "instead of loading a model here")
    parser.add_argument("--server-model", default=None, metavar="NAME",
                        help="with --server: the model name to ask for; None: the first one the "
                             "server lists (on vLLM, name the LoRA adapter here)")
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
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="random seed (torch here; with --server, the requests' seed)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true", help="load the base model in 4-bit nf4")
    quant.add_argument("--use-8bit", action="store_true", help="load the base model in 8-bit")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype (auto: bf16 where supported)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: chat(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
