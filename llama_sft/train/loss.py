"""The training loss: cross-entropy on supervised tokens only."""
from __future__ import annotations

from typing import Any


def supervised_loss(model, batch: dict[str, Any], num_items):
    """Summed cross-entropy over supervised tokens, divided by ``num_items``.

    Logits are computed only where a label is supervised (``logits_to_keep`` with a boolean
    mask), so the vocabulary projection skips prompt and padding positions: on SFT data, where
    most tokens are prompt, that is most of the lm_head's work and its fp32 logits' memory.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum") / num_items
