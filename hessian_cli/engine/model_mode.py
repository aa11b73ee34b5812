"""The mode a model is evaluated in while analysed: eval mode throughout (no dropout), BatchNorm by
its running statistics or, on request, by each batch's own, without touching its buffers; and
kernels whose backward torch can differentiate again, where the fast ones cannot."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`forward_mode` needs of a model's modules, found in one walk.

    Four walks over every module at each entry cost ~0.8 ms on ResNet-20 (58 modules, this
    project's CPU): a product's forward mode, paid at every one (a GPU's products wait on the
    host). An operator finds it once per solve, where it looks for changed weights.
    """

    modules: tuple[nn.Module, ...]
    batchnorms: tuple[nn.modules.batchnorm._BatchNorm, ...]
    rnn: bool
    weight_norm: bool

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        modules = tuple(model.modules())
        return cls(
            modules,
            tuple(m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)),
            any(isinstance(m, nn.RNNBase) for m in modules),
            any(_weight_normed(m) for m in modules),
        )


@contextlib.contextmanager
def forward_mode(model: nn.Module, bn: BNMode, layout: ModelLayout | None = None) -> Iterator[None]:
    """Put the model in a mode where every forward pass computes the same function.

    Everything is in eval mode (no dropout). With ``bn="train"`` BatchNorm layers normalise by
    the batch statistics but do not update their running statistics, so analysing a model never
    changes it. The forward runs in :func:`twice_differentiable` kernels. ``layout``: the
    model's as it is now (found here where not given).
    """
    if bn == "train" and isinstance(model, torch.jit.ScriptModule) and has_batchnorm(model):
        raise UserError(
            "The BatchNorm layers of a TorchScript module cannot be switched to batch "
            "statistics (`bn=train`); use the eager model, or running statistics (`bn=eval`)."
        )
    layout = layout or ModelLayout.of(model)
    saved = [(m, m.training) for m in layout.modules]
    tracked = [(m, m.track_running_stats) for m in layout.batchnorms] if bn == "train" else []
    # The attention fast path runs only without autograd (a loss, not a gradient), and where a
    # padding mask makes it nest the batch, it gives padded positions 0, not the layer's output:
    # the loss at w + rho g (SAM sharpness) was of another function than the gradient's.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    if any(training for _, training in saved):  # (the module's own train(), if it has one)
        model.eval()
    for m, _ in tracked:
        m.train()
        m.track_running_stats = False
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with twice_differentiable(model, layout):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in saved:
            if m.training != training:
                m.training = training
        for m, track in tracked:
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
def twice_differentiable(model: nn.Module, layout: ModelLayout | None = None) -> Iterator[None]:
    """Kernels whose backward torch can differentiate again, for the forward passes inside.

    Attention by its math kernel: the fused ones (flash, memory-efficient; on the CPU too) have no
    derivative of their backward, and every product failed in torch's words. RNNs without cuDNN,
    whose backward runs only in training mode and has no derivative either. Weight norm by its
    formula (:class:`_ComposedWeightNorm`).
    """
    layout = layout or ModelLayout.of(model)
    cudnn = torch.backends.cudnn.enabled
    try:
        if layout.rnn:
            torch.backends.cudnn.enabled = False
        with (
            sdpa_kernel(SDPBackend.MATH),
            _ComposedWeightNorm() if layout.weight_norm else contextlib.nullcontext(),
        ):
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn


def _weight_normed(m: nn.Module) -> bool:
    """Whether ``m`` is weight norm (``parametrizations.weight_norm``) or has the older hook."""
    return isinstance(m, _WeightNorm) or any(
        isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()
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
