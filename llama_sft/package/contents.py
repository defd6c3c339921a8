"""What may go into a package: the allowlist walk of an adapter directory and the token scan."""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath

from llama_sft.adapter.archive import SCAN_CHUNK
from llama_sft.adapter.layout import COPIED_FILES, RECORD_FILES
from llama_sft.errors import SECRET_ENV_VARS

log = logging.getLogger("llama_package")

# Files an adapter dir must never ship. Pickle-based formats can run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz",
                   ".distcp", ".dill")
SECRET_FILES = (".env", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc")

# Token shapes: Hugging Face tokens, W&B API keys (40 hex next to "wandb"), generic api_key=...
TOKEN_PATTERNS = (
    ("a Hugging Face token", re.compile(rb"hf_[A-Za-z0-9]{30,}")),
    ("a W&B API key", re.compile(rb"(?is)wandb.{0,64}?(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")),
    ("an api_key value",
     re.compile(rb"(?i)api[_-]?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-./+]{12,}")),
)
SCAN_OVERLAP = 256


def _danger(rel: str, path: Path) -> str | None:
    """Why a file in the adapter dir must not be packaged (None when it is not dangerous)."""
    name = path.name.lower()
    parts = [p.lower() for p in PurePosixPath(rel).parts]
    if "wandb" in parts:
        return "W&B run files (wandb/)"
    if name == "training_args.bin":
        return "training arguments pickle"
    if name in SECRET_FILES or name.startswith(".env."):
        return "secrets file"
    if any(p.startswith(("checkpoint-", "global_step")) for p in parts):
        return "training checkpoint (optimizer state)"
    if "optimizer" in name or "scheduler" in name or name.startswith("rng_state"):
        return "optimizer/scheduler state"
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle file"
    return None


def _symlink_problem(path: Path, root: Path) -> str | None:
    target = os.readlink(path)
    if os.path.isabs(target):
        return f"absolute symlink to {target}"
    if not path.resolve().is_relative_to(root):
        return f"symlink leaving the adapter dir ({target})"
    return None


def inspect_adapter_dir(adapter_dir: Path) -> tuple[list[str], list[str]]:
    """(allowlisted files present, problems). Walks everything, following no links."""
    root = adapter_dir.resolve()
    present, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            reason = _danger(rel, path)
            if stat.S_ISLNK(mode):
                reason = _symlink_problem(path, root) or reason
                if reason is None and not path.exists():
                    reason = "broken symlink"
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                reason = "not a regular file (device, fifo or socket)"
            if reason:
                problems.append(f"{rel}: {reason}")
            elif stat.S_ISDIR(mode) or (stat.S_ISLNK(mode) and path.is_dir()):
                continue
            elif rel in COPIED_FILES:
                present.append(rel)
            elif rel not in RECORD_FILES:
                log.info("skipping %s (not in the package allowlist)", rel)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()
                       and _danger((here / d).relative_to(root).as_posix(), here / d) is None]
    return present, problems


def find_secret(path: Path) -> str | None:
    """The kind of token found in ``path`` (token-shaped strings or a live env token), or None."""
    literals = [os.environ[v].encode() for v in SECRET_ENV_VARS
                if len(os.environ.get(v, "")) >= 8]
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(SCAN_CHUNK):
            window = tail + block
            for kind, pattern in TOKEN_PATTERNS:
                if pattern.search(window):
                    return kind
            if any(lit in window for lit in literals):
                return "the value of a token environment variable"
            tail = window[-SCAN_OVERLAP:]
    return None
