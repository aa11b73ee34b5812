"""What a solve of the eigensolver is planned to take before its first product: the options
no solve can run with, refused; the sizes of the solve (pairs converged, block, basis, budget,
and whether it takes the whole space instead of a Krylov basis), how many Ritz vectors a full
basis keeps at a restart, and the memory its basis needs, refused in one sentence where it is
not free. Kept apart from the iteration: these decide how much a solve may take, the
iteration how it spends it.
"""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple

import torch

from hessian_cli.engine.linear_operator import LinearOperator
from hessian_cli.engine.memory import require_room
from hessian_cli.engine.solver_defaults import (
    CHECK_REACH,
    default_block_size,
    default_guard,
    default_max_hvps,
)
from hessian_cli.errors import UserError, a_type, is_number, shown

# Where the basis would hold half the space or more, it is cheaper to take the whole space at
# once: n products (in blocks of WHOLE_SPACE_BLOCK) and one dense Rayleigh-Ritz, the exact
# eigendecomposition. Grown a block at a time, such a basis needs about as many products and a
# Rayleigh-Ritz of every size on the way: ~n^4 / (4b) flops, hours at n = 2,410 (the digits MLP,
# top-1500). Below WHOLE_SPACE_FROM parameters that sum is cheap and the Krylov space may stop
# well before n products.
WHOLE_SPACE_FROM = 256
WHOLE_SPACE_BLOCK = 64
# What the whole space holds beside its two buffers, in n x n float64 matrices on the CPU, at
# its peak, the dense eigendecomposition: the projected matrix, the signed copy that eigh takes,
# its eigenvectors and LAPACK's workspace (syevd: 2 n^2). Counted as 3, the peak resident memory
# was 5 beyond the buffers (n = 2,100 float32 and float64, every column at once or a Krylov
# basis completed to them).
WHOLE_SPACE_SQUARES = 5

# A full basis restarts to its best Ritz vectors: this fraction of it (at least the pairs
# converged and a block more), so that it grows again for several blocks before the next
# restart. Restarting to all but one block, at every iteration once full, took 2.5 times the
# products over 96 solves of known spectra (n = 400; the largest and smallest 1, 5 and 20 of
# power-law, clustered, bulk-and-outliers and dense spectra, 4 seeds: 15,347 against 6,210;
# no case's mean was more, and some that exhausted their budget converged), and 30-40% more on
# networks (the digits MLP's smallest 5: 237-263 against 142-143); those where the basis never
# fills (a network's top few) are unchanged. A third did as well as a half (6,030). Over 200
# random solves (sizes 30-400, blocks 1-8, guards, warm starts, small max_basis, both ends),
# 129,305 products and 118 pairs left unconverged before, 95,730 and 11 now (restart_size).
RESTART_DIVISOR = 2


def check_whole(label: str, value: object) -> None:
    """Refuse a count that is not a whole number: ``k=2.0`` failed in torch ("must be tuple of
    ints"), a TypeError. ``label`` names it as the caller takes it (```k```, ``--top-k``)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UserError(f"{label} must be a whole number, not {value!r}.")


def check_options(
    *,
    tol: float,
    block_size: int | None,
    max_hvps: int | None,
    guard: int | None = None,
    k: int = 1,
    which: str = "largest",
    max_basis: int | None = None,
    progress: object = None,
) -> None:
    """Refuse settings no solve can run with (callers may check them before any work). A
    ``max_basis`` of 2.5 or -3 was taken for the least basis the solve can run with, unsaid;
    a ``progress`` of True failed after the first block's products ("'bool' object is not
    callable")."""
    check_whole("`k`", k)
    sizes = {"block_size": block_size, "max_hvps": max_hvps, "max_basis": max_basis}
    for name, value in (*sizes.items(), ("guard", guard)):
        if value is not None:
            check_whole(f"`{name}`", value)
    # Also refuses NaN; 1 and more: every pair converged at once. A string ("1e-4" from a
    # config file) failed in the comparison: "'<' not supported between 'int' and 'str'".
    if not (is_number(tol) and 0 < tol < 1):
        raise UserError(
            f"`tol` must be a positive number below 1 (relative to the largest eigenvalue's size, "
            f"or with the eigenvalue criterion to each eigenvalue's), not {shown(tol)}."
        )
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"`{name}` must be at least 1, not {value}.")
    if guard is not None and guard < 0:
        raise UserError(f"`guard` must be at least 0, not {guard}.")
    if progress is not None and not callable(progress):
        raise UserError(
            "`progress` must be None or a function of (HVPs spent, pairs converged, pairs "
            f"wanted), not {a_type(progress)}."
        )
    # k pairs span k dimensions, and each costs a product.
    least = 2 * k if which == "both" else k
    if max_hvps is not None and max_hvps < least:
        pairs = f"{k} eigenpair{'s' if k > 1 else ''}" + (" at each end" if which == "both" else "")
        raise UserError(
            f"`max_hvps` {max_hvps} is too few for {pairs}: each needs at least one HVP, so "
            f"allow at least {least}."
        )


