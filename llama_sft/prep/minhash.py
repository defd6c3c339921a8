"""Near-duplicate detection: MinHash signatures of character shingles, LSH bands, and the
index the prep stage keeps its records in.

Two records are near duplicates when the Jaccard of their shingles reaches the threshold or, for
short records, when they give the same answer to prompts one word apart (``prep.one_word``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from llama_sft.prep.normalize import normalize_fuzzy
from llama_sft.prep.one_word import OneWordIndex, ShortPrompt

NUM_PERM = 128               # MinHash permutations
SHINGLE_CHARS = 5            # character shingles for near-duplicate detection
PREFILTER_MIN_CANDIDATES = 16  # longer candidate lists get the half-signature bound first


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
