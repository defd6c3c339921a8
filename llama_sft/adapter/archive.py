"""The package archive format: a reproducible ``.tar.gz`` of one folder with ``SHA256SUMS``.

``verify_package`` checks gzip/tar integrity, the allowlist, member types and paths, size caps,
every checksum and the adapter layout that serving needs (vLLM's ``--lora-modules`` reads
``adapter_config.json`` and the tensor names peft writes) without writing anything.
``extract_package`` verifies first, then extracts with tarfile's ``data`` filter into a temporary
directory that is renamed into place, so a failed extraction leaves nothing. Damaged or hostile
archives are ``DataError`` (exit 65).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from llama_sft.adapter.layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALLOWED_FILES,
                                      ARCHIVE_SUFFIXES, METADATA, REQUIRED_FILES, SUMS)
from llama_sft.errors import DataError, UsageError
from llama_sft.files import atomic_file, sha256_file

DEFAULT_MAX_BYTES = 32 * 1024 ** 3     # total uncompressed size an archive may declare
DEFAULT_MAX_MEMBERS = 64               # the allowlist has 16 names
SMALL_FILE_CAP = 16 * 1024 ** 2        # read into memory: the KEPT_FILES (of the weights, the head)
SCAN_CHUNK = 1 << 20
KEPT_FILES = (SUMS, METADATA, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# peft's names for a LoRA saved without adapter name, as vLLM loads them
PEFT_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<half>[AB])\.weight")


def is_package_archive(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(ARCHIVE_SUFFIXES)


def write_sums(folder: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.name != SUMS]
    (folder / SUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_archive(folder: Path, archive: Path, mtime: int) -> None:
    """A reproducible .tar.gz of ``folder``: sorted, fixed owner/mode/mtime, bare gzip header."""
    from tqdm import tqdm

    members = sorted(p.name for p in folder.iterdir())
    with atomic_file(archive) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in tqdm(members, desc="archiving", unit="file", disable=None):
            info = tarfile.TarInfo(f"{folder.name}/{name}")
            info.size = (folder / name).stat().st_size
            info.mtime, info.mode, info.uid, info.gid = mtime, 0o644, 0, 0
            info.uname = info.gname = ""
            with open(folder / name, "rb") as fh:
                tar.addfile(info, fh)


class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` decompressed bytes were read."""

    def __init__(self, fh, limit: int, archive: Path):
        super().__init__()
        self._fh, self._limit, self._archive, self._count = fh, limit, archive, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._count += len(data)
        if self._count > self._limit:
            raise DataError(f"{self._archive}: decompresses to more than {self._limit} bytes "
                            f"(size cap); refusing it as a decompression bomb")
        return data


@contextlib.contextmanager
def _open_tar(archive: Path, max_bytes: int, max_members: int) -> Iterator[tarfile.TarFile]:
    overhead = (max_members + 8) * 2048 + 20480  # headers, padding and end blocks
    with gzip.open(archive, "rb") as gz:
        reader = _CappedReader(gz, max_bytes + overhead, archive)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            yield tar
        while reader.read(SCAN_CHUNK):  # to the end of the gzip stream, so its CRC is checked
            pass


@contextlib.contextmanager
def _archive_errors(archive: Path) -> Iterator[None]:
    import zlib

    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{archive} is not an intact .tar.gz ({exc or type(exc).__name__}); "
                        f"download or build it again") from None


class _MemberCheck:
    """Checks tar members one by one: type, path, allowlist, count and total size."""

    def __init__(self, archive: Path, max_bytes: int, max_members: int):
        self.archive, self.max_bytes, self.max_members = archive, max_bytes, max_members
        self.top: str | None = None
        self.count = self.total = 0
        self.seen: set[str] = set()

    def fail(self, member: tarfile.TarInfo, why: str) -> DataError:
        return DataError(f"{self.archive}: member {member.name!r} {why}; refusing the archive")

    def __call__(self, member: tarfile.TarInfo) -> str | None:
        """The file name inside the package folder (None for the folder entry itself)."""
        self.count += 1
        if self.count > self.max_members:
            raise DataError(f"{self.archive}: more than {self.max_members} members; refusing it")
        if member.issym() or member.islnk():
            raise self.fail(member, f"is a link (to {member.linkname!r})")
        if member.isdev() or not (member.isfile() or member.isdir()):
            raise self.fail(member, "is a device or special file")
        name = member.name
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise self.fail(member, "has an absolute path")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if ".." in parts:
            raise self.fail(member, "leaves the extraction directory (path traversal)")
        self.top = self.top or parts[0]
        if parts[0] != self.top:
            raise self.fail(member, f"is outside the package folder {self.top!r}")
        if member.isdir():
            if len(parts) != 1:
                raise self.fail(member, "is a directory not in the package allowlist")
            return None
        if len(parts) != 2 or parts[1] not in ALLOWED_FILES:
            raise self.fail(member, "is not in the package allowlist")
        if parts[1] in self.seen:
            raise self.fail(member, "appears twice")
        self.seen.add(parts[1])
        self.total += member.size
        if self.total > self.max_bytes:
            raise DataError(f"{self.archive}: members total more than {self.max_bytes} bytes "
                            f"(size cap); refusing it as a decompression bomb")
        return parts[1]


