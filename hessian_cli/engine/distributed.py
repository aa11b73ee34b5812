"""torch.distributed glue: one process or many under ``torchrun``, the same answers.

Everything goes through torch.distributed (Gloo on CPU, NCCL on CUDA tensors); this module only
decides who holds which batches, sums what the ranks computed, and makes user errors collective so
that one failing rank ends the whole job with its message instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from hessian_cli.errors import NotFinite, UserError
from hessian_cli.launch import launch_error, launched_by_torchrun

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 900.0
TIMEOUT_ENV = "HESSIAN_CLI_COLLECTIVE_TIMEOUT"


class CollectiveUserError(UserError):
    """A user error every rank raises together; rank 0 reports it, the others exit quietly.
    ``origin`` is the rank where it arose, whose traceback (``--debug``) shows where."""

    origin = 0


class CollectiveNotFinite(NotFinite, CollectiveUserError):
    """Products that are not finite after their sum over ranks: every rank sees it at once."""


class PeerLost(RuntimeError):
    """A collective failed: another rank left the job (e.g. out of memory) or stopped answering.

    That rank's own message (or torchrun's report, for one killed by a signal) says why, so this
    one is not an error of its own.
    """


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:  # Gloo: "Connection closed by peer", timeouts; NCCL errors
        raise PeerLost(str(exc)) from exc


def is_distributed() -> bool:
    """True when a process group is initialised (several ranks, or one under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not in use."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_world_size() -> int:
    """Ranks of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``), which share its
    memory; 1 outside a job."""
    if not is_distributed():
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so.

    Collectives time out after ``$HESSIAN_CLI_COLLECTIVE_TIMEOUT`` seconds (default 900), a
    backstop for a rank that died outside the error agreement of :func:`fail_together`.
    CPU tensors always go through Gloo, CUDA tensors through NCCL, so ``--device cpu`` works on a
    GPU node too, even one with fewer GPUs than ranks (only a rank with a GPU of its own selects
    it: selecting a missing one fails, "invalid device ordinal", before any option is read).
    """
    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    if not dist.is_available():
        raise UserError(
            "this torch build has no torch.distributed, so it cannot run under torchrun."
        )
    if (why := launch_error()) is not None:
        raise UserError(why)
    # RANK and WORLD_SIZE alone (set by hand, or inherited from a job's shell) made torch's
    # rendezvous fail as "unexpected ValueError".
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(
            f"RANK and WORLD_SIZE are set, as torchrun sets them, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start the job with torchrun, or unset "
            "RANK and WORLD_SIZE to run one process."
        )
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout_s = math.nan
    valid = 0 < timeout_s < 1e9  # nan, inf and 0 excluded
    backend = "gloo"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    seconds = timeout_s if valid else DEFAULT_TIMEOUT_S
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    # Refused once the ranks can agree on it: before, every rank said it.
    with fail_together():
        if not valid:
            raise UserError(
                f"${TIMEOUT_ENV} must be a positive number of seconds, "
                f"not {os.environ[TIMEOUT_ENV]!r}."
            )
    return True


def shutdown() -> bool:
    """Leave the process group together, then destroy it; whether there was one to leave.

    Without the barrier a rank that finishes first can tear its Gloo group down while a peer's
    last collective is still in flight, and abort ("terminate called without an active
    exception"; seen about once in ten 2-rank test runs). Only for ranks that finished together
    (done, or failed by :func:`fail_together`): the 60 s bound of the Gloo barrier did not hold on
    rank 1 while rank 0 sat in another collective, so a rank that failed alone never gets here.
    """
    if not is_distributed():
        return False
    with contextlib.suppress(RuntimeError):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    dist.destroy_process_group()
    return True


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous share of ``items``: shares differ by at most one, in rank order.

    Contiguity keeps the global order (rank 0's items first), which minibatch statistics rely on.
    """
    q, r = divmod(len(items), world_size)
    start = rank * q + min(rank, r)
    return list(items[start : start + q + (rank < r)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identical on every rank afterwards) and return it."""
    if is_distributed():
        with _collective():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank says so (a Ctrl-C seen by one rank stops all)."""
    if world()[1] == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def average_gradients(params: Iterable[torch.Tensor], local: int, total: int) -> None:
    """Turn each rank's gradient of its share's mean loss (``local`` samples) into the gradient
    of the global batch's mean loss (``total`` samples), in one all-reduce. Parameters no rank
    has a gradient for (unused ones) stay without; one that only some ranks' shares reach (a
    data-dependent branch) counts as zero on the others: their lists of gradients differed, and
    the all-reduce aborted the job (Gloo: "Received data size doesn't match") or, where the
    sizes matched, summed one parameter's gradient into another's."""
    if world()[1] == 1:
        return
    params = list(params)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.mul_(local / total) for p in params]
    # How many ranks have each gradient, summed in the same buffer.
    used = grads[0].new_tensor([p.grad is not None for p in params])
    _through_one_buffer([*grads, used], lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    for p, grad, ranks in zip(params, grads, used.tolist(), strict=True):
        if ranks > 0:
            p.grad = grad  # the same tensor where this rank had one


def broadcast_from_lead(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (one broadcast per dtype): what DDP
    does to a model's buffers, so BatchNorm's running statistics agree across ranks."""
    if not is_distributed():
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for same in groups.values():
        _through_one_buffer(same, lambda flat: dist.broadcast(flat, src=0))


def _through_one_buffer(
    tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object]
) -> None:
    """Apply the in-place ``collective`` to ``tensors`` concatenated into one flat buffer (one
    call, not one per tensor), then copy the result back into them."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    with _collective():
        collective(flat)
    offset = 0
    for t in tensors:
        t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_scalar(value: float, device: torch.device | None = None) -> float:
    """The sum of a Python float over ranks, in float64."""
    if not is_distributed():
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device))[0])


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (ranks may hold different numbers of rows)."""
    if not is_distributed():
        return rows
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(parts, rows.cpu())
    return torch.cat([p for p in parts if p is not None]).to(rows.device)


def all_gather_ints(value: int) -> list[int]:
    """One integer from every rank, in rank order."""
    if not is_distributed():
        return [value]
    out: list[int | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(out, value)
    return [int(v) for v in out if v is not None]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of tensors' values, for :func:`check_same` (data read on each node)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same(parts: Callable[[], dict[str, str]]) -> None:
    """Refuse a job whose ranks were started differently (other options, or another checkpoint
    or data on one node): their sums would mix different functions without a word. ``parts()``
    names what must agree (the named part that differs is said); it is not even called without
    a process group, where hashing the data would be wasted."""
    if not is_distributed():
        return
    mine = parts()
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(everyone, mine)
    first = everyone[0] or {}
    for rank, theirs in enumerate(everyone):
        differ = [name for name in mine if (theirs or {}).get(name) != first.get(name)]
        if differ:
            raise CollectiveUserError(
                f"rank {rank} of {len(everyone)} was started with other {' and '.join(differ)} "
                "than rank 0; every rank must be given the same options and files."
            )


@contextlib.contextmanager
def fail_together(*, lead_only: bool = False) -> Iterator[None]:
    """Make user errors raised inside the block collective: all ranks raise or none does.

    Wrap the phases where bad input shows up (loading checkpoints and data). Every rank reports
    its error message or ``None``; if any rank failed, every rank raises
    :class:`CollectiveUserError` with the first failing rank's message (naming that rank unless
    every rank failed alike), so rank 0 can report it and the job ends at once instead of the
    healthy ranks waiting for the failed one until the timeout. ``lead_only``: the block checks
    what rank 0 alone does (the output it writes), so its error is the job's and names no rank.
    Without a process group this is a no-op.
    """
    error: UserError | None = None
    try:
        yield
    except UserError as exc:
        if not is_distributed():
            raise
        error = exc
    if not is_distributed():
        return
    messages: list[str | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    rank, message = failed[0]
    alike = len(failed) == len(messages) and len(set(messages)) == 1
    if not (alike or lead_only):  # one rank's doing: named (not so where every rank failed)
        message = f"rank {rank} of {len(messages)}: {message}"
    agreed = CollectiveUserError(message)
    agreed.origin = rank
    raise agreed from error
