"""Which loss the Hessian is taken of: cross-entropy, mean squared error, or the user's function.

Every loss is the mean over the batch, so that multi-batch analysis can weight batches by size.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from hessian_cli.engine.batches import LossFn
from hessian_cli.engine.misfit import class_dim
from hessian_cli.errors import UserError
from hessian_cli.specs.data import IGNORE_INDEX, check_labels
from hessian_cli.specs.user_code import (
    USER_CODE_FORMS,
    call_user,
    guarded_user_function,
    load_object,
    refuse_file_without_name,
    split_user_spec,
)

BUILTIN_LOSSES: tuple[str, ...] = ("ce", "mse")
TARGET_SUM_SLACK = 1e-2  # how far from 1 a row of class probabilities may sum


def default_loss(num_classes: int | None) -> str:
    """Cross-entropy for class labels, mean squared error for real-valued targets."""
    return "ce" if num_classes is not None else "mse"


def loss_names_code(spec: str) -> bool:
    """Whether the loss spec names code to import that a checkpoint may not choose: not a
    built-in, nor one of torch's own losses (:func:`is_torch_loss`)."""
    return _names_an_object(spec) and not is_torch_loss(spec)


def _names_an_object(spec: str) -> bool:
    return spec not in BUILTIN_LOSSES and split_user_spec(spec) is not None


def is_torch_loss(spec: str) -> bool:
    """Whether ``spec`` names one of torch's loss classes (``torch.nn:BCEWithLogitsLoss``) or
    loss functions (``torch.nn.functional:huber_loss``): code already imported, which a
    checkpoint that records it (``train --loss torch.nn:...``) may name without trust."""
    parts = split_user_spec(spec)
    if parts is None:
        return False
    where, name = parts
    if where == "torch.nn":
        obj = getattr(torch.nn, name, None)
        return isinstance(obj, type) and issubclass(obj, torch.nn.modules.loss._Loss)
    return where == "torch.nn.functional" and name in _TORCH_LOSS_FUNCTIONS


# torch.nn.functional's losses: each _Loss class's function (cross_entropy for CrossEntropyLoss...)
_TORCH_LOSS_FUNCTIONS = frozenset(name for name in dir(F) if name.endswith("_loss")) | {
    "cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
}


def get_loss(spec: str, *, num_classes: int | None = None, trusted: bool = True) -> LossFn:
    """The loss ``spec`` names, as ``loss(outputs, targets) -> scalar`` (mean over the batch)."""
    if spec == "ce":
        return cross_entropy
    if spec == "mse":
        return _mse(num_classes)
    if _names_an_object(spec):
        trusted = trusted or is_torch_loss(spec)
        obj = load_object(spec, "loss function", trusted=trusted)
        if isinstance(obj, type):  # a loss class such as torch.nn:CrossEntropyLoss
            obj = call_user(obj, "loss class", spec)
        if not callable(obj):
            raise UserError(f"the loss {spec!r} is not callable.")
        if isinstance(obj, _TORCH_BINARY_LOSSES) or obj in _TORCH_BINARY_FUNCTIONS:
            obj = _binary_labels(obj)
        return guarded_user_function(obj, "loss function", spec)
    refuse_file_without_name(spec, "loss")
    raise UserError(
        f"unknown loss {spec!r}: use {' or '.join(BUILTIN_LOSSES)}, or user code as "
        f"{USER_CODE_FORMS} taking (outputs, targets)."
    )


_TORCH_BINARY_LOSSES = (torch.nn.BCELoss, torch.nn.BCEWithLogitsLoss)
_TORCH_BINARY_FUNCTIONS = (F.binary_cross_entropy, F.binary_cross_entropy_with_logits)


def _binary_labels(loss: LossFn) -> LossFn:
    """torch's binary cross-entropy (``--loss torch.nn:BCEWithLogitsLoss`` and kin) on integer
    0/1 labels, as mse takes them: as real numbers, one per sample against a single output
    (batch, 1) (or per pixel against (batch, 1, H, W)). torch refused both the labels' shape
    and their type, where a binary classifier's data holds them so."""

    label_range = _LabelRange()  # (a product's batch is read once, not at every call)

    def binary(outputs: Tensor, targets: Tensor) -> Tensor:
        if not targets.is_floating_point():
            if (label := _not_0_or_1(*label_range(targets))) is not None:
                raise UserError(
                    f"label {label} is out of range for binary cross-entropy, which takes 0/1 "
                    "labels only."
                )
            targets = targets.to(outputs.dtype)
            if outputs.ndim == targets.ndim + 1 and outputs.shape[1] == 1:
                targets = targets.unsqueeze(1)
        return loss(outputs, targets)

    # As its __wrapped__: a loss module is found behind it (loss_module), put in eval mode.
    return functools.update_wrapper(binary, loss, assigned=(), updated=())


