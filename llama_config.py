#!/usr/bin/env python3
"""Per-size presets, hardware requirements and run-configuration resolution.

    python3 llama_config.py                      # the preset table
    python3 llama_config.py --json               # the same, as JSON
    python3 llama_config.py --check --model-size 7b   # can this machine run the 7b preset?

A run's configuration is resolved in one order: preset < ``--config`` JSON < explicit flags.
Flags default to ``None`` so "not given" means "use the preset". Unknown keys and wrong types
in a config file are errors that name the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

from llama_io import EXIT_OK, EXIT_USAGE, UsageError


class ConfigError(UsageError):
    """A usage or configuration problem (exit code 2)."""


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


# ---------------------------------------------------------------------------------------------
# The resolved configuration of a run: small dataclasses by concern, flat, unique field names.

@dataclass(frozen=True)
class ModelSettings:
    model_size: str = DEFAULT_SIZE   # preset name
    base_model: str = ""             # hub id or local directory; "" means the preset's
    method: str = "lora"             # lora | qlora | full
    quantization: str = "none"       # none | 4bit | 8bit
    gradient_checkpointing: bool = False
    dtype: str = "auto"              # auto | bfloat16 | float16 | float32

    def __post_init__(self):
        _check_choice("method", self.method, ("lora", "qlora", "full"))
        _check_choice("quantization", self.quantization, ("none", "4bit", "8bit"))
        _check_choice("dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        if self.method == "full" and self.quantization != "none":
            raise ConfigError("method 'full' cannot train a quantized model; drop --use-4bit/--use-8bit")


@dataclass(frozen=True)
class LoraSettings:
    lora_r: int = 16                 # LoRA rank
    lora_alpha: int = 32             # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05       # dropout on the LoRA input
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        _check_positive("lora_r", self.lora_r)
        _check_positive("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module")


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = 2e-5      # peak learning rate
    batch_size: int = 4              # examples per device per micro-step
    gradient_accumulation_steps: int = 4
    num_epochs: int = 3
    max_steps: int | None = None     # optimizer steps; overrides num_epochs when set
    warmup_ratio: float = 0.03       # share of steps with linear warm-up
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"     # cosine | linear | constant
    max_bad_steps: int = 10          # NaN/inf steps skipped before the run aborts
    seed: int = 42

    def __post_init__(self):
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0, got {self.learning_rate}")
        _check_positive("batch_size", self.batch_size)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("num_epochs", self.num_epochs)
        if self.max_steps is not None:
            _check_positive("max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_choice("lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))


@dataclass(frozen=True)
class DataSettings:
    max_length: int = 2048           # tokens per example (prompt + response + EOS)
    packing: bool = True             # padding-free packing of each batch into one row
    prompt_style: str = "auto"       # auto | chat_template | instruction | llama2

    def __post_init__(self):
        _check_positive("max_length", self.max_length)
        _check_choice("prompt_style", self.prompt_style,
                      ("auto", "chat_template", "instruction", "llama2"))


@dataclass(frozen=True)
class EvalSettings:
    eval_steps: int = 50             # evaluate every N optimizer steps
    save_steps: int = 100            # checkpoint every N optimizer steps
    save_total_limit: int = 3        # checkpoints kept (oldest deleted first)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    num_eval_samples: int = 3        # golden prompts generated at each evaluation
    max_eval_examples: int = 200     # cap on examples in each evaluation pass
    max_new_tokens: int = 128        # generation length for logged samples

    def __post_init__(self):
        _check_positive("eval_steps", self.eval_steps)
        _check_positive("save_steps", self.save_steps)
        _check_positive("save_total_limit", self.save_total_limit)
        if self.early_stopping_patience is not None:
            _check_positive("early_stopping_patience", self.early_stopping_patience)


SECTIONS = {"model": ModelSettings, "lora": LoraSettings, "optim": OptimSettings,
            "data": DataSettings, "eval": EvalSettings}
FIELD_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, resolved from preset, config file and flags."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def preset(self) -> Preset:
        return get_preset(self.model.model_size)

    @property
    def base_model(self) -> str:
        return self.model.base_model or self.preset.base_model

    @property
    def lora_scale(self) -> float:
        return self.lora.lora_alpha / self.lora.lora_r

    def to_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        flat["base_model"] = self.base_model
        return flat

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, origin: str = "config") -> "RunConfig":
        return resolve_config(values.get("model_size", DEFAULT_SIZE), file_values=values,
                              origin=origin)


def _check_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for cls in SECTIONS.values() for f in fields(cls)}


def _coerce(key: str, value: Any, type_name: str, origin: str) -> Any:
    """Check ``value`` against the declared field type; return it in canonical form."""
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{origin}: key {key!r} must not be null")
    base = type_name.replace(" | None", "")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{origin}: key {key!r} must be {base}, got {type(value).__name__} "
                          f"({value!r})")
    return value


def preset_values(preset: Preset) -> dict[str, Any]:
    """The RunConfig fields a preset sets."""
    values = {k: v for k, v in dataclasses.asdict(preset).items() if k in FIELD_SECTION}
    values["model_size"] = preset.name
    values["base_model"] = ""
    values["lora_target_modules"] = tuple(preset.lora_target_modules)
    return values


def resolve_config(model_size: str | None = None, *, file_values: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None, origin: str = "config") -> RunConfig:
    """Resolve preset < file values < overrides (``None`` overrides mean "not given")."""
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    size = overrides.get("model_size") or model_size or file_values.get("model_size") or DEFAULT_SIZE
    preset = get_preset(size)
    types = _field_types()
    unknown = sorted(set(file_values) - set(types))
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(sorted(types))}")
    merged = {f.name: f.default for cls in SECTIONS.values() for f in fields(cls)}
    merged.update(preset_values(preset))
    for source_name, source in ((origin, file_values), ("flags", overrides)):
        for key, value in source.items():
            if key not in types:
                raise ConfigError(f"{source_name}: unknown setting {key!r}")
            merged[key] = _coerce(key, value, str(types[key]), source_name)
    merged["model_size"] = preset.name
    if merged["method"] == "qlora" and merged["quantization"] == "none":
        merged["quantization"] = "4bit"
    if merged["quantization"] == "4bit" and merged["method"] == "lora":
        merged["method"] = "qlora"
    if merged["method"] == "full":
        explicit = {**file_values, **overrides}.get("quantization", "none")
        if explicit != "none":
            raise ConfigError("method 'full' cannot train a quantized model; drop "
                              "--use-4bit/--use-8bit or use --method lora")
        merged["quantization"] = "none"  # the preset's default quantization is for LoRA
    sections = {name: cls(**{f.name: merged[f.name] for f in fields(cls)})
                for name, cls in SECTIONS.items()}
    return RunConfig(**sections)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file as a flat dict; errors name the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------------------------------------
# Hardware estimates and the environment check.

def lora_parameter_count(preset: Preset, r: int, targets: tuple[str, ...]) -> int:
    """Exact LoRA parameter count for a LLaMA architecture: r·(in+out) per targeted linear."""
    h, i = preset.hidden_size, preset.intermediate_size
    kv = preset.num_kv_heads * (h // preset.num_heads)
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return preset.num_layers * sum(r * sum(dims[t]) for t in targets if t in dims)


def estimate_training_memory_gb(preset: Preset, *, quantization: str, method: str, lora_r: int,
                                lora_targets: tuple[str, ...], batch_size: int, max_length: int,
                                gradient_checkpointing: bool) -> float:
    """First-order peak memory of fine-tuning on one device, in GB (10^9 bytes).

    weights: 2 bytes/param (bf16), 0.55 (nf4 + double-quant constants) or 1.05 (int8);
    trainable state: 16 bytes per trainable param (fp32 weight, grad, two Adam moments);
    activations (bf16, SDPA, Korthikanti et al. 2022): 34·h bytes per token per layer, or
    2·h per layer plus one layer's 34·h when checkpointing; logits: 8·vocab bytes per token
    (fp32 logits and their gradient); plus 0.5 GB for the CUDA context and allocator slack.
    """
    bytes_per_param = {"none": 2.0, "8bit": 1.05, "4bit": 0.55}[quantization]
    trainable = preset.params if method == "full" else \
        lora_parameter_count(preset, lora_r, lora_targets)
    tokens = batch_size * max_length
    h, layers = preset.hidden_size, preset.num_layers
    per_token = (2 * h * layers + 34 * h) if gradient_checkpointing else 34 * h * layers
    activations = tokens * (per_token + 8 * preset.vocab_size)
    return (preset.params * bytes_per_param + trainable * 16 + activations) / 1e9 + 0.5


def detect_hardware() -> dict[str, Any]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name,
                         "memory_gb": round(props.total_memory / 1e9, 1),
                         "compute_capability": f"{props.major}.{props.minor}"})
    bf16 = bool(gpus) and torch.cuda.is_bf16_supported()
    return {"cuda": bool(gpus), "gpus": gpus, "bf16": bf16 if gpus else True,
            "cpu_count": os.cpu_count()}


def environment_check(size: str) -> tuple[list[tuple[str, str, bool]], str | None]:
    """Rows of (item, value, ok) and, when the size cannot run here, a one-line reason."""
    import importlib.metadata as md

    preset = get_preset(size)
    rows = [("python", sys.version.split()[0], sys.version_info >= (3, 10))]
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                "wandb", "huggingface-hub", "jsonlines"):
        try:
            rows.append((pkg, md.version(pkg), True))
        except md.PackageNotFoundError:
            rows.append((pkg, "not installed", False))
    hw = detect_hardware()
    reason = None
    if hw["gpus"]:
        for gpu in hw["gpus"]:
            ok = gpu["memory_gb"] >= preset.min_gpu_memory_gb
            rows.append((f"gpu{gpu['index']}", f"{gpu['name']} {gpu['memory_gb']} GB "
                         f"(preset needs {preset.min_gpu_memory_gb} GB)", ok))
        total = sum(g["memory_gb"] for g in hw["gpus"])
        if max(g["memory_gb"] for g in hw["gpus"]) < preset.min_gpu_memory_gb and \
                total < preset.min_gpu_memory_gb * max(preset.num_gpus, 1):
            reason = (f"{size} needs a GPU with {preset.min_gpu_memory_gb} GB; the largest here has "
                      f"{max(g['memory_gb'] for g in hw['gpus'])} GB. Try a smaller --model-size.")
        rows.append(("bf16", "supported" if hw["bf16"] else "not supported (fp16 will be used)",
                     True))
    else:
        rows.append(("cuda", "not available (CPU only)", preset.min_gpu_memory_gb == 0))
        if preset.min_gpu_memory_gb > 0:
            reason = (f"{size} needs a CUDA GPU with {preset.min_gpu_memory_gb} GB; none found. "
                      f"Use --model-size 135m on CPU.")
    free_gb = shutil.disk_usage(Path.cwd()).free / 1e9
    rows.append(("free disk", f"{free_gb:.1f} GB", free_gb > 2))
    rows.append(("hf auth", _hf_auth_state(), True))
    if preset.base_model == EMBEDDED_MODEL_ID:
        from llama_model import embedded_model_status
        state = embedded_model_status()
        rows.append(("embedded model", state, state.startswith("ready")))
        if not state.startswith("ready") and reason is None:
            reason = "the embedded model is not installed; run `make setup`"
    return rows, reason


def _hf_auth_state() -> str:
    """Whether a hub token is configured; never the token itself."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "configured (environment)"
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    if (hf_home / "token").exists():
        return "configured (token file)"
    return "not configured (needed only for gated meta-llama models)"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the preset table as JSON")
    parser.add_argument("--check", action="store_true",
                        help="check this environment against a preset (exit 2 when it cannot run)")
    parser.add_argument("--model-size", default=DEFAULT_SIZE, help=f"preset: {', '.join(PRESETS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        get_preset(args.model_size)
        if args.check:
            rows, reason = environment_check(args.model_size)
            for item, value, ok in rows:
                print(f"{'ok ' if ok else 'NO '} {item:<16} {value}")
            if reason:
                print(f"error: {reason}", file=sys.stderr)
                return EXIT_USAGE
            print(f"{args.model_size}: this environment can run it")
            return EXIT_OK
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({k: dataclasses.asdict(p) for k, p in PRESETS.items()}, indent=2))
    else:
        print(format_table())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
