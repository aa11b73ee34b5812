"""Eigen-SAM's eigenvector refresh: the top Hessian eigenpair of one minibatch, by the engine.

The published method runs 5 power iterations every 100 steps. Power iteration converges to the
eigenvalue of largest *magnitude*, which early in training (or near a saddle) can be a large
negative one, and when the top eigenvalues are nearly tied its vector is far from ``v_1`` after
a few steps. The refresh instead asks the engine's block Krylov solver for the largest
*algebraic* eigenvalue (Rayleigh-Ritz keeps the most positive Ritz value, so a negative
eigenvalue is only returned when nothing positive was found), warm-started from the previous
vector, and reports the residual of what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hessian_cli.engine.batches import Batch, LossFn
from hessian_cli.engine.distributed import is_distributed
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.model_mode import (
    BNMode,
    holds_running_instance_statistics,
    scripted_running_norm,
)
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.params import ParamSpace
from hessian_cli.engine.results import EigenResult
from hessian_cli.engine.solver_plan import check_whole
from hessian_cli.errors import UserError

# The paper's 5 power steps cost 5 HVPs; 6 products here build a warm-started Krylov basis whose
# best Ritz vector is at least as good as the last power iterate (that iterate lies in the basis),
# and its residual comes from the kept products at no extra cost. The product design asks for the
# same work or less: 5 products lose that guarantee but not, measured, the advantage (mean |cos| to
# the minibatch Hessian's v1 of 0.944 and 0.933 on the digits MLP and CNN, against 0.857 and
# 0.811 for 5 power steps from the same vector, never worse in 78 refreshes), where 6 reach
# 0.952 and 0.998 (experiments/RESULTS.md "Refresh quality"); the 6th costs about 2.8
# gradient-equivalents, 1% of 100 SAM steps, so 6 stay. On the digits CNN with a refresh every
# 100 steps Eigen-SAM's step costs +11.4% over SAM (95% interval +4.3 to +18.5%,
# experiments/RESULTS.md "step-cost", 2026-11-30), near the 10% target: more products would
# pass it (a warm refresh of 6 is about 17 gradient-equivalents).
DEFAULT_MAX_HVPS = 6
DEFAULT_TOL = 1e-2
# The first refresh has nothing to continue from, and its vector is used for the next eig_every
# steps: 6 products from a cold start left |cos(v, v_1)| at 0.275 (residual 4e-2) for one of 8
# starts on a 53-parameter MLP with BatchNorm, where 10 gave 1.000 for all 8. So it may spend
# up to COLD_MAX_HVPS, once per run, and stops at the tolerance like any refresh.
COLD_MAX_HVPS = 20


@dataclass
class RefreshResult:
    """The refreshed pair. ``eigenvalue <= 0`` means no positive curvature was found: the
    caller keeps the vector but must flag it (see ``EigenSAM.negative_refreshes``).

    ``vector`` is unit, flat over the given parameters in their order (zero on parameters that
    do not require gradients); ``residual`` is the true ``||H v - lambda v||`` of that vector
    (from the kept products) relative to ``|lambda|`` (:func:`top_residual`), ``converged`` is
    ``residual <= tol``: an eigenpair to that residual, which a warm refresh cannot certify as
    the top one (its budget leaves no products for the engine's look for a skipped larger
    eigenvalue: ``check_hvps`` 0; on the digits MLP 1 of 39 converged at lambda_2).
    """

    eigenvalue: float
    vector: torch.Tensor
    residual: float
    converged: bool
    hvps: int


def top_residual(res: EigenResult) -> float:
    """The top pair's ``||H v - lambda v||`` relative to ``|lambda|`` (the product design's
    ``|lambda_max|``), where the solver's is relative to the largest ``|Ritz value|`` it saw:
    with an eigenvalue of -30 below a lambda_1 of 1, refreshes 0.14 to 0.25 off (relative to
    lambda_1, |cos| 0.05 to 0.97 to v_1) passed as 5e-3 to 8e-3, converged."""
    eigenvalue = abs(float(res.eigenvalues[0]))
    residual = float(res.residuals[0]) * res.scale
    return residual / eigenvalue if eigenvalue > 0 else math.inf


def held_to_own_eigenvalue(
    op: HessianOperator,
    res: EigenResult,
    *,
    tol: float,
    max_hvps: int,
    seed: int,
    block_size: int | None = None,
) -> tuple[EigenResult, int]:
    """``res`` (the top pair of ``op`` by :func:`eigenpairs`) taken on to ``tol`` relative to
    its own eigenvalue (:func:`top_residual`) within ``max_hvps``, and the products of both.

    The solve's residual is relative to the largest |Ritz value| it saw: under a larger negative
    eigenvalue it stopped "converged" short of that, with products left (a warm refresh 3 of 6,
    0.12 off; tracking 19 of 200, 1.03e-3 for 1e-3), and train's end said it had spent its
    budget. It goes on from its vector, held to its eigenvalue's share of that scale; its look
    for a skipped eigenvalue was made (where there was room), so none is taken again."""
    hvps = res.hvps
    if res.stop_reason == "converged" and tol < top_residual(res) < math.inf and hvps < max_hvps:
        res = eigenpairs(
            op,
            1,
            which="largest",
            tol=tol * abs(float(res.eigenvalues[0])) / res.scale,
            block_size=block_size,
            max_hvps=max_hvps - hvps,
            init=res.eigenvectors,
            seed=seed,
            check_steps=0,
        )
        hvps += res.hvps
    return res, hvps


def batchnorm_mode(model: nn.Module) -> BNMode:
    """How the model's BatchNorm layers (and InstanceNorm layers that keep running statistics)
    normalise now: by batch statistics in training mode, by running ones in eval mode, also
    under ``model.train()`` (fine-tuning with frozen statistics: taken by ``model.training`` for
    batch statistics, a refresh found lambda_1 2.94, |cos| 0.28 to v_1, of a loss whose lambda_1
    was 1.90). The operator takes all of them in one mode, so layers in both are refused, and
    batch statistics for a TorchScript layer, which cannot normalise by them without updating
    its statistics (the engine's refusal named an option of `analyze`; an InstanceNorm layer's
    met it at the first refresh, the run directory left behind)."""
    modes = {
        m.training
        for m in model.modules()
        if isinstance(m, _BatchNorm) or holds_running_instance_statistics(m)
    }
    if len(modes) > 1:
        raise UserError(
            "the model has BatchNorm (or InstanceNorm) layers in training mode and others in "
            "eval mode: the eigenvector refresh takes them all in one mode (batch or running "
            "statistics)."
        )
    # None found (a scripted model's are not nn.BatchNorm): the model's own mode says.
    training = modes.pop() if modes else model.training
    if training and any(scripted_running_norm(m) for m in model.modules()):
        raise UserError(
            "Eigen-SAM's eigenvector refresh takes BatchNorm (and InstanceNorm) layers in "
            "training mode by their batch statistics without updating them, which a TorchScript "
            "module's cannot do: train the eager model, or with SAM."
        )
    return "train" if training else "eval"


def refresh_top_eigenvector(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Sequence[torch.Tensor],
    v_prev: torch.Tensor | None,
    *,
    max_hvps: int | None = None,
    tol: float = DEFAULT_TOL,
    seed: int,
    hint: torch.Tensor | None = None,
    batch_weight: Callable[[torch.Tensor], float] | None = None,
) -> RefreshResult:
    """Top eigenpair of the Hessian of ``loss_fn(model(x), y)`` on ``batch`` w.r.t. ``params``.

    ``max_hvps`` (>= 1) bounds the Hessian-vector products (default: DEFAULT_MAX_HVPS
    warm-started from ``v_prev``, COLD_MAX_HVPS without it). ``hint`` (e.g. the minibatch
    gradient, which leans toward v_1) guides the start where there is no ``v_prev``.
    BatchNorm layers normalise as in the loss SAM perturbs, whose Hessian is the one that
    matters (:func:`batchnorm_mode`); no buffer is updated and dropout is off, so every product
    applies the same matrix. An enclosing autocast does not apply (the engine's products are in
    the model's dtype). The weights' ``.grad`` is not touched.
    """
    if max_hvps is None:
        max_hvps = DEFAULT_MAX_HVPS if v_prev is not None else COLD_MAX_HVPS
    # "5" failed in the comparison, a TypeError naming nothing; 0 said it as no sentence.
    check_whole("`max_hvps`", max_hvps)
    if max_hvps < 1:
        raise UserError(f"`max_hvps` must be at least 1, not {max_hvps}.")
    names = {id(p): name for name, p in model.named_parameters()}
    if any(id(p) not in names for p in params):
        raise ValueError("every optimised parameter must be a parameter of the model")
    # Frozen parameters have no curvature to find; their entries of the vector stay zero.
    mask = torch.cat([torch.full((p.numel(),), p.requires_grad, dtype=torch.bool) for p in params])
    live = [p for p in params if p.requires_grad]
    if not live:
        raise ValueError("none of the optimised parameters requires gradients")
    space = ParamSpace(names=tuple(names[id(p)] for p in live), tensors=tuple(live))
    # Under torchrun a rank's share of the minibatch that holds nothing the loss averages over
    # (padding only) weighs nothing in the global mean: that rank holds no batch.
    empty = batch_weight is not None and is_distributed() and not batch_weight(batch[1])
    op = HessianOperator(
        model,
        loss_fn,
        [] if empty else [batch],
        params=space,
        bn=batchnorm_mode(model),
        batch_weight=batch_weight,
    )
    # A previous vector that is zero on the live parameters starts nothing: eigenpairs then
    # starts at random.
    init = None if v_prev is None else v_prev.reshape(-1)[mask.to(v_prev.device)]
    res = eigenpairs(
        op,
        1,
        which="largest",
        tol=tol,
        block_size=1,
        max_hvps=max_hvps,
        init=init,
        hint=None if hint is None else hint.reshape(-1)[mask.to(hint.device)],
        seed=seed,
    )
    res, hvps = held_to_own_eigenvalue(op, res, tol=tol, max_hvps=max_hvps, seed=seed, block_size=1)
    residual = top_residual(res)
    vector = torch.zeros(mask.numel(), dtype=space.dtype, device=space.device)
    vector[mask.to(space.device)] = res.eigenvectors[0]
    return RefreshResult(
        eigenvalue=float(res.eigenvalues[0]),
        vector=vector,
        residual=residual,
        converged=bool(res.converged[0]) and residual <= tol,
        hvps=hvps,
    )
