"""SAM and Eigen-SAM optimizers, usable in any training loop: ``from eigensam import EigenSAM``.

The names load on first use, so that importing :mod:`eigensam.config` (as the command line's
help does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "SAM": "eigensam.sam",
    "EigenSAM": "eigensam.eigen_sam",
    "RefreshResult": "eigensam.refresh",
    "refresh_top_eigenvector": "eigensam.refresh",
    "disable_running_stats": "eigensam.bn",
    "enable_running_stats": "eigensam.bn",
}
__all__ = [
    "SAM",
    "EigenSAM",
    "RefreshResult",
    "disable_running_stats",
    "enable_running_stats",
    "refresh_top_eigenvector",
]

if TYPE_CHECKING:
    from eigensam.bn import disable_running_stats, enable_running_stats
    from eigensam.eigen_sam import EigenSAM
    from eigensam.refresh import RefreshResult, refresh_top_eigenvector
    from eigensam.sam import SAM


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'eigensam' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too, for dir() and tab completion
    return sorted({*globals(), *__all__})
