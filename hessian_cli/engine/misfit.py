"""Why a batch does not fit the model or its loss, in one sentence: where the model's forward or
the loss fails on a batch, torch's own words ("Expected input batch_size (5) to match target
batch_size (4)", "Target 7 is out of bounds", a tuple "must be Tensor") name neither the data
nor what to change. Said by the operator (of the model at its first batch, of the loss at any)
and by the command line's check before any work (:mod:`hessian_cli.specs.fit`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hessian_cli.engine.inputs import Inputs, describe_samples, input_tensors, run_model
from hessian_cli.errors import UserError, a_type, first_line, out_of_host_memory


def model_outputs(
    model: nn.Module, x: Inputs, params: dict[str, torch.Tensor] | None = None
) -> Any:
    """The model's outputs on ``x`` (:func:`run_model`); where its forward fails on them, one
    sentence naming the samples' shapes."""
    try:
        return run_model(model, x, params)
    except UserError:  # said already, in its own words (integer inputs a model refuses)
        raise
    except Exception as exc:
        if _not_the_datas(exc):
            raise
        raise UserError(
            f"the data (samples of {describe_samples(x)}) does not fit the model: "
            f"{first_line(exc)}{embedding_reach(model, [x], exc)}."
        ) from exc


def loss_on_outputs(loss_fn: Callable, out: Any, y: torch.Tensor, x: Inputs) -> Any:
    """``loss_fn(out, y)``; where it fails, one sentence naming what does not fit: outputs that
    are no tensor, fewer targets than outputs, class labels beyond the outputs, labels of
    another integer type, else the shapes of both."""
    try:
        return loss_fn(out, y)
    except UserError:  # said already, in its own words
        raise
    except Exception as exc:
        if _not_the_datas(exc):
            raise
        raise _loss_misfit(out, y, x, exc) from exc


def check_scalar_loss(loss: object, samples: int | None = None) -> torch.Tensor:
    """``loss``, refused where it is no scalar tensor (a float, its ``.item()``, a tuple, one
    value per sample; a tensor of shape (1,) too): the products take a 0-dimensional loss only.
    ``samples``: the batch's, where known, which a loss of one value per sample matches."""
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return loss
    if isinstance(loss, torch.Tensor):
        per = f" for a batch of {samples}" if samples is not None else ""
        got = f"a tensor of shape {tuple(loss.shape)}{per}"
    else:
        got = a_type(loss)
    # One value in a tensor of shape (1,) or (1, 1) reads as a scalar to its writer
    fix = ": return loss.squeeze()" if isinstance(loss, torch.Tensor) and loss.numel() == 1 else ""
    raise UserError(f"the loss returns {got}, not a scalar tensor (the mean over the batch){fix}.")


def _not_the_datas(exc: BaseException) -> bool:
    """Whether ``exc`` says nothing of the data: memory ran out (the operator halves a block
    that ran out of device memory)."""
    return isinstance(exc, torch.OutOfMemoryError) or out_of_host_memory(exc)


def _loss_misfit(out: Any, y: torch.Tensor, x: Inputs, exc: BaseException) -> UserError:
    said = first_line(exc)
    tensor = isinstance(out, torch.Tensor)
    # (A loss that takes them, failing otherwise, gets the plain sentence below.)
    if not tensor and isinstance(exc, (TypeError, AttributeError)):
        return UserError(
            f"the model returns {a_type(out)}, which the loss function does not take ({said}): "
            "give a model whose forward returns the output tensor (e.g. out['logits']), or a "
            "loss function of what it returns."
        )
    samples = {len(t) for t in input_tensors(x) if t.ndim}
    if tensor and out.ndim and y.ndim and len(out) != len(y) and samples == {len(out)}:
        return UserError(
            f"the batch holds {len(out)} samples of inputs but {len(y)} targets: give one "
            "target per sample."
        )
    if tensor and not y.is_floating_point() and y.numel():
        top = int(y.max())
        if (error := too_few_outputs(top, class_count(out, y))) is not None:
            return error
    # torch's "expected target dtype to be Long": int32 labels (NumPy's on Windows), or whole
    # numbers stored as floats
    labels = not y.is_floating_point() or bool((y == y.round()).all())
    if tensor and y.dtype not in (torch.int64, torch.uint8) and "Long" in said and labels:
        return UserError(
            f"the class labels are {str(y.dtype)[6:]}, and the loss takes int64 ones "
            f"({said}): give them as y.long()."
        )
    outputs = f"of shape {tuple(out.shape)}" if tensor else a_type(out)
    return UserError(
        f"the loss fails on the model's outputs ({outputs}, for {str(y.dtype)[6:]} targets of "
        f"shape {tuple(y.shape)}): {said}."
    )


def too_few_outputs(top: int, classes: int | None) -> UserError | None:
    """The error for class labels up to ``top`` where the model gives ``classes`` outputs (None:
    outputs of no class count), if they do not fit."""
    if classes is None or top < max(classes, 2):
        return None
    return UserError(
        f"the data has class labels up to {top}, but the model has only {classes} outputs: "
        "check the data and the model's num_classes."
    )


def class_count(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """How many classes ``outputs`` hold for integer ``targets``: a classifier's (batch,
    classes), or a language model's, classes last. Not a segmentation model's one channel for a
    binary mask, nor a binary classifier's one logit with 0/1 labels (refused, for a loss made
    for it: BCE); the loss says what it takes."""
    dim = class_dim(outputs, targets) if outputs.ndim == targets.ndim + 1 else None
    return outputs.shape[dim] if dim is not None and (outputs.ndim == 2 or dim == -1) else None


def class_dim(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """The dimension of ``outputs`` that holds the classes of integer ``targets``: 1 (torch's
    layout), or -1 where only that fits (labels per token against ``(batch, tokens, classes)``);
    None where both fit (labels per token, as many tokens as classes: a guess was a wrong loss)."""
    if targets.ndim < 2 or targets.is_floating_point():
        return 1
    last = outputs.shape[:-1] == targets.shape
    second = outputs.shape[:1] + outputs.shape[2:] == targets.shape
    if last and second:
        return None
    return -1 if last else 1


def embedding_reach(model: nn.Module, inputs: Iterable[Inputs], exc: BaseException) -> str:
    """Where an embedding lookup failed ("index out of range in self"): how far the integer
    inputs of the batches it may have been in reach beside the model's tables, which torch's
    words leave out; "" where it was not such a lookup."""
    sizes = sorted({m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)})
    ids = [
        t
        for x in inputs
        for t in input_tensors(x)
        if t.numel() and not (t.is_floating_point() or t.dtype == torch.bool)
    ]
    if not (isinstance(exc, IndexError) and sizes and ids):
        return ""
    low, top = min(int(t.min()) for t in ids), max(int(t.max()) for t in ids)
    below = f"go down to {low} (below 0: padding with -100, say?) and " if low < 0 else ""
    return (
        f" (its integer inputs {below}reach {top}, and the model's embedding tables hold "
        f"{', '.join(map(str, sizes))} rows)"
    )
