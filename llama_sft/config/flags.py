"""The training flags of llama_train.py and llama_pilot.py, generated from the run-config fields.

One flag per setting (``--lora-r`` for ``lora_r``), typed and with choices as the field declares
them. Flags default to ``None``: "not given", so the value comes from the preset, the stage's own
defaults or the ``--config`` file (``config_from_args``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from llama_sft.config.presets import DEFAULT_SIZE, Preset
from llama_sft.config.settings import SECTIONS, load_config_file, resolve_config
from llama_sft.errors import UsageError

REPORT_TARGETS = ("tensorboard", "wandb", "mlflow")
# Settings every preset sets (its row's value is the default), besides model_size and base_model.
PRESET_FIELDS = frozenset(f.name for f in dataclasses.fields(Preset))


def config_fields(exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The run-config fields that get a flag, in section order."""
    return [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)
            if f.metadata.get("flag", True) and f.name not in exclude]


def _default_text(f: dataclasses.Field, defaults: dict[str, Any]) -> str:
    if f.name in defaults:
        return str(defaults[f.name])
    if f.name == "model_size":
        return DEFAULT_SIZE
    if f.name in PRESET_FIELDS or f.name == "base_model":
        return "the preset's"
    value = f.default
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "unset" if value is None else str(value)


def add_config_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None,
                     shown_defaults: dict[str, str] | None = None) -> None:
    """One flag per run-config field. ``defaults``: a script's own flag defaults;
    ``shown_defaults``: what --help says of defaults a stage derives (the pilot's)."""
    defaults = defaults or {}
    shown = {**(shown_defaults or {}), **defaults}
    group = parser.add_argument_group("run settings (preset < --config < these flags)")
    for f in config_fields(exclude):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_default_text(f, shown)})"
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, default=defaults.get(f.name),
                               action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = f.metadata.get("choices") if kind == "str" else None
        group.add_argument(flag, dest=f.name, default=defaults.get(f.name), choices=choices,
                           type={"int": int, "float": float}.get(kind, str), help=help_text)


def add_training_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                       defaults: dict[str, Any] | None = None,
                       shown_defaults: dict[str, str] | None = None) -> None:
    """Everything llama_train.py and llama_pilot.py share: output, config file, quantization,
    the run settings, and reporting."""
    parser.add_argument("--config", default=None,
                        help="JSON config (e.g. sft_output/training_config.json)")
    parser.add_argument("--output-dir", required=True, help="where checkpoints and final_model/ go")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true",
                       help="QLoRA: nf4 4-bit base with double quant")
    quant.add_argument("--use-8bit", action="store_true", help="8-bit base (LLM.int8)")
    parser.add_argument("--use-wandb", action="store_true",
                        help="log to Weights & Biases (offline mode when no key is configured)")
    parser.add_argument("--wandb-project", default="llama-sft", help="W&B project")
    parser.add_argument("--report-to", default="tensorboard",
                        help=f"comma-separated: {', '.join(REPORT_TARGETS)}, none (mlflow: "
                             f"MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser, exclude=exclude, defaults=defaults, shown_defaults=shown_defaults)


def config_from_args(args, stage_defaults: dict[str, Any] | None = None):
    """Resolve preset < ``stage_defaults`` < --config file < explicit flags."""
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    if args.use_4bit:
        overrides["quantization"] = "4bit"
    elif args.use_8bit:
        overrides["quantization"] = "8bit"
    file_values = load_config_file(args.config) if args.config else {}
    return resolve_config(overrides.get("model_size"), file_values=file_values,
                          overrides=overrides, origin=args.config or "config",
                          stage_defaults=stage_defaults)


def report_targets(args) -> tuple[str, ...]:
    targets = {t.strip() for t in args.report_to.split(",") if t.strip() and t.strip() != "none"}
    if args.use_wandb:
        targets.add("wandb")
    unknown = targets - set(REPORT_TARGETS)
    if unknown:
        raise UsageError(f"--report-to: unknown target(s) {', '.join(sorted(unknown))}")
    return tuple(sorted(targets))
