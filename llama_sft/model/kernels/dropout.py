"""LoRA input dropout with CPU keep-masks drawn from numpy's SFC64 generator."""
from __future__ import annotations

import functools


def swap_lora_dropout(model) -> int:
    """Replace peft's ``nn.Dropout`` on each LoRA input with :func:`mask_dropout_class`'s module.

    On CPU, torch's ``bernoulli_`` masks cost more of a LoRA training step than the adapter's own
    matmuls (benchmarks/README.md). Returns how many dropouts were replaced.
    """
    import torch

    mask_dropout = mask_dropout_class()
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = mask_dropout(dropout.p)
                swapped += 1
    return swapped


@functools.cache
def mask_dropout_class():
    """The ``MaskDropout`` module class (built on first use, so importing this file needs no torch)."""
    import numpy as np
    import torch

    class MaskDropout(torch.nn.Module):
        """Inverted dropout whose CPU keep-mask comes from numpy's SFC64 generator.

        A fresh generator is seeded from torch's default generator on each call, so
        ``torch.manual_seed`` and a checkpointed torch RNG state reproduce the masks exactly. An
        element is kept when a uniform 16-bit draw is >= round(p * 65536), so the dropout
        probability is p to within 1/65536 and kept values are scaled by 1 / (1 - that
        probability). The draw's high byte is one byte of raw 64-bit output; only the 1 in 256
        elements whose high byte equals the threshold's draw a low byte (half the generator work
        of drawing 16 bits for every element). Tensors on other devices, and small ones (where a
        generator's set-up costs more than torch's mask), use torch's dropout (``keep_mask``:
        torch's ``bernoulli_``).
        """

        MIN_NUMEL = 65536

        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = round(p * 65536)
            self.scale = 1.0 / (1.0 - self.threshold / 65536)

        def forward(self, x):
            if not self.training or self.threshold == 0:
                return x
            if x.device.type != "cpu" or x.numel() < self.MIN_NUMEL:
                return torch.nn.functional.dropout(x, self.p, training=True)
            keep, scale = self.keep_mask(x)
            return x * keep * scale

        def keep_mask(self, x):
            """(a 0/1 keep-mask shaped like ``x`` in its dtype, the scale for kept values).

            A mask in the tensor's own dtype multiplies faster on CPU than a boolean one.
            """
            if x.device.type != "cpu" or x.numel() < self.MIN_NUMEL:
                return torch.empty_like(x).bernoulli_(1.0 - self.p), 1.0 / (1.0 - self.p)
            seed = int(torch.randint(0, 2**63 - 1, (1,)))
            n = x.numel()
            bits = np.random.SFC64(seed)
            high = bits.random_raw(-(-n // 8)).view(np.uint8)[:n]
            keep = high > self.threshold >> 8
            edge = np.flatnonzero(high == self.threshold >> 8)   # decided by the low byte
            if edge.size:
                low = bits.random_raw(-(-edge.size // 8)).view(np.uint8)[:edge.size]
                keep[edge] = low >= (self.threshold & 255)
            # converted from uint8, not bool: torch converts bool to floats much more slowly
            return torch.from_numpy(keep.view(np.uint8)).to(x.dtype).view(x.shape), self.scale

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return MaskDropout
