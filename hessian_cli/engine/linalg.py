"""Small dense helpers shared by the Krylov solvers."""

from __future__ import annotations

import torch


def gram(A: torch.Tensor, B: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """``A @ B.T`` in float64 without float64 copies of ``A`` and ``B``.

    Products over column chunks in the inputs' dtype, summed in float64: the rounding of a chunk
    of ``2^18`` terms, not of all ``n``, and memory traffic of one read of each input (a float64
    copy of a basis of 30 vectors of 11M parameters would be 2.6 GB per iteration).
    """
    if A.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for start in range(0, A.shape[1], chunk):
        out += (A[:, start : start + chunk] @ B[:, start : start + chunk].T).double()
    return out


def orthonormalize_against(
    W: torch.Tensor, Q: torch.Tensor | None, *, drop_tol: float = 1e-6
) -> torch.Tensor:
    """Rows of ``W`` made orthonormal and orthogonal to the (orthonormal) rows of ``Q``.

    Classical Gram-Schmidt applied twice, then a QR of what remains; directions whose norm
    collapses below ``drop_tol`` of their original size (already in span(Q)) are dropped.
    """
    norms0 = W.norm(dim=1).clamp_min(torch.finfo(W.dtype).tiny)
    for _ in range(2):
        if Q is not None and Q.shape[0]:
            W = W - (W @ Q.T) @ Q
    keep = W.norm(dim=1) > drop_tol * norms0
    W = W[keep]
    if W.shape[0] == 0:
        return W
    q, r = torch.linalg.qr(W.T)
    diag = r.diagonal().abs()
    good = diag > drop_tol * diag.max()
    W = q.T[good]
    if Q is not None and Q.shape[0]:  # one more pass: QR can reintroduce components of Q
        W = W - (W @ Q.T) @ Q
        W = torch.linalg.qr(W.T)[0].T
    return W
