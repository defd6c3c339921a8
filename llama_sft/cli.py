"""What the command-line scripts share: the help formatter, the decoding flags, progress lines."""
from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every default that is not None."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or \
                "%(default)" in (action.help or "") or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_decoding_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int,
                       temperature: float, top_p: float) -> None:
    """--max-new-tokens, --temperature and --top-p, as evaluation and chat both declare them."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="generation limit per answer")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="sampling temperature; 0 = greedy decoding")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help="nucleus sampling mass (with --temperature > 0)")


def decoding_problems(max_new_tokens: int, temperature: float, top_p: float) -> list[str]:
    """What is wrong with the values of the add_decoding_flags flags, one message each."""
    found = []
    if max_new_tokens <= 0:
        found.append(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        found.append(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        found.append(f"--top-p must be in (0, 1], got {top_p}")
    return found


def log(msg: str) -> None:
    """One progress line for the user, on stderr (stdout is for results)."""
    print(msg, file=sys.stderr, flush=True)


def progress_bar(enabled: bool, iterable=None, **kwargs):
    """A tqdm progress bar on stderr (off when ``enabled`` is False or stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if enabled else True, mininterval=0.5, file=sys.stderr,
                **kwargs)
