"""Extreme eigenpairs by a thick-restart block Krylov method (block Lanczos in Davidson form).

Each iteration multiplies a block of ``b`` vectors by H in one pass, adds them to an orthonormal
basis ``Q`` (with ``HQ`` kept, so no product is ever recomputed), and solves the small projected
problem (Rayleigh-Ritz). The new block is the residuals of the wanted, not yet converged Ritz
vectors, which span the same space as the next block-Lanczos block in exact arithmetic but stay
stable in float32. When the basis reaches ``max_basis`` vectors it is restarted with the best
Ritz vectors (thick restart), so memory is ``O(max_basis * n)`` whatever the iteration count.
The Ritz vectors are formed only to stop: until then their residuals come from what the newest
products leave outside the basis (:class:`_Leak`), a few vectors instead of ``k``.
Its sizes, restart size and memory are planned in :mod:`solver_plan`, and the error bounds
and convergence tests that certify its pairs are :mod:`convergence`'s.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch

from hessian_cli.engine.convergence import (
    claimed_gaps,
    converged_pairs,
    relative_errors,
    residual_floor,
    rounding_noise,
)
from hessian_cli.engine.distributed import fail_together
from hessian_cli.engine.linalg import (
    gram,
    norms,
    orthonormalize_against,
    project_out,
    row_dots,
    small_eigh,
    to_device,
    to_host,
)
from hessian_cli.engine.linear_operator import (
    LinearOperator,
    check_operator,
    checks_products,
    described,
    holds_weights,
    not_finite,
)
from hessian_cli.engine.precision import without_tf32
from hessian_cli.engine.probes import gaussian, probe_generator
from hessian_cli.engine.results import EigenResult
from hessian_cli.engine.seeds import next_seed
from hessian_cli.engine.solver_defaults import CHECK_REACH, CHECK_STEPS, LOOSE_CHECK, LOOSE_TOL
from hessian_cli.engine.solver_plan import (
    WHOLE_SPACE_BLOCK,
    Plan,
    check_count,
    check_memory,
    check_options,
    check_rows,
    check_whole,
    plan_solve,
    restart_chunk,
    restart_size,
)
from hessian_cli.errors import UserError

Which = Literal["largest", "smallest", "both"]
WHOLE = "whole-space"  # the method of a solve that took every column of the matrix
Criterion = Literal["residual", "eigenvalue"]
Progress = Callable[[int, int, int], None]  # (hvps spent, pairs converged, pairs wanted)


# The stall guard's allowance for slow convergence (see `_stop_decision`): a residual more than
# NOISE_MARGIN times the products' estimated noise floor (their asymmetry times sqrt(n)) is
# still far from it, and a residual tolerance more than REACHABLE_MARGIN times the asymmetry
# itself is not what the noise keeps from being met. That floor is a generous estimate: float32
# networks' smallest eigenpairs stopped "stalled" at residuals above a tolerance they met with
# more patience (the digits MLP, n = 2410, smallest 2 at tol 1e-4: stopped at 2.8e-3 after 108
# products, met at 296, the tolerance 3.3 times the floor and 530 times the asymmetry; n = 484,
# smallest 5: stopped at 4e-4 after 614, met at 918).
NOISE_MARGIN = 100
REACHABLE_MARGIN = 10
SLOW_PATIENCE = 4


def _refuse_not_finite(op: LinearOperator, values: torch.Tensor) -> None:
    """Raise, in the operator's words where it has them, where ``values`` (on the host) that
    products entered are not finite: the operator does not look at them in a solve
    (:func:`checks_products`), and every later step would fail on them, less clearly (an
    ``eigh`` that "failed to converge")."""
    if not bool(values.isfinite().all()):
        raise not_finite(op, "eigensolver's")


@without_tf32
@holds_weights
@checks_products
def eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    which: Which = "largest",
    tol: float = 1e-4,
    criterion: Criterion = "residual",
    block_size: int | None = None,
    guard: int | None = None,
    max_basis: int | None = None,
    max_hvps: int | None = None,
    init: torch.Tensor | None = None,
    hint: torch.Tensor | None = None,
    seed: int = 0,
    verify: bool | None = None,
    check_steps: int | None = None,
    progress: Progress | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest, or both) eigenpairs of ``op``.

    ``init`` rows warm-start the search (e.g. eigenvectors of the previous checkpoint); rows
    that are zero or not finite are left out, and more rows than the block are folded into it
    (:func:`_folded`); with ``which="both"`` the first ``k`` rows start the largest and the
    rest the smallest, as a previous result of that kind holds them. A warm start has at least
    one guard pair (the scout, held to ``sqrt(tol)``): rows that are eigenvectors converge at
    once, and without it the space would never grow past them to a direction that has since
    become one of the k.
    ``hint`` is a direction the wanted eigenvectors are expected to lean toward, such as the
    loss gradient for the largest ones (it lies mostly in the top eigenspace: Gur-Ari et al.,
    "Gradient Descent Happens in a Tiny Subspace", 2018). It is added with equal weight to the
    random start, so a poor hint costs little; with ``which="both"`` only the largest use it,
    and ``init`` rows that fill the block leave no room for it.

    ``max_hvps`` bounds the solve's products, the start included (``which="both"``: half for
    each end, and what the top leaves to the bottom); it must allow one per pair.

    ``criterion`` says when a pair counts as converged: ``residual`` (the default: eigenvector and
    eigenvalue), when ||H v - lambda v|| <= tol * |lambda_max|; ``eigenvalue``, when the bound
    on its eigenvalue's relative error (:func:`eigenvalue_error_bounds` over ``|lambda|``) is
    <= tol. That takes fewer products when only the eigenvalues are wanted; the eigenvectors
    are then less accurate, by an angle of about residual / gap. Its bound holds where no
    eigenvalue the solve has not found lies within the pair's residual, which this criterion
    leaves up to about sqrt(tol * gap), not tol (0.9997 and 0.998 above a bulk below 0.9 at
    tol 1e-4: residuals of 1.6e-3 to 2.8e-3, 0.998 unseen inside them); the check for a
    skipped eigenvalue looks there, evidence rather than proof (1 of 40 such solves was still
    9.6 times tol off).

    ``guard`` more pairs (default :func:`default_guard`) are converged beyond the ``k`` wanted and
    then dropped, so that an eigenvalue the space found late is not skipped (no residual test
    can see one it has not found). The result, its ``converged`` flags and ``stop_reason``
    speak of the ``k`` pairs only. Once they converge, ``check_steps`` products (default
    CHECK_STEPS, which says why; 0: none; more toward an end near the middle of the spectrum,
    see CHECK_REACH, and from a loose tolerance on, see LOOSE_CHECK; more while a loose
    tolerance's margin is still to cross, or an eigenvalue past the threshold may lie within
    the look's residual, see :func:`_skipped_direction`) look for a skipped
    one from a fresh start outside them, where the budget leaves room; what they find is taken
    in and converged too.

    Where the basis would hold half the space or more (``method`` "whole-space"; from
    ``WHOLE_SPACE_FROM`` parameters on, when ``max_hvps`` allows ``n`` products) the solve takes
    every column of the matrix at once and its exact eigendecomposition, ``init`` and ``hint``
    then being moot. A Krylov solve that has spent ``n`` products without converging completes
    its basis to the whole space in the same way, where the budget and memory leave room
    (:func:`_whole_space_instead`).

    Residuals come from the kept products: ``H x = S^T (H Q)`` for ``x = S^T Q``, exact up to the
    rounding of that combination, since every product of the basis is stored rather than
    recurred (between stops the iteration tracks them more cheaply, see :class:`_Leak`; a stop
    and the reported residuals are always these). With ``verify`` (default: only when the
    operator computes in reduced precision, whose products are not the matrix being certified)
    they come from ``k`` fresh full-precision products instead.
    """
    check_operator(op, "eigenpairs")
    check_options(
        tol=tol,
        block_size=block_size,
        max_hvps=max_hvps,
        guard=guard,
        k=k,
        which=which,
        max_basis=max_basis,
        progress=progress,
    )
    check_steps = CHECK_STEPS if check_steps is None else check_steps
    # Rows by their shape, not their count: eigh's columns, [n, 4], were read as 4 rows of n.
    if init is not None and (
        not isinstance(init, torch.Tensor)
        or init.ndim not in (1, 2)
        or init.shape[-1] != op.n
        or not init.is_floating_point()
    ):
        raise UserError(
            f"warm-start vectors must be real rows of {op.n} entries, one per parameter, "
            f"not {_described(init)}."
        )
    # A gradient of other parameters failed in the start block's arithmetic, a RuntimeError.
    if hint is not None and (
        not isinstance(hint, torch.Tensor) or hint.numel() != op.n or not hint.is_floating_point()
    ):
        raise UserError(
            f"the hint must be a real vector of {op.n} entries, one per parameter, "
            f"not {_described(hint)}."
        )
    check_whole("`check_steps`", check_steps)  # 2.5 ran, True as 1 step
    if check_steps < 0:
        raise UserError(f"`check_steps` must be at least 0, not {check_steps}.")
    # 'no' (a config file's word) was taken as true, and 0 as neither a yes nor a no.
    if verify is not None and not isinstance(verify, bool):
        raise UserError(
            f"`verify` must be True, False or None (verify in reduced precision only), "
            f"not {verify!r}."
        )
    if which == "both":
        check_count(k, op.n, which)
        return _both_ends(
            op,
            k,
            tol=tol,
            criterion=criterion,
            block_size=block_size,
            guard=guard,
            max_basis=max_basis,
            max_hvps=max_hvps,
            init=init,
            hint=hint,
            seed=seed,
            verify=verify,
            check_steps=check_steps,
            progress=progress,
        )
    if which not in ("largest", "smallest"):
        raise UserError(f"unknown eigenvalue selection {which!r}: use largest, smallest or both.")
    if criterion not in ("residual", "eigenvalue"):
        raise UserError(f"unknown convergence criterion {criterion!r}: use residual or eigenvalue.")
    check_count(k, op.n)
    start_time, start_hvps = time.perf_counter(), op.hvp_count
    if init is not None:  # the rows that can start anything (none: a cold start)
        init = _usable_rows(init, op.n)
    plan = plan_solve(op.n, k, guard, block_size, max_basis, max_hvps, warm=init is not None)
    if init is not None:  # folded into the plan's block (the one asked may be lowered)
        init = _folded(init, plan.b)
    solve = _Solve.start(
        op,
        k,
        plan,
        which=which,
        tol=tol,
        criterion=criterion,
        check_steps=check_steps,
        seed=seed,
        start_time=start_time,
        start_hvps=start_hvps,
    )
    basis = _start_basis(solve, init, hint, progress)
    while True:
        solve.iterations += 1
        pairs = _rayleigh_ritz(solve, basis)
        stop = _stop_decision(solve, basis, pairs)
        # The pairs the result would call converged if the solve stopped now: of a Krylov
        # solve only a leading run (see converged_pairs), not every pair within tolerance.
        conv = stop.conv[:k]
        solve.reported = int((conv if solve.whole else conv.long().cumprod(0)).sum())
        if progress:
            progress(solve.spent, solve.reported, k)
        missed = _check_for_skipped(solve, basis, pairs, stop)
        if stop.reason and missed is None:  # a skipped direction found, the iteration goes on
            break
        whole_basis = None if missed is not None else _whole_space_instead(solve, basis, progress)
        if whole_basis is not None:
            basis, whole_basis = whole_basis, None  # one name holds it: `del basis` frees it
            continue
        _expand_basis(solve, basis, pairs, stop, missed)
    # A basis grown to the whole space (never restarted: see _expand_basis) holds it as the
    # identity does: its projected matrix's eigenvalues need no correction either.
    whole = solve.whole or basis.m >= op.n
    values, theta, vectors = _rayleigh_quotients(pairs, k, whole=whole)
    asymmetry = basis.asymmetry
    del basis, pairs  # free the basis before any verifying products
    return _final_pairs(solve, values, theta, vectors, stop, asymmetry, verify)


