"""Spectral density by stochastic Lanczos quadrature, all probes advanced as one block."""

from __future__ import annotations

import math
import time

import torch

from hessian_cli.engine.linalg import gram, norms
from hessian_cli.engine.memory import shortfall
from hessian_cli.engine.operator import LinearOperator, probe_generator, rademacher
from hessian_cli.engine.precision import without_tf32
from hessian_cli.engine.results import DensityResult
from hessian_cli.errors import NotFinite, UserError

GRID_POINTS = 1000  # of the uniform grid over the whole spectrum
_POINTS_PER_SIGMA = 4  # at least, near every node: or a narrow Gaussian falls between points
_KERNEL_CHUNK = 2**22  # grid points x nodes evaluated at a time


def density_memory_need(op: LinearOperator, num_probes: int, steps: int) -> int:
    """Bytes the density holds at once: its Lanczos basis (``num_probes * steps`` vectors) and a
    few block vectors beside it."""
    rows = num_probes * (min(steps, op.n) + 5)
    return rows * op.n * torch.finfo(op.dtype).bits // 8


def check_density_memory(op: LinearOperator, num_probes: int, steps: int) -> None:
    """Refuse, in one sentence and before any product, a density whose basis cannot fit."""
    need = density_memory_need(op, num_probes, steps)
    short = shortfall(op, need)
    if short is None:
        return
    free, ranks = short
    each = f" on each of the {ranks} ranks on this machine" if ranks > 1 else ""
    raise UserError(
        f"the density's {num_probes:,} probes x {min(steps, op.n):,} Lanczos steps on "
        f"{op.n:,} parameters need {need / 2**30:.1f} GiB{each}, more than the "
        f"{free / 2**30:.1f} GiB free: give fewer --density-probes or --density-steps."
    )


@without_tf32
def spectral_density(
    op: LinearOperator,
    num_probes: int = 8,
    steps: int = 64,
    *,
    seed: int = 0,
    sigma: float | None = None,
) -> DensityResult:
    """SLQ: one Lanczos run per Rademacher probe, each step one block HVP for all probes.

    Each probe's tridiagonal matrix gives a Gauss quadrature rule (nodes, weights) for the
    spectral measure seen by that probe; averaging the rules estimates the density of
    eigenvalues, normalised to integrate to 1. Full reorthogonalisation keeps
    ``num_probes * steps`` vectors, trading memory for rules free of spurious copies.
    ``sigma`` is the width of the Gaussian that smooths each node (default 1% of the nodes'
    spread).
    """
    if num_probes < 1 or steps < 2:
        raise UserError(
            "The density needs at least one probe and two Lanczos steps (one step gives each "
            "probe a single node, its Rayleigh quotient)."
        )
    if sigma is not None and not 0 < sigma < math.inf:  # also refuses NaN
        raise UserError(f"The density's smoothing width must be a positive number, not {sigma}.")
    check_density_memory(op, num_probes, steps)
    start, hvps0 = time.perf_counter(), op.hvp_count
    steps = min(steps, op.n)
    gen = probe_generator(op, seed)
    v = rademacher((num_probes, op.n), generator=gen, dtype=op.dtype, device=op.device)
    v = v / norms(v)[:, None]
    alphas = torch.zeros(num_probes, steps, dtype=torch.float64)
    betas = torch.zeros(num_probes, steps, dtype=torch.float64)
    length = torch.full((num_probes,), steps, dtype=torch.long)
    active = torch.ones(num_probes, dtype=torch.bool)
    # The Lanczos vectors, filled in place: one [probes, steps, n] buffer, never re-stacked.
    basis = torch.empty(num_probes, steps, op.n, dtype=op.dtype, device=op.device)
    v_prev = torch.zeros_like(v)
    exhausted = max(1e-10, 100 * torch.finfo(op.dtype).eps)
    beta_prev = torch.zeros(num_probes, 1, dtype=op.dtype, device=op.device)
    for j in range(steps):
        basis[:, j] = v
        w = op.matmul(v)
        a = (w * v).sum(dim=1, keepdim=True)
        w = w - a * v - beta_prev * v_prev
        B = basis[:, : j + 1]  # [p, j+1, n]
        for _ in range(2):  # inner products in float64 pieces (gram): float32 dots drift
            coeffs = torch.cat([gram(w[p : p + 1], B[p]) for p in range(num_probes)])
            w = w - torch.einsum("pj,pjn->pn", coeffs.to(w.dtype), B)
        b = norms(w)[:, None]
        alphas[:, j] = a.squeeze(1).double().cpu()
        betas[:, j] = b.squeeze(1).double().cpu()
        if not (alphas[:, j].isfinite().all() and betas[:, j].isfinite().all()):
            raise NotFinite("The density's Hessian-vector products are not finite (NaN or inf).")
        # A probe whose Krylov space became invariant stops: its rule is already exact. What is
        # left of w then is rounding, relative to the operator's scale (its entries so far).
        size = torch.cat([alphas[:, : j + 1].abs(), betas[:, :j]], 1).max(dim=1).values
        done = active & (betas[:, j] <= exhausted * size.clamp_min(1e-300))
        length[done] = j + 1
        active &= ~done
        if not active.any():
            break
        scale = torch.where(active.to(op.device)[:, None], b, torch.ones_like(b))
        v_prev, v, beta_prev = v, torch.where(active.to(op.device)[:, None], w / scale, 0.0), b
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
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    spread = max(hi - lo, 1e-12 * max(abs(lo), abs(hi))) or 1.0  # 1.0: every node at 0
    sigma = sigma if sigma is not None else 0.01 * spread
    grid = _grid(nodes[used], lo, hi, sigma)
    values = torch.zeros_like(grid)
    at, mass = nodes[used], weights[used] / num_probes
    chunk = max(1, _KERNEL_CHUNK // at.numel())
    for i in range(0, len(grid), chunk):
        g = grid[i : i + chunk]
        kernel = torch.exp(-0.5 * ((g[:, None] - at[None, :]) / sigma) ** 2)
        values[i : i + chunk] = kernel @ mass / (sigma * math.sqrt(2 * math.pi))
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        values=values,
        sigma=sigma,
        num_probes=num_probes,
        steps=steps,
        hvps=op.hvp_count - hvps0,
        seconds=time.perf_counter() - start,
    )


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