def check_check_steps(
    check_steps: int, *, k: int, guard: int | None, max_hvps: int | None, which: str
) -> None:
    """Refuse ``check_steps`` that the budget never leaves room for: the check for a skipped
    eigenvalue runs only where its steps fit in what the solve has left once its pairs have
    converged, which takes at least a product per pair (``which="both"``: at each end), so such
    a check was left out, unsaid. With the default budget each end has its own."""
    if check_steps <= 0:
        return
    if max_hvps is None:
        budget = default_max_hvps(k + (default_guard(k) if guard is None else guard))
        least = k
    else:
        budget, least = max_hvps, 2 * k if which == "both" else k
    room = budget - least
    if check_steps > room:
        whose = "the default budget" if max_hvps is None else "a budget"
        raise UserError(
            f"`check_steps` {check_steps} can never run: {whose} of {budget} HVPs (`max_hvps`) "
            f"leaves at most {room} once the pairs have their first products; give "
            "`check_steps` of at most that, or a larger `max_hvps`."
        )


def check_count(k: int, n: int, which: str = "largest") -> None:
    """Refuse more eigenpairs than the ``n`` parameters have (or fewer than one); with
    ``which="both"``, more than the two ends can hold apart (their 2k pairs would share some,
    returned twice)."""
    params = f"parameter{'s' if n != 1 else ''}"
    if which == "both" and n < 2:
        raise UserError("a Hessian of one parameter has no two ends: use `which=largest`.")
    if which == "both" and k > n // 2:
        raise UserError(
            f"cannot compute {k} eigenpair{'s' if k != 1 else ''} at each end of a Hessian with "
            f"{n} {params} without the ends overlapping: choose `k` of at most {n // 2}, or "
            f"`which=largest` with `k` {n} for the whole spectrum."
        )
    if not 1 <= k <= n:
        limit = f"of at most {n}" if k > n else "of at least 1"
        raise UserError(
            f"cannot compute {k} eigenpair{'s' if k != 1 else ''} of a Hessian with {n} "
            f"{params}: choose `k` {limit}."
        )


class Plan(NamedTuple):
    """The sizes of one end's solve (:func:`plan_solve`)."""

    kg: int  # pairs converged: the k wanted, the guard and a warm start's scout
    b: int  # vectors per pass
    max_basis: int
    max_hvps: int
    whole: bool  # every column of the matrix instead of a Krylov basis
    scout: bool  # the last of the kg pairs is a warm start's scout


