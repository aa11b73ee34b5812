"""The dense oracle: the exact Hessian of a tiny model and its eigendecomposition.

Built with ``torch.autograd.functional.hessian`` over the flat parameter vector, independently of
the operator's HVP code, so that tests compare two different derivations of the same matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from hessian_cli.engine.batches import Batch, LossFn
from hessian_cli.engine.inputs import run_model
from hessian_cli.engine.memory import require_room
from hessian_cli.engine.model_mode import BNMode, forward_mode
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.params import ParamSpace


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    space: ParamSpace | str | Iterable[str] | Iterable[torch.Tensor] | None = None,
    *,
    bn: BNMode = "eval",
    batch_weight: Callable[[torch.Tensor], float] | None = None,
) -> torch.Tensor:
    """The ``[n, n]`` Hessian of the weighted mean loss (by samples, or ``batch_weight``; only
    for small ``n``) over ``space`` (default: every trainable parameter).

    The model, loss, batches and space are taken, checked and weighted as
    :class:`HessianOperator` takes them, and its loss is evaluated once, so that what it
    refuses (a loss that returns a float, a NaN loss, a batch that is no pair) is refused here
    in the same sentence, not in a TypeError from autograd or a matrix of NaN."""
    op = HessianOperator(
        model, loss_fn, batches, space, bn=bn, batch_weight=batch_weight, distributed=False
    )
    op.loss()
    # Its n gradient rows, then their stack: a network's (400k parameters: 1.2 TiB) set out on
    # a gradient pass per row, which no machine holds, and was not told so.
    require_room(
        op,
        2 * op.n**2 * max(t.element_size() for t in op.space.tensors),  # the flat vector's
        f"the dense Hessian of {op.n:,} parameters needs its matrix twice over",
        "it is for tiny models; eigenpairs, stochastic_trace and spectral_density take any",
    )
    space = op.space

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        # Each piece in its parameter's dtype: the flat vector of a mixed float32/float64 model
        # is float64, which a float32 layer refused ("mat1 and mat2 must have the same dtype").
        pieces = [v.to(t.dtype) for v, t in zip(space.unflatten(flat), space.tensors, strict=True)]
        params = dict(zip(space.names, pieces, strict=True))
        return sum(
            loss_fn(run_model(model, x, params), y) * w
            for w, (x, y) in zip(op.weights, op.batches, strict=True)
        )

    with forward_mode(model, bn, loss=loss_fn):
        return torch.autograd.functional.hessian(mean_loss, space.values())


def dense_eigh(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (rows) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((H + H.T) / 2)
    return values.flip(0), vectors.flip(1).T
