"""Small dense helpers shared by the Krylov solvers."""

from __future__ import annotations

import torch

# Rows this short are simply converted to float64: cheaper than the pieces' bookkeeping (a
# product of two rows of 5,130 entries: 13 instead of 59 us on 2 CPU cores; even at 65,536).
SHORT = 16_384


def gram(A: torch.Tensor, B: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``A @ B.T`` in float64, from float32 products over ``chunk``-long pieces of the rows.

    Float32 dot products over hundreds of thousands of terms lose about ``sqrt(n) * 6e-8`` of
    their size: enough to leave Krylov bases non-orthogonal and Ritz values above the largest
    eigenvalue (seen on ResNet-20 as a solver stalled at a 1e-4 residual). Summing the pieces'
    products in float64 brings the error to about ``chunk / sqrt(n) * 6e-8`` (1.6e-8 measured for
    unit vectors of 2M entries) at the cost of one float32 batched product: converting the
    inputs to float64 instead moved 5x the memory and took 10-20x as long.
    """
    if torch.float64 in (A.dtype, B.dtype) or A.shape[1] <= SHORT:
        return A.double() @ B.double().T
    A, B = A.float(), B.float()  # half-precision pieces would round every partial sum
    n = A.shape[1]
    pieces = n // chunk
    split = pieces * chunk
    out = A[:, split:].double() @ B[:, split:].double().T
    if pieces:
        # [pieces, a, chunk] @ [pieces, chunk, b]: strided views of the rows, no copies.
        A3 = A[:, :split].reshape(A.shape[0], pieces, chunk).transpose(0, 1)
        B3 = B[:, :split].reshape(B.shape[0], pieces, chunk).permute(1, 2, 0)
        out += torch.bmm(A3, B3).sum(0, dtype=torch.float64)
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity, from its least and greatest entries (both NaN
    where any is): ``isfinite(t).all()`` took 0.85 ms for 272,474 entries on the CPU, a tenth of
    a ResNet-20 product on one input, and 82 ms for 11M; this 0.09 and 5 ms."""
    return t.numel() == 0 or bool(torch.stack(torch.aminmax(t)).isfinite().all())


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` of two vectors (of any shape, flattened) in float64, through :func:`gram`:
    torch's float32 ``dot`` of 11M entries is 1e-5 off on CPU."""
    return gram(a.reshape(1, -1), b.reshape(1, -1))[0, 0]


def row_dots(A: torch.Tensor, B: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``<A_i, B_i>`` for each row ``i``, in float64: sums of ``chunk``-long pieces' products
    combined in float64, as :func:`gram` does, without its cross terms (``k`` dots, not
    ``k^2``) and without a copy of the rows: each row's pieces are a view of it, multiplied in
    one batched product (the pieces of all rows at once were a reshape of the rows cut short
    of their tail, which copied them: a trace of 99 probes of 2M entries held 66 more)."""
    acc = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    A, B = A.to(acc), B.to(acc)
    split = A.shape[1] // chunk * chunk if A.shape[1] > SHORT else 0
    # The float64 copies of short rows, a few rows at a time: those of all rows at once held
    # three times the rows in float64 (a trace's n = 3,000 probes of as many parameters: 206 MiB
    # beside its 69 MiB of probes and products).
    rows = max(1, (1 << 18) // max(1, A.shape[1] - split))
    dots = torch.cat(
        [
            (a.double() * b.double()).sum(1)
            for a, b in zip(A[:, split:].split(rows), B[:, split:].split(rows), strict=True)
        ]
    )
    if split:
        dots += torch.stack(
            [
                torch.bmm(a[:split].reshape(-1, 1, chunk), b[:split].reshape(-1, chunk, 1))
                .double()
                .sum()
                for a, b in zip(A, B, strict=True)
            ]
        )
    return dots


def norms(W: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean norms of the rows of ``W`` (of ``W`` itself if it is a vector), in its dtype.

    torch's CPU ``norm`` sums float32 squares in a few running totals, which drift low as the
    length grows (pytorch/pytorch#169237): 8e-5 for 4M entries, 4.4e-4 for 11M. "Unit" Krylov
    vectors normalised with it were that far from unit length, and a float32 top-1 of ResNet-18
    (11.2M parameters) on CPU stalled at a 4e-4 residual with its eigenvalue 4e-4 too high.
    Norms of ``chunk``-long pieces, combined in float64, are accurate to rounding on any device.
    """
    rows = W.reshape(-1, W.shape[-1])
    acc = torch.promote_types(W.dtype, torch.float32)  # half-precision pieces would round
    split = rows.shape[1] // chunk * chunk if rows.shape[1] > SHORT else 0
    squares = rows[:, split:].double().pow(2).sum(1)
    if split:
        pieces = rows[:, :split].unflatten(1, (-1, chunk))  # a view: no copy of the rows
        squares += torch.linalg.vector_norm(pieces, dim=2, dtype=acc).double().pow(2).sum(1)
    return squares.sqrt().to(W.dtype).reshape(W.shape[:-1])


def orthonormalize_against(
    W: torch.Tensor,
    Q: torch.Tensor | None,
    *,
    drop_tol: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of ``W`` made orthonormal and orthogonal to the (orthonormal) rows of ``Q``.

    Projections against ``Q`` (classical Gram-Schmidt, twice), then, for more than one row,
    orthonormalisation within ``W`` through the eigendecomposition of its Gram matrix (twice),
    every inner product and norm accumulated in float64 (:func:`gram`, :func:`norms`): a float32
    QR of a tall matrix leaves its columns only about ``sqrt(n) * 6e-8`` orthogonal. Directions
    whose norm collapses below ``drop_tol`` of their original size (already in the span of ``Q``
    or of the other rows) are dropped. Given ``out`` (``W``'s shape, which may be ``W``), the
    rows are its first ones.
    """
    norms0 = norms(W).clamp_min(torch.finfo(W.dtype).tiny)
    # One copy of the caller's rows (none into `out`), then everything in place: each fresh
    # n-long array costs its page faults (ResNet-18, 11.2M parameters: 0.16 s a row on CPU, a
    # filled one 0.03 s).
    W = project_out(W, Q, out=torch.empty_like(W) if out is None else out)
    W = project_out(W, Q, out=W)
    W = _orthonormal_rows(W, Q, norms0, drop_tol)
    if out is None or W.data_ptr() == out.data_ptr():
        return W
    return out[: len(W)].copy_(W)  # rows dropped or combined: a new array


def _orthonormal_rows(
    W: torch.Tensor, Q: torch.Tensor | None, norms0: torch.Tensor, drop_tol: float
) -> torch.Tensor:
    """The rows of ``W``, orthogonal to ``Q``, made unit and orthonormal among themselves
    (:func:`orthonormalize_against`): in place where none drops and there is one."""
    lengths = norms(W)
    keep = lengths > drop_tol * norms0
    # Unit rows (only dependence drops a row below), those to drop too: the kept ones are the
    # same, so that several rows' first Gram matrix comes back with whether any drops (on a
    # GPU one wait, not two). It is made again where one does (rare).
    W /= lengths[:, None]
    G = None
    if W.shape[0] > 1:
        kept, G = to_host(keep.double(), gram(W, W))
    else:
        kept = keep
    if not bool(kept.all()):
        W, G = W[keep], None
    if W.shape[0] <= 1:  # nothing to orthonormalise within W (the usual block of one)
        return W
    for _ in range(2):
        values, U = small_eigh(gram(W, W) if G is None else G)
        G = None
        good = values > drop_tol**2 * values.max()
        W = to_device((U[:, good] / values[good].sqrt()).T, W) @ W
        W = project_out(W, Q, out=W)  # the combinations can bring back rounding-level parts of Q
    return W


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``, a small tensor on the host, in ``like``'s dtype on its device: torch's blocking copy
    to a GPU synchronises the stream after it (a wait for every queued kernel, as a read is);
    an asynchronous one from pageable memory has taken the data when it returns (``t`` may then
    change or be freed), and the driver need not wait for the stream to take a few kilobytes.
    The dtype is converted on the host: the same values."""
    return t.to(like.dtype).to(like.device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors (of one dtype) copied to the host in one transfer: on a GPU each copy is a
    wait for the device, and several that an iteration needs at once are one wait."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [part.reshape(t.shape) for part, t in zip(parts, tensors, strict=True)]


def small_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a small (basis-sized) matrix, on the CPU whatever ``M``'s device:
    on an H200 a CUDA eigh of a 20 x 20 matrix took about a millisecond, several times per
    iteration (benchmarks/overhead.py), against microseconds here. Results stay on the CPU."""
    return torch.linalg.eigh(M.cpu())


def project_out(
    W: torch.Tensor, Q: torch.Tensor | None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``W`` minus its components along the (orthonormal) rows of ``Q``, one classical
    Gram-Schmidt pass with the coefficients from :func:`gram`, in one ``addmm`` (``C @ Q`` and
    the subtraction made two n-long arrays): into ``out`` where given, which may be ``W``."""
    if Q is None or Q.shape[0] == 0:
        return W if out is None else out.copy_(W)
    return torch.addmm(W, gram(W, Q).to(W.dtype), Q, alpha=-1, out=out)
