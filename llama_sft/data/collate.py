"""Collators: right-padded batches, or padding-free packed rows."""
from __future__ import annotations

from typing import Any, Sequence

from llama_sft.data.tokenize import IGNORE_INDEX, Encoded


def pad_collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example; padding has attention 0 and label -100."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_collate(batch: Sequence[Encoded]) -> dict[str, Any]:
    """Padding-free packing: one row, position_ids restart at 0 for every example.

    The model sees no attention mask; transformers derives the block-diagonal mask from the
    position_ids, so no example attends to another (forward with ``use_cache=False``). Each
    example starts with a masked prompt token, so no label crosses a boundary. The example
    boundaries also go along as ``cu_seq_lens_q/k`` and the longest example as
    ``max_length_q/k`` (transformers' varlen names, the lengths computed here on the host so the
    GPU is never asked for them), which ``model.kernels.packed_attention`` uses to attend per
    example directly; other attention implementations ignore them.
    """
    import itertools

    import torch

    ids = [t for e in batch for t in e.input_ids]
    labels = [t for e in batch for t in e.labels]
    positions = [p for e in batch for p in range(len(e))]
    bounds = torch.tensor([0, *itertools.accumulate(len(e) for e in batch)], dtype=torch.int32)
    longest = max(len(e) for e in batch)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def collate(batch: Sequence[Encoded], pad_id: int, packing: bool) -> dict[str, Any]:
    return pack_collate(batch) if packing else pad_collate(batch, pad_id)


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """The batch's tensors moved to ``device``; other values (lengths as ints) as they are."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
