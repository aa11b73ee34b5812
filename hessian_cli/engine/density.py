"""Spectral density by stochastic Lanczos quadrature, all probes advanced as one block."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from hessian_cli.engine.deflation import deflation
from hessian_cli.engine.distributed import fail_together
from hessian_cli.engine.linalg import norms, project_out
from hessian_cli.engine.linear_operator import (
    LinearOperator,
    check_operator,
    checks_products,
    holds_weights,
    not_finite,
)
from hessian_cli.engine.memory import require_room
from hessian_cli.engine.precision import without_tf32
from hessian_cli.engine.probes import DENSITY_STREAM, probe_generator, rademacher
from hessian_cli.engine.results import DensityResult, EigenResult
from hessian_cli.engine.solver_plan import check_whole
from hessian_cli.errors import UserError, a_type, is_number, shown

GRID_POINTS = 1000  # of the uniform grid over the whole spectrum
_POINTS_PER_SIGMA = 4  # at least, near every node: or a narrow Gaussian falls between points
_KERNEL_CHUNK = 2**22  # grid points x nodes evaluated at a time, at most
_KERNEL_REACH = 9.0  # sigmas: farther, a Gaussian is below 3e-18 of its peak (float64 rounding)
_DOT_PIECE = 4096  # entries at most per float32 partial sum of an inner product, as in gram
_EXHAUSTED = 1e-10  # a Lanczos b this small beside the entries so far: the space is exhausted


def _working_dtype(op: LinearOperator) -> torch.dtype:
    """The basis's dtype: the operator's, but at least float32 (half-precision pieces would
    round every partial sum of the inner products)."""
    return torch.promote_types(op.dtype, torch.float32)


def _pieces(n: int) -> tuple[int, int]:
    """``(chunk, padded)``: vectors of ``n`` entries padded with zeros to ``padded``, a whole
    number of ``chunk``-long pieces (``chunk <= _DOT_PIECE``, fewer than one padding entry per
    piece), so that the pieces of all probes' rows tile one flat buffer."""
    count = -(-n // _DOT_PIECE)
    chunk = -(-n // count)
    return chunk, count * chunk


def density_memory_need(op: LinearOperator, num_probes: int, steps: int) -> int:
    """Bytes the density holds at once: its Lanczos basis (``num_probes * steps`` vectors) and a
    few block vectors beside it."""
    rows = num_probes * (min(steps, op.n) + 5)
    return rows * _pieces(op.n)[1] * torch.finfo(_working_dtype(op)).bits // 8


def check_density_memory(op: LinearOperator, num_probes: int, steps: int) -> None:
    """Refuse, in one sentence and before any product, a density whose basis cannot fit."""
    require_room(
        op,
        density_memory_need(op, num_probes, steps),
        f"the density's {num_probes:,} probes x {min(steps, op.n):,} Lanczos steps on "
        f"{op.n:,} parameters need their Lanczos vectors",
        "give fewer probes or Lanczos steps",
    )


@without_tf32
@holds_weights
@checks_products
def spectral_density(
    op: LinearOperator,
    num_probes: int = 8,
    steps: int = 64,
    *,
    seed: int = 0,
    sigma: float | None = None,
    known: EigenResult | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DensityResult:
    """SLQ: one Lanczos run per Rademacher probe, each step one block HVP for all probes.

    Each probe's tridiagonal matrix gives a Gauss quadrature rule (nodes, weights) for the
    spectral measure seen by that probe; averaging the rules estimates the density of
    eigenvalues, normalised to integrate to 1. Full reorthogonalisation keeps
    ``num_probes * steps`` vectors, trading memory for rules free of spurious copies.
    ``sigma`` is the width of the Gaussian that smooths each node (default 1% of the nodes'
    spread; at least 1e-10 of the largest node in magnitude, where float64 still draws it).

    ``known`` eigenpairs of ``op`` (an :func:`eigenpairs` result for the same weights; the
    converged ones serve, see :func:`~hessian_cli.engine.deflation.deflation`) are taken out:
    each rule gets their eigenvalues as nodes of weight ``1/n`` each, exactly, and the Lanczos
    runs in the space orthogonal to their vectors, its rule weighted ``(n - k)/n``. The probes'
    random weights on the top eigenvalues were the rules' largest error, and the steps that
    found them go to the rest: at no product, with 5 eigenpairs at 8 probes x 40 steps, the
    rules' (Wasserstein) distance to the spectrum fell 1.6x and 4.4x on the example MLP and CNN,
    the error of their first moment 2.2x and 4.8x (benchmarks/known_eigenpairs.py). The rest's
    weight is its expected share, ``(n - k)/n``, so that each rule still sums to 1, not each
    probe's own share ``|Pz|^2/n``: a bias of order ``k/n`` in its moments, within the noise from
    ``n`` of about 20 on, and large only where ``k`` is close to ``n`` (``n = 8, k = 6``: the
    rest's trace 0.33 for 0.50).

    ``progress(done, steps)`` is called after each Lanczos step (every probe's product): a
    density of a large network takes minutes, as many as its steps. Where every probe's space
    runs out before ``steps``, the last report is ``(done, done)``: the steps taken.

    Beside its product, a step reads the basis twice (the inner products of all probes in one
    batched call, then the update; four times where a probe's space is exhausted, see
    :func:`_orthogonalized`) and reads back from the device once (whether its coefficients are
    finite, whether a probe goes on, whether a second pass is needed; again after that pass):
    on an operator whose products are nearly free, that is all the time it takes.
    """
    check_operator(op, "spectral_density")
    check_whole("`num_probes`", num_probes)
    check_whole("`steps`", steps)
    if num_probes < 1 or steps < 2:
        raise UserError(
            "the density needs at least one probe and two Lanczos steps (one step gives each "
            "probe a single node, its Rayleigh quotient)."
        )
    # NaN too; True was taken for a width of 1, unsaid.
    if sigma is not None and not (is_number(sigma) and 0 < sigma < math.inf):
        raise UserError(
            f"the density's smoothing width must be a positive number, not {shown(sigma)}."
        )
    if progress is not None and not callable(progress):
        raise UserError(
            f"`progress` must be None or a function of (steps done, steps), not {a_type(progress)}."
        )
    # Ranks may differ in free memory: all refuse together or none does (none left waiting).
    with fail_together() if getattr(op, "distributed", False) else contextlib.nullcontext():
        check_density_memory(op, num_probes, steps)
    start, hvps0 = time.perf_counter(), op.hvp_count
    V, values, _ = deflation(op, known)
    n, k, device = op.n, len(V), op.device
    steps = min(steps, n - k)  # the dimension left to the Lanczos runs
    gen = probe_generator(op, seed, DENSITY_STREAM)
    v = rademacher((num_probes, n), generator=gen, dtype=op.dtype, device=device)
    v = project_out(project_out(v, V), V)  # twice: what one pass leaves is rounding of |v|
    if steps:
        nodes, weights = _lanczos_rules(op, v, steps, V.to(_working_dtype(op)), progress)
    else:  # the known vectors span the space: nothing is left to the Lanczos runs
        nodes = weights = torch.zeros(num_probes, 0, dtype=torch.float64)
    # Each rule: the rest's, weighted by its share of the space, and the known eigenvalues,
    # 1/n each.
    nodes = torch.cat([nodes, values.expand(num_probes, k)], 1)
    weights = torch.cat(
        [weights * ((n - k) / n), torch.full((num_probes, k), 1 / n, dtype=torch.float64)], 1
    )
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    spread = max(hi - lo, 1e-12 * max(abs(lo), abs(hi))) or 1.0  # 1.0: every node at 0
    sigma = sigma if sigma is not None else 0.01 * spread
    # Not below what float64 draws beside the nodes: the lattice near them is quantised by
    # their rounding (the density integrated to 1 + 6e-4 at 1e-14 of the nodes, 1 + 6e-6 at
    # 1e-12, 1.2 at 1e-15, NaN at 5e-324). Given narrower, it is drawn at 1e-10 of them, which
    # the result's sigma says.
    sigma = max(sigma, 1e-10 * max(abs(lo), abs(hi)), 1e-300)
    grid = _grid(nodes[used], lo, hi, sigma)
    density = _smoothed(grid, nodes[used], weights[used] / num_probes, sigma)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        values=density,
        sigma=sigma,
        num_probes=num_probes,
        steps=steps,
        hvps=op.hvp_count - hvps0,
        seconds=time.perf_counter() - start,
        known=k,
    )


def _lanczos_rules(
    op: LinearOperator,
    v: torch.Tensor,
    steps: int,
    V: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each probe's (row of ``v``) Gauss quadrature rule, nodes and weights ``[probes, steps]``
    (float64, on the CPU; padded with weight 0), from ``steps`` Lanczos steps of ``H`` in the
    space orthogonal to the rows of ``V`` (none: all of it)."""
    num_probes, n, device = len(v), op.n, op.device
    chunk, padded = _pieces(n)
    # The Lanczos vectors, step-major ([steps, probes, padded]) and filled in place: every
    # product over the basis is then one batched call for all probes (_dots, _subtract).
    basis = torch.empty(steps, num_probes, padded, dtype=_working_dtype(op), device=device)
    basis[:, :, n:] = 0
    basis[0, :, :n] = v / norms(v)[:, None]
    # Kept on the device, where each host read would wait for the GPU: see the step's read.
    alphas = torch.zeros(num_probes, steps, dtype=torch.float64, device=device)
    betas = torch.zeros_like(alphas)
    size = torch.zeros(num_probes, dtype=torch.float64, device=device)  # largest entry so far
    length = torch.full((num_probes,), steps, dtype=torch.long, device=device)
    active = torch.ones(num_probes, dtype=torch.bool, device=device)
    for j in range(steps):
        w = op.matmul(basis[j, :, :n].to(op.dtype)).to(basis.dtype)
        w = project_out(w, V)  # H restricted to the space without the known vectors
        if padded > n:
            w = torch.nn.functional.pad(w, (0, padded - n))
        a = _dots(w, basis[j : j + 1], chunk)
        recurrence = basis[max(j - 1, 0) : j + 1]  # v_prev (from the second step on) and v
        w = _subtract(w, torch.cat([betas[:, j - 1 : j], a], 1) if j else a, recurrence)
        before = norms(w).double()
        w, b = _orthogonalized(w, basis[: j + 1], chunk)
        again = (b < before / math.sqrt(2)).any()  # a second pass (see _orthogonalized)
        a = a.squeeze(1)
        size = torch.maximum(size, a.abs())
        if j:
            size = torch.maximum(size, betas[:, j - 1])
        done, finite, going, again = _step_read(a, b, active, size, again)
        if again:
            w, b = _orthogonalized(w, basis[: j + 1], chunk)
            done, finite, going, _ = _step_read(a, b, active, size, again=False)
        alphas[:, j], betas[:, j] = a, b
        length = torch.where(done, j + 1, length)
        active &= ~done
        if not finite:
            raise not_finite(op, "density's")
        if progress:  # where every probe's space ran out, the whole is the steps taken
            progress(j + 1, steps if going else j + 1)
        if not going:
            break
        if j + 1 < steps:  # a stopped probe's next vector is 0 (w / inf): its products are too
            scale = torch.where(active, b, torch.inf).to(w.dtype)
            torch.div(w, scale[:, None], out=basis[j + 1])
    # One copy to the host for the three (each its own read was a wait for the GPU)
    host = torch.cat([alphas, betas, length[:, None].to(alphas.dtype)], 1).cpu()
    alphas, betas, length = host[:, :steps], host[:, steps:-1], host[:, -1].long()
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for p in range(num_probes):
        m = int(length[p])
        T = (
            torch.diag(alphas[p, :m])
            + torch.diag(betas[p, : m - 1], 1)
            + torch.diag(betas[p, : m - 1], -1)
        )
        theta, U = torch.linalg.eigh(T)
        nodes[p, :m], weights[p, :m] = theta, U[0] ** 2
        nodes[p, m:] = theta[-1]  # padding with zero weight
    return nodes, weights


def _dots(w: torch.Tensor, B: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[probes, k]`` inner products of each probe's row ``w[p]`` with its ``k`` basis vectors
    ``B[:, p]``, in float64 from ``chunk``-long float32 pieces: the accuracy of :func:`gram`
    (see its docstring) in one batched product for all probes instead of one call per probe.

    ``w`` is ``[probes, padded]`` and ``B`` ``[k, probes, padded]``, contiguous, ``padded`` a
    multiple of ``chunk`` (:func:`_pieces`): every piece then lies within one row, and the
    pieces of all rows are one batch of strided views, with no copy of the basis.
    """
    probes, padded = w.shape
    k, count = len(B), probes * padded // chunk
    parts = torch.bmm(w.reshape(count, 1, chunk), B.reshape(k, count, chunk).permute(1, 2, 0))
    return parts.view(probes, -1, k).sum(1, dtype=torch.float64)


def _step_read(
    a: torch.Tensor,
    b: torch.Tensor,
    active: torch.Tensor,
    size: torch.Tensor,
    again: torch.Tensor | bool,
) -> tuple[torch.Tensor, bool, bool, bool]:
    """The active probes that stop at a step with coefficients ``a``, ``b`` (entries so far up
    to ``size``), and, in one host read (on a GPU a wait for the step): whether ``a`` and ``b``
    are finite (every product enters its probe's ``b``, so the operator need not look at it:
    checks_products), whether a probe goes on, and ``again``.

    A probe whose Krylov space became invariant stops: its rule is already exact. What is left
    of ``w`` then is rounding, relative to the operator's scale (its entries so far). Not at the
    dtype's rounding of the largest entry: a bulk 1e-5 as wide as a float32 operator's top
    (beside an outlier) has Lanczos entries that small, and was drawn from 2 nodes per probe. A
    float32 space that is really exhausted runs on, its further nodes weightless.
    """
    done = active & (b <= _EXHAUSTED * size.clamp_min(1e-300))
    finite = a.isfinite().all() & b.isfinite().all()
    read = torch.stack([finite, (active & ~done).any(), torch.as_tensor(again).to(finite)])
    finite, going, again = read.tolist()
    return done, finite, going, again


def _orthogonalized(
    w: torch.Tensor, B: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` without its components along the basis ``B`` (one classical Gram-Schmidt pass),
    and its norms (float64).

    The step takes a second pass where the first removed most of some row (its norm fell below
    ``1/sqrt(2)`` of what it was: the "twice is enough" test of Daniel, Gragg, Kaufman and
    Stewart). Until a probe's Krylov space is exhausted, w's components along
    the basis are rounding after the three-term recurrence and one pass leaves it orthogonal to
    the accuracy of :func:`_dots` (a second always-on pass cost as much again for nothing
    measurable). Once it is, all of w is rounding, as large as those components: one pass left
    it ``|w| / |w'|`` less orthogonal at each step, and a float32 probe of a low-rank Hessian
    lost orthogonality in 15 steps, then grew without bound (NaN by step 60).
    """
    w = _subtract(w, _dots(w, B, chunk), B)
    return w, norms(w).double()


def _subtract(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``w[p] - sum_i c[p, i] B[i, p]`` for every probe: one fused batched product."""
    coeffs = c.to(w.dtype).unsqueeze(1)
    return torch.baddbmm(w.unsqueeze(1), coeffs, B.transpose(0, 1), alpha=-1).squeeze(1)


def _smoothed(
    grid: torch.Tensor, at: torch.Tensor, mass: torch.Tensor, sigma: float
) -> torch.Tensor:
    """The sum of Gaussians of width ``sigma`` and masses ``mass`` at ``at``, on ``grid``
    (sorted). Each Gaussian is evaluated only at the grid points within :data:`_KERNEL_REACH`
    sigmas of its node: a trained network's nodes sit in a narrow bulk and a few outliers, so
    most (point, node) pairs of the full table lie far out in a tail, below rounding (the full
    table took 7-10x as long), and pairs are formed for :data:`_KERNEL_CHUNK` at most at once."""
    values = torch.zeros_like(grid)
    group = max(1, _KERNEL_CHUNK // len(grid))
    for i in range(0, len(at), group):
        nodes, masses = at[i : i + group], mass[i : i + group]
        first = torch.searchsorted(grid, nodes - _KERNEL_REACH * sigma)
        counts = torch.searchsorted(grid, nodes + _KERNEL_REACH * sigma, right=True) - first
        node = torch.repeat_interleave(counts)  # each pair's node, then its grid point:
        point = torch.arange(len(node)) + (first - counts.cumsum(0) + counts)[node]
        z = (grid[point] - nodes[node]) / sigma
        values.index_add_(0, point, z.square_().mul_(-0.5).exp_() * masses[node])
    return values / (sigma * math.sqrt(2 * math.pi))


def _grid(nodes: torch.Tensor, lo: float, hi: float, sigma: float) -> torch.Tensor:
    """Where the smoothed density is evaluated: :data:`GRID_POINTS` points from
    ``lo - 5 sigma`` to ``hi + 5 sigma``; where those lie farther apart than sigma / 4, the
    points within 8 sigma of a node (where its Gaussian falls to 1e-14 of its peak) are those
    of one lattice sigma / 4 apart instead. A width narrow beside the spread (a bulk beside
    outliers) is then drawn, and integrates to 1, on a grid that grows with the nodes, not with
    spread / sigma; one lattice, not one run of points per node, keeps the spacing even where
    nodes' neighbourhoods overlap (uneven points cost the trapezoid rule its accuracy)."""
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, GRID_POINTS, dtype=torch.float64)
    step = sigma / _POINTS_PER_SIGMA
    if (hi - lo + 10 * sigma) / (GRID_POINTS - 1) <= step:
        return grid
    reach = 8 * _POINTS_PER_SIGMA
    nodes = nodes.unique()  # sorted
    ticks = (nodes / step).round()[:, None] + torch.arange(-reach, reach + 1, dtype=torch.float64)
    near = ticks.unique() * step
    at = torch.searchsorted(nodes, grid).clamp(1, len(nodes) - 1) if len(nodes) > 1 else None
    gap = (
        torch.minimum((grid - nodes[at - 1]).abs(), (grid - nodes[at]).abs())
        if at is not None
        else (grid - nodes[0]).abs()
    )
    return torch.cat([grid[gap > 8 * sigma + step], near]).sort().values
