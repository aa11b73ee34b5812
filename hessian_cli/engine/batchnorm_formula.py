"""Eval-mode BatchNorm by its formula, ``(x - mean) * (weight / sqrt(var + eps)) + bias``, in the
first-order graphs that products differentiate again.

The function is torch's own, but its graph is smaller to differentiate twice: torch's double
backward of ``batch_norm`` is one composite for training and eval alike, which also works out
the batch-statistics terms that running statistics do not have. On ResNet-20 (CPU, 2026-12-01,
benchmarks/RESULTS.md) a kept graph's product ran 38% fewer operators (3,351 -> 2,091) and a
top-5 solve took 5-10% less time, with the same saved memory and, on PyHessian's trained
checkpoint, the same float32 error against float64 (3.1e-6); a GPU's products wait on the
host's launches, one or more per operator. ``x * scale + shift``, one operator fewer, was 6
times less accurate there: where a running mean is large beside its spread, the difference is
lost to rounding. torch's own double backward loses some of it too: on ResNet-20 with random
running statistics a float32 product was 4.8e-5 off float64 by the kernel, 9.2e-7 by the
formula (and a test of large means on the CPU: 1.3e-5 against 6e-8). A plain gradient or a
torch.func block is 11-13% slower by the formula on the CPU: only graphs that are
differentiated twice use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from hessian_cli.engine.model_mode import patched

_BatchNorm = nn.modules.batchnorm._BatchNorm


def formula_ready(m: nn.Module) -> bool:
    """Whether ``m`` is a BatchNorm layer whose forward is torch's own and holds running
    statistics, so that in eval mode its formula is the same function."""
    return (
        isinstance(m, _BatchNorm)
        and type(m).forward is _BatchNorm.forward
        and "forward" not in m.__dict__
        and isinstance(m.running_mean, torch.Tensor)
        and isinstance(m.running_var, torch.Tensor)
        and not isinstance(m, nn.modules.lazy.LazyModuleMixin)  # statistics not made yet
    )


def running_statistics_formula(m: _BatchNorm, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``m``'s forward, called as torch's is (``input`` by position or name): its formula where
    ``m`` normalises ``input`` by its running statistics and everything is as its kernel would
    take it, else torch's kernel, which then also raises where it refuses (batch statistics
    with ``bn="train"``; an autocast's 16-bit inputs, which it normalises in float32; channels
    that are not the layer's features; weights of another dtype; statistics that require
    gradients, which it refuses to differentiate)."""
    x = args[0] if args else kwargs.get("input")
    if len(args) + len(kwargs) != 1 or not _as_kernel_takes(m, x):
        return _BatchNorm.forward(m, *args, **kwargs)
    m._check_input_dim(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    # Centred first: x * scale + (bias - mean * scale) loses what a large mean leaves of x.
    y = (x - m.running_mean.reshape(shape)) * scale.reshape(shape)
    return y if m.bias is None else y + m.bias.reshape(shape)


def _as_kernel_takes(m: _BatchNorm, x: object) -> bool:
    """Whether torch's kernel would normalise ``x`` by ``m``'s running statistics, in float32
    or float64, without an error: the only case where the formula is its function."""
    if m.training or not isinstance(x, torch.Tensor) or x.ndim < 2:
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    features = (x.shape[1],)
    statistics = (m.running_mean, m.running_var)
    affine = tuple(t for t in (m.weight, m.bias) if t is not None)
    return all(
        isinstance(t, torch.Tensor) and t.shape == features and t.dtype == x.dtype
        for t in (*statistics, *affine)
    ) and not any(t.requires_grad for t in statistics)


def batchnorm_formula(layers: Sequence[_BatchNorm]) -> contextlib.AbstractContextManager[None]:
    """``layers`` (each :func:`formula_ready`) by :func:`running_statistics_formula` for the
    forward passes inside, also those that a non-reentrant checkpoint runs again in a backward
    pass: a graph built inside must be differentiated inside."""
    return patched([(m, "forward", partial(running_statistics_formula, m)) for m in layers])
