"""The resolved configuration of a training run: small dataclasses by concern, flat field names.

Every setting is declared once, here, with its help line: the training flags are generated from
these fields (``config.flags``). A run's configuration is resolved in one order: defaults <
preset < the stage's own defaults (the pilot's) < ``--config`` JSON < explicit flags. Unknown keys
and wrong types in a config file are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llama_sft.config.presets import DEFAULT_SIZE, PRESETS, Preset, get_preset
from llama_sft.data.conversation import TRAIN_ON
from llama_sft.data.prompt_format import PROMPT_STYLES
from llama_sft.errors import ConfigError

METHODS = ("lora", "qlora", "full")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LR_SCHEDULERS = ("cosine", "linear", "constant")
# The training kernels of llama_sft.model.kernels, each switched on or off by name.
KERNELS = ("mask_dropout", "fused_lora", "lora_siblings", "rms_norm", "packed_attention",
           "retain_memory")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
            flag: bool = True) -> Any:
    """A config field with its help line, its allowed values and whether it gets a flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class ModelSettings:
    model_size: str = setting(DEFAULT_SIZE, f"preset: {', '.join(PRESETS)}")
    base_model: str = setting("", "hub id or local directory overriding the preset's")
    method: str = setting("lora", "fine-tuning method", choices=METHODS)
    quantization: str = setting("none", "base weights: none, 4bit (QLoRA nf4), 8bit; set by "
                                "--use-4bit / --use-8bit", choices=QUANTIZATIONS, flag=False)
    gradient_checkpointing: bool = setting(False, "gradient checkpointing")
    dtype: str = setting("auto", "compute dtype (auto: bf16 where supported)", choices=DTYPES)
    kernels: tuple[str, ...] = setting(KERNELS, "training kernels to use, comma-separated, or "
                                       "none (llama_sft/model/kernels)")

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        for kernel in self.kernels:
            _check_choice("kernels", kernel, KERNELS)
        if self.method == "full" and self.quantization != "none":
            raise ConfigError("method 'full' cannot train a quantized model; drop --use-4bit/--use-8bit")


@dataclass(frozen=True)
class LoraSettings:
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"),
                                                   "comma-separated module names")

    def __post_init__(self):
        _check_positive("lora_r", self.lora_r)
        _check_positive("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module")


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = setting(2e-5, "peak learning rate")
    batch_size: int = setting(4, "examples per device per micro-step")
    gradient_accumulation_steps: int = setting(4, "micro-steps per optimizer step")
    num_epochs: int = setting(3, "epochs (ignored when --max-steps is set)")
    max_steps: int | None = setting(None, "optimizer steps; overrides --num-epochs when set")
    warmup_ratio: float = setting(0.03, "share of steps with linear warm-up")
    warmup_steps: int | None = setting(None, "linear warm-up steps; overrides --warmup-ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    lr_scheduler: str = setting("cosine", "learning-rate schedule after warm-up",
                                choices=LR_SCHEDULERS)
    max_bad_steps: int = setting(10, "NaN/inf steps skipped before the run aborts")
    seed: int = setting(42, "random seed")

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
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)


@dataclass(frozen=True)
class DataSettings:
    max_length: int = setting(2048, "max tokens per example (prompt + response + EOS)")
    packing: bool = setting(True, "padding-free packing of each batch into one row")
    prompt_style: str = setting("auto", "prompt format (auto: the tokenizer's chat template "
                                "when it has one)", choices=PROMPT_STYLES)
    train_on: str = setting("all", "assistant turns of a multi-turn conversation to supervise",
                            choices=TRAIN_ON)

    def __post_init__(self):
        _check_positive("max_length", self.max_length)
        _check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        _check_choice("train_on", self.train_on, TRAIN_ON)


@dataclass(frozen=True)
class EvalSettings:
    eval_steps: int = setting(50, "evaluate every N optimizer steps")
    save_steps: int = setting(100, "checkpoint every N optimizer steps")
    save_total_limit: int = setting(3, "checkpoints kept (oldest deleted first)")
    early_stopping_patience: int | None = setting(None, "evaluations without improvement "
                                                  "before stopping")
    num_eval_samples: int = setting(3, "golden prompts generated at each evaluation")
    max_eval_examples: int = setting(200, "cap on examples in each evaluation pass")
    max_new_tokens: int = setting(128, "generation length of the samples at each evaluation")

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
    else:  # tuple[str, ...]: a list, or a comma-separated string ("none": empty)
        if isinstance(value, str):
            value = [] if value.strip() == "none" else \
                [v.strip() for v in value.split(",") if v.strip()]
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
                   overrides: dict[str, Any] | None = None, origin: str = "config",
                   stage_defaults: dict[str, Any] | None = None) -> RunConfig:
    """Resolve preset < ``stage_defaults`` < file values < overrides (``None`` overrides mean
    "not given")."""
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
    for source_name, source in (("stage defaults", stage_defaults or {}), (origin, file_values),
                                ("flags", overrides)):
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
