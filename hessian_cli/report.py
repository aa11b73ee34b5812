"""The report of one analysed checkpoint as plain JSON data: ``analyze --json``, ``show --json``,
the terminal tables and the HDF5 reader all speak this one structure (keys in docs/hdf5.md).

Numbers are Python floats/ints; non-finite floats become ``None`` so that the output is strict
JSON. Eigenvectors are not part of the report (they live only in the HDF5 file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessian_cli.checkpoint_analysis import CheckpointAnalysis

Scalar = str | int | float | bool | None

# Provenance keys that the `cost` section summarises, as (report key, provenance key).
COST_KEYS = (
    ("hvps", "hvps"),
    ("grad_equivalents", "grad_equivalents"),
    ("seconds", "wall_seconds"),
    ("device", "device"),
)


def number(x: Any) -> float | None:
    """A float, or ``None`` where it is missing or not finite (strict JSON has no NaN or inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def numbers(values: Iterable[Any]) -> list:
    """Nested lists of floats (``None`` for non-finite) from a tensor, array or list."""
    if hasattr(values, "detach"):  # torch tensor: float64 keeps float32 values exactly
        values = values.detach().cpu().double().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    return [numbers(v) if isinstance(v, list) else number(v) for v in values]


def scalar(value: Any) -> Scalar | list[Scalar]:
    """A provenance value as a JSON scalar (or list of scalars), whatever type it came in as."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # also plain-ifies str subclasses such as torch's TorchVersion
    if hasattr(value, "tolist"):  # numpy/torch scalars and arrays
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return number(value)
    if isinstance(value, (list, tuple)):
        items = [scalar(v) for v in value]
        kinds = {type(v) for v in items}  # scalar() returns exact bool/int/float/str types
        if kinds <= {bool} or kinds <= {str} or kinds <= {int, float}:
            return items  # a homogeneous list is stored as an HDF5 array attribute
        return json.dumps(items)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def provenance_dict(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance with JSON values; ``None`` entries are dropped (the HDF5 file skips them)."""
    out = {str(k): scalar(v) for k, v in provenance.items()}
    return {k: v for k, v in out.items() if v is not None}


def cost_dict(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """What the analysis cost, from the provenance keys the analyser records (``None`` where
    absent)."""
    return {key: provenance.get(src) for key, src in COST_KEYS}


def analysis_to_dict(a: CheckpointAnalysis) -> dict[str, Any]:
    """The report of one checkpoint: stable keys, JSON-serialisable, no eigenvectors."""
    prov = provenance_dict(a.provenance)
    eigen = trace = density = alignment = None
    if a.eigen is not None:
        e = a.eigen
        eigen = {
            "which": e.which,
            "eigenvalues": numbers(e.eigenvalues),
            "residuals": numbers(e.residuals),
            "errors": numbers(e.errors),
            "converged": [bool(c) for c in e.converged.tolist()],
            "tol": number(e.tol),
            "criterion": e.criterion,
            "scale": number(e.scale),
            "hvps": int(e.hvps),
            "iterations": int(e.iterations),
            "seconds": number(e.seconds),
            "block_size": int(e.block_size),
            "guard": int(e.guard),
            "check_hvps": int(e.check_hvps),
            "skipped_found": int(e.skipped_found),
            "unchecked": bool(e.unchecked),
            "floor": number(e.floor),
            "stop_reason": e.stop_reason,
            "method": e.method,
        }
    if a.trace is not None:
        t = a.trace
        trace = {
            "estimate": number(t.estimate),
            "stderr": number(t.stderr),
            "num_probes": int(t.num_probes),
            "method": t.method,
            "hvps": int(t.hvps),
            "seconds": number(t.seconds),
            "sketch_trace": number(t.sketch_trace),
            "num_samples": len(t.samples),
            "known_eigenpairs": int(t.known),
        }
    if a.density is not None:
        d = a.density
        density = {
            "nodes": numbers(d.nodes),
            "weights": numbers(d.weights),
            "grid": numbers(d.grid),
            "values": numbers(d.values),
            "sigma": number(d.sigma),
            "num_probes": int(d.num_probes),
            "steps": int(d.steps),
            "hvps": int(d.hvps),
            "seconds": number(d.seconds),
            "known_eigenpairs": int(d.known),
        }
    if a.alignment is not None:
        al = a.alignment
        alignment = {
            "alignment": numbers(al.alignment),
            "subspace_alignment": number(al.subspace_alignment),
            "curvature_ratio": number(al.curvature_ratio),
            "eigensam_alignment": number(al.eigensam_alignment),
            "sam_sharpness": number(al.sam_sharpness),
            "grad_norm": number(al.grad_norm),
            "loss": number(al.loss),
            "rho": number(al.rho),
            "alpha": number(al.alpha),
            "minibatch": {
                "values": numbers(al.minibatch_alignment),
                "mean": numbers(al.minibatch_mean),
                "std": numbers(al.minibatch_std),
            },
            "hvps": int(al.hvps),
        }
    return {
        "name": a.name,
        "provenance": prov,
        "loss": number(a.loss),
        "eigen": eigen,
        "trace": trace,
        "density": density,
        "alignment": alignment,
        "cost": cost_dict(prov),
    }
