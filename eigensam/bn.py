"""BatchNorm (and InstanceNorm) running statistics for the two passes of a SAM step.

SAM evaluates the gradient twice per step, at ``w`` and at ``w + e``. Only the first pass sees
the model's actual weights, so only it may update the running statistics; otherwise they would
move twice per step and average in activations of perturbed weights that are never kept.

davda54/sam does this by setting ``momentum = 0``; that leaves the running mean and variance
alone but still increments ``num_batches_tracked`` (and ``0 * NaN`` would still poison them).
Here the second pass runs with ``track_running_stats = False`` instead, exactly as the engine's
``forward_mode(bn="train")`` does: the layer normalises by the batch statistics, as in the first
pass, and touches none of its buffers. An InstanceNorm layer that keeps running statistics
updates them whatever that flag says (``F.instance_norm`` updates the buffers it is given: they
moved on both passes); in training mode its second pass normalises each sample by its own
statistics, as the first, without its buffers. A TorchScript layer's ``track_running_stats`` is
compiled in: its buffers are saved instead and put back (they moved in both passes:
num_batches_tracked 6 after 3 steps; an InstanceNorm's running mean -0.12 for -0.07).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hessian_cli.engine.model_mode import (
    holds_running_instance_statistics,
    instance_statistics,
    scripted_running_norm,
)

_SAVED = "_eigensam_track_running_stats"


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm and InstanceNorm layers from updating their buffers (call before the
    second pass).

    Idempotent: calling it twice keeps the setting saved by the first call.
    """
    for m in model.modules():
        if hasattr(m, _SAVED):
            continue
        if isinstance(m, _BatchNorm):
            setattr(m, _SAVED, m.track_running_stats)
            m.track_running_stats = False
        elif m.training and holds_running_instance_statistics(m):
            setattr(m, _SAVED, True)
            m._apply_instance_norm = instance_statistics(m)  # type: ignore[method-assign]
        elif scripted_running_norm(m):
            setattr(m, _SAVED, {k: b.clone() for k, b in m.named_buffers(recurse=False)})


def enable_running_stats(model: nn.Module) -> None:
    """Restore what :func:`disable_running_stats` changed (call before the next first pass)."""
    for m in model.modules():
        if not hasattr(m, _SAVED):
            continue
        saved = getattr(m, _SAVED)
        if isinstance(m, _BatchNorm):
            m.track_running_stats = saved
        elif isinstance(saved, dict):  # a scripted layer's buffers
            with torch.no_grad():
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(saved[k])
        else:
            del m._apply_instance_norm
        delattr(m, _SAVED)
