"""The one reader of adapter directories: ``final_model/`` from training, or an extracted package.

Checked before any model library sees them: no custom code (``auto_map``), no file leading outside
the directory, the base model it was trained on, and that its files are the ones its manifest
(or, for an extracted package, ``SHA256SUMS``) lists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.adapter.archive import parse_sums
from llama_sft.adapter.layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALLOWED_FILES, METADATA,
                                      SUMS, TRAINING_CONFIG)
from llama_sft.config.presets import EMBEDDED_MODEL_ID, embedded_model_dir
from llama_sft.errors import DataError, UsageError
from llama_sft.files import read_json, sha256_file, verify_manifest


@dataclass(frozen=True)
class AdapterDir:
    """An adapter directory that passed ``read_adapter_dir``'s checks, and what it records."""

    path: Path
    training_config: dict[str, Any]   # the resolved run config it was trained with ({} if none)
    manifest: dict[str, Any]          # its manifest; an extracted package's is built from metadata


def read_adapter_dir(path: str | os.PathLike, base_model: str | None = None) -> AdapterDir:
    """Check an adapter directory (``check_adapter_dir``, then its files against the manifest or
    ``SHA256SUMS``) and read what it records."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"adapter path {path} does not exist or is not a directory")
    check_adapter_dir(path, base_model)
    training_config, manifest = _read_records(path)
    return AdapterDir(path, training_config, manifest)


def check_adapter_dir(adapter_dir: str | os.PathLike, base_model: str | None = None) -> dict:
    """Refuse adapter dirs that could run code or that belong to another base model."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{adapter_dir} is not an adapter directory (needs {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{cfg_path} is not valid JSON: {exc}") from None
    if "auto_map" in cfg:
        raise DataError(f"{cfg_path} has auto_map (custom code); refusing to load it")
    _check_adapter_files(adapter_dir)
    recorded = cfg.get("base_model_name_or_path")
    if base_model and recorded and not _same_base(recorded, base_model):
        raise UsageError(f"adapter {adapter_dir} was trained on {recorded!r}, not {base_model!r}; "
                         f"pass --base-model {recorded}")
    return cfg


def _check_adapter_files(adapter_dir: Path) -> None:
    """No file may lead outside the adapter dir, and the tokenizer may not bring its own code."""
    root = adapter_dir.resolve()
    for path in sorted(adapter_dir.iterdir()):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise DataError(f"{path} points outside the adapter directory "
                            f"({os.readlink(path)}); refusing it")
    tok_cfg_path = adapter_dir / "tokenizer_config.json"
    if not tok_cfg_path.is_file():
        return
    try:
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{tok_cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(tok_cfg, dict):
        raise DataError(f"{tok_cfg_path} must hold a JSON object")
    if "auto_map" in tok_cfg:
        raise DataError(f"{tok_cfg_path} has auto_map (custom tokenizer code); refusing to load it")
    for key, value in sorted(tok_cfg.items()):
        if key.endswith("_file") and isinstance(value, str) and value \
                and not (adapter_dir / value).resolve().is_relative_to(root):
            raise DataError(f"{tok_cfg_path}: {key} names a file outside the adapter directory "
                            f"({value}); refusing it")


def _same_base(recorded: str, requested: str) -> bool:
    def norm(name: str) -> str:
        return EMBEDDED_MODEL_ID if Path(name) == embedded_model_dir() else name.rstrip("/")
    return norm(recorded) == norm(requested)


def recorded_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter dir was trained on (from its run config, else PEFT config)."""
    adapter_dir = Path(adapter_dir)
    run_cfg = adapter_dir / TRAINING_CONFIG
    if run_cfg.exists():
        return json.loads(run_cfg.read_text())["base_model"]
    return check_adapter_dir(adapter_dir)["base_model_name_or_path"]


def _read_records(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training config, manifest) of a final_model/ dir, checked against its manifest.

    An extracted package (no manifest.json, but SHA256SUMS and metadata.json) is checked against
    SHA256SUMS instead, and its metadata.json stands in for both records.
    """
    if (adapter_dir / "manifest.json").exists() or not (adapter_dir / SUMS).is_file():
        manifest = verify_manifest(adapter_dir)
        cfg_path = adapter_dir / TRAINING_CONFIG
        training_config = read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(training_config, dict):
            raise DataError(f"{cfg_path} must hold a JSON object")
        return training_config, manifest
    sums = parse_sums(adapter_dir, (adapter_dir / SUMS).read_bytes())
    for name, digest in sums.items():
        if name not in ALLOWED_FILES or sha256_file(adapter_dir / name) != digest:
            raise DataError(f"{adapter_dir / name} does not match {SUMS}; extract the package "
                            f"again")
    meta = read_json(adapter_dir / METADATA)
    training_config = {**(meta.get("training_config") or {}),
                       "model_size": meta.get("model_size"), "base_model": meta.get("base_model")}
    inputs = {k: {"path": v.get("file", ""), **v} for k, v in (meta.get("data") or {}).items()}
    manifest = {"created": meta.get("created"), "config": training_config, "inputs": inputs,
                "versions": (meta.get("versions") or {}).get("training") or {},
                "git_commit": meta.get("pipeline_git_commit"),
                "training_metrics": meta.get("training_metrics")}
    return training_config, manifest

