"""What a training checkpoint holds, and how a run continues from one.

Resuming repeats an uninterrupted run bit for bit on CPU: the weights, optimizer state (momentum,
the Eigen-SAM eigenvector and its refresh count), the global torch RNG, the data-order generator
as of the start of the current epoch and the position within the epoch are all restored, and the
learning rate is a closed-form function of the global step (no scheduler state to drift).

A resume must agree with the run on its configuration (config.json's, and the one each checkpoint
records) and on its course: the number of processes and of samples, which fix the data order and
the schedule. Files are compared as absolute paths, as :func:`anchored_config` records them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eigensam.config import (
    ADDED_FIELDS,
    RESUME_AS_CONFIGURED,
    TrainConfig,
    flag,
    without_unused,
)
from eigensam.determinism import DataOrder, capture_rng, restore_rng
from eigensam.run_dir import unusable_checkpoint_message
from hessian_cli import __version__
from hessian_cli.engine.batches import Batch
from hessian_cli.engine.distributed import tensors_digest
from hessian_cli.engine.inputs import input_tensors
from hessian_cli.errors import UserError
from hessian_cli.specs import (
    DataSource,
    absolute,
    anchored,
    anchored_data,
    apply_weights,
    load_checkpoint,
)
from hessian_cli.specs.checkpoints import is_count
from hessian_cli.specs.models import with_builtin_defaults

# The configuration fields that may name files.
FILE_FIELDS = ("model", "data", "loss", "data_root")


def anchored_config(config: TrainConfig) -> TrainConfig:
    """The configuration with the files it names made absolute: config.json and checkpoints
    then mean the same files from any working directory (a resume, an analysis)."""
    return dataclasses.replace(config, **_anchored_files(dataclasses.asdict(config)))


def _anchored_files(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a configuration that may name files, those files made absolute."""
    anchors = dict(zip(FILE_FIELDS, (anchored, anchored_data, anchored, absolute), strict=True))
    return {
        k: f(fields[k]) if isinstance(fields.get(k), str) else fields.get(k)
        for k, f in anchors.items()
    }


def check_same_run(config: TrainConfig, saved: dict[str, Any], where: str) -> None:
    """Refuse to resume with a configuration other than ``saved`` (the one ``where`` holds)."""
    mine = json.loads(json.dumps(config.identity()))  # as JSON has it: tuples become lists
    saved = without_unused({**ADDED_FIELDS, **saved})
    # A file named relative to where the run began is the same file named absolutely, and a
    # built-in model's option left out (runs before 2026-12-01 recorded only those given) is
    # its default named.
    mine, saved = (
        {**f, **_anchored_files(f), "model_kwargs": _built_with(f)} for f in (mine, saved)
    )
    differ = [k for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]
    if differ:
        raise UserError(
            f"{RESUME_AS_CONFIGURED}, but {', '.join(map(flag, differ))} "
            f"{'differs' if len(differ) == 1 else 'differ'} from the {where}."
        )


def _built_with(fields: dict[str, Any]) -> Any:
    """The model arguments of a configuration, with its built-in model's defaults."""
    return with_builtin_defaults(fields.get("model"), fields.get("model_kwargs"))


def samples_digest(batches: list[Batch]) -> str:
    """A hash of ``batches``' samples: what tells a resume that data of the same name gives
    others now, as a factory whose code or files were edited does (a data file's sha256 tells
    it of a data file)."""
    return tensors_digest(t for x, y in batches for t in (*input_tensors(x), y))


def _new_epoch_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "labelled": 0.0, "count": 0.0, "seconds": 0.0}


