"""Eigenpairs an analysis has already found, taken out of the random estimators' work exactly."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessian_cli.engine.linalg import gram
from hessian_cli.engine.linear_operator import LinearOperator
from hessian_cli.engine.results import EigenResult
from hessian_cli.errors import UserError, a_type

# Known eigenvectors serve while they are orthonormal to this (largest entry of their Gram
# matrix minus the identity). A departure e changes what they leave to the random part only by
# terms of order lambda * e^2 and e * ||residual||: one solve's vectors are orthonormal to about
# 1e-7, the two ends of `which="both"` (two solves) to their residuals, 5-7e-5 at the default
# tolerance on the example checkpoints.
ORTHONORMAL_TOL = 1e-4


class Deflation(NamedTuple):
    """The known eigenpairs that serve: ``vectors`` ``[k, n]`` (orthonormal rows, the operator's
    dtype and device), ``values`` ``[k]`` (float64, their Rayleigh quotients), and how many of
    them are of the largest end (``largest``)."""

    vectors: torch.Tensor
    values: torch.Tensor
    largest: int


def deflation(op: LinearOperator, known: EigenResult | None) -> Deflation:
    """The pairs of ``known`` (an :func:`eigenpairs` result of ``op``, for the same weights) that
    serve: the converged ones (an unconverged one may be far from any eigenvector), as many of
    them, in order, as are orthonormal to :data:`ORTHONORMAL_TOL` (all of one solve's; of
    ``which="both"``'s, those of the second end orthogonal enough to the first's). None without
    ``known``."""
    if known is None:
        empty = torch.empty(0, op.n, dtype=op.dtype, device=op.device)
        return Deflation(empty, torch.empty(0, dtype=torch.float64), 0)
    # torch.linalg.eigh's (values, vectors), its columns, failed in .eigenvectors.
    if not isinstance(known, EigenResult):
        raise UserError(
            f"`known` must be the EigenResult of eigenpairs() on this operator, not "
            f"{a_type(known)}."
        )
    V, values = known.eigenvectors, known.eigenvalues
    if V.ndim != 2 or V.shape != (len(values), op.n):
        raise UserError(
            f"the known eigenpairs are {len(values)} values and vectors of shape "
            f"{tuple(V.shape)}: they must be eigenpairs of this operator, [k] and [k, {op.n}]."
        )
    ends = {"largest": len(values), "both": len(values) // 2}  # `both`: largest first
    largest = torch.arange(len(values)) < ends.get(known.which, 0)
    converged = known.converged.cpu()
    if not bool(converged.all()):  # (a mask copies the vectors: not where all serve)
        V, values, largest = V[converged.to(V.device)], values[converged], largest[converged]
    departure = (gram(V, V) - torch.eye(len(V), dtype=torch.float64, device=V.device)).abs()
    bad = (departure > ORTHONORMAL_TOL).cpu().tril().any(dim=1)  # row i against rows <= i
    k = int(bad.int().argmax()) if bool(bad.any()) else len(V)
    return Deflation(
        V[:k].to(device=op.device, dtype=op.dtype),
        values[:k].double().cpu(),
        int(largest[:k].sum()),
    )
