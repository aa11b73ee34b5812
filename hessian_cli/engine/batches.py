"""What the curvature operator reads: batches of (inputs, targets) in the model's dtype, and the
loss that maps a model's outputs and targets to a scalar. Inputs are one tensor or several
(:mod:`hessian_cli.engine.inputs`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hessian_cli.engine.inputs import Inputs, map_inputs
from hessian_cli.engine.linear_operator import described
from hessian_cli.errors import UserError, a_type, is_number

Batch = tuple[Inputs, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_batches(batches: object) -> None:
    """Refuse batches that are nothing to iterate over: None (data not loaded yet) or a count
    failed in "'NoneType' object is not iterable", a TypeError that named no argument. (A
    dataset, iterated by its indices, is refused by its samples.)"""
    if not hasattr(batches, "__iter__") and not hasattr(batches, "__getitem__"):
        raise UserError(
            "the batches must be a list, DataLoader or generator of (inputs, targets), "
            f"not {a_type(batches)}."
        )


def check_batch_weight(batch_weight: object) -> None:
    """Refuse a ``batch_weight`` that is no function: ``"len"`` (a config file's word) or a
    number failed at the first batch as "'str' object is not callable", naming neither."""
    if batch_weight is not None and not callable(batch_weight):
        raise UserError(
            "`batch_weight` must be a function of a batch's targets that gives what its loss is "
            f"a mean over (None: its samples), not {a_type(batch_weight)}."
        )


def batch_share(batch_weight: Callable[[torch.Tensor], object] | None, y: torch.Tensor) -> float:
    """What a batch's mean loss is a mean over: its samples, or ``batch_weight(y)``, refused
    in one sentence where that is no number (None failed in ``float()``, a TypeError, and a
    tensor of several entries in "only one element tensors can be converted")."""
    share = len(y) if batch_weight is None else batch_weight(y)
    if not (is_number(share) or isinstance(share, torch.Tensor) and share.numel() == 1):
        raise UserError(
            "`batch_weight` must return a number, what the batch's loss is a mean over, not "
            f"{described(share)}."
        )
    return float(share)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's real parameters, where they have one."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def cast_batch(batch: Batch, dtype: torch.dtype | None) -> Batch:
    """Real inputs and targets in ``dtype`` (the model's: some losses, e.g. huber_loss, refuse
    float64 targets for float32 outputs in their backward), except that targets are never
    narrowed to a 16-bit dtype, where the copy would change the loss (1234.5 is 1232 in
    bfloat16); labels, token ids and masks as given."""
    x, y = batch
    if dtype is None:
        return x, y

    def cast(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        check_range(t, dtype)
        return t.to(dtype=dtype)

    x = map_inputs(cast, x)
    if y.is_floating_point() and (
        torch.finfo(dtype).bits >= 32 or torch.finfo(y.dtype).bits < torch.finfo(dtype).bits
    ):
        check_range(y, dtype)
        y = y.to(dtype=dtype)
    return x, y


def check_range(t: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse real data whose finite values ``dtype`` cannot hold: cast, they became inf, and
    float64 data of 1e300 for a float32 model was called "NaN or infinite" data (in training,
    a divergence)."""
    if not t.is_floating_point() or not t.numel():
        return
    top = torch.finfo(dtype).max
    if torch.finfo(t.dtype).max <= top:  # bfloat16 into float16 narrows too
        return
    finite = t if bool(torch.isfinite(t).all()) else t[torch.isfinite(t)]
    if finite.numel() and (float(finite.amax()) > top or float(finite.amin()) < -top):
        raise UserError(
            f"the data hold values beyond {str(dtype)[6:]}'s range (at most {top:.3g}): rescale "
            "them (an analysis can also run in float64: `dtype=float64`)."
        )