@dataclass
class RunPosition:
    """Where a run stands between two steps, as its checkpoints keep it: the global step, the
    epoch and batch within it, the current epoch's running sums, and the lambda_max tracker's
    last vector and value (which warm-start and report the next measurement)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=_new_epoch_sums)
    track_vector: torch.Tensor | None = None
    lambda_max: float | None = None


def checkpoint_payload(
    config: TrainConfig,
    data: DataSource,
    loss_spec: str,
    optimizer: torch.optim.Optimizer,
    position: RunPosition,
    order_state: torch.Tensor,
    *,
    processes: int,
    samples: int,
    total_steps: int,
    data_digest: str | None = None,
    first_samples: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's metadata (what analyze reads to rebuild the model and data) and the
    training state beside it (all a resume needs), with the global RNG as it is now."""
    metadata = {
        "model": config.model,
        "model_kwargs": json.dumps(config.model_kwargs or {}, sort_keys=True),
        "data": config.data,
        # Absolute, so that analyze finds the data from any working directory; symbolic
        # links kept, as config.json keeps them (made so by anchored_config).
        "data_root": absolute(config.data_root) if config.data_root else None,
        "loss": loss_spec,
        "input_shape": None if data.input_shape is None else list(data.input_shape),
        "num_classes": data.num_classes,
        "step": position.step,
        "epoch": position.epoch,
        "optimizer": config.optimizer,
        "base_optimizer": config.base_optimizer,
        "seed": config.seed,
        "config": json.dumps(config.identity(), sort_keys=True),
        "tool": f"hessian-cli {__version__}",
    }
    vector = position.track_vector
    extra = {
        "optimizer": optimizer.state_dict(),
        # The learning rate is a closed-form function of the step: this is all its state.
        "scheduler": {
            "schedule": config.schedule,
            "base_lr": config.lr,
            "total_steps": total_steps,
            "step": position.step,
        },
        "rng": capture_rng(),
        "data_order": order_state,
        "training": {
            # What fixes the schedule and the data order, which a resume must find again.
            "processes": processes,
            "samples": samples,
            "data_sha256": data_digest,  # of a data file (None for other data)
            "samples_digest": first_samples,  # samples_digest's, of any data
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "epoch_sums": dict(position.epoch_sums),
            "track_vector": None if vector is None else vector.cpu(),
            "lambda_max": position.lambda_max,
        },
    }
    return metadata, extra


