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
safetensors, loads with plain ``AutoModelForCausalLM``); ``--gguf f16,q8_0,q4_k_m`` writes
``<name>-<version>.<type>.gguf`` from the merged model with llama.cpp's own converter and
quantizer (Llama 2, Llama 3, SmolLM2); ``--onnx`` writes ``<name>-<version>-onnx/`` for
onnxruntime. Every export is listed with its sha256 in the archive's ``metadata.json`` and in
``SHA256SUMS`` beside the archive. The output dir gets ``manifest.json`` (stage "package").

``--verify`` checks gzip/tar integrity, the allowlist, member types and paths, size caps and every
checksum without writing anything, and the exports found beside the archive against the sha256
its metadata lists. ``--extract`` verifies first, then extracts with tarfile's
``data`` filter into a temporary directory that is renamed into place, so a failed extraction leaves
nothing. Damaged or hostile archives exit 65 with one line saying why.
"""
from __future__ import annotations

import argparse
import sys

from llama_sft.adapter.archive import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS
from llama_sft.errors import run_main
from llama_sft.package.gguf import parse_gguf_types
from llama_sft.package.stage import run


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
    parser.add_argument("--gguf", nargs="?", const="f16", default=None, type=parse_gguf_types,
                        metavar="TYPES",
                        help="also export the merged model to GGUF with llama.cpp: f16, q8_0, "
                             "q4_k_m or a comma list (bare --gguf: f16)")
    parser.add_argument("--onnx", action="store_true",
                        help="also export the merged model to ONNX (fp32, KV cache) for "
                             "onnxruntime")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the package to this hub repo (needs a token)")
    parser.add_argument("--public", action="store_true",
                        help="with --push-to-hub: create a public repo, not a private one")
    parser.add_argument("--mlflow", action="store_true",
                        help="log the archive into the MLflow run that trained the adapter (its "
                             "final_model/tracking.json)")
    parser.add_argument("--register-model", metavar="NAME", default=None,
                        help="--mlflow, then register the archive as a new version of this "
                             "MLflow registered model, tagged with the evaluation metrics")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="verify/extract: cap on total uncompressed size")
    parser.add_argument("--max-members", type=int, default=DEFAULT_MAX_MEMBERS,
                        help="verify/extract: cap on archive members")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --extract: replace an existing extracted folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
