"""SIGTERM and Ctrl-C during training: finish the current step, checkpoint, then stop."""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from llama_sft.cli import log


class GracefulStop:
    """Remembers the first SIGTERM/SIGINT while installed; a second one interrupts at once."""

    def __init__(self):
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator["GracefulStop"]:
        def handler(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name
            log(f"{self.signal} received: finishing this step, then writing a checkpoint")
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal: all of them must checkpoint at the same step."""
        import torch

        flag = self.signal is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device),
                                           reduction="sum").item() > 0)
        return flag
