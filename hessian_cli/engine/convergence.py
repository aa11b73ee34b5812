"""How close the eigensolver's Ritz pairs are to the matrix's: each eigenvalue's error bound
from its residual and the gaps to the other Ritz values, the rounding noise the products add
to it, and which pairs those make converged. Plain arithmetic on residual norms and Ritz values,
apart from the iteration that produces them, so that the bounds a result reports can be read
(and tested) on their own.
"""

from __future__ import annotations

import math

import torch


def claimed_gaps(theta: torch.Tensor, rnorm: torch.Tensor) -> torch.Tensor:
    """How far from each Ritz value ``theta[i]`` (of the first ``len(rnorm)``, ordered outward-in)
    the bound ``rnorm[i]**2 / gap`` takes the matrix to have no other eigenvalue: the distance
    to the nearest other Ritz value less that one's residual; 0 (none claimed) for the last,
    whose inner neighbour is unknown."""
    w = len(rnorm)
    theta = theta[:w].to(rnorm)
    others = (theta[:, None] - theta[None, :]).abs() - rnorm[None, :]
    others.fill_diagonal_(float("inf"))
    gap = others.min(dim=1).values.clamp_min(0)
    gap[w - 1 :] = 0
    return gap


def eigenvalue_error_bounds(
    theta: torch.Tensor,
    rnorm: torch.Tensor,
    noise: float = 0.0,
    *,
    lacking: float = -math.inf,
    searched: float = -math.inf,
    sign: float = 1.0,
) -> torch.Tensor:
    """How far each Ritz value ``theta[i]`` may be from its eigenvalue, given the residual norms.

    An eigenvalue lies within ``rnorm[i]`` of ``theta[i]`` (Weyl), and within
    ``rnorm[i]**2 / gap`` when no other eigenvalue is within ``gap`` of ``theta[i]`` (Kato and
    Temple; Parlett, The Symmetric Eigenvalue Problem, 11.7). The gap is estimated from the
    other Ritz values, each widened by its own residual: ``theta`` must be ordered outward-in
    (most wanted first), and the last value, whose inner neighbour is unknown, keeps the
    residual. Like any Krylov convergence test, this assumes the space has not missed an
    eigenvalue beyond the one it approximates, nor one inside the gap toward the middle:
    ``lacking`` is the most wanted eigenvalue (times ``sign``, 1 for the largest) seen outside
    the space (by the eigensolver's check for a skipped eigenvalue), and a pair whose gap
    reaches past it keeps the residual; one it lies beyond, the residual and the distance to it.
    ``searched`` is how far inward that check vouches for what the space left out (the value
    it saw plus its Ritz vector's residual): a gap reaching past it keeps the residual too,
    since an eigenvalue the check did not reach may lie inside it (0.999747 and 0.999699 above
    a bulk below 0.99, top-1 at tol 1e-4: 19 of 20 bounds were below the true error, up to 125
    times, the check's six steps having seen 0.94-0.97).

    Residuals computed from rounded products are those of a nearby matrix ``H + E``, whose
    eigenvalues differ from ``H``'s by up to the size of ``E``: ``noise``, an estimate of it
    (the asymmetry of the projected matrix), is added, so that no bound claims more than the
    products' rounding allows (float32: about 1e-7 of |lambda_max|, where rnorm^2 / gap alone
    said 1e-13).
    """
    gap = claimed_gaps(theta, rnorm)
    out = sign * theta[: len(rnorm)].to(rnorm)  # outward first
    free = (gap > rnorm) & (out - gap >= max(lacking, searched))
    sharper = rnorm * rnorm / gap.clamp_min(torch.finfo(gap.dtype).tiny)
    bounds = torch.where(free, sharper, rnorm)
    # An eigenvalue seen outside the space beyond theta[i] is one of the i most wanted: the i-th
    # may then lie as far out as it or the (i-1)-th, whichever is nearer, not within rnorm[i]
    # of theta[i] (its Weyl bound is to some eigenvalue, not necessarily the i-th).
    # Where the check did not search past theta[i], one may lie out to what it searched: top-3
    # and top-5 of 150 values uniform in [0, 1] at tol 1e-2 had bounds below the true error in
    # 8 of 24 solves, the pair an eigenvalue inside a skipped one; 4 then, none since the check
    # takes LOOSE_CHECK times its steps there. The (i-1)-th lies within its own bound of
    # theta[i - 1], not at it: the 5 smallest of 150 values u^4 at tol 1e-2 had the 4th pair
    # at 0.00326 with a residual of 0.0088, and the 5th, 0.00491, "within 0.0043" of the 5th
    # eigenvalue, 3.8e-7, when its bound reached only to theta[i - 1].
    # Nor has it searched inside a later pair whose residual reaches out past theta[i]: an
    # eigenvalue the space holds only in part, there, is one the check cannot see (its
    # direction is partly in the pairs') and may be one of the i most wanted: the smallest 5 of
    # a bulk in [0, 1] below 5.0 six times at tol 1e-2 had 0.0118 (the 2nd) "within 0.0028" of
    # the 1st, 0.0045, inside the 2nd pair's 0.0127 +- 0.043, the check having seen 0.039.
    later = out + rnorm if searched > -math.inf else torch.full_like(out, -math.inf)
    later = torch.cat([later, later.new_full((1,), -math.inf)]).flip(0).cummax(0).values
    outside = later.flip(0)[1:]  # how far out the pairs after each may reach
    reach = max(lacking, searched)
    if reach > -math.inf:
        edge = math.inf  # how far out the eigenvalue of the pair before may lie
        for i in range(len(out)):
            if not free[i]:
                bounds[i] += max(0.0, min(edge, max(reach, float(outside[i]))) - float(out[i]))
            edge = float(out[i] + bounds[i]) + noise
    return bounds + noise


