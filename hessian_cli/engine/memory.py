"""How much memory a computation may still allocate, so that it can refuse in one sentence
instead of failing part-way (or, on Linux, being killed by the kernel's out-of-memory killer),
and how much an autograd graph holds."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from hessian_cli.engine.distributed import local_world_size
from hessian_cli.errors import UserError


def cuda_free_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on a CUDA device: the device's free memory plus
    what torch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free_bytes(device: torch.device) -> int | None:
    """Memory still available on ``device``; None where the platform does not say. On the CPU,
    the least of the machine's and this container's (cgroup) allowance."""
    if device.type == "cuda":
        return cuda_free_bytes(device)
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available() or _sysconf_free(), cgroup_available()) if v]
    return min(known) if known else None


def require_room(op: Any, need: int, needs: str, advice: str, host: int = 0) -> None:
    """Refuse, in one sentence (``needs``, the sizes, ``advice``), work that needs ``need``
    bytes on each rank of ``op`` that shares this machine's memory (on the CPU) where they do
    not fit, even once the operator's kept first-order graphs are released (they are rebuilt to
    fit what is left); nothing where they fit or the platform does not say what is free.
    ``host`` bytes more are wanted in the machine's own memory by each of its ranks (work that
    a CUDA operator's solve does on the CPU); on the CPU they are part of ``need``."""
    cpu = op.device.type == "cpu"
    local = local_world_size() if getattr(op, "distributed", False) else 1
    if cpu:
        need, host = need + host, 0
    _require(op, op.device, need, local if cpu else 1, needs, advice)
    if host:
        _require(
            None, torch.device("cpu"), host, local, f"{needs} in this machine's memory", advice
        )


def _require(op: Any, device: torch.device, need: int, ranks: int, needs: str, advice: str) -> None:
    free = free_bytes(device)
    if free is not None and need * ranks > free and hasattr(op, "release"):
        op.release()
        free = free_bytes(device)
    if free is None or need * ranks <= free:
        return
    each = f" on each of the {ranks} ranks on this machine" if ranks > 1 else ""
    raise UserError(
        f"{needs}, {need / 2**30:.1f} GiB{each}, more than the {free / 2**30:.1f} GiB free: "
        f"{advice}."
    )


def cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup still allows (v2, else v1); None without a limit.
    Inside a container /proc/meminfo describes the host, so it alone would let a solve start
    that the container's limit then kills. The cgroup's usage counts the page cache of the
    files it read (a data set, a checkpoint), which the kernel gives back before it kills: its
    inactive part is free, as the kubelet's working set counts it."""
    for limit_file, usage_file, stat_file, inactive_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1's "no limit"
            return None
        return max(0, int(limit) - usage + _stat_value(root / stat_file, inactive_key))
    return None


def _stat_value(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup's memory.stat; 0 where it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


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


def graph_bytes(*roots: torch.Tensor) -> int:
    """Bytes of the tensors that the autograd graphs behind ``roots`` (and ``roots`` themselves)
    hold for their backward passes, each storage counted once.

    The CPU has no allocator statistics to difference (as ``torch.cuda.memory_allocated`` is on
    CUDA), but a graph's memory is almost all in its saved tensors, which its nodes expose as
    ``_saved_*`` attributes: on ResNet-20 over 64 inputs, 192 MiB counted against 203-236 MiB of
    resident memory grown. A custom ``autograd.Function``'s node is its ``ctx``: its
    ``saved_tensors`` and the tensors set as its attributes count too.
    """
    storages: dict[int, int] = {}
    # Held until the count ends: a saved tensor that a hook makes on access (a non-reentrant
    # checkpoint recomputes them) is otherwise freed at once, and the next one made can take its
    # address and be counted as the same storage.
    held: list[torch.Tensor] = []

    def count(value: object) -> None:
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                held.append(t)
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()

    seen: set[object] = set()
    stack = [t.grad_fn for t in roots]
    for t in roots:
        count(t)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            with contextlib.suppress(RuntimeError):  # freed by a backward pass
                count(node.saved_tensors)
            for value in vars(node).values():
                count(value)
        for name in dir(node):
            if name.startswith("_saved_"):
                with contextlib.suppress(RuntimeError):  # e.g. a tensor already freed
                    count(getattr(node, name))
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())