NO_LABEL_IN_BATCH = (
    "a batch of the data holds no label but -100 (padding), so its cross-entropy is 0/0: leave "
    "samples without labels out of the data."
)


def check_targets(
    spec: str, batches: Sequence[tuple[Tensor, Tensor]], num_classes: int | None
) -> None:
    """Refuse targets the loss ``spec`` cannot take: class labels beyond ``num_classes``
    (:func:`check_labels`), and for cross-entropy real targets that are not class probabilities
    (non-negative, and summing to 1 over the classes, dim 1, at every position): torch takes any
    real values as soft labels, and regression targets gave a negative "loss" and its Hessian
    without a word."""
    # -100 is padding to cross-entropy, the built-in's and torch's (a user's loss too), not to mse.
    check_labels(batches, num_classes, ignored=None if spec == "mse" else IGNORE_INDEX)
    if spec != "ce":
        return
    for _, y in batches:
        if not y.is_floating_point() and y.numel() and bool((y == IGNORE_INDEX).all()):
            raise UserError(NO_LABEL_IN_BATCH)
    for _, y in batches:
        if not y.is_floating_point() or not y.numel():
            continue
        probabilities = y.ndim > 1 and _sum_to_one(y, 1)
        if not probabilities and y.ndim > 2 and _sum_to_one(y, -1):
            # A language model's soft labels (batch, tokens, classes) are probabilities, but
            # torch's soft cross-entropy takes them over dimension 1 (the tokens).
            raise UserError(
                "cross-entropy takes class probabilities along dimension 1 (batch, classes, "
                "...), but these sum to 1 along their last (batch, tokens, classes): give "
                "--loss your own function for them."
            )
        if not probabilities:
            whole = bool((y == y.round()).all())
            fix = (
                "store class labels as integers, or give --loss mse if they are regression targets"
                if whole
                else "give --loss mse for regression targets"
            )
            raise UserError(
                "cross-entropy needs class labels or class probabilities, but the targets are "
                f"real numbers that are not probabilities: {fix}."
            )


def check_next_tokens(spec: str, batches: Sequence[tuple[Any, Tensor]]) -> None:
    """Refuse, for the built-in cross-entropy, labels per token that are the ``input_ids`` at
    every labelled token of ``batches``: a Hugging Face causal language model's dataset holds
    them so (its forward shifts them), and ``ce``, which compares each position's logits with
    its own label, took the copying of the current token for the loss, unsaid."""
    if spec != "ce":
        return
    pairs = [
        (x["input_ids"], y)
        for x, y in batches
        if isinstance(x, Mapping) and "input_ids" in x and not y.is_floating_point()
    ]
    if not pairs or any(ids.shape != y.shape for ids, y in pairs):
        return
    tokens = torch.cat([ids[y != IGNORE_INDEX].cpu().long() for ids, y in pairs])
    labels = torch.cat([y[y != IGNORE_INDEX].cpu().long() for _, y in pairs])
    if tokens.numel() and torch.equal(tokens, labels):
        raise UserError(
            "the labels are the input_ids at every labelled token, as a Hugging Face causal "
            "language model takes them (it shifts them in its forward), but ce compares each "
            "position's logits with that position's label: give the next token as the label "
            "(-100 after the last), or --loss your own function that shifts them."
        )


