"""Shared fixtures: a tiny random-weight LLaMA with the embedded model's real tokenizer.

The tiny model (2 layers, hidden 64, tied embeddings, ~3.3M parameters, ~13 MB in fp32; 64 is
the smallest width bitsandbytes' CPU 4-bit kernels accept) is built once per test
session; every test that trains, evaluates or packages uses it so the suite runs in minutes on CPU.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ROOT, random_adapter

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's ops are too small to gain from two threads, and on a loaded 2-core machine
# OpenMP's spinning threads make every op many times slower. Child processes inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from llama_sft.model.embedded import ensure_embedded_model

    return ensure_embedded_model(verbose=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A random-weight LlamaForCausalLM saved with the SmolLM2 tokenizer and chat template."""
    from llama_sft.model.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, embedded_dir) -> dict[str, Path]:
    """Tiny random-weight models of each family's shape on its real vocabulary (built lazily):
    ``family_dirs["llama2"]``, ``["llama3"]``, ``["smollm2"]``."""
    from llama_sft.model.tiny import save_tiny_llama

    class Lazy(dict):
        def __missing__(self, family):
            self[family] = save_tiny_llama(tmp_path_factory.mktemp(f"tiny-{family}"), family)
            return self[family]

    return Lazy()


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A final_model/-shaped adapter directory on the tiny model (random LoRA weights)."""
    out = tmp_path_factory.mktemp("adapter") / "final_model"
    return random_adapter(tiny_model_dir, out)


@pytest.fixture
def copy_dir(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst)
        return dst
    return _copy
