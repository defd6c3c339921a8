"""Seeded, category-stratified splits: the golden set first, then val and test."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

MAX_GOLDEN_SHARE = 0.2       # the golden set never takes more than this share of the kept records


def _round(x: float, nd: int = 4) -> float:
    return float(round(x, nd))


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def length_summary(lengths: list[int]) -> dict[str, Any]:
    values = sorted(lengths)
    if not values:
        return {"examples": 0}
    return {"examples": len(values), "min": values[0], "mean": _round(sum(values) / len(values), 2),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p95": percentile(values, 95), "p99": percentile(values, 99), "max": values[-1]}


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` across categories in proportion to ``sizes`` (largest remainder)."""
    n = sum(sizes.values())
    if n == 0 or total <= 0:
        return {c: 0 for c in sizes}
    exact = {c: total * s / n for c, s in sizes.items()}
    out = {c: min(int(v), sizes[c]) for c, v in exact.items()}
    order = sorted(sizes, key=lambda c: (-(exact[c] - int(exact[c])), c))
    left = total - sum(out.values())
    while left > 0 and any(out[c] < sizes[c] for c in order):
        for c in order:
            if left > 0 and out[c] < sizes[c]:
                out[c] += 1
                left -= 1
    return out


def assign_splits(items: list[tuple[str, float | None, bool]], *, seed: int, val_fraction: float,
                  test_fraction: float, golden_size: int) -> tuple[list[str], dict[str, Any]]:
    """Seeded, category-stratified split of ``items`` = [(category, quality, truncated), ...].

    The golden set is drawn first: per category in proportion, highest quality first (ties
    broken by a seeded draw), never a truncated example, at most 20% of all items. Val and test
    are then seeded draws per category; the rest is train. Returns one split name per item.
    """
    n = len(items)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, (cat, _, _) in enumerate(items):
        by_cat[cat].append(i)
    cats = sorted(by_cat)
    golden_target = min(golden_size, int(n * MAX_GOLDEN_SHARE))
    eligible = {c: [i for i in by_cat[c] if not items[i][2]] for c in cats}
    quotas = allocate(golden_target, {c: len(eligible[c]) for c in cats})
    splits = ["train"] * n
    for c in cats:
        rng = random.Random(f"{seed}:golden:{c}")
        keyed = [(-(items[i][1] if items[i][1] is not None else -1.0), rng.random(), i)
                 for i in eligible[c]]
        for _, _, i in sorted(keyed)[:quotas[c]]:
            splits[i] = "golden"
    rest = {c: [i for i in by_cat[c] if splits[i] != "golden"] for c in cats}
    sizes = {c: len(by_cat[c]) for c in cats}
    val_q = allocate(round(val_fraction * n), sizes)
    test_q = allocate(round(test_fraction * n), sizes)
    for c in cats:
        pool = rest[c][:]
        random.Random(f"{seed}:split:{c}").shuffle(pool)
        room = max(0, len(pool) - 1)               # every category keeps a train example
        n_val = min(val_q[c], room)
        n_test = min(test_q[c], room - n_val)
        for i in pool[:n_val]:
            splits[i] = "val"
        for i in pool[n_val:n_val + n_test]:
            splits[i] = "test"
    info = {"golden_requested": golden_size, "golden_target": golden_target,
            "golden_capped": golden_target < golden_size,
            "golden_per_category": {c: quotas[c] for c in cats}}
    return splits, info
