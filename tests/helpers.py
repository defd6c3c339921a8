"""Helpers the tests share (fixtures are in conftest.py): the repository root and small SFT records."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("classification", "extraction", "qa")


def make_records(n: int, split: str = "train", start: int = 0) -> list[dict]:
    """Small deterministic SFT records in the prep stage's output schema."""
    records = []
    for i in range(start, start + n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        if cat == "classification":
            inst, ctx, resp = "Classify the sentiment as positive or negative.", \
                f"Review {i}: the product {'works great' if i % 2 else 'broke fast'}.", \
                "positive" if i % 2 else "negative"
        elif cat == "extraction":
            inst, ctx, resp = "Extract the order number as JSON.", \
                f"Hello, my order #{1000 + i} has not arrived.", json.dumps({"order": 1000 + i})
        else:
            inst, ctx, resp = f"What is {i} plus {i}?", "", str(2 * i)
        records.append({"id": f"ex-{i:05d}", "split": split, "category": cat,
                        "instruction": inst, "context": ctx, "response": resp, "metadata": {}})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path
