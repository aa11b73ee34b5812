"""The spectral engine: curvature operators, solvers (eigenpairs, trace, density), alignment.

It imports nothing from the CLI: ``analyze`` and ``eigensam`` both call it. The main names are
here (``from hessian_cli.engine import HessianOperator, eigenpairs``) and load on first use, so
that importing one module of the engine does not import them all. Every refusal of bad input is a
:class:`UserError` (a loss or product that is NaN or infinite: :class:`NotFinite`, one of them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "HessianOperator": "hessian_cli.engine.operator",
    "LinearOperator": "hessian_cli.engine.linear_operator",
    "MatrixOperator": "hessian_cli.engine.linear_operator",
    "DiagonalOperator": "hessian_cli.engine.linear_operator",
    "ParamSpace": "hessian_cli.engine.params",
    "select_parameters": "hessian_cli.engine.params",
    "eigenpairs": "hessian_cli.engine.eigensolver",
    "stochastic_trace": "hessian_cli.engine.trace",
    "spectral_density": "hessian_cli.engine.density",
    "alignment_scores": "hessian_cli.engine.alignment",
    "dense_hessian": "hessian_cli.engine.dense",
    "EigenResult": "hessian_cli.engine.results",
    "TraceResult": "hessian_cli.engine.results",
    "DensityResult": "hessian_cli.engine.results",
    "AlignmentResult": "hessian_cli.engine.alignment",
    "UserError": "hessian_cli.errors",
    "NotFinite": "hessian_cli.errors",
}
__all__ = [
    "AlignmentResult",
    "DensityResult",
    "DiagonalOperator",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "NotFinite",
    "ParamSpace",
    "TraceResult",
    "UserError",
    "alignment_scores",
    "dense_hessian",
    "eigenpairs",
    "select_parameters",
    "spectral_density",
    "stochastic_trace",
]

if TYPE_CHECKING:
    from hessian_cli.engine.alignment import AlignmentResult, alignment_scores
    from hessian_cli.engine.dense import dense_hessian
    from hessian_cli.engine.density import spectral_density
    from hessian_cli.engine.eigensolver import eigenpairs
    from hessian_cli.engine.linear_operator import DiagonalOperator, LinearOperator, MatrixOperator
    from hessian_cli.engine.operator import HessianOperator
    from hessian_cli.engine.params import ParamSpace, select_parameters
    from hessian_cli.engine.results import DensityResult, EigenResult, TraceResult
    from hessian_cli.engine.trace import stochastic_trace
    from hessian_cli.errors import NotFinite, UserError


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'hessian_cli.engine' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too, for dir() and tab completion
    return sorted({*globals(), *__all__})
