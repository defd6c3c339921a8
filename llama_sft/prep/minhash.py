"""Near-duplicate detection: MinHash signatures of character shingles, LSH bands, and the
index the prep stage keeps its records in.

Two records are near duplicates when the Jaccard of their shingles reaches the threshold or, for
short records, when they give the same answer to prompts one word apart. One edit changes about as
many shingles whatever the length, so the Jaccard it leaves falls as records get shorter: under
~200 characters it drops below thresholds at which distinct records of one template already meet
(tests/test_neardup.py plants both). The number of words changed separates them.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

NUM_PERM = 128               # MinHash permutations
SHINGLE_CHARS = 5            # character shingles for near-duplicate detection
PREFILTER_MIN_CANDIDATES = 16  # longer candidate lists get the half-signature bound first
SHORT_RECORD_CHARS = 200     # records (instruction + context + response) up to this long also
                             # match one whose prompt is one word apart: the threshold misses that
SHORT_MIN_WORDS = 8          # in prompts of fewer words, one word is too large a part to ignore
_NON_WORD = re.compile(r"[^\w\s]+")


# ASCII bytes as fuzzy_words maps them: letters lowercased, neither word nor space -> space
_ASCII_FUZZY = bytes(b if chr(b).isalnum() or chr(b) == "_" or chr(b).isspace() else ord(" ")
                     for b in range(128)).lower() + bytes(range(128, 256))


def fuzzy_words(text: str) -> list[str]:
    """The words of ``text`` case-folded, split at whitespace and punctuation (one byte
    translation for ASCII text, which the regular expression takes three times as long for)."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_FUZZY).decode("ascii").split()
    return _NON_WORD.sub(" ", text.casefold()).split()


def normalize_fuzzy(text: str) -> str:
    """Case-folded, punctuation-free, whitespace-collapsed ``text``."""
    return " ".join(fuzzy_words(text))


def shingles(text: str, size: int = SHINGLE_CHARS) -> set[bytes]:
    """Distinct ``size``-byte shingles of the UTF-8 text (characters, for ASCII text)."""
    data = text.encode("utf-8")
    if len(data) <= size:
        return {data}
    return {data[i:i + size] for i in range(len(data) - size + 1)}


def _lsh_threshold(threshold: float) -> float:
    """LSH bands tuned a little below the threshold: candidates are verified anyway."""
    return max(0.5, threshold - 0.1)


