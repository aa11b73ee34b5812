"""The dense oracle: the exact Hessian of a tiny model and its eigendecomposition.

Built with ``torch.autograd.functional.hessian`` over the flat parameter vector, independently of
the operator's HVP code, so that tests compare two different derivations of the same matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hessian_cli.engine.batches import Batch, LossFn, cast_batch, check_batch_weight, model_dtype
from hessian_cli.engine.inputs import run_model
from hessian_cli.engine.model_mode import BNMode, forward_mode
from hessian_cli.engine.params import ParamSpace, select_parameters


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    space: ParamSpace | None = None,
    *,
    bn: BNMode = "eval",
    batch_weight: Callable[[torch.Tensor], float] | None = None,
) -> torch.Tensor:
    """The ``[n, n]`` Hessian of the weighted mean loss (by samples, or ``batch_weight`` as
    :class:`HessianOperator` takes it; only for small ``n``) over ``space`` (default: every
    trainable parameter, as :class:`HessianOperator` takes them)."""
    check_batch_weight(batch_weight)
    weight = batch_weight or len
    space = select_parameters(model) if space is None else space
    dtype = model_dtype(model)
    batches = [cast_batch(batch, dtype) for batch in batches]  # as the operator casts them
    total = sum(float(weight(y)) for _, y in batches)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        # Each piece in its parameter's dtype: the flat vector of a mixed float32/float64 model
        # is float64, which a float32 layer refused ("mat1 and mat2 must have the same dtype").
        pieces = [v.to(t.dtype) for v, t in zip(space.unflatten(flat), space.tensors, strict=True)]
        params = dict(zip(space.names, pieces, strict=True))
        return sum(
            loss_fn(run_model(model, x, params), y) * (float(weight(y)) / total) for x, y in batches
        )

    with forward_mode(model, bn, loss=loss_fn):
        return torch.autograd.functional.hessian(mean_loss, space.values())


def dense_eigh(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (rows) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((H + H.T) / 2)
    return values.flip(0), vectors.flip(1).T