def _described(given: object) -> str:
    """A warm start or hint as its refusal names it (:func:`described`), with the fix for what
    is no tensor (a numpy array, a list: they failed in ``.ndim`` or ``.numel()``; an earlier
    solve's result, whose vectors are its ``eigenvectors``)."""
    if isinstance(given, torch.Tensor):
        return described(given)
    if isinstance(given, EigenResult):
        return f"{described(given)} (its vectors are its .eigenvectors)"
    return f"{described(given)} (make it a tensor: torch.as_tensor)"


def _both_ends(
    op: LinearOperator,
    k: int,
    *,
    tol: float,
    criterion: Criterion,
    block_size: int | None,
    guard: int | None,
    max_basis: int | None,
    max_hvps: int | None,
    init: torch.Tensor | None,
    hint: torch.Tensor | None,
    seed: int,
    verify: bool | None,
    check_steps: int,
    progress: Progress | None,
) -> EigenResult:
    """``eigenpairs(which="both")``: a solve for each end, which share the budget (half each, and
    what the top leaves to the bottom); or, where the top alone would take every column of the
    matrix, that one solve, whose spectrum holds both ends."""

    def of_both(hvps0: int, found0: int, share: int) -> Progress | None:
        """``progress`` told of the 2k pairs of both ends, ``share`` of them the solve's it
        follows, after ``hvps0`` products and ``found0`` pairs (it was told of k, then of k again
        from 0; or of all n)."""
        if progress is None:
            return None
        return lambda spent, done, wanted: progress(
            hvps0 + spent, found0 + done * share // wanted, 2 * k
        )

    top_budget = None if max_hvps is None else max_hvps - max_hvps // 2
    plan = plan_solve(op.n, k, guard, block_size, max_basis, top_budget, warm=init is not None)
    fresh = verify is False or (verify is None and getattr(op, "precision", "full") == "full")
    if plan.whole and fresh:  # every column for the top: the bottom is in the same matrix
        every = eigenpairs(
            op,
            op.n,
            tol=tol,
            criterion=criterion,
            max_hvps=max_hvps,
            seed=seed,
            verify=verify,
            progress=of_both(0, 0, 2 * k),
        )
        return _ends(every, k)
    top = eigenpairs(
        op,
        k,
        which="largest",
        tol=tol,
        criterion=criterion,
        block_size=block_size,
        guard=guard,
        max_basis=max_basis,
        max_hvps=top_budget,
        init=None if init is None else init.reshape(-1, op.n)[:k],
        hint=hint,
        seed=seed,
        verify=verify,
        check_steps=check_steps,
        progress=of_both(0, 0, k),
    )
    low = eigenpairs(
        op,
        k,
        which="smallest",
        tol=tol,
        criterion=criterion,
        block_size=block_size,
        guard=guard,
        max_basis=max_basis,
        max_hvps=None if max_hvps is None else max(k, max_hvps - top.hvps),
        init=None if init is None else init.reshape(-1, op.n)[k:],
        seed=next_seed(seed),
        verify=verify,
        check_steps=check_steps,
        progress=of_both(top.hvps, int(top.converged.sum()), k),
    )
    return _concat(top, low)


