"""The time a device still takes for the work queued on it, for an honest step time.

On CUDA a step returns once its kernels are queued, not run: the rest of its time is spent in
whatever waits next (the next step, or an epoch's evaluation, which is not step time). One wait
where the steps' time is read (before a measurement, an epoch's end, a stop) gives the steps
their own time without a wait in every step.
"""

from __future__ import annotations

import time

import torch


def queued_seconds(device: torch.device) -> float:
    """Seconds spent waiting for ``device`` to finish what is queued on it (0 on the CPU, whose
    work is done when a call returns)."""
    if device.type != "cuda":
        return 0.0
    start = time.perf_counter()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start
