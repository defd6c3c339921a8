#!/usr/bin/env python3
"""Per-size presets, hardware requirements and run-configuration resolution.

    python3 llama_config.py                      # the preset table
    python3 llama_config.py --json               # the same, as JSON
    python3 llama_config.py --check --model-size 7b   # can this machine run the 7b preset?

A run's configuration is resolved in one order: preset < ``--config`` JSON < explicit flags.
Flags default to ``None`` so "not given" means "use the preset". Unknown keys and wrong types
in a config file are errors that name the key.

As an import, this module is the configuration API (``llama_sft.config``): presets, the run
config and its resolution, hardware estimates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from llama_sft.config.hardware import (detect_hardware, environment_check,
                                       estimate_training_memory, lora_parameter_count)
from llama_sft.config.presets import (DEFAULT_SIZE, EMBEDDED_MODEL_ID, PRESETS, Preset,
                                      format_table, get_preset, preset_for_base_model)
from llama_sft.config.settings import (FIELD_SECTION, SECTIONS, DataSettings, EvalSettings,
                                       LoraSettings, ModelSettings, OptimSettings, RunConfig,
                                       load_config_file, resolve_config)
from llama_sft.errors import EXIT_OK, EXIT_USAGE, ConfigError
from llama_sft.model.embedded import embedded_model_status

__all__ = ["DEFAULT_SIZE", "EMBEDDED_MODEL_ID", "FIELD_SECTION", "PRESETS", "SECTIONS",
           "ConfigError", "DataSettings", "EvalSettings", "LoraSettings", "ModelSettings",
           "OptimSettings", "Preset", "RunConfig", "detect_hardware", "environment_check",
           "estimate_training_memory", "format_table", "get_preset", "load_config_file",
           "lora_parameter_count", "preset_for_base_model", "resolve_config"]


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
            preset = get_preset(args.model_size)
            state = embedded_model_status() if preset.base_model == EMBEDDED_MODEL_ID else None
            rows, reason = environment_check(args.model_size, state)
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
