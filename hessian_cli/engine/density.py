"""Spectral density by stochastic Lanczos quadrature, all probes advanced as one block."""

from __future__ import annotations

import math
import time

import torch

from hessian_cli.engine.linalg import gram, norms
from hessian_cli.engine.operator import LinearOperator, probe_generator, rademacher
from hessian_cli.engine.precision import without_tf32
from hessian_cli.engine.results import DensityResult
from hessian_cli.errors import UserError

_MAX_GRID = 20_000  # grid points of the smoothed density at most (memory: probes x steps x grid)


@without_tf32
def spectral_density(
    op: LinearOperator,
    num_probes: int = 8,
    steps: int = 64,
    *,
    seed: int = 0,
    reorthogonalize: bool = True,
    grid_size: int = 1000,
    sigma: float | None = None,
) -> DensityResult:
    """SLQ: one Lanczos run per Rademacher probe, each step one block HVP for all probes.

    Each probe's tridiagonal matrix gives a Gauss quadrature rule (nodes, weights) for the
    spectral measure seen by that probe; averaging the rules estimates the density of
    eigenvalues, normalised to integrate to 1. Full reorthogonalisation (default) keeps
    ``num_probes * steps`` vectors, trading memory for rules free of spurious copies.
    """
    if num_probes < 1 or steps < 1:
        raise UserError("The density needs at least one probe and one Lanczos step.")
    if sigma is not None and not 0 < sigma < math.inf:  # also refuses NaN
        raise UserError(f"The density's smoothing width must be a positive number, not {sigma}.")
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
    basis = (
        torch.empty(num_probes, steps, op.n, dtype=op.dtype, device=op.device)
        if reorthogonalize
        else None
    )
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros(num_probes, 1, dtype=op.dtype, device=op.device)
    for j in range(steps):
        if basis is not None:
            basis[:, j] = v
        w = op.matmul(v)
        a = (w * v).sum(dim=1, keepdim=True)
        w = w - a * v - beta_prev * v_prev
        if basis is not None:
            B = basis[:, : j + 1]  # [p, j+1, n]
            for _ in range(2):  # inner products in float64 pieces (gram): float32 dots drift
                coeffs = torch.cat([gram(w[p : p + 1], B[p]) for p in range(num_probes)])
                w = w - torch.einsum("pj,pjn->pn", coeffs.to(w.dtype), B)
        b = norms(w)[:, None]
        alphas[:, j] = a.squeeze(1).double().cpu()
        betas[:, j] = b.squeeze(1).double().cpu()
        # A probe whose Krylov space became invariant stops: its rule is already exact.
        done = active & (
            betas[:, j] <= 1e-10 * alphas[:, : j + 1].abs().max(dim=1).values.clamp_min(1e-30)
        )
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
    spread = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = sigma if sigma is not None else 0.01 * spread
    # At least 4 grid points per sigma, or narrow Gaussians fall between points and the density
    # no longer integrates to 1.
    needed = math.ceil((hi - lo + 10 * sigma) / (sigma / 4)) + 1
    if needed > max(grid_size, _MAX_GRID):
        raise UserError(
            f"The density's smoothing width {sigma:.3g} is too narrow for eigenvalues spread over "
            f"{hi - lo:.3g} (it would take a grid of {needed:,} points); give at least "
            f"{4 * (hi - lo) / (_MAX_GRID - 42):.3g}."
        )
    grid_size = max(grid_size, needed)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - nodes[:, :, None]) / sigma) ** 2)
    values = (weights[:, :, None] * kernel).sum(dim=1).mean(dim=0) / (
        sigma * math.sqrt(2 * math.pi)
    )
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