def _sum_to_one(y: Tensor, dim: int) -> bool:
    """Whether non-negative ``y`` sums to 1 along ``dim`` everywhere: within the rounding of
    probabilities stored in half precision (bfloat16's [0.9, 0.05, 0.05] sums to 0.9985, also
    once cast to float32 for the analysis), which does not grow with the number of classes, so
    all-zero or other rows stay refused."""
    return not bool((y < 0).any()) and bool(
        ((y.double().sum(dim) - 1).abs() <= TARGET_SUM_SLACK).all()
    )


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits against class labels (or soft labels), over the labels that
    are not ``IGNORE_INDEX``. Labels per token take logits with the classes last, as language
    models give them ``(batch, tokens, vocabulary)``, or second, torch's ``(batch, classes,
    ...)``; where both fit (tokens as many as classes) it is refused, not guessed."""
    # A softmax over one class is 1; outputs of shape (batch,) are one per sample too (they
    # met "Dimension out of range (expected to be in range of [-1, 0], but got 1)").
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
        raise UserError(
            "cross-entropy over a single output is 0 whatever the weights: use --loss mse for "
            "one real-valued target, or a model with one output per class."
        )
    if not targets.is_floating_point() and targets.ndim == outputs.ndim:
        # torch reads such targets as class probabilities and refuses them for not being real.
        # y.argmax(1) only where it keeps them: of multi-hot rows or integer regression
        # targets it kept one label, or none.
        one_hot = bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all())
        fix = (
            "give class indices (y.argmax(1)), or the rows as floats for class probabilities"
            if one_hot
            else "give --loss mse, or your own loss (binary cross-entropy for multi-label), as "
            "they are not one-hot rows (multi-label or regression targets?)"
        )
        raise UserError(
            f"cross-entropy takes one integer class label per sample (or per token), but the "
            f"labels have as many dimensions as the outputs, {tuple(targets.shape[1:])} per sample "
            f"for outputs of {tuple(outputs.shape[1:])}: {fix}."
        )
    dim = class_dim(outputs, targets)
    if dim is None:
        raise UserError(_classes_where(outputs, targets, "cross-entropy"))
    if dim == -1:
        outputs = outputs.movedim(-1, 1)
    if not targets.is_floating_point():  # torch takes int64 or uint8 labels only, not int32
        targets = targets.long()
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


def labelled_count(targets: Tensor) -> int:
    """How many labels the built-in cross-entropy of ``targets`` averages over: those not -100
    (tokens, or samples)."""
    return int((targets != IGNORE_INDEX).sum())


def label_weight(
    spec: str, batches: Sequence[tuple[Any, Tensor]]
) -> Callable[[Tensor], float] | None:
    """What a mean over several batches weighs each batch's loss by: its labels (not -100) for
    the built-in cross-entropy of class labels, which averages over those, else None (its
    samples). By samples, a language model's lambda_1 moved 1.2% with --batch-size, and data
    with unlabelled samples (-100) 8%."""
    if spec == "ce" and all(not y.is_floating_point() for _, y in batches):
        return labelled_count
    return None


def _classes_where(outputs: Tensor, targets: Tensor, loss: str) -> str:
    """Why ``loss`` refuses labels per token where :func:`class_dim` finds both layouts."""
    return (
        f"{loss} cannot tell where the classes are in outputs of shape {tuple(outputs.shape)} "
        f"for labels of shape {tuple(targets.shape)}: dimension 1 and the last both fit (as "
        "many tokens as classes); give --loss your own function."
    )


class _LabelRange:
    """The lowest and highest of integer targets, read from the device once per tensor (and
    version of it): the products pass one batch's targets at every call, and each read waited
    for the GPU's work before it. An inference-mode tensor, which keeps no version, is read at
    every call."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, int, int]] = {}

    def __call__(self, targets: Tensor) -> tuple[int, int]:
        if targets.is_inference():
            return _read_range(targets)
        key, version = id(targets), targets._version
        seen = self._seen.get(key)
        if seen is None or seen[0] != version:
            if key not in self._seen:  # forgotten with the tensor (an id is then reused)
                weakref.finalize(targets, self._seen.pop, key, None)
            self._seen[key] = seen = (version, *_read_range(targets))
        return seen[1], seen[2]


def _not_0_or_1(low: int, high: int) -> int | None:
    """A label of integer targets ranging ``low`` to ``high`` that is neither 0 nor 1, if any."""
    return low if low < 0 else high if high > 1 else None


def _read_range(targets: Tensor) -> tuple[int, int]:
    if not targets.numel():
        return 0, 0
    low, high = torch.aminmax(targets)
    return int(low), int(high)


