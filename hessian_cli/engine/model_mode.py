"""The mode a model is evaluated in while analysed: eval mode throughout (no dropout), BatchNorm by
its running statistics or, on request, by each batch's own, without touching its buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from hessian_cli.errors import UserError, first_line

BNMode = Literal["eval", "train"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer, also as a scripted module (by its class name)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or "BatchNorm" in getattr(m, "original_name", "")
        for m in model.modules()
    )


@contextlib.contextmanager
def forward_mode(model: nn.Module, bn: BNMode) -> Iterator[None]:
    """Put the model in a mode where every forward pass computes the same function.

    Everything is in eval mode (no dropout). With ``bn="train"`` BatchNorm layers normalise by
    the batch statistics but do not update their running statistics, so analysing a model never
    changes it.
    """
    if bn == "train" and isinstance(model, torch.jit.ScriptModule) and has_batchnorm(model):
        raise UserError(
            "The BatchNorm layers of a TorchScript module cannot be switched to batch "
            "statistics (`bn=train`); use the eager model, or running statistics (`bn=eval`)."
        )
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    model.eval()
    if bn == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None and m.track_running_stats != track:  # a scripted one: constant
                m.track_running_stats = track


def batch_statistics_error(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why BatchNorm cannot normalise ``x`` by its own statistics (a batch of one sample has
    none), or None; nothing of the model changes."""
    with torch.no_grad(), forward_mode(model, "train"):
        try:
            model(x)
        except ValueError as exc:
            return first_line(exc)
    return None
