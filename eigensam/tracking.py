"""What training measures besides its minibatch loss: lambda_max of a fixed held-out batch
(tracking), the test split's loss and accuracy, and how the gradient aligns with Eigen-SAM's
refreshed eigenvector.

No metrics are written here: the loop records what these return, and turns a
:class:`~hessian_cli.errors.NotFinite` into its own divergence handling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eigensam.refresh import held_to_own_eigenvalue, top_residual
from hessian_cli.engine import distributed
from hessian_cli.engine.batches import Batch, LossFn
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.inputs import inputs_to, rows, run_model
from hessian_cli.engine.linalg import dot, norms
from hessian_cli.engine.model_mode import forward_mode, loss_module
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.errors import UserError
from hessian_cli.specs.data import IGNORE_INDEX
from hessian_cli.specs.losses import class_dim

# Tracking measures lambda_max to a tight tolerance; warm starts usually need a handful of HVPs,
# the cap only bounds a cold start or a reordering of nearly tied eigenvalues.
TRACK_TOL = 1e-3
TRACK_MAX_HVPS = 200


@dataclass(frozen=True)
class Measurement:
    """One tracking solve: lambda_max, its residual relative to it and the HVPs it took."""

    lambda_max: float
    residual: float
    hvps: int


class LambdaMaxTracker:
    """lambda_max of a fixed held-out batch (BatchNorm in eval), each solve warm-started from the
    previous one's eigenvector. ``vector`` and ``lambda_max`` are what a checkpoint keeps of it.

    ``share`` is this rank's part of the batch: under torchrun products and gradients are summed
    over ranks, so every rank measures the whole batch's lambda_max (the shares weighted by
    ``batch_weight``, as :class:`HessianOperator` takes it: by samples they were another mean
    for a language model's labels, which differed with the number of ranks).
    """

    def __init__(
        self,
        share: list[Batch],
        *,
        seed: int,
        device: torch.device,
        batch_weight: Callable[[torch.Tensor], float] | None = None,
    ) -> None:
        self.share = share
        self.batch_weight = batch_weight
        self.seed = seed
        self.device = device
        self.vector: torch.Tensor | None = None
        self.lambda_max: float | None = None

    def measure(self, model: nn.Module, loss_fn: LossFn) -> Measurement:
        """lambda_max at the model's current weights; raises ``NotFinite`` where the loss or its
        curvature is not finite."""
        op = HessianOperator(model, loss_fn, self.share, bn="eval", batch_weight=self.batch_weight)
        init = hint = None
        if self.vector is None:
            # The first solve has no previous vector; the gradient leans toward v_1, and its
            # pass builds the kept graph the first product reuses.
            hint = op.gradient()[1]
        else:
            init = self.vector.reshape(1, -1)
        res = eigenpairs(
            op, 1, tol=TRACK_TOL, max_hvps=TRACK_MAX_HVPS, init=init, hint=hint, seed=self.seed
        )
        res, hvps = held_to_own_eigenvalue(
            op, res, tol=TRACK_TOL, max_hvps=TRACK_MAX_HVPS, seed=self.seed
        )
        op.release()
        self.vector = res.eigenvectors[0].detach()
        self.lambda_max = float(res.eigenvalues[0])
        return Measurement(self.lambda_max, top_residual(res), hvps)

    @torch.no_grad()
    def held_out_loss_finite(self, model: nn.Module, loss_fn: LossFn) -> bool:
        """Whether the held-out batch's loss is finite on every rank: finite weights (near 1e36)
        can make it infinite, and a run without a test split would not see it otherwise."""
        with forward_mode(model, "eval", loss=loss_fn):
            finite = all(
                bool(
                    torch.isfinite(
                        loss_fn(run_model(model, inputs_to(x, self.device)), y.to(self.device))
                    )
                )
                for x, y in self.share
            )
        return not distributed.any_rank(not finite)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    device: torch.device,
    *,
    classify: bool,
    batch_weight: Callable[[torch.Tensor], float] = len,
    threshold: float | None = None,
) -> tuple[float, float]:
    """Mean loss (the batches' weighted by ``batch_weight``, as :class:`HessianOperator` weighs
    them; a batch that weighs nothing, of padding only, is left out) and accuracy on ``batches``
    (eval mode, the loss's too where it is a module: a dropout in it made the test loss a random
    draw), NaN without any.

    Under torchrun every rank holds all of ``batches`` and evaluates every ``world``-th one
    (each repeated the whole split); each batch's sums fill its own row, zero on the other
    ranks, so the summed rows are the values one rank computes and their total is the same,
    bit for bit."""
    if not batches:
        return math.nan, math.nan
    rank, world = distributed.world()
    modules = [m for m in (model, loss_module(loss_fn)) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    rows = torch.zeros(len(batches), 4, dtype=torch.float64)  # loss * weight, right, labels, weight
    for i, (x, y) in enumerate(batches):
        share = float(batch_weight(y))
        if i % world != rank or not share:  # padding only: nothing of the mean over labels
            continue
        out = run_model(model, inputs_to(x, device))
        y = y.to(device)
        right, labels = correct_count(out, y, classify=classify, threshold=threshold)
        rows[i] = torch.tensor(
            [float(loss_fn(out, y)) * share, right, labels, share], dtype=torch.float64
        )
    for m, training in zip(modules, was_training, strict=True):
        m.train(training)
    distributed.all_reduce_sum(rows)
    total = correct = labelled = weight = 0.0
    for row in rows.tolist():  # in the batches' order, as one process adds them
        if row[3]:
            total, correct = total + row[0], correct + row[1]
            labelled, weight = labelled + row[2], weight + row[3]
    return total / weight, accuracy(correct, labelled, classify=classify)


@torch.no_grad()
def binary_threshold(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    device: torch.device,
    *,
    num_classes: int | None,
) -> float | None:
    """Above which value a binary classifier's one output per sample picks label 1 (data of two
    classes), from what its loss expects: the output at which the loss weighs both labels alike,
    0 for a logit (binary cross-entropy with logits, a hinge) or 0.5 for a probability (BCELoss
    after a Sigmoid) or mse's regression onto 0/1; else 0 where the loss of label 1 still falls
    past an output of 1 (a logit whose labels are weighed unequally: pos_weight, a focal alpha);
    else NaN: the accuracy is not known (it was scored at 0 for any loss but mse, so a Sigmoid's
    outputs all picked label 1). None for other data and outputs; ``batch``'s first two samples
    give the outputs' shape."""
    x, y = rows(batch[0], slice(0, 2)), batch[1][:2]
    if num_classes != 2 or y.ndim != 1 or y.is_floating_point():
        return None
    with forward_mode(model, "eval", loss=loss_fn):
        out = run_model(model, inputs_to(x, device))
        if not isinstance(out, torch.Tensor) or out.numel() != len(y):
            return None
        y = y.to(device)

        def loss(output: float, label: int) -> float:
            """The loss of every output at ``output`` and every label ``label``; NaN where the
            loss refuses it (BCELoss an output past 1)."""
            try:
                return float(loss_fn(torch.full_like(out, output), torch.full_like(y, label)))
            except (UserError, RuntimeError):
                return math.nan

        for middle in (0.0, 0.5):
            zero, one = loss(middle, 0), loss(middle, 1)
            if math.isfinite(zero) and math.isclose(zero, one, rel_tol=1e-5):  # inf is inf
                return middle
        return 0.0 if loss(2.0, 1) < loss(1.0, 1) else math.nan


