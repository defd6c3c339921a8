"""The preset table: one frozen row per model size, with its defaults and hardware needs.

An unknown size is an error listing the valid ones. The embedded default (135m) lives in a local
cache directory (``$LLAMA_SFT_CACHE``, default ``~/.cache/llama_sft``), materialized by
``llama_sft.model.embedded``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llama_sft.errors import ConfigError

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Preset:
    """One row of the preset table: a model size with its defaults and hardware needs."""

    name: str
    base_model: str
    params: int                      # parameter count of the base model
    min_gpu_memory_gb: float         # smallest single-GPU memory the default setup fits in
    recommended_gpu: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    num_epochs: int
    max_length: int
    gradient_checkpointing: bool
    quantization: str                # "none", "4bit" (QLoRA nf4) or "8bit" on CUDA
    lora_target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    max_steps: int | None = None     # None: run num_epochs
    max_eval_examples: int = 200     # cap on examples in each evaluation pass
    max_new_tokens: int = 128        # generation length of the samples logged at evaluation
    num_gpus: int = 1                # GPUs the README recommends
    accelerate_config: str | None = None  # configs/accelerate/<file> for multi-GPU runs
    license: str = "llama2"
    source: str = ""                 # where the defaults come from
    hidden_size: int = 4096          # architecture, for memory estimates
    num_layers: int = 32
    intermediate_size: int = 11008
    num_kv_heads: int = 32
    num_heads: int = 32
    vocab_size: int = 32000


# The 7b/13b/70b rows carry the user's guide's numbers exactly. The Llama 3.x rows follow the
# torchtune LoRA recipes (llama3_2/1B_lora, llama3_2/3B_lora, llama3_1/8B_lora_single_device)
# for rank/alpha; learning rate and batch follow the same recipes. The 135m row is the embedded
# CPU demo, tuned here so the whole chain finishes in minutes on 2 cores.
PRESETS: dict[str, Preset] = {
    "135m": Preset(  # SmolLM2-135M-Instruct, 134.5M params, LlamaForCausalLM, embedded default
        name="135m", vocab_size=49152,
        hidden_size=576, num_layers=30, intermediate_size=1536, num_kv_heads=3, num_heads=9,
        base_model=EMBEDDED_MODEL_ID, params=134_515_008, min_gpu_memory_gb=0.0,
        recommended_gpu="none (runs on CPU)", lora_r=16, lora_alpha=32, lora_dropout=0.05,
        batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, num_epochs=1,
        max_length=512, gradient_checkpointing=False, quantization="none", max_steps=60,
        max_eval_examples=48, max_new_tokens=48,
        license="apache-2.0", source="measured on a 2-core CPU for the demo"),
    "1b": Preset(  # Llama-3.2-1B, 1.24B params
        name="1b", vocab_size=128256,
        hidden_size=2048, num_layers=16, intermediate_size=8192, num_kv_heads=8, num_heads=32,
        base_model="meta-llama/Llama-3.2-1B", params=1_235_814_400,
        min_gpu_memory_gb=8, recommended_gpu="RTX 3060 (12GB) or better", lora_r=64,
        lora_alpha=128, lora_dropout=0.0, batch_size=4, gradient_accumulation_steps=4,
        learning_rate=3e-4, num_epochs=1, max_length=2048, gradient_checkpointing=True,
        quantization="none", license="llama3.2", source="torchtune llama3_2/1B_lora"),
    "3b": Preset(  # Llama-3.2-3B, 3.21B params
        name="3b", vocab_size=128256,
        hidden_size=3072, num_layers=28, intermediate_size=8192, num_kv_heads=8, num_heads=24,
        base_model="meta-llama/Llama-3.2-3B", params=3_212_749_824,
        min_gpu_memory_gb=12, recommended_gpu="RTX 4080 (16GB) or better", lora_r=64,
        lora_alpha=128, lora_dropout=0.0, batch_size=4, gradient_accumulation_steps=4,
        learning_rate=3e-4, num_epochs=1, max_length=2048, gradient_checkpointing=True,
        quantization="none", license="llama3.2", source="torchtune llama3_2/3B_lora"),
    "7b": Preset(  # Llama-2-7b, 6.74B params
        name="7b",
        hidden_size=4096, num_layers=32, intermediate_size=11008, num_kv_heads=32, num_heads=32,
        base_model="meta-llama/Llama-2-7b-hf", params=6_738_415_616,
        min_gpu_memory_gb=16, recommended_gpu="RTX 3090 (24GB) or better", lora_r=16,
        lora_alpha=32, lora_dropout=0.05, batch_size=4, gradient_accumulation_steps=4,
        learning_rate=2e-5, num_epochs=3, max_length=2048, gradient_checkpointing=True,
        quantization="4bit", source="user's guide"),
    "8b": Preset(  # Llama-3.1-8B, 8.03B params
        name="8b", vocab_size=128256,
        hidden_size=4096, num_layers=32, intermediate_size=14336, num_kv_heads=8, num_heads=32,
        base_model="meta-llama/Llama-3.1-8B", params=8_030_261_248,
        min_gpu_memory_gb=16, recommended_gpu="RTX 4090 (24GB) or better", lora_r=8,
        lora_alpha=16, lora_dropout=0.0, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=3e-4, num_epochs=1, max_length=2048, gradient_checkpointing=True,
        quantization="4bit", license="llama3.1",
        source="torchtune llama3_1/8B_qlora_single_device"),
    "13b": Preset(  # Llama-2-13b, 13.0B params
        name="13b",
        hidden_size=5120, num_layers=40, intermediate_size=13824, num_kv_heads=40, num_heads=40,
        base_model="meta-llama/Llama-2-13b-hf", params=13_015_864_320,
        min_gpu_memory_gb=24, recommended_gpu="A100 (40GB) or better", lora_r=32,
        lora_alpha=64, lora_dropout=0.05, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=2e-5, num_epochs=3, max_length=2048, gradient_checkpointing=True,
        quantization="4bit", num_gpus=2, accelerate_config="fsdp.yaml", source="user's guide"),
    "70b": Preset(  # Llama-2-70b, 69.0B params
        name="70b",
        hidden_size=8192, num_layers=80, intermediate_size=28672, num_kv_heads=8, num_heads=64,
        base_model="meta-llama/Llama-2-70b-hf", params=68_976_648_192,
        min_gpu_memory_gb=80, recommended_gpu="Multiple A100 (80GB) or H100", lora_r=64,
        lora_alpha=128, lora_dropout=0.05, batch_size=1, gradient_accumulation_steps=16,
        learning_rate=2e-5, num_epochs=3, max_length=2048, gradient_checkpointing=True,
        quantization="4bit", num_gpus=4, accelerate_config="fsdp_qlora.yaml",
        source="user's guide"),
}
DEFAULT_SIZE = "135m"


def get_preset(size: str) -> Preset:
    """Return the preset for ``size``; an unknown size lists the valid ones."""
    try:
        return PRESETS[size.lower()]
    except KeyError:
        raise ConfigError(f"unknown model size {size!r}; valid sizes: {', '.join(PRESETS)}") from None


def preset_for_base_model(base_model: str) -> Preset | None:
    """The preset whose base model is ``base_model``, if any."""
    return next((p for p in PRESETS.values() if p.base_model == base_model), None)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_SFT_CACHE", Path.home() / ".cache" / "llama_sft"))


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def format_table() -> str:
    cols = ["size", "base model", "params", "min GPU", "recommended GPU", "r/alpha", "batch×acc",
            "lr", "epochs", "max len", "ckpt", "quant", "GPUs"]
    rows = [[p.name, p.base_model, f"{p.params / 1e9:.2f}B", f"{p.min_gpu_memory_gb:g} GB",
             p.recommended_gpu, f"{p.lora_r}/{p.lora_alpha}",
             f"{p.batch_size}×{p.gradient_accumulation_steps}", f"{p.learning_rate:g}",
             str(p.num_epochs), str(p.max_length), "on" if p.gradient_checkpointing else "off",
             p.quantization, str(p.num_gpus)] for p in PRESETS.values()]
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])
