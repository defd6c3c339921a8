"""Continuous greedy batching: finished rows leave the batch, waiting prompts take their place."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

from llama_sft.model.generation.cache import growing_cache_layer_class


def left_padded(prompts: Sequence[Sequence[int]], pad: int, device):
    """(ids, attention mask) of the prompts right-aligned in one batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# Prefill calls take at most this many (padded) tokens: larger activations are slower per token
# on CPU (benchmarks/README.md, generation).
PREFILL_TOKENS = 2048


def greedy_continuous(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      stop_ids: Collection[int],
                      pad_id: int, batch_size: int, on_done: Callable[[int], None] | None = None,
                      count_prefills: bool = False, prefill_tokens: int = PREFILL_TOKENS):
    """Greedy decoding of many prompts with a KV cache, at most ``batch_size`` rows at a time.

    A row leaves the batch (and the cache) as soon as it emits a token of ``stop_ids`` or reaches
    ``max_new_tokens``, so later steps compute only the rows still answering; waiting prompts
    (longest first) are prefilled in calls of at most ``prefill_tokens`` (padded) and join the running
    batch once a quarter of its places are free. Rows are left-padded to the cache's common length
    and position ids follow each row's own tokens, so every row gets the ids
    ``model.generate(do_sample=False)`` gives it alone, up to floating-point rounding (tests
    check it). Returns token ids per prompt, the stop token included when one was emitted (and
    the number of prefill calls with ``count_prefills``).

    ``model.generate`` keeps finished rows to the end of a batch, and a fixed batch waits for its
    longest answer: on CPU most of those steps compute padding.
    """
    import torch

    waiting = collections.deque(sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)))
    refill_at = max(1, batch_size // 4)
    out: list[list[int]] = [[] for _ in prompts]
    batch: _DecodeBatch | None = None
    prefills = 0
    with torch.inference_mode():
        while waiting or batch is not None:
            free = batch_size - (len(batch.rows) if batch else 0)
            if waiting and free >= min(refill_at, len(waiting)):
                group = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                for chunk in _prefill_chunks([len(prompts[i]) for i in group], prefill_tokens):
                    rows = [group[j] for j in chunk]
                    joined = _DecodeBatch.prefill(model, rows, [prompts[i] for i in rows], pad_id)
                    batch = joined if batch is None else batch.merge(joined)
                    prefills += 1
            token = batch.logits.argmax(-1)
            going = []
            for slot, (row, t) in enumerate(zip(batch.rows, token.tolist())):
                out[row].append(t)
                if t not in stop_ids and len(out[row]) < max_new_tokens:
                    going.append(slot)
            if len(going) < len(batch.rows):
                if on_done is not None:
                    on_done(len(batch.rows) - len(going))
                if not going:
                    batch = None
                    continue
                token = token[batch.select(going)]
            batch.step(model, token)
    return (out, prefills) if count_prefills else out


def _prefill_chunks(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive index runs whose left-padded batch stays within ``limit`` tokens (one index
    at least)."""
    chunks: list[list[int]] = []
    width = 0
    for i, n in enumerate(lengths):
        if chunks and max(width, n) * (len(chunks[-1]) + 1) <= limit:
            chunks[-1].append(i)
            width = max(width, n)
        else:
            chunks.append([i])
            width = n
    return chunks


@dataclass
class _DecodeBatch:
    """The rows being decoded together: their prompt indices, KV cache (left-padded to one
    length), attention mask over the cache, last position ids and next-token logits."""

    rows: list[int]
    cache: Any
    mask: Any
    last: Any
    logits: Any

    @classmethod
    def prefill(cls, model, rows: list[int], prompts: Sequence[Sequence[int]],
                pad_id: int) -> "_DecodeBatch":
        from transformers import DynamicCache

        ids, mask = left_padded(prompts, pad_id, next(model.parameters()).device)
        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)            # as generate() fills padding positions
        cache = DynamicCache(config=model.config)
        cache.layers = [growing_cache_layer_class()() for _ in cache.layers]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return cls(rows, cache, mask, positions[:, -1], logits)

    def merge(self, other: "_DecodeBatch") -> "_DecodeBatch":
        """Both batches' rows in one, the shorter cache left-padded to the longer one's length."""
        import torch
        import torch.nn.functional as F

        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.adopt(*(torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                    F.pad(b, (0, 0, width - b.shape[2], 0))])
                         for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))))
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self.mask, other.mask)])
        self.last = torch.cat([self.last, other.last])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        return self

    def select(self, slots: list[int]) -> list[int]:
        """Keep only the rows at these slots and drop the cache positions none of them attends to
        any more. Rows from the end fill the slots of rows that left, so only they are copied;
        returns the old slot of each new one (to reorder the next tokens alike)."""
        import torch

        rows = len(slots)
        gone = sorted(set(range(len(self.rows))) - set(slots))
        holes = [s for s in gone if s < rows]
        movers = [s for s in slots if s >= rows]
        order = list(range(rows))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        for layer in self.cache.layers:
            layer.move_rows(holes, movers, rows)
        keep = torch.tensor(order, device=self.mask.device)
        self.rows = [self.rows[s] for s in order]
        self.mask, self.last = self.mask[keep], self.last[keep]
        start = int(self.mask.any(0).int().argmax())
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.drop_columns(start)
        return order

    def step(self, model, token) -> None:
        """One decode step: feed each row's next token, keep the logits after it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.last = self.last + 1
        self.logits = model(input_ids=token[:, None], attention_mask=self.mask,
                            position_ids=self.last[:, None], past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