def correct_count(
    out: torch.Tensor, y: torch.Tensor, *, classify: bool, threshold: float | None = None
) -> tuple[int, int]:
    """How many labels the outputs pick, and how many labels there are: one per sample (class
    indices, one-hot or soft targets; a single output picks 1 above ``threshold``, where the
    data is binary, and none where it is NaN: :func:`binary_threshold`) or one per token (its
    class from the dimension cross-entropy reads, :func:`class_dim`; -100 is none); (0, 0) for
    data without classes and other outputs without a class dimension of two or more."""
    if not classify:
        return 0, 0
    single = y.ndim == 1 and out.numel() == len(y) and not y.is_floating_point()
    if threshold is not None and single:
        # One output per sample, (batch, 1) or (batch,): a binary classifier's score.
        if math.isnan(threshold):  # its loss tells no logit from a probability
            return 0, 0
        labelled = y != IGNORE_INDEX
        picked = (out.reshape(-1) > threshold).long() == y
        return int(picked[labelled].sum()), int(labelled.sum())
    if y.is_floating_point():
        if out.shape != y.shape:
            return 0, 0
        return int((out.argmax(1) == y.argmax(1)).sum()), len(y)
    dim = class_dim(out, y) if out.ndim == y.ndim + 1 else None
    if dim is None or out.shape[dim] == 1:  # no class dimension (multi-hot labels, one logit)
        return 0, 0
    labelled = y != IGNORE_INDEX
    picked = out.argmax(dim) == y
    return int(picked[labelled].sum()), int(labelled.sum())


def accuracy(correct: float, labelled: float, *, classify: bool) -> float:
    """The fraction correct; NaN for data without classes, or no labels."""
    return correct / labelled if classify and labelled else math.nan


def gradient_alignment(g: torch.Tensor, v: torch.Tensor) -> float:
    """``|<g / |g|, v>|`` for a unit ``v`` (the refreshed eigenvector, in ``g``'s layout): how
    much of the gradient's direction it holds; NaN for a zero gradient."""
    norm = float(norms(g))
    return float(dot(g, v.to(g)).abs() / norm) if norm > 0 else math.nan