@dataclass
class _Solve:
    """One end's solve: its settings (from :func:`plan_solve` and the options), and what it has
    counted so far, which the steps of the iteration share."""

    op: LinearOperator
    k: int
    kg: int  # pairs converged: the k wanted, the guard and a warm start's scout
    b: int  # vectors per pass
    max_basis: int
    max_hvps: int
    whole: bool  # every column of the matrix instead of a Krylov basis
    which: Which
    tol: float
    tols: torch.Tensor  # each of the kg pairs' tolerance
    criterion: Criterion
    sign: float  # 1 for the largest, -1 for the smallest: sign * theta is largest first
    check_steps: int
    check_rows: int  # the most vectors a check holds, as its memory was counted (check_rows)
    gen: torch.Generator  # the start, the checks and fresh directions draw from it
    patience: int  # products the stall guard waits for an improvement (see _stop_decision)
    start_time: float
    start_hvps: int
    iterations: int = 0
    scale: float = 0.0  # |lambda_max| as far as seen
    grown_out: bool = False  # no new direction survived orthogonalisation
    check_hvps: int = 0  # products spent looking for a skipped eigenvalue
    reported: int = 0  # pairs converged at the last progress report (the whole space's repeat it)
    skipped_found: int = 0
    # The most wanted eigenvalue (times sign) the last check saw outside the pairs, less the
    # products' rounding: no pair's error bound may take a gap past it.
    lacking: float = -math.inf
    # How far inward (times sign) that check vouches for the space it left out: its top Ritz
    # value there widened by that value's residual. A gap reaching past it is one the check
    # has not searched.
    searched: float = -math.inf
    # A check was due at the stop (converged, or the budget's end) but too few products were
    # left for it: no gap is taken, as nothing vouches that the space missed no eigenvalue
    # inside one.
    unchecked: bool = False
    best_worst: float = float("inf")  # the stall guard's best worst unconverged residual,
    best_at: int = 0  # and the products spent when it was reached

    @classmethod
    def start(
        cls,
        op: LinearOperator,
        k: int,
        plan: Plan,
        *,
        which: Which,
        tol: float,
        criterion: Criterion,
        check_steps: int,
        seed: int,
        start_time: float,
        start_hvps: int,
    ) -> _Solve:
        """A solve that has taken no step yet."""
        # Each pair's tolerance: `tol`, but a warm start's scout (see plan_solve) needs only
        # `sqrt(tol)`.
        tols = torch.full((plan.kg,), tol, dtype=torch.float64)
        if plan.scout:
            tols[-1] = math.sqrt(tol)
        return cls(
            op=op,
            k=k,
            kg=plan.kg,
            b=plan.b,
            max_basis=plan.max_basis,
            max_hvps=plan.max_hvps,
            whole=plan.whole,
            which=which,
            tol=tol,
            tols=tols,
            criterion=criterion,
            sign=1.0 if which == "largest" else -1.0,
            check_steps=check_steps,
            check_rows=check_rows(check_steps, plan.kg, plan.max_hvps),
            gen=probe_generator(op, seed),
            patience=max(50, 10 * (plan.kg + plan.b)),
            start_time=start_time,
            start_hvps=start_hvps,
        )

    @property
    def spent(self) -> int:
        """Products this solve has taken so far, the start and the checks included."""
        return self.op.hvp_count - self.start_hvps


@dataclass
class _Basis:
    """The orthonormal basis ``Q`` (rows), its products ``HQ`` and its projected matrix
    ``T = Q H Q^T``. Every product is kept, so none is ever recomputed; ``Q`` and ``HQ`` are the
    first ``m`` rows of two buffers allocated once, filled in place."""

    Qb: torch.Tensor
    HQb: torch.Tensor
    m: int
    T: torch.Tensor  # float64, on the CPU
    asymmetry: float  # the largest gap between two estimates of an entry of T: products' noise
    leak: _Leak | None  # None for the whole space, where nothing leaks

    @property
    def Q(self) -> torch.Tensor:
        return self.Qb[: self.m]

    @property
    def HQ(self) -> torch.Tensor:
        return self.HQb[: self.m]

    @property
    def capacity(self) -> int:
        """Rows the buffers hold: the largest the basis may grow."""
        return self.Qb.shape[0]

    def restart(self, S: torch.Tensor) -> None:
        """Thick restart: the basis becomes the Ritz vectors ``S^T Q`` (columns of ``S``), in
        place, with their products and projected matrix."""
        Sk = to_device(S, self.Q)
        _combine_rows(self.Qb, Sk)
        _combine_rows(self.HQb, Sk)
        # The same rounded combinations, rounded on the host: a copy back from the basis's
        # device would be a read (on a GPU a wait for the restart).
        Sk = S.to(self.Q.dtype).to(self.T)
        self.T = _symmetric(Sk.T @ self.T @ Sk)
        self.leak.restart(Sk)
        self.m = Sk.shape[1]

    def append(self, W: torch.Tensor, HW: torch.Tensor, op: LinearOperator) -> None:
        """Take in the rows ``W``, already written after the basis in ``Qb``, with their
        products ``HW`` (by ``op``)."""
        first, m = self.m, self.m + len(W)
        rows = _new_rows(self.Q, self.HQ, W, HW)
        self.HQb[first:m] = HW
        # The leak's rows from the new rows of T as the device has them (the same values as
        # the host's), so that their Gram matrix comes back with the rows: one read, not two.
        F = _Leak.rows(_symmetrized(rows, first), self.Qb[:m], self.HQb[:m], first, self.leak)
        rows, FF = to_host(rows, gram(F, F))
        self.T, cross_asymmetry = _extended(self.T, rows)
        _refuse_not_finite(op, self.T)
        self.asymmetry = max(self.asymmetry, cross_asymmetry)
        self.leak = _Leak.of_rows(F, FF, m, first, self.leak)
        self.m = m


def _start_basis(
    solve: _Solve, init: torch.Tensor | None, hint: torch.Tensor | None, progress: Progress | None
) -> _Basis:
    """The basis the iteration starts from, in buffers for the whole solve, allocated only once
    its memory is known to be free: every column of the matrix for a whole-space solve, else
    the start block (:func:`_start_block`)."""
    op = solve.op
    # The basis and its products live in two buffers of `capacity` rows, filled in place: no
    # copy of the basis per iteration, and a peak memory that is known before the first product.
    # Every row costs a product, so a small budget (Eigen-SAM's refresh: 6) needs no more rows.
    if solve.whole:
        return _whole_basis(solve, progress)
    capacity = min(solve.max_basis, solve.max_hvps)
    Qb, HQb = _buffers(solve, capacity)
    start = _start_block(op, solve.b, init, hint, solve.gen)
    m = start.shape[0]
    Qb[:m], HQb[:m] = start, op.matmul(start)
    T = gram(Qb[:m], HQb[:m])  # Q H Q^T, kept up to date by _Basis
    F = _Leak.rows(_symmetric(T), Qb[:m], HQb[:m], 0, None)
    T, FF = to_host(T, gram(F, F))  # one read (see _Basis.append)
    _refuse_not_finite(op, T)
    asymmetry = float((T - T.T).abs().max())
    T = _symmetric(T)
    return _Basis(Qb, HQb, m, T, asymmetry, _Leak.of_rows(F, FF, m, 0, None))