def plan_solve(
    n: int,
    k: int,
    guard: int | None,
    block_size: int | None,
    max_basis: int | None,
    max_hvps: int | None,
    *,
    warm: bool,
) -> Plan:
    """The sizes of a solve for ``k`` pairs of an operator of size ``n``, from its options."""
    # The solve converges `kg` pairs, the k wanted and a guard beyond them (see default_guard).
    kg = min(n, k + (default_guard(k) if guard is None else guard))
    scout = warm and kg == k < n
    if scout:
        # Warm-start rows that are (near) eigenvectors converge at once, and would stop the solve
        # before its space grew past them: a direction that has since become one of the k
        # largest would be skipped. So a warm start also converges a scout pair beyond the k,
        # loosely: the space must grow until it has found the largest eigenvalue outside the
        # rows' span, which, if it now belongs among the k, is then held to `tol` with them.
        kg += 1
    budget = max_hvps if max_hvps is not None else default_max_hvps(kg)
    b = min(block_size or default_block_size(k), n, budget)
    # The iteration stops where a whole block no longer fits the budget, so blocks that stop
    # short of k rows returned fewer pairs than asked (-k 98 --max-hvps 98 at the default block
    # of 3: 96 pairs; -k 8 --block-size 5 --max-hvps 8: 5): the largest block that reaches k.
    while b > 1 and budget // b * b < k:
        b -= 1
    max_basis = min(n, max_basis or max(3 * (kg + b), 20))
    max_basis = max(max_basis, min(n, kg + 2 * b))
    large = 2 * max_basis >= n >= WHOLE_SPACE_FROM
    if large and max_hvps is None:  # the whole space's n products, fewer than such a basis takes
        budget = max(budget, n)  # (a block of 2,000 of 2,410 spent a budget of 2,000 at once)
    return Plan(kg, b, max_basis, budget, large and budget >= n, scout)


def restart_size(capacity: int, kg: int, b: int) -> int:
    """How many Ritz vectors a full basis of ``capacity`` keeps (see RESTART_DIVISOR): a basis
    too small to grow by two blocks after that (a caller's small ``max_basis``) keeps all but
    one block, as every restart did before: keeping fewer there left pairs unconverged."""
    keep = max(kg + b, capacity // RESTART_DIVISOR)
    return keep if capacity - keep >= 2 * b else max(kg, capacity - b)


def check_rows(check_steps: int, kg: int, max_hvps: int) -> int:
    """The most Lanczos vectors the check for a skipped eigenvalue holds (and as many products):
    its steps toward an end near the middle of the spectrum, or across a loose tolerance's
    margin, CHECK_REACH times ``check_steps``; no more than the budget leaves once the ``kg``
    pairs have their products, and none where that is too little for a check."""
    left = max_hvps - kg
    return min(round(CHECK_REACH * check_steps), left) if 0 < check_steps <= left else 0


def check_memory(
    op: LinearOperator, k: int, capacity: int, w: int, whole: bool, check: int = 0
) -> None:
    """Refuse, in one sentence, a solve whose basis cannot fit: the basis and its products
    (``capacity`` rows each), ``w`` Ritz vectors and their residuals, and a restart's chunk or
    the ``check`` rows of the check for a skipped eigenvalue (its vectors and products, see
    :func:`check_rows`, and a copy of the pairs'); for the whole space no restart or check,
    but its dense eigendecomposition (WHOLE_SPACE_SQUARES), which lives on the CPU (the
    device's memory where that is the CPU). On the CPU every rank of a distributed solve on
    this machine holds its own copy, and all check before any allocates."""
    what = (
        "every column of the Hessian"
        if whole
        else f"a basis of {capacity:,} vectors and their products"
    )
    pairs = f"{k:,} eigenpair{'s' if k > 1 else ''}"
    require_room(
        op,
        _memory_need(op, capacity, w, whole, check),
        f"{pairs} of {op.n:,} parameters need {what}",
        "ask for fewer pairs",
        host=WHOLE_SPACE_SQUARES * op.n * op.n * 8 if whole else 0,
    )


def _memory_need(op: LinearOperator, capacity: int, w: int, whole: bool, check: int = 0) -> int:
    """Bytes on the operator's device that :func:`check_memory` asks to be free (its docstring
    says for what), without the dense eigendecomposition's, which is the CPU's."""
    # A restart and the check never run at once: the larger of them counts.
    extra = 0 if whole else max(capacity * restart_chunk(op.n), check * op.n)
    return ((2 * capacity + 2 * w) * op.n + extra) * torch.finfo(op.dtype).bits // 8


def restart_chunk(n: int) -> int:
    """Columns per piece of a thick restart: an eighth of them (all of a short vector), so that
    the restart holds an eighth of a basis more and makes at most 8 matrix products per buffer
    (each a kernel launch on a GPU, where a restart happens at every iteration once the basis is
    full)."""
    return min(n, max(1 << 16, -(-n // 8)))