def restore(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    processes: int,
    samples: int,
    steps_per_epoch: int,
    total_steps: int,
    device: torch.device,
    data_digest: str | None = None,
    first_samples: str | None = None,
) -> tuple[RunPosition, DataOrder]:
    """Load a checkpoint of this run into ``model``, ``optimizer`` and the global RNG; return
    its position (the tracker's vector on ``device``) and the data order as it saved them.

    Refuses, in this order: a file that is no readable or resumable checkpoint, a recorded
    configuration other than ``config``, another course, weights or optimizer state that do not
    fit, and a damaged training state or position.
    """
    try:
        ckpt = load_checkpoint(path)
    except UserError as exc:
        raise UserError(unusable_checkpoint_message(path, exc)) from exc
    raw = ckpt.raw
    if not all(k in raw for k in ("optimizer", "rng", "data_order", "training")):
        raise UserError(f"{str(path)!r} is not a resumable training checkpoint.")
    # config.json may have been edited since: the checkpoint says how its run was configured.
    recorded = ckpt.metadata.get("config")
    if recorded is not None:
        try:
            recorded = json.loads(recorded)
        except (ValueError, TypeError):
            recorded = None
        if not isinstance(recorded, dict):
            raise UserError(f"{str(path)!r} is damaged: its recorded configuration is not JSON.")
        recorded = without_unused(recorded)  # older checkpoints recorded them all
        check_same_run(config, recorded, f"configuration {path.name} records")
    _check_same_course(
        path,
        raw,
        config.data,
        processes=processes,
        samples=samples,
        total_steps=total_steps,
        data_digest=data_digest,
        first_samples=first_samples,
    )
    apply_weights(model, ckpt.state_dict)
    try:
        optimizer.load_state_dict(raw["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"the optimizer state in {str(path)!r} does not fit a {config.optimizer} "
            "optimizer of this model."
        ) from exc
    state = raw["training"]
    try:
        restore_rng(raw["rng"])
        step, epoch, batch = state["step"], state["epoch"], state["batch"]
        if not all(is_count(v) for v in (step, epoch, batch)):  # a str failed in arithmetic
            raise TypeError("a position that is not whole numbers")
        # Every running sum the epoch's end reads, as a number (a missing one failed there,
        # a "nan" one went into the metrics).
        saved = dict(state["epoch_sums"])
        saved.setdefault("labelled", saved.get("count"))  # before labels per token: one each
        epoch_sums = {k: float(saved[k]) for k in _new_epoch_sums()}
        if not all(math.isfinite(v) for v in epoch_sums.values()):
            raise ValueError("epoch sums that are not finite")
        vector = state["track_vector"]
        vector = None if vector is None else vector.to(device)
        position = RunPosition(step, epoch, batch, epoch_sums, vector, state["lambda_max"])
        order = DataOrder(samples, config.seed, raw["data_order"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise UserError(
            f"{str(path)!r} is damaged: its training state cannot be restored."
        ) from exc
    at = epoch * steps_per_epoch + batch
    if not (0 <= batch < steps_per_epoch and at == step):
        raise UserError(
            f"{str(path)!r} is damaged: its position (step {step}, epoch {epoch}, batch {batch}) "
            "is not one of this run's."
        )
    return position, order


def _check_same_course(
    path: Path,
    raw: dict[str, Any],
    data: str,
    *,
    processes: int,
    samples: int,
    total_steps: int,
    data_digest: str | None,
    first_samples: str | None = None,
) -> None:
    """The schedule and data order depend on the number of processes and of samples: a resume
    with others would follow another run's course from this one's position. A data file
    rewritten with as many samples is other data too (its digest; checkpoints before 2026-11-30
    have none)."""
    state = raw["training"] if isinstance(raw["training"], dict) else {}
    saved_processes, saved_samples = state.get("processes"), state.get("samples")
    for name, value in (("processes", saved_processes), ("samples", saved_samples)):
        if value is not None and not is_count(value):
            raise UserError(f"{str(path)!r} is damaged: its {name} ({value!r}) is not a count.")
    scheduler = raw.get("scheduler")
    total = scheduler.get("total_steps") if isinstance(scheduler, dict) else None
    if saved_processes is not None and saved_processes != processes:
        if is_count(total) and state.get("step") == total:  # its last checkpoint
            raise UserError(
                f"this run has already finished (step {total} of {total}): there is nothing to "
                "resume."
            )
        # By world size: --nproc-per-node alone is it on one machine only (nodes times ranks).
        raise UserError(
            f"this run was trained by {saved_processes} "
            f"process{'es' if saved_processes > 1 else ''}, not {processes}: resume it with as "
            f"many (a torchrun job of world size {saved_processes}: --nnodes times "
            "--nproc-per-node), since they fix its data order and schedule."
        )
    if saved_samples is not None and saved_samples != samples:
        raise UserError(
            f"this run was trained on {saved_samples} samples, but its data {data!r} now has "
            f"{samples}: it cannot be resumed on other data."
        )
    saved_digest = state.get("data_sha256")
    if isinstance(saved_digest, str) and data_digest is not None and saved_digest != data_digest:
        raise UserError(
            f"the data file {data!r} has changed since this run was trained on it (its sha256 "
            "differs): it cannot be resumed on other data."
        )
    if total is not None and total != total_steps:  # checkpoints before 2026-11-29
        raise UserError(
            f"this run was planned as {total} steps, but the data and processes now make "
            f"{total_steps}: resume it with the data and number of processes it began with."
        )
    saved_samples_digest = state.get("samples_digest")  # checkpoints before 2026-12-02 have none
    if isinstance(saved_samples_digest, str) and first_samples not in (None, saved_samples_digest):
        raise UserError(
            f"the data {data!r} gives other samples than this run was trained on (its first "
            "ones differ: code or files edited since?): it cannot be resumed on other data."
        )
