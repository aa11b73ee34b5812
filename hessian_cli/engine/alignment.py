"""SAM-alignment scores: how well the gradient and SAM's perturbation see the top curvature.

Definitions: ``g_hat = g/||g||``, ``v_1..v_k`` unit top eigenvectors.
``alignment[i] = |<g_hat, v_i>|``, ``subspace_alignment = ||V_k^T g_hat||``,
``curvature_ratio = g_hat^T H g_hat / lambda_1``, Eigen-SAM direction
``d = g_hat + alpha * sign(<g, v_1>) * (v_1 - <g_hat, v_1> g_hat)`` with
``eigensam_alignment = |<d/||d||, v_1>|``, and ``sam_sharpness = L(w + rho g_hat) - L(w)``.
Where a score is undefined it is NaN, and the analysis goes on: every score of ``g_hat`` where
the gradient is exactly zero (a fitted model: the eigenpairs still mean something), and the
curvature ratio where ``lambda_1 <= 0`` (then ``g_hat^T H g_hat / lambda_1 >= 1``, which would
read as better than perfectly aligned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch

from hessian_cli.engine.linalg import all_finite, dot, gram, norms
from hessian_cli.engine.linear_operator import described
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.results import EigenResult
from hessian_cli.errors import NotFinite, UserError, a_type, is_number, shown


@dataclass
class AlignmentResult:
    alignment: torch.Tensor  # [k]
    subspace_alignment: float
    curvature_ratio: float  # NaN where lambda_1 <= 0: undefined
    eigensam_alignment: float
    sam_sharpness: float
    grad_norm: float
    loss: float
    rho: float
    alpha: float
    # [M, k]: alignment of each of the first M batch gradients (NaN for one that is zero)
    minibatch_alignment: torch.Tensor
    hvps: int

    @property
    def _defined(self) -> torch.Tensor:
        m = self.minibatch_alignment
        return m[~m.isnan().any(1)]

    @property
    def minibatch_mean(self) -> torch.Tensor:
        """Over the batches whose gradient is not zero (NaN where there is none)."""
        return self._defined.mean(0)

    @property
    def minibatch_std(self) -> torch.Tensor:
        """The sample standard deviation (over M - 1): NaN for fewer than two batches."""
        m = self._defined
        return m.std(0) if m.shape[0] > 1 else torch.full((m.shape[1],), math.nan, dtype=m.dtype)


def eigensam_direction(
    g: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    *,
    g_norm: torch.Tensor | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """Eigen-SAM's unnormalised perturbation direction ``d`` (see the module); ``alpha=0`` is SAM's.

    It runs at every training step: two reductions (|g| as SAM takes it, so that ``alpha=0``
    stays SAM bit for bit, and ``<g, v>``), where three cost a 5,130-parameter CNN 3% of a SAM
    step; a caller that has ``g_norm`` (``norms(g)``) already saves the first. Its vectors are
    formed in place, two at most besides ``g`` and ``v`` (one with ``overwrite``, which turns
    ``g``, a copy the caller no longer needs, into ``d``): a model's size each, in the step's
    peak memory. The same operations in the same order as written out, so the same bits.
    """
    size = norms(g) if g_norm is None else g_norm
    gv = dot(g, v)
    g_hat = g.div_(size) if overwrite else g / size
    c = (gv / size).to(g.dtype)
    w = torch.mul(g_hat, c).neg_().add_(v)  # v - c g_hat
    return g_hat.add_(w.mul_(alpha * torch.sign(gv).to(g.dtype)))


def _check_operands(
    op: object, eigenvectors: object, gradient: object, minibatch_op: object
) -> None:
    """Refuse, before any work, what the scores cannot be taken with: a MatrixOperator (it
    has no loss) failed in an AttributeError, eigenvectors as a numpy array in torch's
    promote_types, a gradient of other parameters in a matrix product or, zero, as scores of
    NaN, and a ``minibatch_op`` of other parameters in one."""
    if not isinstance(op, HessianOperator):
        raise UserError(
            f"alignment_scores takes a HessianOperator (the scores need its loss and gradient), "
            f"not {a_type(op)}."
        )
    if not isinstance(eigenvectors, torch.Tensor):
        raise UserError(
            f"alignment_scores takes the eigenvectors as a tensor, [k, {op.n}], not "
            f"{described(eigenvectors)}."
        )
    if gradient is not None and not (
        isinstance(gradient, tuple)
        and len(gradient) == 2
        and is_number(gradient[0])
        and isinstance(gradient[1], torch.Tensor)
        and gradient[1].shape == (op.n,)
    ):
        got = (
            f"({', '.join(described(part) for part in gradient)})"
            if isinstance(gradient, tuple)
            else described(gradient)
        )
        raise UserError(
            f"alignment_scores takes the gradient as op.gradient() gives it, (loss, a vector of "
            f"{op.n} entries), not {got}."
        )
    if minibatch_op is not None and not (
        isinstance(minibatch_op, HessianOperator) and minibatch_op.n == op.n
    ):
        got = f"one of {minibatch_op.n}" if isinstance(minibatch_op, HessianOperator) else None
        raise UserError(
            f"alignment_scores takes a minibatch_op of the same {op.n} parameters as op, not "
            f"{got or a_type(minibatch_op)}."
        )


def alignment_scores(
    op: HessianOperator,
    eigenvalues: torch.Tensor | EigenResult,
    eigenvectors: torch.Tensor | None = None,
    *,
    rho: float = 0.05,
    alpha: float = 0.2,
    minibatches: int = 8,
    gradient: tuple[float, torch.Tensor] | None = None,
    minibatch_op: HessianOperator | None = None,
) -> AlignmentResult:
    """All alignment scores of the analysed loss, for top eigenpairs ``(lambda_i, v_i)``.

    The minibatch statistics take the first ``minibatches`` batches of ``minibatch_op`` (default
    ``op``): an operator over more of the data than the Hessian's, whose gradients alone are used.
    Costs one gradient pass (none when the caller passes the ``(loss, gradient)`` it already
    has), one HVP (curvature ratio), one loss evaluation and up to ``minibatches`` per-batch
    gradients (none for ``minibatches=0``). The pairs are the largest, largest first (an
    :class:`EigenResult` of ``which="largest"``, which may be given for both, as
    ``alignment_scores(op, top)``): the ratio and Eigen-SAM's direction take the first as
    ``(lambda_1, v_1)``.
    """
    # alignment_scores(op, top), as stochastic_trace takes known=top, failed in a TypeError
    # (a missing argument) or, with top.eigenvectors beside it, in torch.as_tensor.
    if isinstance(eigenvalues, EigenResult):
        if eigenvectors is not None:
            raise UserError(
                "alignment_scores takes an EigenResult or its eigenvalues and eigenvectors, "
                "not both."
            )
        eigenvalues, eigenvectors = eigenvalues.eigenvalues, eigenvalues.eigenvectors
    elif eigenvectors is None:
        raise UserError(
            "alignment_scores takes the eigenvectors beside the eigenvalues (or an EigenResult, "
            "which holds both)."
        )
    # As the CLI's options: a negative rho measured a descent step (sam_sharpness -0.022 where
    # +0.023), a negative alpha tilted d away from v_1, a negative count took no batch at all.
    # A string ("0.05" from a config file) failed in math.isfinite, a TypeError naming neither.
    for name, value in (("rho", rho), ("alpha", alpha)):
        if not (is_number(value) and math.isfinite(value) and value >= 0):
            raise UserError(f"alignment_scores takes {name} of at least 0, not {shown(value)}.")
    # 2.5 failed in a slice after the gradient and a product were spent, True took one batch.
    if isinstance(minibatches, bool) or not isinstance(minibatches, Integral):
        raise UserError(
            f"alignment_scores takes a whole number of minibatches, not {minibatches!r}."
        )
    if minibatches < 0:
        raise UserError(f"alignment_scores takes minibatches of at least 0, not {minibatches}.")
    _check_operands(op, eigenvectors, gradient, minibatch_op)
    values = torch.as_tensor(eigenvalues).double().cpu()
    if values.ndim != 1 or len(values) == 0 or len(values) != len(eigenvectors):
        raise UserError("alignment_scores takes one eigenvector per eigenvalue, at least one.")
    # Vectors of another operator (other `params`, another model) failed in a matrix product.
    if eigenvectors.ndim != 2 or eigenvectors.shape[1] != op.n:
        raise UserError(
            f"the eigenvectors have shape {tuple(eigenvectors.shape)}: alignment_scores takes "
            f"eigenvectors of this operator, [k, {op.n}]."
        )
    # Beyond rounding, pair by pair: near-tied top eigenvalues (a float32 solve's) may rise by
    # 1e-7 of their size; the rise of a bottom end near 0 is far more of its own.
    rise = values[1:] - values[:-1]
    if bool((rise > 1e-5 * torch.maximum(values[1:].abs(), values[:-1].abs())).any()):
        raise UserError(
            "alignment_scores takes the largest eigenpairs, largest first (`which=largest`); "
            "these are in another order (the smallest, or both ends)."
        )
    # A zero or NaN vector (or a NaN value) gave scores of NaN, said of no input: with v_1, all.
    lengths = norms(eigenvectors)
    if not (all_finite(values) and all_finite(lengths) and bool((lengths > 0).all())):
        raise UserError(
            "alignment_scores takes finite eigenvalues and eigenvectors that are finite and not "
            "zero, as eigenpairs() gives them."
        )
    V = eigenvectors / lengths[:, None]
    loss, g = gradient if gradient is not None else op.gradient()
    gnorm = float(norms(g))
    hvps0 = op.hvp_count
    if gnorm > 0:
        g_hat = g / gnorm
        coeffs = gram(V, g_hat[None])[:, 0].to(V.dtype)
        curvature = float(dot(g_hat, op.matmul(g_hat)))
        d = eigensam_direction(g, V[0], alpha)
        eigensam = float(dot(d / norms(d), V[0]).abs())
        try:
            sharp = op.loss_at(rho * g_hat) - loss
        except NotFinite:  # a rho so large that the loss overflows at w + e: undefined there
            sharp = math.nan
    else:  # no direction to align: the scores of g_hat are undefined
        coeffs = V.new_full((V.shape[0],), math.nan)
        curvature = eigensam = sharp = math.nan
    top = float(eigenvalues[0])
    mb_op = op if minibatch_op is None else minibatch_op
    # Each row: the minibatch's loss, then its scores (gathered together: a loss that is not
    # finite on one rank's share is then seen by every rank).
    mb = [
        torch.cat(
            [
                V.new_tensor([mb_loss]),
                (gram(V, gb[None])[:, 0].abs() / (float(norms(gb)) or math.nan)).to(V.dtype),
            ]
        )
        for mb_loss, gb in mb_op.batch_gradients(minibatches)
    ]
    local = torch.stack(mb) if mb else V.new_zeros(0, V.shape[0] + 1)
    rows = mb_op.gather_batch_rows(local.cpu())
    mb_op.check_losses(rows[:, 0])
    minibatch = rows[:, 1:]
    return AlignmentResult(
        alignment=coeffs.abs().cpu(),
        subspace_alignment=float(coeffs.norm()),
        curvature_ratio=curvature / top if top > 0 else math.nan,
        eigensam_alignment=eigensam,
        sam_sharpness=sharp,
        grad_norm=gnorm,
        loss=loss,
        rho=rho,
        alpha=alpha,
        minibatch_alignment=minibatch,
        hvps=op.hvp_count - hvps0,
    )
