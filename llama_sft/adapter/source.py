"""An adapter path as a user gives it: an adapter directory, or a package archive."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from llama_sft.adapter.archive import extract_package, is_package_archive
from llama_sft.adapter.directory import AdapterDir, read_adapter_dir


@contextlib.contextmanager
def adapter_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself, or for a package archive the package verified (every checksum) and
    extracted into a temporary directory that is removed on exit. Nothing in it is read here."""
    if not is_package_archive(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="llama-adapter-") as tmp:
        yield extract_package(path, tmp)


@contextlib.contextmanager
def open_adapter(path: str | os.PathLike, base_model: str | None = None) -> Iterator[AdapterDir]:
    """The checked adapter directory (``read_adapter_dir``) behind ``path``, before any model
    library is imported; ``base_model``, when given, must be the one it was trained on."""
    with adapter_directory(path) as directory:
        yield read_adapter_dir(directory, base_model)
