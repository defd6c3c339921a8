"""What training will see of an SFT file: token counts per split, and examples with the
supervised tokens shown apart from the masked prompt."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import IGNORE_INDEX, Encoded, encode_example, token_stats


def split_stats(tokenizer, fmt: PromptFormat, records: Sequence[dict[str, Any]],
                max_length: int) -> dict[str, dict[str, Any]]:
    """Per split: ``token_stats`` of the examples training keeps, how many it drops, and how many
    kept examples do not supervise the terminator (0 unless their response was truncated)."""
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_split[record.get("split") or "train"].append(record)
    terminator = fmt.terminator_id(tokenizer)
    out = {}
    for split, group in sorted(by_split.items()):
        encoded = [encode_example(tokenizer, fmt, r, max_length) for r in group]
        kept = [e for e in encoded if e is not None and e.num_supervised]
        out[split] = {**token_stats(kept), "dropped": len(group) - len(kept),
                      "without_eos_label": sum(terminator not in supervised_ids(e)
                                                 for e in kept)}
    return out


def supervised_ids(example: Encoded) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def show_example(tokenizer, example: Encoded) -> str:
    """The example's tokens as text: the masked prompt, then the supervised tokens between
    ``>>>`` and ``<<<`` (special tokens kept, so a missing EOS is visible)."""
    prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    return (f"{tokenizer.decode(prompt, skip_special_tokens=False)}>>>"
            f"{tokenizer.decode(supervised_ids(example), skip_special_tokens=False)}<<<")
