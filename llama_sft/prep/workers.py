"""Worker processes for the per-record work of the prep stage (forked, results in input order)."""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
from collections import deque
from typing import Any, Iterator

from llama_sft.prep.items import Item
from llama_sft.prep.minhash import MinHasher
from llama_sft.prep.readers import parse_jsonl_line
from llama_sft.prep.records import Prepared, Rejected, prepare_value

PREP_CHUNK = 512             # records per task sent to a worker process
_WORKER: dict[str, Any] = {}


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off (for a prep run). Prep holds millions of long-lived
    record objects and makes no reference cycles; full collections over them grow with every
    record held and took a quarter of the read phase (benchmarks/README.md, prep)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _worker_start() -> None:
    gc.enable()                                       # frozen before the fork: see _fork_pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the main process's to handle


def _worker_init(field_map: dict[str, str], pii_scrub: bool) -> None:
    _worker_start()
    _WORKER.update(field_map=field_map, pii_scrub=pii_scrub, minhash=MinHasher())


@contextlib.contextmanager
def _fork_pool(workers: int, initializer, initargs=()):
    """A pool of ``workers`` forked processes, terminated on exit."""
    import multiprocessing

    # the tokenizer's threads may have run before this fork, and the workers do not tokenize:
    # setting its switch for the fork keeps it from printing a warning in every worker
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = previous or "false"
    # the parent's objects are frozen so that a worker's collections never touch them (which
    # would copy their memory pages into every worker); the initializer re-enables collection
    gc.freeze()
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer, initargs)
    finally:
        gc.unfreeze()
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
    try:
        yield pool
    finally:
        pool.terminate()


def _prepare_chunk(task: tuple[str | None, list]) -> list[Prepared | Rejected | Item]:
    """``prepare_value`` over a chunk in a worker. A task is (None, objects) or (file name,
    raw JSONL lines), which the worker parses; a line that holds no object comes back as its
    reject Item."""
    name, units = task
    args = _WORKER["field_map"], _WORKER["pii_scrub"], _WORKER["minhash"]
    if name is None:
        out = [prepare_value(value, *args) for value in units]
    else:
        out = []
        for line in units:
            item = parse_jsonl_line(name, line)
            out.append(item if item.reason else prepare_value(item.value, *args))
    return out


def _ordered_map(pool, fn, tasks: Iterator[tuple[Any, Any]], in_flight: int):
    """(context, fn(arg)) for each (context, arg) of ``tasks``, in order, computed in ``pool``
    with at most ``in_flight`` tasks queued (``Pool.imap`` would queue all of them at once)."""
    pending: deque = deque()
    for context, arg in tasks:
        pending.append((context, pool.apply_async(fn, (arg,))))
        if len(pending) > in_flight:
            context, result = pending.popleft()
            yield context, result.get()
    while pending:
        context, result = pending.popleft()
        yield context, result.get()


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
