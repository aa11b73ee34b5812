"""What the training loop reports as it goes (to an optional callback) and when it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunStarted:
    run_dir: Path
    start_step: int
    total_steps: int
    steps_per_epoch: int
    epochs: int
    device: str
    num_params: int
    resumed_from: Path | None
    samples: int  # in the training set
    global_batch: int  # --batch-size times the processes
    task: str  # what the data asks of the model: "10 classes", "regression, 1 target", ...


@dataclass
class StepDone:
    step: int
    epoch: int  # 1-based epoch this step belongs to
    loss: float
    accuracy: float
    lr: float
    lambda_max: float | None  # the last tracked value
    eigenvalue: float | None  # the last Eigen-SAM refresh's eigenvalue


@dataclass
class EpochDone:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float  # in its steps, refreshes included (not evaluation, tracking, checkpoints)
    lambda_max: float | None


Event = RunStarted | StepDone | EpochDone


@dataclass
class TrainSummary:
    """Where a call to :func:`train` left the run."""

    run_dir: Path
    step: int
    total_steps: int
    epoch: int
    finished: bool
    interrupted: bool
    checkpoint: Path | None
    epochs: list[EpochDone] = field(default_factory=list)
    lambda_max: float | None = None
    steps_run: int = 0  # in this call
    step_seconds: float = 0.0  # time in training steps in this call
    # Eigen-SAM's eigenvector refreshes in the whole run, and those that found no positive
    # curvature (top eigenvalue <= 0), whose vectors it perturbed along all the same
    refreshes: int = 0
    negative_refreshes: int = 0
    # and those whose residual stayed above their tolerance (their HVP budget spent, or stalled;
    # not a top eigenvalue of 0, whose residual is infinite): their vectors perturbed all the same
    unconverged_refreshes: int = 0
    # and the median residual of those with one (NaN without): above the tolerance, the vector
    # a step typically perturbed along fell short of it, not an odd refresh or two
    median_refresh_residual: float = math.nan
    # The steps whose minibatch held no label (padding only), which made no update
    unlabelled_steps: int = 0
    # The held-out lambda_max measurements (--track-every) of the whole run, and those whose
    # residual stayed above their tolerance (budget spent or stalled; not a lambda_max of 0)
    tracks: int = 0
    unconverged_tracks: int = 0
    # A binary classifier of one output whose loss tells no logit from a probability: which
    # outputs pick label 1 is not known, so no accuracy is given (tracking.binary_threshold)
    accuracy_unknown: bool = False
    # (the first step's loss, the last epoch's training loss) where the latter is so much larger
    # that the run diverged without a NaN to stop it (training.GROWN_LOSS), and what to lower
    loss_growth: tuple[float, float] | None = None
    divergence_knobs: str = "--lr"

    @property
    def seconds_per_step(self) -> float:
        return self.step_seconds / self.steps_run if self.steps_run else math.nan
