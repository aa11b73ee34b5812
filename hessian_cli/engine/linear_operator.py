"""The interface the solvers work against, and two plain operators that implement it.

Solvers (eigenpairs, trace, density) see only :class:`LinearOperator`; the network's Hessian
(:class:`~hessian_cli.engine.operator.HessianOperator`) is one implementation, a dense or a
diagonal matrix two more: references for tests and for measuring the solvers' own cost.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import torch

from hessian_cli.errors import NotFinite, UserError, a_type


class LinearOperator(Protocol):
    """What the solvers need: a size, a dtype/device, and a block product ``[b, n] -> [b, n]``.

    Optional members the solvers look for (:class:`HessianOperator` has them): an operator whose
    products are approximate has ``precision`` (not ``"full"``) and a ``full_precision()``
    context in which they are exact, with which the eigensolver certifies its residuals; one
    whose products are collective over torch.distributed ranks has ``distributed = True``, so
    that refusals and random draws agree on every rank; one whose products depend on weights
    that could change between calls has a ``weights_held()`` context, inside which they do not
    (see :func:`holds_weights`); one that looks at each product for NaN or inf has an
    ``unchecked_products()`` context, inside which the caller looks instead (the solvers, at
    what they read anyway: :func:`checks_products`), and ``not_finite()``, the error to raise.
    """

    n: int
    dtype: torch.dtype
    device: torch.device
    hvp_count: int

    def matmul(self, block: torch.Tensor) -> torch.Tensor: ...


def check_operator(op: object, solver: str) -> None:
    """Refuse what is no :class:`LinearOperator`: a matrix given as it is failed in ``op.n``
    or ``op.hvp_count``, an AttributeError that named neither the solver nor the fix."""
    if not all(hasattr(op, name) for name in ("n", "dtype", "device", "hvp_count", "matmul")):
        raise UserError(
            f"{solver} takes a linear operator (a HessianOperator, or MatrixOperator(matrix) for "
            f"a matrix), not {a_type(op)}."
        )


def check_block(block: object, n: int) -> None:
    """Refuse, before it is counted, what a product cannot take: a vector of another length
    (a matrix's failed in torch's "mat1 and mat2 shapes cannot be multiplied"; a diagonal's of
    length 1 broadcast to the diagonal itself, unsaid), a block of more dimensions, or an array
    that is no tensor (it failed in ``.to``), or a complex one."""
    if not isinstance(block, torch.Tensor) or block.ndim not in (1, 2) or block.shape[-1] != n:
        raise UserError(
            f"a product takes a vector of {n} entries or a block of them, [b, {n}], "
            f"not {described(block)}."
        )
    if block.is_complex():  # cast to the operator's real dtype, its imaginary part went, unsaid
        raise UserError(f"a product takes a real vector, not {described(block)}.")


def _products(block: torch.Tensor) -> int:
    """Products in ``block``: one per row, one for a single ``[n]`` vector (as the network's
    operator counts it), not ``n``."""
    return 1 if block.ndim == 1 else block.shape[0]


def _as_operand(block: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """``block`` in the operator's dtype and on its device, as :class:`HessianOperator` takes
    it: a float64 vector on a float32 matrix failed in torch's "expected m1 and m2 to have the
    same dtype", and on a diagonal came back float64, not the operator's dtype. As given where
    it is (no call: a solve's every product)."""
    if block.dtype == op.dtype and block.device == op.device:
        return block
    return block.to(device=op.device, dtype=op.dtype)


class MatrixOperator:
    """A dense symmetric matrix as a :class:`LinearOperator`: a spectrum chosen exactly, for the
    solvers' tests and benchmarks."""

    def __init__(self, matrix: torch.Tensor) -> None:
        _check_matrix(matrix)
        # A matrix that requires grad (made from a model's weights) failed in eigenpairs, in
        # "addmm(): functions with out=... arguments don't support automatic differentiation".
        self.matrix = matrix.detach()
        self.n = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvp_count = 0

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        check_block(block, self.n)
        self.hvp_count += _products(block)
        return _as_operand(block, self) @ self.matrix


class DiagonalOperator:
    """A diagonal matrix as a :class:`LinearOperator`: solves of a network's size whose
    products cost next to nothing (tests, and measuring the solvers' own cost)."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        if not isinstance(diagonal, torch.Tensor) or diagonal.ndim != 1 or not _real(diagonal):
            raise UserError(f"DiagonalOperator takes a real vector, not {described(diagonal)}.")
        if diagonal.layout != torch.strided:  # as a matrix's
            raise UserError(
                "DiagonalOperator takes a dense vector, not a sparse one: diagonal.to_dense()."
            )
        if not len(diagonal):  # of no entries: see _check_matrix
            raise UserError(
                "DiagonalOperator takes a vector of at least one entry, not an empty one."
            )
        self.diagonal = diagonal.detach()  # as a matrix's (products record no graph)
        self.n = len(diagonal)
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.hvp_count = 0

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        check_block(block, self.n)
        self.hvp_count += _products(block)
        return _as_operand(block, self) * self.diagonal


# Asymmetry beyond float32 rounding, relative to the largest entry: a dense Hessian from
# autograd differs from its transpose by about 1e-7 of it.
_ASYMMETRY = 1e-4


def _real(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not t.is_complex()


def described(t: object) -> str:
    """A tensor as a refusal names it, by its dtype and shape; anything else by its type."""
    if not isinstance(t, torch.Tensor):
        return a_type(t)
    dtype = str(t.dtype).removeprefix("torch.")
    return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(t.shape)}"


def _check_matrix(matrix: torch.Tensor) -> None:
    """Refuse what is not a real symmetric matrix: an integer one failed deep in a solve
    (torch.finfo), a non-square one gave products of another length than its size, and a
    non-symmetric one had no eigenpairs of the kind solved for (triu(ones(4)), all of whose
    eigenvalues are 1, gave 2.5). Entries that are not finite are left to the solvers."""
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or not _real(matrix):
        raise UserError(f"MatrixOperator takes a real square matrix, not {described(matrix)}.")
    if matrix.layout != torch.strided:  # failed in the symmetry check, NotImplementedError
        raise UserError("MatrixOperator takes a dense matrix, not a sparse one: matrix.to_dense().")
    if matrix.shape[0] != matrix.shape[1]:
        raise UserError(
            f"MatrixOperator takes a square matrix, not one of shape {tuple(matrix.shape)}."
        )
    # Of no rows, the trace came out 0 from 99 probes and no product, and the density failed in
    # a ZeroDivisionError.
    if not matrix.numel():
        raise UserError("MatrixOperator takes a matrix of at least one row, not an empty one.")
    matrix = matrix.detach()
    both = torch.isfinite(matrix) & torch.isfinite(matrix.T)
    gap = float(torch.where(both, (matrix - matrix.T).abs(), 0).amax())
    size = float(torch.where(both, matrix.abs(), 0).amax())
    if gap > _ASYMMETRY * size:
        raise UserError(
            f"MatrixOperator takes a symmetric matrix, as a Hessian is: this one differs from "
            f"its transpose by up to {gap:.3g}, with entries up to {size:.3g}."
        )


P = ParamSpec("P")
R = TypeVar("R")


def holds_weights(
    solver: Callable[Concatenate[LinearOperator, P], R],
) -> Callable[Concatenate[LinearOperator, P], R]:
    """Run a solver inside its operator's ``weights_held()``, where it has one: a solve writes
    no weights between its products, so they need not look for changed ones at every call."""
    return _inside(solver, "weights_held")


def checks_products(
    solver: Callable[Concatenate[LinearOperator, P], R],
) -> Callable[Concatenate[LinearOperator, P], R]:
    """Run a solver with its operator's products unchecked for NaN or inf, where the operator
    can leave that to it (``unchecked_products()``): the solver reads on the host something
    that every product enters and raises :func:`not_finite` where that is not finite. The
    operator's own look is one more read of the device per product (on a GPU a wait for it)."""
    return _inside(solver, "unchecked_products")


def _inside(
    solver: Callable[Concatenate[LinearOperator, P], R], context: str
) -> Callable[Concatenate[LinearOperator, P], R]:
    """``solver`` run inside its operator's optional ``context`` (a method's name)."""

    @functools.wraps(solver)
    def wrapped(op: LinearOperator, *args: P.args, **kwargs: P.kwargs) -> R:
        with getattr(op, context, contextlib.nullcontext)():
            return solver(op, *args, **kwargs)

    return wrapped


def not_finite(op: LinearOperator, solver: str) -> NotFinite:
    """The error for products that are not finite: the operator's own words where it has them
    (``not_finite()``), else that ``solver``'s products are not."""
    error = getattr(op, "not_finite", None)
    if error is not None:
        return error()
    return NotFinite(f"the {solver} Hessian-vector products are not finite (NaN or inf).")
