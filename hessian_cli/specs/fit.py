"""Whether a model and a loss fit the data: tried on two samples before any work, so that a
shape, label or type mismatch (or a bug in user code) is one sentence, not a failure later."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from hessian_cli.engine.batches import Batch
from hessian_cli.engine.inputs import Inputs, inputs_to, rows, run_model
from hessian_cli.engine.misfit import (
    check_scalar_loss,
    class_count,
    loss_on_outputs,
    model_outputs,
    too_few_outputs,
)
from hessian_cli.engine.model_mode import loss_module
from hessian_cli.errors import UserError, a_type

# What a model or loss that does not fit the data (or user code with a bug: an assert, a
# KeyError) raises: anything but an interrupt.
_MISFIT = Exception


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are: where its inputs must go."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def takes_token_ids(model: nn.Module) -> bool:
    """Whether the model looks its inputs up in an embedding table: then signed integer inputs
    are token ids and stay integers (:func:`cast_inputs`); other inputs become real numbers."""
    tables = (nn.Embedding, nn.EmbeddingBag)
    names = {t.__name__ for t in tables}
    return any(
        isinstance(m, tables) or getattr(m, "original_name", None) in names  # TorchScript
        for m in model.modules()
    )


@contextlib.contextmanager
def _in_eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """``modules`` (None: none) in eval mode inside, each part's own mode as it was after."""
    saved = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    for module in modules:
        if module is not None:
            module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def check_fits(model: nn.Module, loss_fn: Callable, batches: Sequence[Batch]) -> None:
    """Run the model and the loss (a loss module too, as the products run it) in eval mode, so
    that no buffer or RNG is touched, on two samples of ``batches[0]``, on the model's device;
    class labels are checked against the outputs over all of ``batches``."""
    with _in_eval_mode(model, loss_module(loss_fn)):
        _check_fits(model, loss_fn, batches)


def _check_fits(model: nn.Module, loss_fn: Callable, batches: Sequence[Batch]) -> None:
    device = model_device(model)
    x = inputs_to(rows(batches[0][0], slice(0, 2)), device)
    y = batches[0][1][:2].to(device)
    out = model_outputs(model, x)
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"the model returns {a_type(out)}, not a tensor of outputs; wrap it in a "
            "factory whose module returns the output tensor (e.g. out['logits'])."
        )
    live = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    if live and not out.requires_grad:
        raise UserError(
            "the model's outputs do not depend on its parameters (its forward detaches them or "
            "runs without gradients): there is nothing to differentiate."
        )
    if not y.is_floating_point():
        top = max(int(b[1].max()) for b in batches)
        if (error := too_few_outputs(top, class_count(out, y))) is not None:
            raise error
    loss = loss_on_outputs(loss_fn, out, y, x)
    # Before the work, where the products refused it after the work before them
    check_scalar_loss(loss, len(y))
    if out.requires_grad and not loss.requires_grad:  # it has no curvature to find
        raise UserError("the loss does not depend on the model's outputs (it returns a constant).")
    if _sums_over_the_batch(model, loss_fn, x, y, loss.detach()):
        raise UserError(
            "the loss sums over the batch (its value on two samples is the sum of theirs), so its "
            "Hessian grows with the batch size: make it the mean (reduction='mean')."
        )


def guard_embedding_lookups(model: nn.Module) -> None:
    """Make an embedding lookup out of range raise the CPU's IndexError ("index out of range in
    self") before its kernel runs: for models off the CPU, where CUDA's kernel meets it with a
    device-side assert, a RuntimeError that none of the handlers of a lookup out of range
    (``except IndexError``, :func:`~hessian_cli.engine.misfit.embedding_reach`) takes, and
    after which the process's CUDA context is unusable. Costs one reduction per lookup, waited for.

    Only plain lookups: a subclass with a forward of its own need not look its argument up
    (a learned positional embedding, such as BART's or Whisper's, takes the token ids for their
    shape). Checked against the table as it is (``weight``, which a grown table replaced without
    ``num_embeddings``), and not inside a transform over the ids (``vmap``), whose values
    cannot be read."""

    def check(module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if not (isinstance(ids, torch.Tensor) and ids.numel()) or ids.is_floating_point():
            return
        try:
            low, high = torch.stack(torch.aminmax(ids)).tolist()
        except RuntimeError:  # a tensor batched by vmap: no values here, the kernel checks
            return
        if low < 0 or high >= module.weight.shape[0]:
            raise IndexError("index out of range in self")

    for m in model.modules():
        if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward:
            m.register_forward_pre_hook(check)


def _sums_over_the_batch(
    model: nn.Module, loss_fn: Callable, x: Inputs, y: torch.Tensor, pair_loss: torch.Tensor
) -> bool:
    """Whether the loss ``pair_loss`` of two samples is the sum of their own losses, not their
    mean (a user's loss with ``reduction='sum'`` made every eigenvalue 128 times too large,
    unsaid). A mean over tokens or classes lies between the two, never at their sum; where a
    sample alone cannot be run (a loss that needs a batch; a model on the meta device, which
    has no values) nothing is said."""
    if len(y) < 2:
        return False
    try:
        with torch.no_grad():
            pair = float(pair_loss)
            one, two = (
                float(loss_fn(run_model(model, rows(x, slice(i, i + 1))), y[i : i + 1]))
                for i in range(2)
            )
    except _MISFIT:
        return False
    scale = abs(one) + abs(two)
    return (
        math.isfinite(pair)
        and scale > 0
        and abs(pair - (one + two)) <= 1e-4 * scale
        and abs(pair - (one + two) / 2) > 1e-2 * scale
    )
