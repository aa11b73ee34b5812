"""Result types of the solvers: numbers together with how they were obtained and how converged."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hessian_cli.engine.solver_plan import check_whole
from hessian_cli.errors import UserError


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator, ordered as asked (``which``).

    ``residuals[i] = ||H v_i - lambda_i v_i|| / scale`` where ``scale`` estimates ``|lambda_max|``
    (the largest Ritz value in magnitude); ``errors[i]`` bounds the relative error of
    ``lambda_i``, ``|lambda_i - eigenvalue| / |eigenvalue|`` (from the residual, and much less
    once the eigenvalue is separated from the others; for a pair that has not converged, from
    the residual alone, and to the nearest eigenvalue, which need not be the i-th). Pair ``i``
    is converged when the one named by ``criterion`` is ``<= tol`` (for ``eigenvalue``, an
    eigenvalue that may be zero, whose relative error is infinite, by its residual).

    ``eigenvalues``, ``residuals``, ``errors`` (float64) and ``converged`` (bool) are ``[k]`` on
    the CPU; ``eigenvectors`` is ``[k, n]`` (row ``i`` is ``v_i``, unit length) in the operator's
    dtype and on its device (``op.space.unflatten(v)`` splits a row per parameter). The repr
    leaves the vectors out.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    errors: torch.Tensor
    converged: torch.Tensor
    eigenvectors: torch.Tensor = field(repr=False)
    which: str
    tol: float
    criterion: str
    scale: float
    hvps: int
    iterations: int
    seconds: float
    block_size: int
    # Pairs converged beyond the k returned, so that none of them was skipped (eigensolver).
    guard: int = 0
    # Why the iteration ended: converged, stalled (residuals stopped improving: the tolerance is
    # below the products' rounding noise), slow (they stopped improving far above that noise:
    # crowded eigenvalues), unverified (the iteration's residuals met the
    # tolerance, the fresh full-precision products did not), budget (max_hvps spent) or
    # exhausted (Krylov space invariant or as large as the space).
    stop_reason: str = "converged"
    # block-krylov-thick-restart, or whole-space: every column of the matrix and its dense
    # eigendecomposition, where the Krylov basis would hold half the space or more.
    method: str = "block-krylov-thick-restart"
    # Products spent looking, once the pairs had converged, for an eigenvalue the iteration
    # skipped (0: not looked, e.g. the budget left no room), and how many such were found (and
    # then converged with the others).
    check_hvps: int = 0
    skipped_found: int = 0
    # Pairs converged, but the look was due (a Krylov solve, check_steps > 0) and the budget
    # left too few products for it: nothing vouches that the space skipped no eigenvalue, and
    # no bound takes a gap.
    unchecked: bool = False
    # How far below the true residuals (relative to ``scale``) the computed ones may lie, from
    # the products' rounding: a pair meets ``tol`` only with its residual plus this.
    floor: float = 0.0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass
class TraceResult:
    """A stochastic trace estimate with its standard error: ``estimate = sketch_trace +
    mean(samples)`` (Hutch++'s exact part of the sketch, 0 for Hutchinson, and the random part,
    whose spread alone is the standard error)."""

    estimate: float
    stderr: float
    num_probes: int
    method: str
    hvps: int
    seconds: float
    samples: torch.Tensor = field(repr=False)
    sketch_trace: float = 0.0
    # Known eigenpairs whose vectors began Hutch++'s sketch (their eigenvalues are part of
    # sketch_trace, at no product).
    known: int = 0


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature: per-probe nodes and weights, and a smoothed density.

    ``nodes[p]``/``weights[p]`` are the Gauss quadrature rule of probe ``p`` (weights of padded
    entries are zero), followed by the ``known`` eigenvalues taken out of it exactly (weight
    ``1/n`` each); ``values`` is the Gaussian-smoothed density on ``grid``, integrating to 1.
    """

    nodes: torch.Tensor = field(repr=False)
    weights: torch.Tensor = field(repr=False)
    grid: torch.Tensor = field(repr=False)
    values: torch.Tensor = field(repr=False)
    sigma: float
    num_probes: int
    steps: int
    hvps: int
    seconds: float
    known: int = 0  # eigenpairs of the same analysis taken out of the Lanczos runs

    def moment(self, order: int) -> float:
        """Estimate of ``trace(H^order) / n`` from the quadrature rules. A fractional power of a
        negative node is NaN (2.5 gave it, unsaid), and a negative one is dominated by the
        nodes nearest 0, which a Hessian's Lanczos rules place anywhere near it."""
        check_whole("`order`", order)
        if order < 0:
            raise UserError(f"`order` must be at least 0, not {order}.")
        return float((self.weights * self.nodes**order).sum(dim=1).mean())