def rounding_noise(asymmetry: float, scale: float, n: int) -> float:
    """How far rounding may move an eigenvalue of the projected matrix: the products' own error
    (their asymmetry), and at least the float64 rounding of inner products of length ``n``
    (float64 bounds of 4e-16 were seen 22 times too tight without it)."""
    return asymmetry + torch.finfo(torch.float64).eps * scale * math.sqrt(n)


def residual_floor(noise: float, scale: float, dtype: torch.dtype) -> float:
    """How far (relative to ``scale``) a residual computed from rounded products may lie below
    the true one: the products' rounding ``noise`` and the rounding of a residual held in
    ``dtype``, as :func:`relative_errors` adds them to an eigenvalue's bound. Without it float32
    tops met tol 3e-7 with computed residuals of 0.5 tol and true ones of 1.2-1.5 tol (the
    digits CNN)."""
    return noise / scale + torch.finfo(dtype).eps


def relative_errors(
    theta: torch.Tensor,
    rnorm: torch.Tensor,
    noise: float,
    dtype: torch.dtype,
    *,
    gaps: bool = True,
    lacking: float = -math.inf,
    searched: float = -math.inf,
    sign: float = 1.0,
    scale: float = 0.0,
) -> torch.Tensor:
    """:func:`eigenvalue_error_bounds` (without ``gaps``, the residuals alone) relative to the
    eigenvalues (``|lambda| >= |theta| - bound``), plus the rounding of a value held in
    ``dtype``; infinite where the eigenvalue may be zero.

    Products rounded in ``dtype`` are those of a matrix up to about its rounding of ``scale``
    (the largest eigenvalue's size) away, as :func:`residual_floor` allows for a residual, which
    the asymmetry in ``noise`` may not show: a float32 tanh MLP's third eigenvalue was 1.9e-7
    off for a bound of 1.7e-7 (3 of 96 such bounds, up to 1.37 times, before it was added)."""
    bounds = (
        eigenvalue_error_bounds(theta, rnorm, noise, lacking=lacking, searched=searched, sign=sign)
        if gaps
        else rnorm + noise
    ) + torch.finfo(dtype).eps * scale
    size = theta.to(bounds).abs() - bounds
    return torch.where(size > 0, bounds / size + torch.finfo(dtype).eps, torch.inf)


def converged_pairs(
    criterion: str,
    residuals: torch.Tensor,
    errors: torch.Tensor,
    tol: float,
    *,
    krylov: bool,
    floor: float = 0.0,
) -> torch.Tensor:
    """Which pairs meet ``tol`` (``residuals`` relative to the scale, each held to ``tol`` less
    their :func:`residual_floor` ``floor``), in order from the most wanted: by the criterion's
    measure, and by the residual where the eigenvalue criterion has no relative error.

    Of a Krylov solve only a leading run counts: a pair behind one that has not converged is an
    accurate eigenpair but perhaps not the i-th, since the space may not hold the eigenvalues
    between yet (the 10 smallest of 10 * 0.8^i: pair 9 "converged" at the 40th smallest, 85
    times the tolerance away, pairs 1-8 not). A whole-space solve has every eigenvalue.
    """
    if criterion == "residual":
        met = residuals + floor <= tol
    else:
        met = (errors <= tol) | (errors.isinf() & (residuals + floor <= tol))
    return met.long().cumprod(0).bool() if krylov else met
