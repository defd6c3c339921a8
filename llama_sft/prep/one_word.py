"""Short records one word apart: the near duplicates MinHash's threshold cannot see.

One edit changes about as many shingles whatever a record's length, so the Jaccard it leaves falls
as records get shorter: under ~200 characters it drops below thresholds at which distinct records
of one template already meet (tests/test_neardup.py plants both). For short records the number of
words changed separates them instead: the same answer to a prompt one word apart is a duplicate.
``minhash.NearDuplicateIndex`` holds a ``OneWordIndex`` beside its LSH bands.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

from llama_sft.prep.normalize import fuzzy_words, normalize_fuzzy

SHORT_RECORD_CHARS = 200     # records (instruction + context + response) up to this long also
                             # match one whose prompt is one word apart: the threshold misses that
SHORT_MIN_WORDS = 8          # in prompts of fewer words, one word is too large a part to ignore


def one_word_apart(a: list[str], b: list[str]) -> bool:
    """Whether word lists ``a`` and ``b`` are at most one word replaced, inserted or deleted
    apart: what is left of them around their common prefix and suffix is one word at most."""
    if abs(len(a) - len(b)) > 1:
        return False
    shorter = min(len(a), len(b))
    head = 0
    while head < shorter and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < shorter - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return len(a) - head - tail <= 1 and len(b) - head - tail <= 1


def edit_windows(m: int) -> list[tuple[int, int]]:
    """(prefix, suffix) word counts around the parts of a prompt of ``m`` words: its thirds, the
    last third cut again in thirds. Every position (and the end) lies between the prefix and the
    suffix of one of them. The instruction leads a prompt, so leaving out the whole last third
    would often leave only the instruction: a key every record of the template shares."""
    third = m // 3
    ninth = (m - 2 * third) // 3
    return [(0, 2 * third), (third, third),
            *((2 * third + i * ninth, (2 - i) * ninth) for i in range(3))]


@lru_cache(maxsize=None)
def _windows(n: int) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The windows a prompt of ``n`` words is filed under, and those it looks up."""
    own = edit_windows(n)
    return tuple(own), tuple({*edit_windows(n - 1), *own, *edit_windows(n + 1)})


class ShortPrompt(NamedTuple):
    """A short record's fuzzy prompt (words and text), the keys ``OneWordIndex`` files it under
    and the (window, key) pairs it looks up."""
    words: list[str]
    text: str
    keys: list[int]
    lookups: list[tuple[tuple[int, int], int]]


def short_prompt(prompt: str, answer: str) -> ShortPrompt | None:
    """``prompt`` keyed with ``answer`` for ``OneWordIndex`` (both fuzzy-normalized); None if it
    has fewer than ``SHORT_MIN_WORDS`` words.

    Pigeonhole (PassJoin's partition filter for edit distance 1): cut either prompt of a pair
    into parts (``edit_windows``); the one edit falls in one part, so the words before that part
    (counted from the start) and after it (counted from the end) are the same in both prompts.
    A key is the hash of the answer and those words. A prompt is filed under the keys of the
    windows for its own length and looks up those for its length and one word more or less: the
    windows its partner was filed under.
    """
    words = fuzzy_words(prompt)
    n = len(words)
    if n < SHORT_MIN_WORDS:
        return None
    answer, every = normalize_fuzzy(answer), tuple(words)
    own, windows = _windows(n)
    keys = {w: hash((answer, every[:w[0]], every[n - w[1]:])) for w in windows}
    return ShortPrompt(words, " ".join(words), [keys[w] for w in own], list(keys.items()))


def _middles_one_word_apart(short: ShortPrompt, window: tuple[int, int], other: str) -> bool:
    """Whether ``other`` (a prompt's fuzzy text) has ``short``'s words before and after
    ``window`` and, between them, words one edit from ``short``'s: then the two prompts are one
    word apart (a common prefix and suffix do not change an edit distance)."""
    head, tail = window
    words, text = short.words, short.text
    prefix = sum(map(len, words[:head])) + head            # its words and the space after each
    suffix = sum(map(len, words[len(words) - tail:])) + tail  # and the space before each
    if len(other) - suffix < prefix or not other.startswith(text[:prefix]) \
            or not other.endswith(text[len(text) - suffix:]):
        return False
    return one_word_apart(text[prefix:len(text) - suffix].split(),
                          other[prefix:len(other) - suffix].split())


class OneWordIndex:
    """Short records by answer and prompt (``short_prompt``'s keys), to find those that give the
    same answer to a prompt one word apart without comparing against every record of the same
    template: a key leaves out a third of the prompt at most and holds the answer, so records of
    one template seldom share one. What a key finds is then checked on the words it left out."""

    def __init__(self):
        self.table: dict[int, Any] = {}
        self.prompts: dict[int, str] = {}

    def query(self, short: ShortPrompt) -> list[int]:
        """Rows whose prompt is at most one word from ``short``'s, with the same answer unless
        keys collided, in ascending order."""
        found: set[int] = set()
        for window, key in short.lookups:
            held = self.table.get(key)
            if held is None:
                continue
            for row in held if type(held) is list else (held,):
                if row not in found and _middles_one_word_apart(short, window,
                                                               self.prompts[row]):
                    found.add(row)
        return sorted(found)

    def add(self, row: int, short: ShortPrompt) -> None:
        self.prompts[row] = short.text
        for key in short.keys:
            held = self.table.get(key)
            if held is None:
                self.table[key] = row
            elif type(held) is list:
                held.append(row)
            else:
                self.table[key] = [held, row]
