"""Exit codes and the errors that end a stage with one clear line.

Every script's ``main`` runs its body through :func:`run_main`: a known failure prints
``error: <what was wrong and what to do>`` (token values scrubbed) and returns its exit code.
0 ok · 1 failed gate · 2 usage or config error · 65 bad input data · 74 I/O error · 130 interrupted.
"""
from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_GATE = 1          # failed gate: pilot no-go, evaluation under threshold, OOM
EXIT_USAGE = 2         # usage or config error
EXIT_DATA = 65         # bad input data
EXIT_IO = 74           # I/O error (disk full, unreadable)
EXIT_INTERRUPTED = 130
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


class PipelineError(Exception):
    """An error that ends a stage with a specific exit code and one clear line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PipelineError):
    exit_code = EXIT_USAGE


class DataError(PipelineError):
    exit_code = EXIT_DATA


class StorageError(PipelineError):
    exit_code = EXIT_IO


class ConfigError(UsageError):
    """A usage or configuration problem (exit code 2)."""


def scrub_secrets(text: str) -> str:
    """Replace the values of known token environment variables in ``text``."""
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 8:
            text = text.replace(value, f"<{var}>")
    return text


def run_main(main_fn, argv=None) -> int:
    """Run a stage's body, turning known failures into one line and an exit code."""
    try:
        return main_fn(argv)
    except PipelineError as exc:
        print(f"error: {scrub_secrets(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"error: I/O failure: {scrub_secrets(str(exc))}", file=sys.stderr)
        return EXIT_IO
