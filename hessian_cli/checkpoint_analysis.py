"""What analysing one checkpoint produces: provenance plus the engine's results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hessian_cli.engine.alignment import AlignmentResult
from hessian_cli.engine.params import ParamSpace
from hessian_cli.engine.results import DensityResult, EigenResult, TraceResult


@dataclass
class CheckpointAnalysis:
    """Everything computed for one checkpoint; the HDF5 writer and the renderers read this.

    ``provenance`` holds scalar attributes (str/int/float/bool): checkpoint path and sha256,
    model/data/loss specs, parameter and sample counts, dtype, device, seed, solver, tolerance,
    HVP count, wall time, step/epoch where known.
    """

    name: str
    provenance: dict[str, Any]
    space: ParamSpace
    loss: float
    eigen: EigenResult | None = None
    trace: TraceResult | None = None
    density: DensityResult | None = None
    alignment: AlignmentResult | None = None
