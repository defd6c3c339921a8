"""What the prep stage reports: rejects as they happen (``rejects.jsonl``), ``prep_report.json``
and the summary line."""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from typing import IO, Any

from llama_sft.prep.minhash import NUM_PERM, SHINGLE_CHARS
from llama_sft.prep.one_word import SHORT_MIN_WORDS, SHORT_RECORD_CHARS
from llama_sft.prep.options import FILTER_REASONS, INVALID_REASONS
from llama_sft.prep.splits import _round, length_summary


class RejectLog:
    """Writes ``rejects.jsonl`` as rejects happen and counts them by reason."""

    def __init__(self, fh: IO[str]):
        self.fh = fh
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, detail: str, file: str, loc: dict[str, int], *,
            rec_id: str | None = None, excerpt: str = "", **extra: Any) -> None:
        if reason not in INVALID_REASONS + FILTER_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        entry: dict[str, Any] = {"file": file, **loc, "reason": reason, "detail": detail}
        if rec_id is not None:
            entry["id"] = rec_id
        entry.update(extra)
        if excerpt:
            entry["excerpt"] = excerpt
        self.fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.counts[reason] += 1
        where = ":".join([file, str(loc.get("line", loc.get("index")))])
        self.first.setdefault(reason, where)

    @property
    def invalid(self) -> int:
        return sum(n for r, n in self.counts.items() if r in INVALID_REASONS)

    def top(self, k: int = 3) -> str:
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return ", ".join(f"{r} x{n} (first at {self.first[r]})" for r, n in items) or "none"


def build_report(prep, training: dict[str, Any], derivation: dict[str, Any],
                 tokenizer_name: str, max_length: int) -> dict[str, Any]:
    """``prep_report.json`` of a finished ``stage.Prep`` run: every count, by reason, split,
    category and shape, and how the training config was derived."""
    intake = prep.intake
    split_counts = Counter(prep.splits)
    categories: dict[str, Counter] = defaultdict(Counter)
    lengths: dict[str, list[int]] = defaultdict(list)
    for kept, split in zip(prep.kept, prep.splits):
        categories[kept.record["category"]][split] += 1
        lengths[split].append(kept.tokens)
    splits = ("train", "val", "test", "golden")
    qualities = [k.quality for k, s in zip(prep.kept, prep.splits) if s == "golden"
                 and k.quality is not None]
    return {
        "inputs": intake.inputs,
        "counts": {"records_read": intake.stats["records"],
                   "blank_lines": intake.stats["blank_lines"], "kept": len(prep.kept),
                   "rejected": sum(prep.rejects.counts.values()),
                   "invalid": prep.rejects.invalid,
                   "invalid_fraction": _round(prep.rejects.invalid
                                              / max(1, intake.stats["records"])),
                   "max_reject_fraction": prep.cfg.max_reject_fraction},
        "rejects_by_reason": dict(sorted(prep.rejects.counts.items())),
        "splits": {s: split_counts.get(s, 0) for s in splits},
        "categories": {c: {s: categories[c].get(s, 0) for s in splits}
                       | {"total": sum(categories[c].values())}
                       for c in sorted(categories)},
        "shapes": dict(sorted(intake.shapes.items())),
        "cleaning": {k: intake.cleaning.get(k, 0) for k in
                     ("unicode_normalized", "control_chars_removed", "whitespace_fixed")},
        "pii": {"enabled": prep.cfg.pii_scrub,
                **{k: intake.pii.get(k, 0) for k in ("email", "phone", "api_key", "records")}},
        "dedup": {"exact": prep.rejects.counts.get("duplicate", 0),
                  "near": prep.rejects.counts.get("near_duplicate", 0),
                  "near_threshold": prep.cfg.dedup_threshold, "num_perm": NUM_PERM,
                  "shingle_chars": SHINGLE_CHARS,
                  # of "near": short records, same answer, prompt one word apart
                  "near_one_word": intake.stats["near_one_word"],
                  "one_word_rule": {"max_record_chars": SHORT_RECORD_CHARS,
                                    "min_prompt_words": SHORT_MIN_WORDS}},
        "quality": {**intake.quality, "min_quality": prep.cfg.min_quality,
                    "filtered": prep.rejects.counts.get("low_quality", 0)},
        "length": {"tokenizer": tokenizer_name, "prompt_style": prep.fmt.style,
                   "max_length": max_length, "policy": prep.cfg.length_policy,
                   "dropped": prep.rejects.counts.get("too_long", 0),
                   "truncated": sum(k.truncated for k in prep.kept),
                   "all": length_summary([k.tokens for k in prep.kept]),
                   "per_split": {s: length_summary(lengths[s]) for s in splits},
                   "supervised_tokens": sum(k.supervised for k in prep.kept),
                   "tokens": sum(k.tokens for k in prep.kept)},
        "golden": {**prep.split_info,
                   "mean_quality": _round(sum(qualities) / len(qualities)) if qualities
                   else None},
        "contamination": prep.contamination,
        "training_config": {"values": training, "derivation": derivation},
        "seed": prep.cfg.seed,
    }


def _print_summary(report: dict[str, Any], out: str, seconds: float) -> None:
    s, c = report["splits"], report["counts"]
    reasons = ", ".join(f"{r} {n}" for r, n in report["rejects_by_reason"].items()) or "none"
    print(f"kept {c['kept']} of {c['records_read']} records (train {s['train']}, val {s['val']}, "
          f"test {s['test']}, golden {s['golden']}); rejected {c['rejected']} ({reasons})")
    print(f"wrote {out} in {seconds:.1f}s; training config "
          f"{json.dumps(report['training_config']['values'], sort_keys=True)}")
    if report["golden"]["golden_capped"]:
        print(f"warning: golden set capped at {report['golden']['golden_target']} (20% of the kept "
              f"records) instead of --golden-size {report['golden']['golden_requested']}",
              file=sys.stderr)
