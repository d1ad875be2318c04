"""Reading small device values on the host one step late, so the host never waits for the GPU's queue.

A training step on a GPU is queued by the host and runs later; any host read of a device value (`float(loss)`,
`.item()`, `.tolist()`) makes the host wait until everything queued before it has run, and the GPU idles while
the host then queues the next step. The trainer needs a few values every step (the all-reduced preemption flag,
the run of non-finite steps): it copies them into pinned host memory asynchronously at the end of step k and reads
them at the end of step k+1, when step k's copy is done while step k+1 is still queued on the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch


class DeferredReadback:
    """One small device tensor per step, readable on the host at the next step without a device sync."""

    def __init__(self) -> None:
        self._host: Optional[torch.Tensor] = None
        self._event: Optional[torch.cuda.Event] = None
        self._ready = False

    def put(self, value: torch.Tensor) -> None:
        """Start copying `value` to the host (asynchronously on CUDA); `take()` returns it later."""
        if value.device.type == "cuda":
            if self._host is None or self._host.shape != value.shape or self._host.dtype != value.dtype:
                self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # the CPU computed it already: nothing to overlap
            self._host, self._event = value.detach().clone(), None
        self._ready = True

    def take(self) -> Optional[list]:
        """The values of the last `put` as a (nested) list (None if there is none), waiting only for the work
        queued before that `put`."""
        if not self._ready:
            return None
        self._ready = False
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None
        return self._host.tolist()
