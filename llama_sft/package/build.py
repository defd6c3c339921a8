"""Building a package: plan (every check before anything is written), stage, archive, manifest."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llama_sft.adapter.archive import write_archive, write_sums
from llama_sft.adapter.directory import check_adapter_dir, read_adapter_dir, recorded_base_model
from llama_sft.adapter.layout import (ADAPTER_FILES, EVALUATION, GENERATED_FILES, METADATA,
                                      PROMPT_FORMAT, SUMS)
from llama_sft.adapter.source import adapter_directory
from llama_sft.config.presets import (DEFAULT_SIZE, EMBEDDED_MODEL_ID, embedded_model_dir,
                                      get_preset, preset_for_base_model)
from llama_sft.errors import DataError, UsageError
from llama_sft.files import (describe_inputs, published_mode, read_json, sha256_file,
                             verify_file_against_manifest, write_json, write_manifest,
                             write_text_atomic)
from llama_sft.package.contents import find_secret, inspect_adapter_dir
from llama_sft.package.export import merge_adapter
from llama_sft.package.metadata import (_epoch, build_metadata, render_readme, render_requirements,
                                        summarize_evaluation)

log = logging.getLogger("llama_package")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise UsageError(f"--{kind} {value!r} must be letters, digits and . _ + - only "
                         f"(at most 100 characters, starting with a letter or digit)")
    return value


def _package_base_id(base: str) -> str:
    """A hub id for the embedded model's local directory; anything else unchanged."""

    with contextlib.suppress(OSError):
        if Path(base).resolve() == embedded_model_dir().resolve():
            return EMBEDDED_MODEL_ID
    return base


def resolve_package_target(adapter_dir: Path, training_config: dict[str, Any],
                           base_model: str | None, model_size: str | None) -> tuple[str, str]:
    """(base model, model size); mismatches with what the adapter records are usage errors."""

    recorded = _package_base_id(training_config.get("base_model")
                                or recorded_base_model(adapter_dir))
    requested = _package_base_id(base_model) if base_model else recorded
    if requested != recorded and Path(requested).resolve() != Path(recorded).resolve():
        raise UsageError(f"adapter {adapter_dir} was trained on {recorded!r}, not {base_model!r}; "
                         f"pass --base-model {recorded} (or leave it out)")
    check_adapter_dir(adapter_dir, recorded)
    recorded_size = training_config.get("model_size")
    if model_size and recorded_size and get_preset(model_size).name != recorded_size:
        raise UsageError(f"adapter {adapter_dir} was trained with --model-size {recorded_size}, "
                         f"not {model_size}; pass --model-size {recorded_size}")
    preset = preset_for_base_model(recorded)
    size = model_size or recorded_size or (preset.name if preset else DEFAULT_SIZE)
    return recorded, get_preset(size).name


def _stage_files(adapter_dir: Path, present: list[str], folder: Path) -> None:
    for rel in present:
        shutil.copyfile(adapter_dir / rel, folder / rel)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    recorded = cfg.get("base_model_name_or_path")
    if recorded and _package_base_id(recorded) != recorded:
        cfg["base_model_name_or_path"] = _package_base_id(recorded)  # no local cache paths
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class PackagePlan:
    """Everything checked before anything is written."""

    adapter_dir: Path
    output_dir: Path
    base_model: str
    model_size: str
    name: str
    version: str
    training_config: dict[str, Any]
    manifest: dict[str, Any]
    present: list[str]
    evaluation_path: Path | None
    evaluation: dict[str, Any] | None

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def archive(self) -> Path:
        return self.output_dir / f"{self.folder_name}.tar.gz"

    @property
    def files(self) -> list[str]:
        extra = {EVALUATION} if self.evaluation_path else set()
        return sorted(set(self.present) | set(GENERATED_FILES) | extra)


