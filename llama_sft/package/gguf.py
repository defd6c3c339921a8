"""GGUF for llama.cpp: llama.cpp's own converter and quantizer, and llama.cpp running the result.

The merged model is converted by ``convert_hf_to_gguf.py`` from the pinned llama.cpp source
(``model/llamacpp_source.py``), the converter llama.cpp maintains for every tokenizer it loads
(SentencePiece for Llama 2, the ``llama-bpe`` and ``smollm`` pre-tokenizers for Llama 3 and
SmolLM2) and every RoPE variant (``llama3`` scaling). Quantized types are made from the f16 file
by llama.cpp's quantizer through llama-cpp-python, built from the same source. ``load`` and
``greedy`` run a GGUF in llama.cpp, for the tests that prove an export loads and answers as the
transformers model does.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from llama_sft.errors import DataError, UsageError
from llama_sft.files import atomic_file

log = logging.getLogger("llama_package")

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
_LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def parse_gguf_types(value: str) -> list[str]:
    """``f16`` or a comma list such as ``f16,q4_k_m`` (argparse type)."""
    types = [t.strip().lower() for t in value.split(",") if t.strip()]
    unknown = [t for t in types if t not in GGUF_TYPES]
    if not types or unknown:
        raise UsageError(f"--gguf takes {', '.join(GGUF_TYPES)} (or a comma list); "
                         f"got {value!r}")
    return list(dict.fromkeys(types))


def gguf_name(folder_name: str, gguf_type: str) -> str:
    return f"{folder_name}.{gguf_type}.gguf"


def export_gguf(merged_dir: Path, out_dir: Path, folder_name: str,
                types: Sequence[str]) -> list[Path]:
    """Write ``<folder_name>.<type>.gguf`` into ``out_dir`` for every type: f16 by llama.cpp's
    converter, the others quantized from it by llama.cpp."""
    f16 = out_dir / gguf_name(folder_name, "f16")
    convert(merged_dir, f16)
    written = [f16] if "f16" in types else []
    for gguf_type in types:
        if gguf_type != "f16":
            written.append(quantize(f16, out_dir / gguf_name(folder_name, gguf_type), gguf_type))
    if "f16" not in types:
        f16.unlink()
    return written


def convert(merged_dir: Path, out_path: Path) -> Path:
    """``convert_hf_to_gguf.py merged_dir --outtype f16`` into ``out_path`` (atomically)."""
    from llama_sft.model.llamacpp_source import converter

    script = converter()
    log.info("converting %s to GGUF f16 with llama.cpp's %s ...", merged_dir, script.name)
    with atomic_file(out_path) as tmp:
        done = subprocess.run([sys.executable, str(script), str(merged_dir), "--outfile",
                               str(tmp), "--outtype", "f16"], capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or ["no output"]
            raise DataError(f"llama.cpp's converter failed on {merged_dir}: {lines[-1]}")
    log.info("wrote %s", out_path)
    return out_path


def quantize(f16_path: Path, out_path: Path, gguf_type: str) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) from an f16 GGUF to ``gguf_type``."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[gguf_type])
    log.info("quantizing %s to %s with llama.cpp ...", f16_path.name, gguf_type)
    with atomic_file(out_path) as tmp:
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(),
                                                ctypes.byref(params))
        if status != 0:
            raise DataError(f"llama.cpp could not quantize {f16_path} to {gguf_type} "
                            f"(status {status})")
    log.info("wrote %s", out_path)
    return out_path


def load(path: Path, n_ctx: int = 256):
    """A llama.cpp model (llama-cpp-python) on the CPU, quiet, keeping every position's logits
    (``scores``) for comparisons.

    llama.cpp's extra CPU weight layouts (AMX tiles, repacked quantized blocks) are switched off:
    on an AMX CPU where the kernel does not grant the tile permission (seen in sandboxes),
    quantized GGUFs crash in them at the first token. They change speed, not results."""
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama

    default = api.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = plain_buffers   # llama-cpp-python has no flag for it
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, seed=0, verbose=False,
                     logits_all=True)
    finally:
        api.llama_model_default_params = default


def greedy(llm, prompt_ids: Sequence[int], max_new_tokens: int,
           stop_ids: Sequence[int]) -> list[int]:
    """Greedy tokens that llama.cpp generates after ``prompt_ids``, the stop token left out."""
    import numpy as np

    llm.reset()
    llm.eval(list(prompt_ids))
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return out
