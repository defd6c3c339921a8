"""PII scrubbing: e-mail addresses, phone numbers, API keys and tokens become placeholders."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Iterator

_THREE_DIGITS = re.compile(r"\d{3}")

# (kind, pattern, replacement, cheap test that must pass before the pattern can match)
PII_PATTERNS: tuple[tuple[str, re.Pattern, str, Any], ...] = (
    ("api_key", re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}"
        r"|github_pat_[A-Za-z0-9_]{22,}|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20}"
        r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"), "[API_KEY]",
     lambda t: True),
    ("api_key", re.compile(r"(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"), "[API_KEY]",
     lambda t: "Bearer " in t),
    ("api_key", re.compile(r"(?i)\b((?:api[_-]?key|password|passwd|secret|token)\s*[=:]\s*)"
                           r"[^\s\"',;]{8,}"), r"\1[API_KEY]", lambda t: "=" in t or ":" in t),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
     "[EMAIL]", lambda t: "@" in t),
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}(?![\w])"), "[PHONE]",
     lambda t: _THREE_DIGITS.search(t) is not None),
)
PII_MIN_CHARS = 6                             # the shortest match: an e-mail like a@b.co


def scrub_pii(text: str, counts: Counter | None = None) -> tuple[str, Counter]:
    """Replace e-mail addresses, phone numbers, API keys and tokens with placeholders; adds what
    it replaced to ``counts`` (a new Counter when not given) and returns it."""
    if counts is None:
        counts = Counter()
    if len(text) < PII_MIN_CHARS:
        return text, counts
    for kind, pattern, placeholder, may_match in PII_PATTERNS:
        if not may_match(text):
            continue
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] += n
    return text, counts


def _strings(value: Any) -> Iterator[str]:
    """Every string value inside ``value`` (dict keys are not scrubbed, so not included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def may_hold_pii(texts: Iterable[str]) -> bool:
    """False only when ``scrub_pii`` would change none of ``texts``.

    The texts are searched once, joined by NUL: every pattern that matches inside one text also
    matches at the same place in the joined string (NUL is not a word character, not a separator
    a pattern accepts, and is where the text's boundaries were), so a joined string with no match
    means no text has one. Most records hold no PII; this replaces a search per field and
    pattern with one per pattern.
    """
    joined = "\x00".join(t for t in texts if len(t) >= PII_MIN_CHARS)
    return bool(joined) and any(may_match(joined) and pattern.search(joined) is not None
                                for _, pattern, _, may_match in PII_PATTERNS)


def _scrub_value(value: Any, counts: Counter) -> Any:
    if isinstance(value, str):
        return scrub_pii(value, counts)[0]
    if isinstance(value, list):
        return [_scrub_value(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, counts) for k, v in value.items()}
    return value