def _hash_stream(fh, keep: bool) -> tuple[str, bytes | None]:
    digest, kept = hashlib.sha256(), bytearray()
    while block := fh.read(SCAN_CHUNK):
        digest.update(block)
        if keep and len(kept) < SMALL_FILE_CAP:
            kept.extend(block)
    return digest.hexdigest(), bytes(kept) if keep else None


def parse_sums(archive: Path, text: bytes) -> dict[str, str]:
    sums = {}
    for lineno, line in enumerate(text.decode("utf-8", "replace").splitlines(), start=1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not match:
            raise DataError(f"{archive}: {SUMS} line {lineno} is malformed")
        sums[match.group(2)] = match.group(1)
    return sums


def check_serving_layout(archive: Path, config: bytes, weights_head: bytes) -> None:
    """The adapter as vLLM (and peft) load it: ``adapter_config.json`` a LoRA with
    ``target_modules``, ``r`` and ``lora_alpha``; every tensor in the weights named
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (no adapter name such as
    ``.default.``), A and B in pairs. Only the safetensors header is read: the first 8 bytes
    give its length, then JSON maps names to dtype, shape and offsets."""
    where = f"{archive}: {ADAPTER_CONFIG}"
    try:
        cfg = json.loads(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{where} is not a JSON object")
    missing = [k for k in ("target_modules", "r", "lora_alpha") if not cfg.get(k)]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}, which vLLM needs to load the "
                        f"adapter")
    if cfg.get("peft_type") != "LORA":
        raise DataError(f"{where} has peft_type {cfg.get('peft_type')!r}, not 'LORA'; vLLM "
                        f"serves LoRA adapters only")
    names = _safetensors_names(archive, weights_head)
    odd = [n for n in names if ".default." in n or not PEFT_LORA_KEY.fullmatch(n)]
    if odd or not names:
        raise DataError(f"{archive}: {ADAPTER_WEIGHTS} has tensor names outside peft's naming "
                        f"(base_model.model.<module>.lora_A.weight / lora_B.weight), e.g. "
                        f"{odd[0] if odd else '(no tensors)'!r}; vLLM cannot load it")
    halves: dict[str, set[str]] = {}
    for name in names:
        match = PEFT_LORA_KEY.fullmatch(name)
        halves.setdefault(match["module"], set()).add(match["half"])
    unpaired = sorted(m for m, h in halves.items() if h != {"A", "B"})
    if unpaired:
        raise DataError(f"{archive}: {ADAPTER_WEIGHTS} has lora_A without lora_B (or the "
                        f"reverse) for {unpaired[0]}")