def _buffers(solve: _Solve, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis's two buffers of ``capacity`` rows, once their memory is known to be free."""
    op = solve.op
    # Ranks may differ in free memory; all refuse together or none does (no rank left waiting).
    collective = getattr(op, "distributed", False)
    # The check for a skipped eigenvalue copies the kg pairs' vectors beside its own and their
    # products (see _skipped_direction).
    check = 0 if solve.whole else 2 * solve.check_rows + solve.kg
    with fail_together() if collective else contextlib.nullcontext():
        check_memory(op, solve.k, capacity, min(capacity, solve.kg + solve.b), solve.whole, check)
    Qb = torch.empty((capacity, op.n), dtype=op.dtype, device=op.device)
    return Qb, torch.empty_like(Qb)


def _whole_basis(solve: _Solve, progress: Progress | None, kept: _Basis | None = None) -> _Basis:
    """Every column of the matrix as the basis (one step of the iteration): the identity and its
    products, so that the projected matrix is the products themselves (symmetrised, on the CPU),
    its asymmetry their rounding. Given a Krylov basis to keep, only the rows that complete it
    to the whole space are multiplied (n - m products), and the matrix is recovered from all
    the rows' products, ``B H``, as ``B^-1 (B H)`` in float64: as exact as the products,
    however nearly orthogonal the rows are."""
    op, m = solve.op, 0 if kept is None else kept.m
    Qb, HQb = _buffers(solve, op.n)
    if kept is None:
        Qb.zero_().fill_diagonal_(1)
    else:
        Qb[:m], HQb[:m] = kept.Q, kept.HQ
        Qb[m:] = torch.linalg.qr(kept.Q.T, mode="complete")[0][:, m:].T
    for i in range(m, op.n, WHOLE_SPACE_BLOCK):
        HQb[i : i + WHOLE_SPACE_BLOCK] = op.matmul(Qb[i : i + WHOLE_SPACE_BLOCK])
        if progress:  # none converged or lost until its eigendecomposition
            progress(solve.spent, solve.reported, solve.k)
    H = HQb.double().cpu()
    _refuse_not_finite(op, H)
    if kept is not None:
        H = torch.linalg.solve(Qb.double().cpu(), H)
        Qb.zero_().fill_diagonal_(1)
        HQb.copy_(H)
    return _Basis(Qb, HQb, op.n, _symmetric(H), float((H - H.T).abs().max()), None)


def _whole_space_instead(solve: _Solve, basis: _Basis, progress: Progress | None) -> _Basis | None:
    """The whole space for a Krylov solve that has spent ``n`` products, what every column
    costs, without converging, where its budget and memory leave room for the rest of the
    space (:func:`_whole_basis`); else ``None``. Such a solve then spends at most about twice
    what the whole space alone would, where the restarted basis could go on for many times
    that (the smallest 10 of 10 * 0.95^i, n = 200: 2,200 products, unconverged), or certify
    pairs short of the bottom it has not resolved."""
    op = solve.op
    if solve.spent < op.n or solve.spent + op.n - basis.m > solve.max_hvps:
        return None
    solve.whole = True
    try:
        return _whole_basis(solve, progress, basis)
    except UserError:  # no room for every column: the Krylov basis goes on
        solve.whole = False
        return None


# A previous solve's vectors are no generic start: they hold next to nothing, by construction,
# of what was the bottom of its spectrum, and a direction from there that is now among the top
# may then be skipped, with every pair converged (a series whose top-5 directions moved to the
# bottom and back: 12 of 12 seeds skipped one, float64, n = 300; cold starts none). This much of
# a random vector in each row leaves out no direction and keeps what the rows know.
WARM_NOISE = 1e-2


def _start_block(
    op: LinearOperator,
    b: int,
    init: torch.Tensor | None,
    hint: torch.Tensor | None,
    gen: torch.Generator,
) -> torch.Tensor:
    """The first block, orthonormal: the warm start's rows first, each with a little of the
    random vector it displaces (:data:`WARM_NOISE`), then random vectors, which leave out no
    direction; the first of them leans toward the hint, with the weight of the random part, so
    that a poor hint costs little."""
    start = gaussian((b, op.n), generator=gen, dtype=op.dtype, device=op.device)
    if hint is not None:
        h = hint.to(start).reshape(-1)
        size = float(norms(h))
        if 0 < size < float("inf"):  # a zero gradient (a stationary point) hints nothing
            r, u = start[0] / norms(start[0]), h / size
            mixed = r + u
            # A random part nearly opposite the hint cancels it (one parameter: to 0, half
            # the time, leaving no start): the random part's other sign, as random, does not.
            start[0] = mixed if float(norms(mixed)) >= 1 else u - r
    if init is not None:
        rows = init.to(start)[:b]
        m = len(rows)
        noise = start[b - m :]  # the random vectors the rows take the place of
        rows = rows / norms(rows)[:, None] + WARM_NOISE * noise / norms(noise)[:, None]
        start = torch.cat([rows, start[: b - m]])
    return orthonormalize_against(start, None)


@dataclass
class _RitzPairs:
    """The Rayleigh-Ritz solution of one basis, most wanted first."""

    theta: torch.Tensor  # the Ritz values (float64, CPU)
    S: torch.Tensor  # their eigenvectors in the basis: the Ritz vectors are S^T Q
    w: int  # the pairs whose residuals are followed: the kg to converge and a block more
    X: torch.Tensor | None = None  # the first w Ritz vectors, formed only to stop
    R: torch.Tensor | None = None  # and their residuals

    def form(self, basis: _Basis) -> None:
        """Form the Ritz vectors and their residuals from the kept products (:func:`_ritz`)."""
        self.X, self.R = _ritz(self.S[:, : self.w], self.theta, basis.Q, basis.HQ)


def _rayleigh_ritz(solve: _Solve, basis: _Basis) -> _RitzPairs:
    """The Ritz pairs of the basis, from its projected matrix on the CPU; the solve's scale
    follows their values."""
    theta, S = small_eigh(solve.sign * basis.T)  # on the CPU, as is the bookkeeping after it
    theta, S = solve.sign * theta.flip(0), S.flip(1)  # most wanted first
    # |lambda_max| as far as seen: every Ritz value lies within the spectrum, and a thick
    # restart toward the smallest drops the largest from the basis, so keep the maximum.
    tiny = torch.finfo(torch.float64).tiny
    solve.scale = max(solve.scale, float(theta.abs().max().clamp_min(tiny)))
    pairs = _RitzPairs(theta, S, min(basis.m, solve.kg + solve.b))
    if basis.leak is None:  # the whole space: nothing leaks, and the iteration stops now
        pairs.form(basis)
    return pairs


class _Stop(NamedTuple):
    """The stop test of one iteration."""

    reason: str  # why the iteration stops; "" while it goes on
    rnorm: torch.Tensor  # the residual norms of the w pairs followed (float64, CPU)
    conv: torch.Tensor  # which of the kg pairs meet their tolerance
    unconverged: list[int]  # the others among the first w, most wanted first


def _stop_decision(solve: _Solve, basis: _Basis, pairs: _RitzPairs) -> _Stop:
    """Whether the iteration stops, and why. The leak's residuals (:class:`_Leak`) decide it
    each iteration; a stop is decided again on the Ritz vectors' own residuals, formed for it,
    so that the result and its reason rest on those."""
    op, spent, w = solve.op, solve.spent, pairs.w
    while True:  # twice at most: a stop is decided on the Ritz vectors' own residuals
        if pairs.R is None:
            rnorm = basis.leak.norms(pairs.S[:, :w])
        else:
            rnorm = norms(pairs.R).double().cpu()
        # Gaps sharpen the eigenvalue criterion's bounds only where a check can still look
        # inside them (or none is wanted): with --criterion eigenvalue --max-hvps 14
        # --check-steps 12, 1, 0.999, 0.998 above a bulk stopped "converged" after 4-5
        # products, the check left no room, and 18 of 20 seeds' lambda_1 were further off than
        # their bounds (0.998004 +- 3.7e-4 of 1, residual 1.4e-2).
        vouched = (
            basis.leak is None
            or solve.check_steps == 0
            or solve.max_hvps - spent >= solve.check_steps
        )
        conv = _tolerance_met(solve, pairs, rnorm, basis.asymmetry, gaps=vouched)
        unconverged = [i for i in range(min(solve.kg, w)) if not conv[i]]
        # Stall guard: a tolerance below the operator's rounding noise can never be met. When
        # the worst unconverged residual has not improved for `patience` products, stop and
        # report the pairs as unconverged instead of spending the whole budget on noise. The
        # products' noise shows in the projected matrix: H is symmetric, so the two float
        # estimates of each entry, <q_i, H q_j> and <q_j, H q_i>, differ only by the products'
        # errors. A residual far above what that asymmetry allows, or a residual tolerance
        # well above the asymmetry, is slow convergence (crowded eigenvalues), not noise: it gets
        # SLOW_PATIENCE times the patience, and "slow" as its reason if it stops.
        # What the rounding hides (residual_floor) is no improvement: a float32 top-5 at tol
        # 1e-8 (n = 300) went on below its floor to the whole space, 580 products; now 214.
        floor = _floor(solve, basis.asymmetry)
        worst = max(float(rnorm[unconverged].max()), floor) if unconverged else 0.0
        improved = worst < 0.9 * solve.best_worst
        slow = worst > NOISE_MARGIN * basis.asymmetry * math.sqrt(op.n) or (
            solve.criterion == "residual"
            and bool(unconverged)
            and float(solve.tols[unconverged].min()) * solve.scale
            > REACHABLE_MARGIN * basis.asymmetry
        )
        patience = solve.patience * (SLOW_PATIENCE if slow else 1)
        stalled = not improved and spent - solve.best_at > patience
        reasons = {
            "converged": bool(conv.all()),
            "exhausted": basis.m >= op.n or solve.grown_out,
            "stalled": stalled,
            "budget": spent + solve.b > solve.max_hvps,
        }
        reason = next((r for r, hit in reasons.items() if hit), "")
        if reason == "stalled" and slow:
            reason = "slow"
        if not reason or pairs.X is not None:
            break
        pairs.form(basis)
    if improved:
        solve.best_worst, solve.best_at = worst, spent
    return _Stop(reason, rnorm, conv, unconverged)


def _tolerance_met(
    solve: _Solve, pairs: _RitzPairs, rnorm: torch.Tensor, asymmetry: float, *, gaps: bool
) -> torch.Tensor:
    """Which of the ``kg`` pairs meet their tolerance by the solve's criterion, given the
    residual norms ``rnorm`` of the first ``w`` (none beyond them); the eigenvalue criterion's
    bounds without the gaps to other Ritz values unless ``gaps``."""
    kg, tols, scale, dtype = solve.kg, solve.tols, solve.scale, solve.op.dtype
    noise = rounding_noise(asymmetry, scale, solve.op.n)
    floor = _floor(solve, asymmetry)  # the tolerance less what rounding may hide of a residual
    if solve.criterion == "residual":
        met = rnorm[:kg] + floor <= tols[: len(rnorm)] * scale
    else:
        theta = pairs.theta[: pairs.w]
        errors = relative_errors(theta, rnorm, noise, dtype, gaps=gaps, scale=scale)[:kg]
        t = tols[: len(errors)]
        # An eigenvalue that may be zero has no relative error to bound: it is held to
        # the residual criterion instead (it used to stall there, exact to 1e-15).
        met = (errors <= t) | (errors.isinf() & (rnorm[: len(errors)] + floor <= t * scale))
    conv = torch.zeros(kg, dtype=torch.bool)
    conv[: min(kg, pairs.w)] = met
    return conv


def _floor(solve: _Solve, asymmetry: float) -> float:
    """How far below the true residuals the computed ones may lie (:func:`residual_floor`,
    not relative)."""
    noise = rounding_noise(asymmetry, solve.scale, solve.op.n)
    return residual_floor(noise, solve.scale, solve.op.dtype) * solve.scale


def _check_for_skipped(
    solve: _Solve, basis: _Basis, pairs: _RitzPairs, stop: _Stop
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """After a stop for convergence, one look for an eigenvalue the space skipped (see
    CHECK_STEPS): the direction found, new to the basis, with its product; ``None`` where the
    look finds none, or where there is none to take (a whole space, no check steps, too little
    budget left, or the most looks a solve takes)."""
    solve.lacking = solve.searched = -math.inf  # no evidence from an earlier basis
    wanted = basis.leak is not None and solve.check_steps > 0
    if stop.reason != "converged":
        # The end of the budget leaves no check to the pairs converged by then.
        solve.unchecked = wanted and stop.reason == "budget"
        return None
    op, k, kg, scale = solve.op, solve.k, solve.kg, solve.scale
    end = max(abs(float(pairs.theta[0])), scale / CHECK_REACH**2)
    loose = LOOSE_CHECK if solve.tol >= LOOSE_TOL else 1.0
    reach = min(loose * math.sqrt(scale / end), CHECK_REACH)  # as far as check_rows counted
    steps = min(round(solve.check_steps * reach), solve.max_hvps - solve.spent)
    checkable = wanted and solve.check_steps <= steps
    solve.unchecked = wanted and not checkable
    if not checkable:
        return None
    # At most one look per pair and one more takes in what it finds: each look that finds a
    # direction adds an eigenvalue beyond the k-th pair, so more would be rounding taken for
    # one. The last still looks, so that the pairs' bounds reach out to what it sees: without
    # it, the smallest 2-3 of a bulk in [0, 1] below 5.0 six times at tol 0.1 had bounds below
    # the true error in 8 of 20 solves, none with it (676 products instead of 373; tighter
    # tolerances there never reach the most looks).
    capped = solve.skipped_found > kg
    assert pairs.X is not None
    # Beyond the k-th pair by more than the pairs' own residuals (and the products'
    # rounding), so that a pair converged to within them is not found again.
    noise = basis.asymmetry * math.sqrt(op.n)
    margin = float(stop.rnorm[:k].max()) + noise
    kth = solve.sign * float(pairs.theta[k - 1])
    threshold = kth + margin
    if solve.criterion == "eigenvalue":
        # Nor past where what it sees would widen the k-th pair's bound (by the distance to
        # it, see eigenvalue_error_bounds) beyond the tolerance: the pair is then not converged.
        room = solve.tol * abs(kth) / (1 + solve.tol) - float(stop.rnorm[k - 1])
        edge = min(_gap_edge(solve, pairs, stop.rnorm), kth + max(room, 0.0))
        threshold = min(threshold, edge + noise)
    before = op.hvp_count
    # As far as the memory counted for the check holds (check_rows) with the pairs' copy, and
    # the rows it has while they move into room for the rest (the look going on, below).
    room = solve.check_rows - (kg + steps + 1) // 2
    most = min(round(CHECK_REACH * steps), solve.max_hvps - solve.spent, max(room, steps))
    missed, seen, spread = _skipped_direction(
        op, pairs.X[:kg], threshold, solve.sign, steps, solve.gen, kth=kth, most=most
    )
    solve.check_hvps += op.hvp_count - before
    solve.lacking = seen - noise
    solve.searched = seen + spread + noise
    if capped:
        return None
    if missed is not None:  # new to the basis (a thick restart keeps a part of it)
        missed = _orthonormal_with_products(*missed, basis.Q, basis.HQ)
    if missed is not None:
        solve.skipped_found += 1
        solve.best_worst, solve.best_at = float("inf"), solve.spent
    return missed


def _gap_edge(solve: _Solve, pairs: _RitzPairs, rnorm: torch.Tensor) -> float:
    """The innermost edge (times ``sign``) of the gaps the ``k`` pairs' eigenvalue bounds claim
    free of eigenvalues (:func:`eigenvalue_error_bounds`: to the other Ritz values, each widened
    by its residual); ``inf`` where none is claimed.

    A Ritz value is no bound on the eigenvalues beyond it toward the middle: one the space has
    not found yet may lie inside such a gap, and the bound of ``rnorm**2 / gap`` is then not
    one (3 random eigenvalues 1.71, 1.62, 0.58: a 2-vector space had 1.6998 "within 2.6e-4"
    of 1.7059 beside a Ritz value 0.578, 3.6e-3 off, converged at tol 1e-3). The check for a
    skipped eigenvalue holds the complement of the pairs to this edge as well.
    """
    gap = claimed_gaps(pairs.theta, rnorm)[: solve.k]
    r = rnorm[: len(gap)]
    used = (gap > r) & (r > 0)  # where r^2 / gap is below r
    edges = solve.sign * pairs.theta[: len(gap)].to(gap) - gap
    return float(edges[used].min()) if bool(used.any()) else math.inf


def _expand_basis(
    solve: _Solve,
    basis: _Basis,
    pairs: _RitzPairs,
    stop: _Stop,
    missed: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Grow the basis by a block: the direction the check found, whose product it has already
    taken, or the residuals of the Ritz pairs (:func:`_residual_block`) and their products.
    A full basis is first restarted from its best Ritz vectors; a space that cannot grow is
    marked ``grown_out``, to stop on the Ritz pairs it has."""
    op, m = solve.op, basis.m
    W = missed[0] if missed is not None else _residual_block(solve, basis, pairs, stop)
    if m + W.shape[0] > basis.capacity:  # thick restart: keep the best Ritz vectors
        # A basis that may hold the whole space takes what is left of it instead: restarted a
        # block short of it (n = 101, top-60 at block 2: from 100 to 68 vectors), it took 128
        # products where 101 span the space.
        room = basis.capacity >= op.n
        keep = m if room else min(m, restart_size(basis.capacity, solve.kg, solve.b))
        if keep < m:
            basis.restart(pairs.S[:, :keep])
            m = keep
        W = W[: basis.capacity - m]  # where the kept pairs leave less room than a block
    if missed is not None:
        W, HW = missed
        basis.Qb[m : m + len(W)] = W
    else:
        # Straight into the basis: the residuals are the solve's own, no copy of them needed.
        W = orthonormalize_against(W, basis.Q, out=basis.Qb[m : m + len(W)])
        if len(W) < solve.b and m + len(W) < op.n:  # invariant subspace: add fresh directions
            extra = gaussian(
                (solve.b - len(W), op.n), generator=solve.gen, dtype=op.dtype, device=op.device
            )
            extra = orthonormalize_against(extra, basis.Qb[: m + len(W)])[: solve.b - len(W)]
            basis.Qb[m + len(W) : m + len(W) + len(extra)] = extra
            W = basis.Qb[m : m + len(W) + len(extra)]
        if len(W) == 0:  # the space cannot grow: stop after the Ritz pairs of this basis
            solve.grown_out = True
            return
        HW = op.matmul(W)
    basis.append(W, HW, op)


def _residual_block(solve: _Solve, basis: _Basis, pairs: _RitzPairs, stop: _Stop) -> torch.Tensor:
    """The next block's directions: the residuals of the unconverged wanted Ritz vectors,
    largest first, then of the next Ritz vectors. In a Krylov space all residuals point the same
    way in exact arithmetic; the largest carries that direction with the least rounding,
    whereas a pair already at its noise floor would only add noise."""
    largest_first = sorted(stop.unconverged, key=lambda i: -float(stop.rnorm[i]))
    order = (largest_first + list(range(solve.kg, pairs.w)))[: solve.b]
    return pairs.R[order] if pairs.R is not None else basis.leak.residuals(pairs.S[:, order])


def _rayleigh_quotients(
    pairs: _RitzPairs, k: int, *, whole: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` Ritz values made their vectors' Rayleigh quotients (except in the whole
    space), the values of the ``w`` pairs followed with them in front, and the ``k`` Ritz
    vectors at unit length."""
    # The projected matrix drifts from the stored float32 basis (rounding of the basis and of
    # restarts): a float32 top vector of 4M entries was 1 + 6e-7 long, and Ritz values were up
    # to 1.3e-6 (relative) off their vectors' Rayleigh quotients, twice their error bounds. The
    # value is that quotient, x.Hx / x.x = theta + x.r / x.x from the kept products (Hx = r +
    # theta x), and the vector unit length, to rounding. The whole space's projected matrix is
    # the products themselves (the identity basis), whose float64 eigenvalues have no drift to
    # correct: the quotient would only add the float32 rounding of x and r (a 300 x 300 float32
    # matrix: 96 of its 130 largest eigenvalues off by more than their bounds, up to 21 times;
    # a float32 network's basis grown to all of its 88 parameters: lambda_1 1.4 times).
    X, R = pairs.X, pairs.R
    assert X is not None and R is not None  # a stop computes them
    # One read of the device (on a GPU one wait) for both sums.
    squares, quotients = to_host(row_dots(X[:k], X[:k]), row_dots(X[:k], R[:k]))
    values = pairs.theta[:k].clone()
    if not whole:
        values += quotients / squares
    theta = torch.cat([values, pairs.theta[k : pairs.w]])
    return values, theta, X[:k] / to_device(squares.sqrt(), X)[:, None]


def _final_pairs(
    solve: _Solve,
    values: torch.Tensor,
    theta: torch.Tensor,
    vectors: torch.Tensor,
    stop: _Stop,
    asymmetry: float,
    verify: bool | None,
) -> EigenResult:
    """The result for the ``k`` pairs: their residuals (from fresh full-precision products where
    verified), error bounds, which converged, and the stop's reason as those make it."""
    op, k, scale, rnorm = solve.op, solve.k, solve.scale, stop.rnorm
    if verify is None:
        verify = getattr(op, "precision", "full") != "full"
    if verify:
        with getattr(op, "full_precision", contextlib.nullcontext)():
            HV = op.matmul(vectors)
        values = (vectors * HV).sum(1).double() / (vectors * vectors).sum(1).double()
        fresh = norms(HV - values[:, None].to(op.dtype) * vectors).double()
        values, fresh = to_host(values, fresh)  # one read (on a GPU one wait), not two
        _refuse_not_finite(op, torch.cat([values, fresh]))
        # Rounded products may order close eigenvalues wrongly (bf16: 4 of 10 tops 5e-4 apart,
        # which alignment then refused): most wanted first by the full-precision values.
        order = torch.argsort(solve.sign * values, descending=True, stable=True)
        values, fresh, vectors = values[order], fresh[order], vectors[order.to(vectors.device)]
        rnorm = torch.cat([fresh, rnorm[len(fresh) :]])
        theta = torch.cat([values, theta[len(values) :]])
        scale = max(scale, float(values.abs().max()))
    residuals = rnorm[:k] / scale
    noise = rounding_noise(asymmetry, scale, op.n)
    # No gap past what the check saw, nor (where the gaps do not converge the pairs) past what
    # it searched, which a pair's bound reaches out to where it lies beyond the pair.
    searched = solve.searched if solve.criterion == "residual" else -math.inf
    lacking = {"lacking": solve.lacking, "searched": searched, "sign": solve.sign}
    gaps = not solve.unchecked
    errors = relative_errors(theta, rnorm, noise, op.dtype, gaps=gaps, scale=scale, **lacking)[:k]
    # Fresh full-precision products carry none of the reduced precision's noise that the
    # asymmetry measured: their residuals' floor is their dtype's rounding.
    floor = residual_floor(
        rounding_noise(0.0 if verify else asymmetry, scale, op.n), scale, op.dtype
    )
    converged = converged_pairs(
        solve.criterion, residuals, errors, solve.tol, krylov=not solve.whole, floor=floor
    )
    # The gaps that sharpen a bound are read from the other Ritz values, which an unconverged
    # solve may not have found yet (a budget of 4 products claimed 0.21 for a value 0.72 off):
    # its pairs keep the bound that needs no gap, the residual's (Weyl).
    weyl = relative_errors(theta[:k], rnorm[:k], noise, op.dtype, gaps=False, scale=scale)
    errors = torch.where(converged, errors, weyl)
    stop_reason = stop.reason
    if bool(converged.all()):
        stop_reason = "converged"  # whatever became of the guard
    elif stop_reason == "converged":
        stop_reason = "unverified"  # the fresh (full-precision) products disagree
    return EigenResult(
        eigenvalues=values.cpu(),
        residuals=residuals,
        errors=errors,
        converged=converged,
        eigenvectors=vectors,
        which=solve.which,
        tol=solve.tol,
        criterion=solve.criterion,
        scale=scale,
        hvps=solve.spent,
        iterations=solve.iterations,
        seconds=time.perf_counter() - solve.start_time,
        block_size=solve.b,
        guard=solve.kg - solve.k,
        stop_reason=stop_reason,
        method=WHOLE if solve.whole else "block-krylov-thick-restart",
        check_hvps=solve.check_hvps,
        skipped_found=solve.skipped_found,
        unchecked=solve.unchecked and bool(converged.any()),
        floor=floor,
    )


def _skipped_direction(
    op: LinearOperator,
    V: torch.Tensor,
    threshold: float,
    sign: float,
    steps: int,
    gen: torch.Generator,
    *,
    kth: float,
    most: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
    """A direction outside the rows of ``V`` (converged eigenvectors) whose Rayleigh quotient,
    times ``sign``, exceeds ``threshold``, with its product (``None`` if ``steps`` Lanczos steps
    from a random start in the complement of ``V`` find none), and the largest such quotient
    seen (times ``sign``: an eigenvalue of the complement is at least as far out), and the
    residual in the complement of the Ritz vector that saw it (where it has not converged,
    the complement's extreme may lie further out than the quotient and that residual).

    The complement holds every eigenvector ``V`` lacks, so a quotient there beyond the k-th
    wanted eigenvalue proves that one of them belongs among the k. Ritz values of the
    complement approach its extremes from inside, so a check that finds nothing is evidence,
    not proof: a direction the random start barely holds can still hide.

    The threshold is the k-th pair's value ``kth`` (times ``sign``) and a margin for the pairs'
    residuals. Where that margin is wider than the quotient's last rise (loose tolerances), a
    quotient about to pass ``kth`` still has the margin to cross: the look goes on, up to
    ``most`` steps, while at its last rise it would pass ``kth`` in one more step and the
    threshold in ``steps`` more. At tol 1e-2 to 1e-1 six steps left a skipped eigenvalue 8-17
    steps from the threshold (tanh MLPs, random spectra); at tight tolerances the margin is
    narrower than a rise. The look goes on too (up to ``most``) while its quotient plus its
    Ritz vector's residual reaches past the threshold: an eigenvalue of the complement lies
    within that residual of the quotient, and may be past it. Two eigenvalues a little above
    a bulk (0.999747, 0.999699 or 0.9997, 0.998, the rest below 0.99 or 0.9) left the other
    mix of the two outside a space grown from one vector, and six steps saw 0.87-0.96 with
    residuals of 0.04-0.1: top-2 at tol 1e-3 took the bulk's top for the 2nd pair (14 times
    tol off) in 3 of 20 bases, the eigenvalue criterion's top-1 at 1e-4 was up to 11 times
    tol off in 10 of 20; none since. Where the complement's top stands clear of the rest (the
    digits examples' checks: 0.89 +- 0.003 and 0.58 +- 0.012), the look keeps its ``steps``.
    """
    # The vectors follow a copy of V in one buffer, which each new one is made orthogonal to.
    # Room for the look's own steps at first (a tight tolerance's look takes no more), for all
    # ``most`` only once it goes on: the solve counted memory for the latter (check_rows).
    kv = len(V)
    VP = torch.empty((kv + min(steps, most), op.n), dtype=op.dtype, device=op.device)
    VP[:kv] = V
    HP = torch.empty((len(VP) - kv, op.n), dtype=op.dtype, device=op.device)
    q = orthonormalize_against(
        gaussian((1, op.n), generator=gen, dtype=op.dtype, device=op.device), V
    )
    # The Ritz vector, its product and its residual are written over in one buffer: fresh
    # n-long arrays each step cost their page faults (11.2M parameters: 0.16 s each on CPU).
    x, hx, r = torch.empty((3, op.n), dtype=op.dtype, device=op.device).split(1)
    seen = rise = -math.inf
    # The residual's size stays on the device until something asks for it (on a GPU a read is
    # a wait): the first `steps` steps go on whatever it is.
    spread: torch.Tensor | float = 0.0
    for j in range(most):
        if len(q) == 0:  # the complement is invariant and searched through
            return None, seen, 0.0
        rising = rise > 0 and seen + rise > kth and seen + steps * rise > threshold
        # Nor while an eigenvalue past the threshold lies within its Ritz vector's residual.
        if j >= steps and not rising:
            spread = float(spread)
            if seen + spread <= threshold:
                return None, seen, spread
        if j == len(HP):  # one buffer at a time, the old one freed before the next grows
            HP = torch.cat([HP, HP.new_empty((most - j, op.n))])
            VP = torch.cat([VP, VP.new_empty((most - j, op.n))])
        P = VP[kv:]
        P[j : j + 1], HP[j : j + 1] = q, op.matmul(q)
        T = gram(P[: j + 1], HP[: j + 1]).cpu()
        _refuse_not_finite(op, T)
        theta, S = small_eigh(sign * _symmetric(T))
        y = to_device(S[:, -1:], P)  # the most wanted Ritz vector of the complement searched so far
        torch.mm(y.T, P[: j + 1], out=x)
        torch.mm(y.T, HP[: j + 1], out=hx)
        rise, seen = float(theta[-1]) - seen, float(theta[-1])
        torch.add(hx, x, alpha=-float(sign * theta[-1]), out=r)
        spread = norms(project_out(r, V))[0]  # its residual in the complement
        if seen > threshold:
            return (x, hx), seen, float(spread)
        q = orthonormalize_against(r, VP[: kv + j + 1], out=r)  # copied into P next step
    return None, seen, float(spread)


def _orthonormal_with_products(
    W: torch.Tensor, HW: torch.Tensor, Q: torch.Tensor, HQ: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The unit row ``W`` made orthogonal to the rows of ``Q`` and unit again, and its product
    from ``HW`` and ``HQ`` (the same combination: no new product); ``None`` where hardly
    anything of it is outside ``Q``, whose rounding the division would magnify."""
    for _ in range(2):
        C = gram(W, Q).to(W)
        W, HW = W - C @ Q, HW - C @ HQ
    size = norms(W)[:, None]
    return (W / size, HW / size) if float(size.min()) > 1e-3 else None


def _ends(res: EigenResult, k: int) -> EigenResult:
    """The ``k`` largest and ``k`` smallest pairs of a whole spectrum (``res`` holds all of
    them, largest first), as a ``which="both"`` result: one set of products for both ends."""
    n = len(res.eigenvalues)

    def part(index: torch.Tensor, which: str, costs: bool) -> EigenResult:
        return replace(
            res,
            eigenvalues=res.eigenvalues[index],
            residuals=res.residuals[index],
            errors=res.errors[index],
            converged=res.converged[index],
            eigenvectors=res.eigenvectors[index.to(res.eigenvectors.device)],
            which=which,
            hvps=res.hvps if costs else 0,
            iterations=res.iterations if costs else 0,
            seconds=res.seconds if costs else 0.0,
        )

    top = part(torch.arange(k), "largest", True)
    return _concat(top, part(torch.arange(n - 1, n - 1 - k, -1), "smallest", False))


def _usable_rows(init: torch.Tensor, n: int) -> torch.Tensor | None:
    """A warm start's rows that can start anything, ``None`` where none can: rows that are not
    finite or are zero are left out (a frozen layer's share)."""
    rows = init.reshape(-1, n)
    rows = rows[torch.isfinite(rows).all(1) & (rows != 0).any(1)]
    return rows if len(rows) else None


def _folded(rows: torch.Tensor, block: int) -> torch.Tensor | None:
    """A warm start's rows, at most a block of them; ``None`` where they cancel out.

    More rows than the block are folded into it: start vector ``j`` is the sum of rows
    ``j, j + block, ...`` (each of unit length). Taken as they are, the rows made a larger start
    block, which then grew one residual at a time: on a digits-MLP SGD series a warm top-5 took
    1.5 times the products of a cold one, top-20 at tol 1e-8 2.6 times; the sum takes 1-7% fewer
    than cold (benchmarks/RESULTS.md, twelfth session). The vector of a top-1 stays as it is:
    Eigen-SAM's refresh continues from it with a budget of a few products. Consecutive rows go
    to different vectors, so an eigenvalue repeated up to ``block`` times keeps its copies;
    more, and the start holds fewer, as a cold start of that block does (see
    solver_defaults.DEFAULT_BLOCK_SIZE). The block is the plan's: folded into the block asked
    for where the plan lowered it (a budget it did not divide), the rows beyond the plan's were
    dropped (8 exact eigenvectors of a top-8, --block-size 5 lowered to 4: no pair converged in
    8 products).
    """
    if len(rows) > block:
        unit = rows / norms(rows)[:, None]
        # Summed block by block in order, not by index_add_ (atomic, in no set order, on CUDA):
        # a warm-started series repeats itself bit for bit.
        rows = unit[:block].clone()
        for start in range(block, len(unit), block):
            part = unit[start : start + block]
            rows[: len(part)] += part
        rows = rows[norms(rows) > 1e-3]  # rows that cancel out (v and -v) sum to nothing
    return rows if len(rows) else None


def _ritz(
    S: torch.Tensor, theta: torch.Tensor, Q: torch.Tensor, HQ: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Ritz vectors ``X = S^T Q`` and their residuals ``H X - theta X = S^T HQ - theta X``
    (from the kept products: exact up to the rounding of the combination)."""
    S = to_device(S, Q)
    X = S.T @ Q
    return X, (S.T @ HQ).addcmul_(to_device(theta[: S.shape[1], None], Q), X, value=-1)


class _Leak:
    """What the products of the basis leave outside it: ``H Q^T - Q^T T = (E B)^T``, with ``B``
    a few orthonormal rows (``r x n``) and ``E`` their coefficients (``m x r``, on the CPU).

    A Ritz vector ``S^T Q`` then has the residual ``(S^T E) B``, of norm ``||S^T E||``: ``w r n``
    and ``w m r`` flops instead of the ``4 w m n`` of forming the Ritz vectors and their
    products, which took nearly all of a top-50 solve of a 272,474-parameter operator on CPU
    (145 ms an iteration at block 1). In a Krylov space only the newest block leaks, so
    ``r = b``; what a new block leaves of the older leak stays, and ``r`` is the leak's rank.
    The residuals are exact in exact arithmetic; with rounding they choose the next block and
    say when to look closer, and a stop is decided on the Ritz vectors' own residuals
    (``_ritz``).
    """

    # Directions of the leak below this fraction of its largest (squared) are dropped: the
    # Gram matrix that finds them resolves no finer (see linalg.gram); dropping only lowers the
    # residuals' estimates, which a stop then checks against the Ritz vectors' own.
    DROP = 1e-7

    def __init__(self, E: torch.Tensor, B: torch.Tensor) -> None:
        self.E, self.B = E, B

    @staticmethod
    def rows(
        T_new: torch.Tensor, Q: torch.Tensor, HQ: torch.Tensor, first: int, older: _Leak | None
    ) -> torch.Tensor:
        """The rows ``F`` that span the leak of basis ``Q`` whose rows from ``first`` on are
        new (``T_new``: their rows of its projected matrix), given the ``older`` leak of the
        rows before them: the older leak's (less the new rows' span), then the new rows' own."""
        new = slice(first, Q.shape[0])
        r = 0 if older is None else older.B.shape[0]
        # The leak's rows F written in place by addmm: subtracting a product and then
        # concatenating made each row three times (ResNet-18: 14 s of a 72 s top-1).
        F = Q.new_empty((r + Q.shape[0] - first, Q.shape[1]))
        torch.addmm(HQ[new], T_new.to(Q), Q, alpha=-1, out=F[r:])
        if r:
            torch.addmm(older.B, gram(older.B, Q[new]).to(Q), Q[new], alpha=-1, out=F[:r])
        return F

    @classmethod
    def of_rows(
        cls, F: torch.Tensor, FF: torch.Tensor, m: int, first: int, older: _Leak | None
    ) -> _Leak:
        """The leak of a basis of ``m`` rows, new from ``first`` on, from its rows ``F``
        (:meth:`rows`) and their Gram matrix ``FF`` (on the host, read with the basis's new
        projected rows)."""
        E = torch.zeros(m, m - first, dtype=FF.dtype)
        E[first:] = torch.eye(m - first, dtype=FF.dtype)
        if older is not None:
            old_E = torch.cat([older.E, torch.zeros(m - first, older.E.shape[1], dtype=FF.dtype)])
            E = torch.cat([old_E, E], 1)
        values, U = small_eigh(FF)  # F = (U sqrt(values)) B for orthonormal rows B
        keep = values > cls.DROP * values.max().clamp_min(torch.finfo(values.dtype).tiny)
        U, root = U[:, keep], values[keep].sqrt()
        return cls(E @ (U * root), to_device((U / root).T, F) @ F)

    def residuals(self, S: torch.Tensor) -> torch.Tensor:
        """The residuals ``H x - theta x`` of the Ritz vectors ``x = S^T Q`` (columns of ``S``)."""
        return to_device(S.T @ self.E, self.B) @ self.B

    def norms(self, S: torch.Tensor) -> torch.Tensor:
        """The norms of :meth:`residuals` (float64, CPU)."""
        return (S.T @ self.E).norm(dim=1)

    def restart(self, S: torch.Tensor) -> None:
        """Follow a thick restart to the basis ``S^T Q``."""
        self.E = S.T @ self.E


def _symmetric(T: torch.Tensor) -> torch.Tensor:
    return (T + T.T) / 2


def _new_rows(Q: torch.Tensor, HQ: torch.Tensor, W: torch.Tensor, HW: torch.Tensor) -> torch.Tensor:
    """The rows ``W`` add to the projected matrix of the basis ``[Q; W]``, in two estimates
    beside each other, ``[W HQ^T, (Q HW^T)^T, W HW^T]`` (float64, on the device). Only the new
    rows are multiplied (``2 m b n`` flops, where recomputing all of it took ``m^2 n``: at
    k = 300 on the digits MLP that product was a third of the solve)."""
    return torch.cat([gram(W, HQ), gram(Q, HW).T, gram(W, HW)], 1)


def _symmetrized(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The new rows of the projected matrix from their two estimates (:func:`_new_rows`, after
    ``m`` rows): the same values on the device and on the host."""
    w_hq, q_hw, corner = rows.split([m, m, rows.shape[0]], 1)
    return torch.cat([(w_hq + q_hw) / 2, _symmetric(corner)], 1)


def _extended(T: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The projected matrix of the basis ``[Q; W]``, given ``T`` of ``Q`` and the rows ``W``
    adds (:func:`_new_rows`, on the host), and the largest difference between two estimates of
    one of its new entries."""
    m = T.shape[0]
    w_hq, q_hw, corner = rows.split([m, m, rows.shape[0]], 1)  # two estimates of W H Q^T
    asymmetry = max(
        float((w_hq - q_hw).abs().max()) if w_hq.numel() else 0.0,
        float((corner - corner.T).abs().max()),
    )
    new = _symmetrized(rows, m)
    return torch.cat([torch.cat([T, new[:, :m].T], 1), new]), asymmetry


def _combine_rows(buffer: torch.Tensor, S: torch.Tensor, chunk: int | None = None) -> None:
    """``buffer[:keep] = S^T @ buffer[:m]`` for ``S`` of shape ``[m, keep]``, ``keep <= m``, in
    place, a chunk of columns at a time: a thick restart then needs no second basis."""
    m, keep = S.shape
    chunk = chunk or restart_chunk(buffer.shape[1])
    for j in range(0, buffer.shape[1], chunk):
        buffer[:keep, j : j + chunk] = S.T @ buffer[:m, j : j + chunk]


def _concat(a: EigenResult, b: EigenResult) -> EigenResult:
    scale = max(a.scale, b.scale)
    residuals = torch.cat([a.residuals * a.scale, b.residuals * b.scale]) / scale
    errors = torch.cat([a.errors, b.errors])
    k = len(a.residuals)  # each end's pairs in its own order: a leading run of each
    converged = [
        converged_pairs(
            a.criterion,
            residuals[part],
            errors[part],
            a.tol,
            krylov=end.method != WHOLE,
            floor=end.floor * end.scale / scale,
        )
        for end, part in ((a, slice(0, k)), (b, slice(k, None)))
    ]
    return EigenResult(
        eigenvalues=torch.cat([a.eigenvalues, b.eigenvalues]),
        residuals=residuals,
        errors=errors,
        converged=torch.cat(converged),
        eigenvectors=torch.cat([a.eigenvectors, b.eigenvectors]),
        which="both",
        tol=a.tol,
        criterion=a.criterion,
        scale=scale,
        hvps=a.hvps + b.hvps,
        iterations=a.iterations + b.iterations,
        seconds=a.seconds + b.seconds,
        block_size=a.block_size,
        guard=a.guard,
        stop_reason=a.stop_reason if a.stop_reason != "converged" else b.stop_reason,
        # The ends may differ: one may take the whole space after n products (the other not).
        method=a.method if a.method == b.method else f"{a.method} (largest), {b.method} (smallest)",
        check_hvps=a.check_hvps + b.check_hvps,
        skipped_found=a.skipped_found + b.skipped_found,
        unchecked=a.unchecked or b.unchecked,
        floor=max(a.floor * a.scale, b.floor * b.scale) / scale,
    )
