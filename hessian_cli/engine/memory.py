"""How much memory a computation may still allocate, so that it can refuse in one sentence
instead of failing part-way (or, on Linux, being killed by the kernel's out-of-memory killer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cuda_free_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on a CUDA device: the device's free memory plus
    what torch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free_bytes(device: torch.device) -> int | None:
    """Memory still available on ``device``; None where the platform does not say."""
    if device.type == "cuda":
        return cuda_free_bytes(device)
    if device.type != "cpu":
        return None
    return _meminfo_available() or _sysconf_free()


def _meminfo_available() -> int | None:
    """Linux's MemAvailable: free memory plus the page cache it would give back, which the
    free pages alone (sysconf) leave out."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_free() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
