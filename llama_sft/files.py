"""Files every stage writes: hashes, atomic writes, JSON, and each output directory's manifest.

Every stage writes ``manifest.json`` into its output directory (stage, created time, inputs with
sha256, the resolved config, library versions, git commit). A stage that reads a directory calls
``verify_manifest`` and is told which file changed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from llama_sft.errors import DataError, UsageError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_list_problem(directory: str | os.PathLike, hash_list: str) -> str | None:
    """None when every file that ``directory/hash_list`` (JSON: ``{"files": {path: sha256}}``)
    names is present and unchanged, else why not (a materialized cache's self-check)."""
    directory = Path(directory)
    if not (directory / hash_list).is_file():
        return "no hash list"
    for rel, digest in read_json(directory / hash_list)["files"].items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} missing"
        if sha256_file(path) != digest:
            return f"{rel} changed"
    return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def published_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the usual mode, 0666 (a directory 0777) less the umask: mkstemp and mkdtemp
    make 0600 and 0700, which would hide outputs from the user's group."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; on success it gets the usual mode and replaces
    ``path`` in one rename, on failure it is removed (``path`` is never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        published_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    A failure (or kill) leaves ``final`` as it was: never a half-written directory that looks
    finished. Leftover ``.<name>.tmp-*`` siblings from a killed run are ignored by readers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists; pass --overwrite or choose another path")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    published_mode(tmp)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                "safetensors", "tokenizers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return versions


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe_inputs(paths: dict[str, str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """name -> {path, sha256, bytes} for files; directories are described by their manifest."""
    described = {}
    for name, path in paths.items():
        path = Path(path)
        if path.is_dir():
            manifest = path / "manifest.json"
            described[name] = {"path": str(path), "manifest_sha256":
                               sha256_file(manifest) if manifest.exists() else None}
        else:
            described[name] = {"path": str(path), "sha256": sha256_file(path),
                               "bytes": path.stat().st_size}
    return described


def write_manifest(out_dir: str | os.PathLike, *, stage: str, inputs: dict[str, Any] | None = None,
                   config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                   created: str | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` naming every file in ``out_dir`` with its sha256."""
    out_dir = Path(out_dir)
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel == "manifest.json" or rel.startswith(("checkpoint-", "wandb/", "tensorboard/")):
            continue
        files[rel] = sha256_file(path)
    manifest = {"stage": stage, "created": created or now_iso(), "inputs": inputs or {},
                "config": config or {}, "files": files, "versions": library_versions(),
                "git_commit": git_commit()}
    if extra:
        manifest.update(extra)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def verify_manifest(directory: str | os.PathLike, names: list[str] | None = None) -> dict[str, Any]:
    """Check ``directory/manifest.json`` exists and its files (or ``names``) hash the same."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{directory} has no manifest.json: it was not written by this pipeline "
                        f"(or the run that wrote it did not finish)")
    manifest = read_json(manifest_path)
    recorded = manifest.get("files", {})
    for name in names if names is not None else sorted(recorded):
        if name not in recorded:
            raise DataError(f"{directory}/manifest.json does not list {name}")
        path = directory / name
        if not path.exists():
            raise DataError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != recorded[name]:
            raise DataError(f"{path} changed since {manifest.get('stage', 'its stage')} wrote it "
                            f"(sha256 differs from manifest.json); re-run that stage")
    return manifest


def verify_file_against_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """Verify a file that sits in a pipeline output dir, when that dir has a manifest."""
    path = Path(path)
    if (path.parent / "manifest.json").exists():
        return verify_manifest(path.parent, [path.name])
    return None