_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def _fmix64(v: np.ndarray) -> np.ndarray:
    shift, m1, m2 = _FMIX64
    v = v ^ (v >> shift)
    v = v * m1
    v = v ^ (v >> shift)
    v = v * m2
    return v ^ (v >> shift)


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def _fmix32(v: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX32
    v = v ^ (v >> s1)
    v = v * m1
    v = v ^ (v >> s2)
    v = v * m2
    return v ^ (v >> s1)


def shingle_hash(shingle: bytes) -> int:
    """32-bit hash of one shingle: MurmurHash3's 64-bit finalizer of its little-endian integer,
    top half. ``MinHasher`` computes the same for every shingle at once with numpy."""
    value = np.array([int.from_bytes(shingle, "little")], dtype=np.uint64)
    return int(_fmix64(value)[0] >> np.uint64(32))


class MinHasher:
    """MinHash signatures (datasketch's ``affine32`` scheme, ``hashfunc=shingle_hash``) of a
    text's ``SHINGLE_CHARS``-byte shingles, computed for all shingles in a few numpy operations
    instead of one Python call per shingle. A test checks it against datasketch's ``MinHash``.
    """

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.seed = num_perm, seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self._a, self._b = (row[None, :] for row in self.permutations)

    def __call__(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if len(data) <= SHINGLE_CHARS:                # one shingle: the whole text
            value = np.array([int.from_bytes(data.tobytes(), "little")], dtype=np.uint64)
        else:                                         # every window of SHINGLE_CHARS bytes
            n = len(data) - SHINGLE_CHARS + 1
            value = data[:n].astype(np.uint64)
            for i in range(1, SHINGLE_CHARS):
                value |= data[i:i + n].astype(np.uint64) << np.uint64(8 * i)
        hv = (_fmix64(value) >> np.uint64(32)).astype(np.uint32)
        hv = _fmix32(hv)[:, None]                     # datasketch's pre-mix for affine32
        return (hv * self._a + self._b).min(axis=0)


class MinHashBands:
    """LSH banding over MinHash signatures: items that share any whole band are candidates.

    The bands and rows are datasketch's ``MinHashLSH`` tuning for the threshold; the tables are
    plain dicts keyed by the band's bytes (a bucket holds a key, or a list once it has several),
    because datasketch's storage layers made the read phase markedly slower
    (benchmarks/README.md, prep).
    A test checks the candidates against ``MinHashLSH``.
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        tuned = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = tuned.b, tuned.r
        self.tables: list[dict[bytes, Any]] = [{} for _ in range(self.bands)]

    def _keys(self, signature: np.ndarray) -> list[bytes]:
        raw, width = signature.tobytes(), self.rows * signature.itemsize
        return [raw[i * width:(i + 1) * width] for i in range(self.bands)]

    def insert(self, key: int, signature: np.ndarray) -> None:
        for band, table in zip(self._keys(signature), self.tables):
            held = table.get(band)
            if held is None:
                table[band] = key
            elif type(held) is list:
                held.append(key)
            else:
                table[band] = [held, key]

    def query(self, signature: np.ndarray) -> list[int]:
        """Keys sharing at least one band with ``signature``, in ascending order."""
        found: set[int] = set()
        for band, table in zip(self._keys(signature), self.tables):
            held = table.get(band)
            if held is None:
                continue
            if type(held) is list:
                found.update(held)
            else:
                found.add(held)
        return sorted(found)


class SignatureStore:
    """MinHash signatures as rows of one growing uint32 matrix: 512 bytes a record instead of a
    numpy object each, and the candidates of a query are compared in one indexing operation."""

    def __init__(self, num_perm: int = NUM_PERM):
        self._rows = np.empty((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def append(self, signature: np.ndarray) -> int:
        if self.size == len(self._rows):
            grown = np.empty((2 * len(self._rows), self._rows.shape[1]), dtype=np.uint32)
            grown[:self.size] = self._rows
            self._rows = grown
        self._rows[self.size] = signature
        self.size += 1
        return self.size - 1

    def __getitem__(self, rows):
        return self._rows[:self.size][rows]

    def head(self, rows, width: int) -> np.ndarray:
        """The first ``width`` values of the given rows."""
        return self._rows[:self.size, :width][rows]


def best_match(signature: np.ndarray, candidates: list[int], store: SignatureStore,
               threshold: float, accept=None) -> tuple[int, float] | None:
    """The candidate (a row of ``store``) whose signature agrees most with ``signature``
    (estimated Jaccard), if at or over ``threshold`` and ``accept(candidate)`` holds. Ties go to
    the earliest candidate.

    Long candidate lists (templated data gives hundreds) are first compared on half of the
    signature: a candidate that could not reach ``threshold`` even if the other half agreed
    entirely is dropped unchecked, which halves the work and changes no result.
    """
    if not candidates:
        return None
    rows = np.asarray(candidates)
    n = len(signature)
    if len(rows) > PREFILTER_MIN_CANDIDATES:
        half = n // 2
        upper = ((store.head(rows, half) == signature[:half]).sum(axis=1) + (n - half)) / n
        rows = rows[upper >= threshold]
    scores = (store[rows] == signature).sum(axis=1) / n
    hits = np.flatnonzero(scores >= threshold)
    for k in hits[np.argsort(-scores[hits], kind="stable")]:
        if accept is None or accept(int(rows[k])):
            return int(rows[k]), float(scores[k])
    return None


def text_jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two texts' character shingles (after fuzzy normalization)."""
    sa, sb = shingles(normalize_fuzzy(a)), shingles(normalize_fuzzy(b))
    return len(sa & sb) / len(sa | sb)


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


class Match(NamedTuple):
    row: int                   # the indexed item's row in the store
    jaccard: float             # estimated from the signatures
    one_word: bool             # a short record whose prompt is one word apart, same answer


class NearDuplicateIndex:
    """MinHash LSH over kept records; a candidate counts if its estimated Jaccard passes the
    threshold, or if both are short records whose prompts are one word apart and whose answers
    are the same (``OneWordIndex``)."""

    def __init__(self, threshold: float, store: SignatureStore, num_perm: int = NUM_PERM):
        self.threshold, self.store = threshold, store
        self.minhash = MinHasher(num_perm)
        self.lsh = MinHashBands(_lsh_threshold(threshold), num_perm)
        self.one_word = OneWordIndex()
        self.keys: dict[int, Any] = {}

    def best_match(self, signature: np.ndarray, accept=None,
                   short: ShortPrompt | None = None) -> Match | None:
        """The most similar indexed item at or over the threshold; failing that, for a short
        record (``short``: its prompt and answer keyed), the earliest short one whose prompt is
        one word apart and whose answer is the same."""
        found = best_match(signature, self.lsh.query(signature), self.store, self.threshold,
                           accept)
        if found is not None:
            return Match(*found, one_word=False)
        if short is None:
            return None
        for row in self.one_word.query(short):
            if accept is None or accept(row):
                jaccard = (self.store[row] == signature).sum() / len(signature)
                return Match(row, float(jaccard), one_word=True)
        return None

    def add(self, signature: np.ndarray, key: Any, short: ShortPrompt | None = None) -> int:
        """Store and index ``signature`` (and a short record's keyed prompt); returns its row in
        the store."""
        row = self.store.append(signature)
        self.keys[row] = key
        self.lsh.insert(row, signature)
        if short is not None:
            self.one_word.add(row, short)
        return row
