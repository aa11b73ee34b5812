"""The mode a model is evaluated in while analysed: eval mode throughout (no dropout), BatchNorm by
its running statistics or, on request, by each batch's own, without touching its buffers; and
kernels whose backward torch can differentiate again, where the fast ones cannot."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from hessian_cli.engine.inputs import Inputs, run_model
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
    changes it. The forward runs in :func:`twice_differentiable` kernels.
    """
    if bn == "train" and isinstance(model, torch.jit.ScriptModule) and has_batchnorm(model):
        raise UserError(
            "The BatchNorm layers of a TorchScript module cannot be switched to batch "
            "statistics (`bn=train`); use the eager model, or running statistics (`bn=eval`)."
        )
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    # The attention fast path runs only without autograd (a loss, not a gradient), and where a
    # padding mask makes it nest the batch, it gives padded positions 0, not the layer's output:
    # the loss at w + rho g (SAM sharpness) was of another function than the gradient's.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    if bn == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with twice_differentiable(model):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training, track in saved:
            m.training = training
            if track is not None and m.track_running_stats != track:  # a scripted one: constant
                m.track_running_stats = track


def batch_statistics_error(model: nn.Module, x: Inputs) -> str | None:
    """Why BatchNorm cannot normalise ``x`` by its own statistics (a batch of one sample has
    none), or None; nothing of the model changes."""
    with torch.no_grad(), forward_mode(model, "train"):
        try:
            run_model(model, x)
        except ValueError as exc:
            return first_line(exc)
    return None


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """Kernels whose backward torch can differentiate again, for the forward passes inside.

    Attention by its math kernel: the fused ones (flash, memory-efficient; on the CPU too) have no
    derivative of their backward, and every product failed in torch's words. RNNs without cuDNN,
    whose backward runs only in training mode and has no derivative either. Weight norm by its
    formula (:class:`_ComposedWeightNorm`).
    """
    rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    cudnn = torch.backends.cudnn.enabled
    weight_norm = has_weight_norm(model)
    try:
        if rnn:
            torch.backends.cudnn.enabled = False
        with (
            sdpa_kernel(SDPBackend.MATH),
            _ComposedWeightNorm() if weight_norm else contextlib.nullcontext(),
        ):
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn


def has_weight_norm(model: nn.Module) -> bool:
    """Whether ``model`` uses weight norm (``parametrizations.weight_norm`` or the older hook)."""
    return any(
        isinstance(m, _WeightNorm)
        or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
        for m in model.modules()
    )


class _ComposedWeightNorm(TorchFunctionMode):
    """``torch._weight_norm`` as its formula, ``v * (g / ||v||)``, the kernel's own fallback: the
    fused kernel's double backward drops the terms through the norm (torch 2.13, CPU: a weight-
    normed layer's Hessian 14% off, with no error)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            bound = dict(zip(("v", "g", "dim"), args, strict=False)) | kwargs
            v, g = bound["v"], bound["g"]
            return v * (g / torch.norm_except_dim(v, 2, bound.get("dim", 0)))
        return func(*args, **kwargs)
