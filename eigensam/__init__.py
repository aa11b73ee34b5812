"""SAM and Eigen-SAM optimizers, usable in any training loop: ``from eigensam import EigenSAM``."""

from eigensam.bn import disable_running_stats, enable_running_stats
from eigensam.eigen_sam import EigenSAM
from eigensam.refresh import RefreshResult, refresh_top_eigenvector
from eigensam.sam import SAM

__all__ = [
    "SAM",
    "EigenSAM",
    "RefreshResult",
    "disable_running_stats",
    "enable_running_stats",
    "refresh_top_eigenvector",
]
