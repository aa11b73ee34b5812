"""Stochastic trace estimation: Hutchinson and Hutch++ with Rademacher probes, in blocks."""

from __future__ import annotations

import math
import time
from typing import Literal

import torch

from hessian_cli.engine.linalg import orthonormalize_against, project_out, row_dots
from hessian_cli.engine.linear_operator import LinearOperator
from hessian_cli.engine.precision import without_tf32
from hessian_cli.engine.probes import probe_generator, rademacher
from hessian_cli.engine.results import TraceResult
from hessian_cli.errors import NotFinite, UserError


def _apply(op: LinearOperator, V: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``H`` applied to the rows of ``V``, ``block_size`` rows per product (all at once: None)."""
    if not len(V):  # a sketch that H maps to nothing (H = 0 on the chosen parameters)
        return torch.empty_like(V)
    if not block_size or block_size >= len(V):  # one product: no concatenated copy of it
        return op.matmul(V)
    return torch.cat([op.matmul(V[i : i + block_size]) for i in range(0, len(V), block_size)])


@without_tf32
def stochastic_trace(
    op: LinearOperator,
    num_probes: int = 99,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    block_size: int | None = None,
    seed: int = 0,
) -> TraceResult:
    """Unbiased estimate of ``trace(H)`` and its standard error from ``num_probes`` HVPs (fewer
    for Hutch++ when ``H`` maps its sketch into fewer dimensions: those are not multiplied).

    Hutch++ spends a third of the products on a sketch ``Q`` of the dominant range, takes
    ``trace(Q^T H Q)`` exactly and runs Hutchinson on the deflated rest, whose variance is much
    smaller when a few eigenvalues dominate (as they do in trained networks). The standard error
    is that of the Hutchinson part, the only random term.

    The probes are independent, so they are multiplied in as few blocks as can be: Hutchinson's
    all at once, Hutch++'s sketch and then its basis with the deflated probes (``block_size=None``;
    :class:`HessianOperator` splits a block that does not fit in memory).
    """
    if num_probes < 2:
        raise UserError("The trace needs at least 2 probes to report a standard error.")
    if method not in ("hutch++", "hutchinson"):
        raise UserError(f"Unknown trace method {method!r}: use hutch++ or hutchinson.")
    start, hvps0 = time.perf_counter(), op.hvp_count
    gen = probe_generator(op, seed)
    probe = dict(generator=gen, dtype=op.dtype, device=op.device)
    sketch = num_probes // 3 if method == "hutch++" and num_probes >= 6 else 0
    Q = torch.empty(0, op.n, dtype=op.dtype, device=op.device)
    if sketch:  # the sketch and its products are dropped as soon as Q is made of them
        HS = _apply(op, rademacher((sketch, op.n), **probe), block_size)
        Q = orthonormalize_against(HS, None)  # not QR: see its docs
        del HS
    # Q's rows, then the deflated probes, in one buffer: one product for both, a pass fewer,
    # and no more memory than the three passes took (no copy of either beside it).
    q, g = len(Q), num_probes - 2 * sketch
    V = torch.empty(q + g, op.n, dtype=op.dtype, device=op.device)
    V[:q] = Q
    del Q
    V[q:] = rademacher((g, op.n), **probe)
    if q:
        V[q:] = project_out(V[q:], V[:q])
    HV = _apply(op, V, block_size)
    dots = row_dots(V, HV).cpu()  # float64 from float32 pieces: no float64 copy of the block
    exact, samples = float(dots[:q].sum()), dots[q:]
    if not (math.isfinite(exact) and samples.isfinite().all()):
        raise NotFinite("The trace's Hessian-vector products are not finite (NaN or inf).")
    return TraceResult(
        estimate=exact + float(samples.mean()),
        stderr=float(samples.std() / math.sqrt(len(samples))),
        num_probes=num_probes,
        method="hutch++" if sketch else "hutchinson",
        hvps=op.hvp_count - hvps0,
        seconds=time.perf_counter() - start,
        samples=samples,
        sketch_trace=exact,
    )
