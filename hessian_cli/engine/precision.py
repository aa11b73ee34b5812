"""Arithmetic precision of Hessian-vector products: full (the default) or an opt-in faster mode.

``full`` computes in the model's own dtype with TF32 switched off, also for cuDNN convolutions,
where PyTorch allows it by default: a float32 analysis is then float32 throughout. ``tf32`` lets
matrix products and convolutions use TF32 tensor cores (10-bit mantissa); ``bf16`` runs the
forward pass under bfloat16 autocast. Both are several times faster on recent GPUs and far less
accurate (relative HVP errors of 1e-3 to 1e-2), which is why results obtained with them are
always checked with full-precision products (see :meth:`HessianOperator.full_precision`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Literal, ParamSpec, TypeVar, get_args

import torch

from hessian_cli.errors import UserError

P = ParamSpec("P")
R = TypeVar("R")
Precision = Literal["full", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(
    precision: str, device: torch.device, dtype: torch.dtype | None = None
) -> Precision:
    """``precision`` as a :data:`Precision`; refused where unknown, or where it would be
    recorded as used and change nothing: TF32 off CUDA, and either reduced mode for float64
    products (``dtype``), which neither TF32 nor autocast touches."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}.")
    if precision == "tf32" and device.type != "cuda":
        raise UserError(
            f"`precision=tf32` is a CUDA matrix format: on {device.type} it changes nothing; "
            "use `precision=full`, or bf16."
        )
    if precision != "full" and dtype == torch.float64:
        raise UserError(
            f"`precision={precision}` lowers float32 arithmetic only, and float64 products "
            "(`dtype=float64`) are computed in float64 whatever it says; use `precision=full`, "
            "or `dtype=float32`."
        )
    return precision  # type: ignore[return-value]


@contextlib.contextmanager
def numerics(precision: Precision, device: torch.device) -> Iterator[None]:
    """Run the enclosed computation in ``precision``, whatever autocast the caller runs under;
    the global TF32 settings are restored after."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else _without_autocast()
    )
    with _tf32(precision == "tf32"), autocast:
        yield


def without_tf32(solver: Callable[P, R]) -> Callable[P, R]:
    """Run a solver's own linear algebra (Gram matrices, orthogonalisation) without TF32, whatever
    the global setting, and outside a caller's autocast: their 1e-3 rounding would cap every
    residual far above a float32 tolerance.
    """

    @functools.wraps(solver)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        with _tf32(False), _without_autocast():
            return solver(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _without_autocast() -> Iterator[None]:
    """Outside the autocast a caller may run under (a mixed-precision training step that calls
    the engine): full precision would otherwise be bfloat16 or float16 products and Gram
    matrices."""
    with contextlib.ExitStack() as stack:
        for kind in ("cpu", "cuda"):
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


@functools.cache
def _fp32_settings() -> tuple[object, ...]:
    """The per-backend ``fp32_precision`` settings this torch has (torch >= 2.9; none before):
    the same objects for the whole process, so looked for once (each ``hasattr`` reads one)."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if not hasattr(cuda, "fp32_precision"):
        return ()
    backends = (cuda, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None))
    return tuple(b for b in backends if hasattr(b, "fp32_precision"))


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """TF32 on or off for matrix products and cuDNN, through the settings API this torch has.

    torch >= 2.9 has per-backend ``fp32_precision`` settings and refuses to read the legacy
    ``allow_tf32`` flags once code has used the new ones, so the new API is used where it exists.
    Only the settings that differ are set and put back: inside a solver (:func:`without_tf32`)
    each product's :func:`numerics` finds them as wanted (~0.1 ms of host work a product, when
    every setting was looked up, set and put back).
    """
    if settings := _fp32_settings():
        wanted = "tf32" if allowed else "ieee"
        saved = [(s, s.fp32_precision) for s in settings]
        changed = [(s, value) for s, value in saved if value != wanted]
        for s, _ in changed:
            s.fp32_precision = wanted
        try:
            yield
        finally:
            for s, value in changed:
                s.fp32_precision = value
        return
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved_flags = (cuda.allow_tf32, cudnn.allow_tf32)
    cuda.allow_tf32 = cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved_flags
