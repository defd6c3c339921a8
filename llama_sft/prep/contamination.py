"""The contamination guard: train records that leak a golden or test record are removed.

A leak is a near duplicate (MinHash) or a long shared passage (word n-grams that are not template
text). Eval n-grams shared by train records are counted in blocks of array operations; the
per-chunk scan runs in worker processes.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llama_sft.cli import progress_bar
from llama_sft.prep.minhash import MinHashBands, SignatureStore, _lsh_threshold, best_match
from llama_sft.prep.normalize import normalize_fuzzy
from llama_sft.prep.records import fuzzy_source, fuzzy_text
from llama_sft.prep.workers import _fork_pool, _ordered_map, _worker_start

NGRAM_BOILERPLATE_MIN_DF = 10      # an n-gram in more records than this (and than
NGRAM_BOILERPLATE_SHARE = 0.005    # this share of them) is template text, not a leak
LEAK_CHUNK = 2048            # records per contamination-scan task
LEAK_MAX_PAIRS = 1 << 22     # (record, eval record) pairs counted at once by the n-gram check


def ngrams(text: str, n: int) -> set[str]:
    words = re.findall(r"\w+", text.casefold())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class SharedGrams:
    """The eval n-gram ids each record shares, record after record (each record's sorted):
    ``counts[i]`` of them for record i."""
    counts: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def of(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


class LeakScan:
    """What the contamination guard needs from one record, given its fuzzy source text and,
    for a train record, its signature row: the eval n-grams it shares, and its closest eval
    near-duplicate. Needs nothing from other train records, so chunks can run in workers."""

    def __init__(self, gram_id: dict[str, int], n_gram: int, lsh: MinHashBands,
                 store: SignatureStore, threshold: float):
        self.gram_id, self.n_gram = gram_id, n_gram
        self.lsh, self.store, self.threshold = lsh, store, threshold

    def __call__(self, chunk: list[tuple[str, int]]
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, float]]]:
        """(shared count per record, the shared ids one record after another, {position in
        chunk: (eval signature row, Jaccard)} for train records with a near-duplicate)."""
        gram_id = self.gram_id
        counts = np.zeros(len(chunk), dtype=np.int64)
        ids: list[int] = []
        near: dict[int, tuple[int, float]] = {}
        for j, (source, row) in enumerate(chunk):
            shared = sorted(gram_id[g] for g in ngrams(normalize_fuzzy(source), self.n_gram)
                            & gram_id.keys())
            counts[j] = len(shared)
            ids.extend(shared)
            if row >= 0:
                signature = self.store[row]
                best = best_match(signature, self.lsh.query(signature), self.store,
                                  self.threshold)
                if best is not None:
                    near[j] = best
        return counts, np.array(ids, dtype=np.int32), near


_LEAK_SCAN: list[LeakScan] = []         # the scan a forked worker runs (set before forking)


def _scan_chunk(chunk: list[tuple[str, int]]):
    return _LEAK_SCAN[0](chunk)


@contextlib.contextmanager
def _leak_pool(scan: LeakScan, workers: int):
    """A pool of ``workers`` forked processes that run ``scan`` (None for 0 workers)."""
    if not workers:
        yield None
        return
    _LEAK_SCAN.append(scan)
    try:
        with _fork_pool(workers, _worker_start) as pool:
            yield pool
    finally:
        _LEAK_SCAN.clear()


def _most_shared_eval(shared: SharedGrams, postings: list[np.ndarray], is_train: np.ndarray,
                      counted: np.ndarray, min_count: int, n_records: int,
                      max_pairs: int = LEAK_MAX_PAIRS) -> dict[int, tuple[int, int]]:
    """{train record: (eval record, shared n-grams)} for the eval record sharing the most
    ``counted`` n-grams with it (the lowest index on a tie), where that is at least
    ``min_count``. The (record, eval record) pairs are counted in a few array operations per
    block of records rather than a loop per record; a block holds at most ``max_pairs`` pairs
    and shared ids (or one record), which bounds the memory."""
    if not postings:
        return {}
    lengths = np.array([len(p) for p in postings], dtype=np.int64)
    csr = np.concatenate([[0], np.cumsum(lengths)[:-1]]), np.concatenate(postings)
    # the pairs each record expands to, plus its ids
    size = np.concatenate([[0], np.cumsum(np.where(counted[shared.ids], lengths[shared.ids], 0))])
    per_record = np.where(is_train, size[shared.offsets[1:]] - size[shared.offsets[:-1]], 0) \
        + shared.counts
    out: dict[int, tuple[int, int]] = {}
    lo, total = 0, np.concatenate([[0], np.cumsum(per_record)])
    while lo < len(per_record):
        hi = max(lo + 1, int(np.searchsorted(total, total[lo] + max_pairs, side="right")) - 1)
        out.update(_most_shared_block(shared, lo, hi, csr, lengths, is_train, counted,
                                      min_count, n_records))
        lo = hi
    return out


def _most_shared_block(shared: SharedGrams, lo: int, hi: int, csr, lengths: np.ndarray,
                       is_train: np.ndarray, counted: np.ndarray, min_count: int,
                       n_records: int) -> dict[int, tuple[int, int]]:
    """``_most_shared_eval`` for records lo..hi-1."""
    starts, flat = csr
    ids = shared.ids[shared.offsets[lo]:shared.offsets[hi]]
    rec = np.repeat(np.arange(lo, hi), shared.counts[lo:hi])
    mask = is_train[rec] & counted[ids]
    rec, gram = rec[mask], ids[mask]
    if not len(gram):
        return {}
    size = lengths[gram]
    first = np.repeat(starts[gram] - (np.cumsum(size) - size), size)
    evals = flat[first + np.arange(int(size.sum()))]
    pairs, count = np.unique(np.repeat(rec, size) * n_records + evals, return_counts=True)
    rec, evals = np.divmod(pairs, n_records)
    order = np.lexsort((evals, -count, rec))           # per record: most shared, lowest index
    rec, evals, count = rec[order], evals[order], count[order]
    best = np.ones(len(rec), dtype=bool)
    best[1:] = rec[1:] != rec[:-1]
    best &= count >= min_count
    return {int(r): (int(j), int(c)) for r, j, c in zip(rec[best], evals[best], count[best])}


def decontaminate(kept: list, splits: list[str], signatures: SignatureStore, cfg,
                  rejects, *, workers: int, progress: bool
                  ) -> tuple[list, list[str], dict[str, Any]]:
    """Remove train records that leak a golden or test record: returns the kept records and
    their splits without them, and the report's ``contamination`` section; each removal is a
    ``contaminated`` reject.

    A leak is a near duplicate (MinHash Jaccard >= --contamination-threshold) or a long
    shared passage: N or more distinct shared word N-grams (N = --contamination-ngram, so at
    least 2N-1 words of common text), not counting template N-grams that occur in more than
    max(10, 0.5%) of all records (shared instructions are not leaks).
    """
    n_gram = cfg.contamination_ngram
    eval_idx = [i for i, s in enumerate(splits) if s in ("golden", "test")]
    lsh = MinHashBands(_lsh_threshold(cfg.contamination_threshold))
    eval_of_row: dict[int, int] = {}                  # signature row -> kept index
    eval_grams: dict[str, list[int]] = defaultdict(list)
    for i in eval_idx:
        row = kept[i].signature
        lsh.insert(row, signatures[row])
        eval_of_row[row] = i
        for g in ngrams(fuzzy_text(kept[i].record), n_gram):
            eval_grams[g].append(i)
    # an eval n-gram's id is its rank in sorted order, so sorted ids are sorted n-grams
    grams = sorted(eval_grams)
    postings = [np.array(eval_grams[g], dtype=np.int64) for g in grams]
    scan = LeakScan({g: k for k, g in enumerate(grams)}, n_gram, lsh, signatures,
                    cfg.contamination_threshold)
    shared, near = _scan(scan, kept, splits, workers, progress)
    df = np.bincount(shared.ids, minlength=len(grams))
    boilerplate_df = max(NGRAM_BOILERPLATE_MIN_DF,
                         int(NGRAM_BOILERPLATE_SHARE * len(kept)))
    is_train = np.array([s == "train" for s in splits], dtype=bool)
    passages = _most_shared_eval(shared, postings, is_train, df <= boilerplate_df,
                                 n_gram, len(kept))
    removed = {"near_duplicate": 0, "ngram_overlap": 0}
    by_split: Counter = Counter()
    drop: set[int] = set()
    for i in np.flatnonzero(is_train).tolist():
        if i in near:
            row, jaccard = near[i]
            other, kind = eval_of_row[row], "near_duplicate"
            detail = f"near-duplicate (Jaccard {jaccard:.2f}) of"
        elif i in passages:
            other, count = passages[i]
            kind = "ngram_overlap"
            example = next(grams[g] for g in shared.of(i)
                           if df[g] <= boilerplate_df and other in eval_grams[grams[g]])
            detail = f"shares {count} {n_gram}-word passages (e.g. '{example}') with"
        else:
            continue
        removed[kind] += 1
        by_split[splits[other]] += 1
        drop.add(i)
        leak = kept[i]
        rejects.add("contaminated", f"{detail} {splits[other]} record "
                    f"{kept[other].record['id']}", leak.file, leak.loc,
                    rec_id=leak.record["id"], overlaps=kept[other].record["id"])
    kept = [k for i, k in enumerate(kept) if i not in drop]
    splits = [s for i, s in enumerate(splits) if i not in drop]
    return kept, splits, {"removed_from_train": len(drop), **removed,
                          "by_eval_split": dict(sorted(by_split.items())),
                          "checked_against": ["golden", "test"],
                          "near_duplicate_threshold": cfg.contamination_threshold,
                          "ngram_words": n_gram, "ngram_min_shared": n_gram,
                          "ngram_boilerplate_df": boilerplate_df}


def _scan(scan: LeakScan, kept: list, splits: list[str], workers: int, progress: bool
          ) -> tuple[SharedGrams, dict[int, tuple[int, float]]]:
    """``scan`` over every kept record, in ``workers`` processes (forked after ``scan`` exists,
    so only the texts travel to them)."""
    tasks = ((start, [(fuzzy_source(k.record), k.signature if split == "train" else -1)
                      for k, split in zip(kept[start:start + LEAK_CHUNK],
                                          splits[start:start + LEAK_CHUNK])])
             for start in range(0, len(kept), LEAK_CHUNK))
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    near: dict[int, tuple[int, float]] = {}
    with progress_bar(progress, total=len(kept), desc="contamination", unit=" records") as bar, \
            _leak_pool(scan, workers) as pool:
        results = _ordered_map(pool, _scan_chunk, tasks, 2 * workers) if pool else \
            ((start, scan(chunk)) for start, chunk in tasks)
        for start, (chunk_counts, chunk_ids, chunk_near) in results:
            counts.append(chunk_counts)
            ids.append(chunk_ids)
            near.update((start + j, match) for j, match in chunk_near.items())
            bar.update(len(chunk_counts))
    return SharedGrams(np.concatenate(counts or [np.zeros(0, np.int64)]),
                       np.concatenate(ids or [np.zeros(0, np.int32)])), near