def _mse(num_classes: int | None) -> LossFn:
    label_range = _LabelRange()

    def mse(outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error; integer labels are compared with their one-hot vectors (0/1
        labels with a single output as they are), and integer 0/1 targets shaped like the
        outputs (one-hot rows already) as they are."""
        if outputs.ndim == 1 and not targets.is_floating_point():
            # One output per sample, as (batch, 1) is: labels 0 to 3 against (batch,) zeros
            # were regressed onto as numbers (a loss of 3.5) where (batch, 1) refused them.
            outputs = outputs[:, None]
        if not targets.is_floating_point() and targets.shape != outputs.shape:
            # One-hot over the outputs' classes, where they are (as cross_entropy finds them):
            # a model with more outputs than the data's top label (10 for labels 0 to 8) was
            # a shape mismatch, and one-hot vectors last against (batch, classes, ...) outputs
            # were reshaped into them, not moved (a loss of 1.465 for 1.361).
            dim = class_dim(outputs, targets) if outputs.ndim == targets.ndim + 1 else None
            if dim is None and outputs.ndim == targets.ndim + 1:
                raise UserError(_classes_where(outputs, targets, "the mse loss"))
            classes = (
                outputs.shape[dim]
                if dim is not None
                else num_classes
                if num_classes is not None
                else outputs.shape[-1]
            )
            low, high = label_range(targets)
            if classes == 1 and low >= 0 and high <= 1:
                # One output regresses onto 0/1 labels (a binary classifier's score); one-hot
                # over one class, which holds no label 1, refused them.
                targets = targets.to(outputs.dtype)
            elif low < 0 or high >= classes:
                # (a negative label made a row of zeros: one-hot by comparison matches no class)
                what = (
                    "a single output in the mse loss, which takes 0/1 labels only (store others "
                    "as real numbers)"
                    if classes == 1  # "for 1 classes"
                    else f"{classes} classes in the mse loss"
                )
                raise UserError(f"label {low if low < 0 else high} is out of range for {what}.")
            else:
                # (not F.one_hot, which reads the labels' range from the device again)
                classes_range = torch.arange(classes, device=targets.device)
                targets = (targets[..., None] == classes_range).to(outputs.dtype)
                if dim == 1:
                    targets = targets.movedim(-1, 1)
        elif not targets.is_floating_point():
            # Compared as they are, they are one-hot or multi-hot rows, or each output's 0/1
            # label: a mask of labels 0 to 4 against (batch, H, W) outputs was regressed onto as
            # numbers (a loss of 7.84) where (batch, 1, H, W) outputs refused it.
            if (label := _not_0_or_1(*label_range(targets))) is not None:
                raise UserError(
                    f"label {label} is out of range for integer targets "
                    "shaped like the model outputs in the mse loss, which takes 0/1 labels only "
                    "there (one-hot or multi-hot rows, or one label per output): store others as "
                    "real numbers."
                )
        if targets.shape != outputs.shape:
            # The outputs' sizes in another order are another layout ((batch, tokens, classes)
            # for (batch, classes, tokens)), which a reshape paired wrongly: 1.816 for 1.697.
            sizes = [[n for n in shape if n != 1] for shape in (outputs.shape, targets.shape)]
            reordered = sizes[0] != sizes[1] and sorted(sizes[0]) == sorted(sizes[1])
            same_count = targets.numel() == outputs.numel()
            if same_count and targets.shape[0] == outputs.shape[0] and not reordered:
                targets = targets.reshape(outputs.shape)
            else:
                # One per token or sample: a tensor file's real y is read as a column (batch,
                # 1), which met the mismatch alone where labels 0-2 were stored as floats.
                one_each = outputs.ndim == targets.ndim + 1 or (
                    outputs.ndim == 2 and targets.shape[1:] == (1,)
                )
                labels = one_each and bool((targets == targets.round()).all())
                hint = (
                    " (whole numbers, one per sample or token: class labels stored as real "
                    "numbers? store them as integers)"
                    if labels
                    else " (the same sizes in another order: transpose the targets, or the "
                    "outputs, to the other's layout)"
                    if reordered
                    else ""
                )
                raise UserError(
                    f"the mse loss needs targets shaped like the model outputs, but got outputs "
                    f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}{hint}."
                )
        if torch.finfo(outputs.dtype).bits < 32:  # targets in 16 bits are other data
            # (1234.5 is 1232 in bfloat16, which moved a bfloat16 model's loss by 0.26%)
            outputs = outputs.to(torch.promote_types(outputs.dtype, targets.dtype))
        return F.mse_loss(outputs, targets.to(outputs.dtype))

    return mse
