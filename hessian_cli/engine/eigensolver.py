"""Extreme eigenpairs by a thick-restart block Krylov method (block Lanczos in Davidson form).

Each iteration multiplies a block of ``b`` vectors by H in one pass, adds them to an orthonormal
basis ``Q`` (with ``HQ`` kept, so no product is ever recomputed), and solves the small projected
problem (Rayleigh-Ritz). The new block is the residuals of the wanted, not yet converged Ritz
vectors, which span the same space as the next block-Lanczos block in exact arithmetic but stay
stable in float32. When the basis reaches ``max_basis`` vectors it is restarted with the best
Ritz vectors (thick restart), so memory is ``O(max_basis * n)`` whatever the iteration count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch

from hessian_cli.engine.linalg import orthonormalize_against
from hessian_cli.engine.operator import LinearOperator, gaussian
from hessian_cli.engine.results import EigenResult
from hessian_cli.errors import UserError

Which = Literal["largest", "smallest", "both"]
Progress = Callable[[int, int, int], None]  # (hvps spent, pairs converged, pairs wanted)


def default_block_size(k: int, device: torch.device) -> int:
    """Vectors per pass, by device.

    On CPU a block costs as much per vector as single products, and single-vector Krylov needs
    the fewest products (ResNet-20 top-5: 30 HVPs with block 1, 60 with block 5;
    benchmarks/RESULTS.md), so the CPU default is 1. Its known limit: a Krylov space grown from one
    vector sees one copy of an exactly repeated eigenvalue; pass a block at least as large as the
    multiplicity (``--block-size``) where that matters. On GPUs a block amortises one pass over
    several vectors.
    """
    return min(max(k, 4), 16) if device.type == "cuda" else 1


def eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    which: Which = "largest",
    tol: float = 1e-4,
    block_size: int | None = None,
    max_basis: int | None = None,
    max_hvps: int | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    verify: bool = True,
    progress: Progress | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest, or both) eigenpairs of ``op``.

    ``init`` rows warm-start the search (e.g. eigenvectors of the previous checkpoint). With
    ``verify`` the final residuals come from fresh products ``H v`` (``k`` more HVPs) rather than
    from the basis recurrences, so the reported residual is the true one.
    """
    if which == "both":
        top = eigenpairs(
            op,
            k,
            which="largest",
            tol=tol,
            block_size=block_size,
            max_basis=max_basis,
            max_hvps=max_hvps,
            init=init,
            seed=seed,
            return_vectors=return_vectors,
            verify=verify,
            progress=progress,
        )
        low = eigenpairs(
            op,
            k,
            which="smallest",
            tol=tol,
            block_size=block_size,
            max_basis=max_basis,
            max_hvps=max_hvps,
            seed=seed + 1,
            return_vectors=return_vectors,
            verify=verify,
            progress=progress,
        )
        return _concat(top, low)
    if which not in ("largest", "smallest"):
        raise UserError(f"Unknown eigenvalue selection {which!r}: use largest, smallest or both.")
    if not 1 <= k <= op.n:
        raise UserError(
            f"Cannot compute {k} eigenpairs of a Hessian with {op.n} parameters: "
            f"choose --top-k between 1 and {op.n}."
        )
    start_time, start_hvps = time.perf_counter(), op.hvp_count
    b = min(block_size or default_block_size(k, op.device), op.n)
    max_basis = min(op.n, max_basis or max(3 * (k + b), 20))
    max_basis = max(max_basis, min(op.n, k + 2 * b))
    max_hvps = max_hvps if max_hvps is not None else max(2000, 200 * k)
    sign = 1.0 if which == "largest" else -1.0
    gen = torch.Generator().manual_seed(seed)

    start = gaussian((b, op.n), generator=gen, dtype=op.dtype, device=op.device)
    if init is not None:
        start = torch.cat([init.to(start).reshape(-1, op.n), start])[: max(b, len(init))]
    Q = orthonormalize_against(start, None)
    HQ = op.matmul(Q)
    iterations = 0
    while True:
        iterations += 1
        T = Q.double() @ HQ.double().T
        T = (T + T.T) / 2
        theta, S = torch.linalg.eigh(sign * T)
        theta, S = sign * theta.flip(0), S.flip(1)  # most wanted first
        m = Q.shape[0]
        w = min(m, k + b)
        Sw = S[:, :w].to(op.dtype)
        X, HX = Sw.T @ Q, Sw.T @ HQ
        R = HX - theta[:w, None].to(op.dtype) * X
        rnorm = R.norm(dim=1).double()
        scale = float(theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
        conv = torch.zeros(k, dtype=torch.bool)
        conv[: min(k, w)] = rnorm[:k] <= tol * scale
        spent = op.hvp_count - start_hvps
        if progress:
            progress(spent, int(conv.sum()), k)
        exhausted = m >= op.n
        if bool(conv.all()) or exhausted or spent + b > max_hvps:
            break
        # Expand with residuals of the first b unconverged wanted Ritz vectors (then the next).
        order = [i for i in range(w) if i >= k or not conv[i]]
        W = R[order[:b]]
        if m + W.shape[0] > max_basis:  # thick restart: keep the best Ritz vectors
            keep = max(k, max_basis - W.shape[0])
            Sk = S[:, :keep].to(op.dtype)
            Q, HQ = Sk.T @ Q, Sk.T @ HQ
        W = orthonormalize_against(W, Q)
        if W.shape[0] < b and Q.shape[0] + W.shape[0] < op.n:  # invariant subspace: add fresh
            extra = gaussian(
                (b - W.shape[0], op.n), generator=gen, dtype=op.dtype, device=op.device
            )
            W = torch.cat([W, orthonormalize_against(extra, torch.cat([Q, W]))])[:b]
        if W.shape[0] == 0:
            break
        Q, HQ = torch.cat([Q, W]), torch.cat([HQ, op.matmul(W)])

    values, vectors = theta[:k], X[:k]
    if verify:
        HV = op.matmul(vectors)
        values = (vectors * HV).sum(1).double() / (vectors * vectors).sum(1).double()
        rnorm = (HV - values[:, None].to(op.dtype) * vectors).norm(dim=1).double()
        scale = max(scale, float(values.abs().max()))
    residuals = rnorm[:k] / scale
    return EigenResult(
        eigenvalues=values.cpu(),
        residuals=residuals.cpu(),
        converged=(residuals <= tol).cpu(),
        eigenvectors=vectors if return_vectors else None,
        which=which,
        tol=tol,
        scale=scale,
        hvps=op.hvp_count - start_hvps,
        iterations=iterations,
        seconds=time.perf_counter() - start_time,
        block_size=b,
    )


def _concat(a: EigenResult, b: EigenResult) -> EigenResult:
    vecs = None
    if a.eigenvectors is not None and b.eigenvectors is not None:
        vecs = torch.cat([a.eigenvectors, b.eigenvectors])
    scale = max(a.scale, b.scale)
    residuals = torch.cat([a.residuals * a.scale, b.residuals * b.scale]) / scale
    return EigenResult(
        eigenvalues=torch.cat([a.eigenvalues, b.eigenvalues]),
        residuals=residuals,
        converged=residuals <= a.tol,
        eigenvectors=vecs,
        which="both",
        tol=a.tol,
        scale=scale,
        hvps=a.hvps + b.hvps,
        iterations=a.iterations + b.iterations,
        seconds=a.seconds + b.seconds,
        block_size=a.block_size,
    )