def _safetensors_names(archive: Path, head: bytes) -> list[str]:
    """The tensor names in a safetensors header (``__metadata__`` left out)."""
    where = f"{archive}: {ADAPTER_WEIGHTS}"
    if len(head) < 8:
        raise DataError(f"{where} is too short to be safetensors")
    (length,) = struct.unpack("<Q", head[:8])
    if length > len(head) - 8:
        raise DataError(f"{where} declares a {length}-byte header, more than the file has (or "
                        f"over {SMALL_FILE_CAP} bytes); not safetensors")
    try:
        header = json.loads(head[8:8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} has no valid safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise DataError(f"{where} has no valid safetensors header")
    return [name for name in header if name != "__metadata__"]


def _check_sidecar(archive: Path) -> str:
    digest = sha256_file(archive)
    sidecar = archive.with_name(archive.name + ".sha256")
    if sidecar.is_file():
        recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()[:1]
        if recorded != [digest]:
            raise DataError(f"{archive} does not match {sidecar.name} (sha256 differs); the "
                            f"download is damaged or was altered")
    return digest


def verify_package(archive: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_members: int = DEFAULT_MAX_MEMBERS) -> dict[str, Any]:
    """Check integrity, allowlist and every checksum of a package (raises DataError).

    Nothing is written. A ``<archive>.sha256`` beside the archive is checked too.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise UsageError(f"package {archive} not found")
    digest = _check_sidecar(archive)
    check = _MemberCheck(archive, max_bytes, max_members)
    hashes: dict[str, str] = {}
    small: dict[str, bytes] = {}
    with _archive_errors(archive), _open_tar(archive, max_bytes, max_members) as tar:
        for member in tar:
            name = check(member)
            if name is None:
                continue
            fh = tar.extractfile(member)
            hashes[name], content = _hash_stream(fh, keep=name in KEPT_FILES)
            if content is not None:
                small[name] = content
    if check.top is None:
        raise DataError(f"{archive} is empty")
    missing = [f for f in REQUIRED_FILES if f not in hashes]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; it is not a package from "
                        f"llama_package.py")
    sums = parse_sums(archive, small[SUMS])
    listed, present = set(sums), set(hashes) - {SUMS}
    if listed != present:
        odd = sorted(listed ^ present)
        raise DataError(f"{archive}: {SUMS} and the archive disagree on {', '.join(odd)}")
    for name in sorted(present):
        if sums[name] != hashes[name]:
            raise DataError(f"{archive}: checksum mismatch for {name} (the file was altered)")
    try:
        metadata = json.loads(small[METADATA])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{archive}: {METADATA} is not valid JSON ({exc})") from None
    check_serving_layout(archive, small[ADAPTER_CONFIG], small[ADAPTER_WEIGHTS])
    return {"archive": str(archive), "sha256": digest, "folder": check.top,
            "name": metadata.get("name"), "version": metadata.get("version"),
            "base_model": metadata.get("base_model"), "model_size": metadata.get("model_size"),
            "files": dict(sorted(hashes.items())), "bytes": check.total,
            "members": check.count, "exports": metadata.get("exports") or []}


def verify_exports(info: dict[str, Any]) -> str:
    """Check the exports the package's metadata lists (merged model, GGUF, ONNX) that lie beside
    the archive against their sha256 (raises DataError on a mismatch); a summary for the log.

    An export that is not there is no error: an archive copied on its own is still whole."""
    exports = info.get("exports") or []
    if not exports:
        return ""
    where = Path(info["archive"]).parent
    absent = []
    for entry in exports:
        rel = PurePosixPath(str(entry.get("path", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise DataError(f"{info['archive']}: the metadata lists an export outside the "
                            f"package's directory ({rel})")
        path = where / rel
        if not path.is_file():
            absent.append(entry["path"])
        elif sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path} does not match the sha256 the package lists for it; the "
                            f"export is damaged or was altered")
    checked = len(exports) - len(absent)
    return (f"; exports: {checked} of {len(exports)} files verified"
            + (f" ({len(absent)} not beside the archive)" if absent else ""))


def extract_package(archive: str | os.PathLike, dest: str | os.PathLike, *,
                    max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS,
                    overwrite: bool = False) -> Path:
    """Verify, then extract into ``dest/<name>-<version>/``; returns that (adapter) directory.

    Extraction goes into a temporary directory inside ``dest`` that is renamed into place, so a
    failure leaves nothing (``dest`` itself is removed again when this call created it).
    """
    archive = Path(archive)
    info = verify_package(archive, max_bytes=max_bytes, max_members=max_members)
    dest = Path(dest)
    final = dest / info["folder"]
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists; remove it or pass --overwrite")
    created = [p for p in (dest, *dest.parents) if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{info['folder']}.extract-"))
    try:
        check = _MemberCheck(archive, max_bytes, max_members)
        with _archive_errors(archive), _open_tar(archive, max_bytes, max_members) as tar:
            for member in tar:
                check(member)
                tar.extract(member, tmp, filter="data")
        extracted = tmp / info["folder"]
        for name, digest in info["files"].items():
            if sha256_file(extracted / name) != digest:
                raise DataError(f"{archive} changed while it was being extracted ({name})")
        if final.exists():
            os.replace(final, tmp / "replaced")  # removed with tmp below
        os.replace(extracted, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return final
