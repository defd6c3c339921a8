"""The pilot's checks: data (the exact tensors training sees) and learning (the loss curve)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from llama_sft.data import tokenize


@dataclass
class Check:
    group: str
    name: str
    value: Any
    threshold: str
    passed: bool
    detail: str = ""


def data_checks(tokenizer, fmt, records, max_length: int, ratio_range: tuple[float, float]):
    """Checks on the exact tensors training will see (before any model is loaded)."""
    terminator = fmt.terminator_id(tokenizer)
    encoded = [tokenize.encode_example(tokenizer, fmt, r, max_length) for r in records]
    kept = [e for e in encoded if e is not None]
    zero = sum(1 for e in kept if e.num_supervised == 0) + (len(encoded) - len(kept))
    no_eos = sum(1 for e in kept
                 if terminator not in [t for t in e.labels if t != tokenize.IGNORE_INDEX])
    tokens = sum(len(e) for e in kept)
    ratio = sum(e.num_supervised for e in kept) / tokens if tokens else 0.0
    bad_roundtrip = [r.get("id") for r in records[:50] if not _roundtrips(tokenizer, fmt, r)]
    bad_turns = [r.get("id") for r, e in zip(records, encoded)
                 if e is not None and r.get("messages") and not _turns_supervised(
                     tokenizer, terminator, r["messages"], e)]
    lo, hi = ratio_range
    return [
        Check("data", "supervised_token_ratio", round(ratio, 4), f"in [{lo}, {hi}]",
              lo <= ratio <= hi),
        Check("data", "examples_without_eos_label", no_eos, "== 0", no_eos == 0,
              "the end-of-turn token (EOS or the template's) must be supervised or the model "
              "never learns to stop"),
        Check("data", "zero_label_examples", zero, "== 0", zero == 0),
        Check("data", "prompt_roundtrip_failures", len(bad_roundtrip), "== 0", not bad_roundtrip,
              ", ".join(map(str, bad_roundtrip[:5]))),
        Check("data", "conversation_turn_failures", len(bad_turns), "== 0", not bad_turns,
              "every assistant turn supervised, through its end-of-turn token, and nothing "
              "else; " + ", ".join(map(str, bad_turns[:5]))),
    ]


def _turns_supervised(tokenizer, terminator: int, messages, example) -> bool:
    """Whether the supervised runs of a conversation are exactly its assistant turns (the last
    ones, when truncation removed earlier exchanges), each ending in the terminator."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != tokenize.IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return bool(runs) and len(runs) <= len(answers) and all(
        r[-1] == terminator and tokenizer.decode(r[:-1]) in (a, " " + a)
        for r, a in zip(runs, answers[-len(runs):]))


def _roundtrips(tokenizer, fmt, record) -> bool:
    text = fmt.render_record(tokenizer, record)
    ids = fmt.encode_record_prompt(tokenizer, record)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if fmt.adds_special_tokens and tokenizer.bos_token and decoded.startswith(tokenizer.bos_token):
        decoded = decoded[len(tokenizer.bos_token):].lstrip(" ") if not text.startswith(" ") else \
            decoded[len(tokenizer.bos_token):]
    # SentencePiece (Llama 2) starts every text span with "▁", also the one after a special token
    # inside the prompt (as Meta's per-turn encoding does); decoding shows it as a space
    for special in tokenizer.all_special_tokens:
        if special + " " not in text:
            decoded = decoded.replace(special + " ", special)
    return decoded == text


def learning_checks(rows: list[dict], min_drop: float) -> tuple[list[Check], dict[str, float]]:
    losses = [r["loss"] for r in rows if "loss" in r]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    bad = rows[-1].get("bad_steps", 0) if rows else 0
    k = max(1, min(5, len(losses) // 4))
    first = statistics.fmean(losses[:k]) if losses else float("nan")
    last = statistics.fmean(losses[-k:]) if losses else float("nan")
    drop = (first - last) / first if losses and first > 0 else 0.0
    finite = all(math.isfinite(x) for x in losses + norms)
    return [
        Check("learning", "loss_drop", round(drop, 4), f">= {min_drop}", drop >= min_drop,
              f"first {first:.4f} -> last {last:.4f}"),
        Check("learning", "non_finite_steps", bad, "== 0", bad == 0 and finite),
        Check("learning", "grad_norm_finite", all(math.isfinite(x) for x in norms), "true",
              bool(norms) and all(math.isfinite(x) for x in norms),
              f"max {max(norms):.3g}" if norms else "no steps"),
    ], {"first_loss": first, "last_loss": last}