def plan_package(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                 base_model: str | None = None, model_size: str | None = None,
                 name: str | None = None, version: str = "0.1.0",
                 evaluation: str | os.PathLike | None = None) -> PackagePlan:
    """Validate the adapter dir and options; refuse dangerous content, naming every file.

    The directory is inspected (no links followed, nothing read) before any file in it is read.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"adapter path {adapter_dir} does not exist or is not a directory")
    adapter_dir = adapter_dir.resolve()
    present, problems = inspect_adapter_dir(adapter_dir)
    if problems:
        raise DataError(f"refusing to package {adapter_dir}: {'; '.join(problems)}")
    missing = [f for f in ADAPTER_FILES + ("tokenizer_config.json", PROMPT_FORMAT)
               if f not in present]
    if missing:
        raise DataError(f"{adapter_dir} lacks {', '.join(missing)}; it was not written by "
                        f"llama_train.py")
    adapter = read_adapter_dir(adapter_dir)   # code and link checks, manifest or SHA256SUMS
    training_config, manifest = adapter.training_config, adapter.manifest
    base, size = resolve_package_target(adapter_dir, training_config, base_model, model_size)
    name = _check_name("name", name or f"llama-sft-{size}")
    version = _check_name("version", version)
    packaged_eval = adapter_dir / EVALUATION
    eval_path = Path(evaluation) if evaluation else (
        packaged_eval if packaged_eval.is_file() and (adapter_dir / SUMS).is_file() else None)
    if eval_path is not None and not eval_path.is_file():
        raise UsageError(f"evaluation report {eval_path} not found")
    summary = None
    if eval_path is not None:
        verify_file_against_manifest(eval_path)
        summary = summarize_evaluation(read_json(eval_path))
    return PackagePlan(adapter_dir, Path(output_dir), base, size, name, version, training_config,
                       manifest, present, eval_path, summary)


def stage_package(plan: PackagePlan, stage: Path,
                  exports: list[dict[str, Any]] | None = None) -> Path:
    """Write the package folder under ``stage``; refuse it when any file holds a token.

    ``exports`` (path, kind, sha256, bytes of every file written beside the archive) are listed
    in ``metadata.json``, so the archive vouches for them."""
    folder = stage / plan.folder_name
    folder.mkdir()
    _stage_files(plan.adapter_dir, plan.present, folder)
    if plan.evaluation_path is not None:
        shutil.copyfile(plan.evaluation_path, folder / EVALUATION)
    metadata = build_metadata(name=plan.name, version=plan.version, base_model=plan.base_model,
                              model_size=plan.model_size, adapter_dir=plan.adapter_dir,
                              manifest=plan.manifest, training_config=plan.training_config,
                              evaluation=plan.evaluation, files=plan.files)
    metadata["exports"] = exports or []
    write_json(folder / METADATA, metadata, sort_keys=True)
    (folder / "README.md").write_text(render_readme(metadata), encoding="utf-8")
    (folder / "requirements.txt").write_text(render_requirements(
        metadata["versions"]["packaging"], plan.training_config.get("quantization", "none")),
        encoding="utf-8")
    write_sums(folder)
    leaks = [f"{p.name}: {kind}" for p in sorted(folder.iterdir()) if (kind := find_secret(p))]
    if leaks:
        raise DataError(f"refusing to package {plan.adapter_dir}: token-shaped content in "
                        f"{'; '.join(leaks)}; remove the secret and re-run")
    return folder


@contextlib.contextmanager
def _output_dir(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed; remove it again on failure when this call created it."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def build_package(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                  base_model: str | None = None, model_size: str | None = None,
                  name: str | None = None, version: str = "0.1.0",
                  evaluation: str | os.PathLike | None = None, merge: bool = False,
                  gguf: list[str] | None = None, onnx: bool = False,
                  merge_dtype: str = "auto") -> Path:
    """Package ``adapter_dir`` into ``output_dir/<name>-<version>.tar.gz`` (+ .sha256, manifest),
    with the exports asked for beside it (see ``export_models``).

    ``adapter_dir`` is a final_model/ dir, an extracted package, or a package archive. Exports are
    made first, inside a staging directory, so that the archive's metadata lists each with its
    sha256; everything is moved into ``output_dir`` only once all of it was written.
    """
    gguf = list(gguf or [])
    with adapter_directory(adapter_dir) as source_dir:
        plan = plan_package(source_dir, output_dir, base_model=base_model, model_size=model_size,
                            name=name, version=version, evaluation=evaluation)
        archive = plan.archive
        with _output_dir(plan.output_dir), tempfile.TemporaryDirectory(
                dir=plan.output_dir, prefix=f".{plan.folder_name}.stage-") as stage:
            built = Path(stage) / "exports"
            built.mkdir()
            exports = export_models(plan, built, merge=merge, gguf=gguf, onnx=onnx,
                                    dtype=_merge_dtype(merge_dtype, plan.training_config))
            folder = stage_package(plan, Path(stage), exports)
            write_archive(folder, archive, _epoch(plan.manifest.get("created")))
            digest = sha256_file(archive)
            sidecar = archive.with_name(archive.name + ".sha256")
            write_text_atomic(sidecar, f"{digest}  {archive.name}\n")
            published_mode(sidecar)
            log.info("wrote %s (sha256 %s)", archive, digest)
            _publish(built, plan.output_dir)
        if exports:
            sums = [(archive.name, digest)] + [(e["path"], e["sha256"]) for e in exports]
            write_text_atomic(plan.output_dir / SUMS,
                              "".join(f"{h}  {p}\n" for p, h in sorted(sums)))
        inputs = {"adapter": Path(adapter_dir)}
        if plan.evaluation_path is not None:
            inputs["evaluation"] = plan.evaluation_path
        described = describe_inputs(inputs)
    write_manifest(plan.output_dir, stage="package", inputs=described,
                   config={"name": plan.name, "version": plan.version,
                           "base_model": plan.base_model, "model_size": plan.model_size,
                           "merge": merge, "gguf": gguf, "onnx": onnx},
                   extra={"package": {"archive": archive.name, "sha256": digest,
                                      "files": plan.files, "exports": exports}})
    published_mode(plan.output_dir / "manifest.json")
    return archive


def _merge_dtype(requested: str, training_config: dict[str, Any]) -> str:
    if requested != "auto":
        return requested
    return training_config.get("dtype", "auto") or "auto"


def _publish(built: Path, output_dir: Path) -> None:
    """Move each finished export into ``output_dir``, replacing an older one of the same name."""
    for item in sorted(built.iterdir()):
        target = output_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
        published_mode(target)


def export_models(plan: PackagePlan, out: Path, *, merge: bool, gguf: list[str], onnx: bool,
                  dtype: str) -> list[dict[str, Any]]:
    """The exports asked for, written into ``out``: the merged model (``--merge``,
    ``<folder>-merged/``), GGUF files (``--gguf``, ``<folder>.<type>.gguf``) and the ONNX model
    (``--onnx``, ``<folder>-onnx/``); GGUF and ONNX are made from the merged model, so they carry
    the fine-tuning. Returns one entry (path relative to ``out``, kind, sha256, bytes) per file."""
    if not (merge or gguf or onnx):
        return []
    merged_dir = out / f"{plan.folder_name}-merged"
    merge_adapter(plan.adapter_dir, plan.base_model, merged_dir, dtype=dtype)
    kinds = {merged_dir.name: "merged"}
    if gguf:
        from llama_sft.package.gguf import export_gguf
        for path in export_gguf(merged_dir, out, plan.folder_name, gguf):
            kinds[path.name] = "gguf"
    if onnx:
        from llama_sft.package.onnx_export import export_onnx
        onnx_dir = export_onnx(merged_dir, out / f"{plan.folder_name}-onnx")
        kinds[onnx_dir.name] = "onnx"
    if not merge:
        shutil.rmtree(merged_dir)
        del kinds[merged_dir.name]
    entries = []
    for top, kind in sorted(kinds.items()):
        paths = [out / top] if (out / top).is_file() else sorted(
            p for p in (out / top).rglob("*") if p.is_file())
        entries += [{"path": p.relative_to(out).as_posix(), "kind": kind,
                     "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths]
    return entries
