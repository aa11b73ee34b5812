"""The training loop behind ``hessian-cli train``: SGD, SAM or Eigen-SAM on a model/data spec.

A run lives in a directory: ``config.json`` (what defines the run), ``checkpoints/`` (periodic
``stepNNNNNNN.pt`` files and ``final.pt``, self-describing so ``analyze`` needs no flags, and
holding everything a resume needs) and ``metrics.h5`` (see :mod:`hessian_cli.storage.metrics`).

Resuming repeats an uninterrupted run bit for bit on CPU: the weights, optimizer state (momentum,
the Eigen-SAM eigenvector and its refresh count), the global torch RNG, the data-order generator
as of the start of the current epoch and the position within the epoch are all restored, and the
learning rate is a closed-form function of the global step (no scheduler state to drift).
Steps are counted globally from 0; Eigen-SAM refreshes its eigenvector on the current minibatch
at every step that is a multiple of ``eig_every`` (step 0 included).

Under torchrun (DistributedDataParallel semantics) ``batch_size`` is per rank: each step takes
``batch_size * world_size`` samples of the shared data order and splits them into contiguous
shares; gradients are averaged over the global batch after every backward pass, so both SAM
passes use the global gradient and every rank applies the same update. The Eigen-SAM refresh uses
the distributed operator (the Hessian of the global minibatch). Only rank 0 writes; setup errors
are agreed on by all ranks. BatchNorm running statistics are rank 0's: broadcast after every
step, as DDP broadcasts them before every forward pass.

No terminal code here: progress goes to an optional callback, interruption is polled through
``should_stop`` at step boundaries, and problems the user can fix raise ``UserError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from eigensam.bn import disable_running_stats, enable_running_stats
from eigensam.config import (
    CONFIG_FILE,
    CONFIG_FORMAT,
    CONFIG_VERSION,
    TrainConfig,
    flag,
    load_config,
    require,
    without_unused,
)
from eigensam.determinism import DataOrder, capture_rng, restore_rng
from eigensam.eigen_sam import EigenSAM
from eigensam.events import EpochDone, Event, RunStarted, StepDone, TrainSummary
from eigensam.sam import SAM
from hessian_cli import __version__
from hessian_cli.engine import distributed
from hessian_cli.engine.devices import resolve_device
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linalg import dot, norms
from hessian_cli.engine.operator import (
    Batch,
    HessianOperator,
    LossFn,
    batch_statistics_error,
    forward_mode,
)
from hessian_cli.errors import NotFinite, UserError
from hessian_cli.specs import (
    absolute,
    analysis_batches,
    anchored,
    anchored_data,
    apply_weights,
    build_model,
    cast_inputs,
    check_finite,
    check_fits,
    check_labels,
    default_loss,
    get_loss,
    load_checkpoint,
    load_data,
    save_checkpoint,
    takes_token_ids,
)
from hessian_cli.specs.checkpoints import RUN_CHECKPOINTS, UntrustedCheckpoint
from hessian_cli.specs.user_code import split_user_spec
from hessian_cli.storage.files import atomic_path, check_directory_writable, held
from hessian_cli.storage.metrics import MetricsLog

METRICS_FILE = "metrics.h5"
FINAL_CHECKPOINT = "final.pt"
_STEP_CHECKPOINT = re.compile(r"step(\d+)\.pt")
# Tracking measures lambda_max to a tight tolerance; warm starts usually need a handful of HVPs,
# the cap only bounds a cold start or a reordering of nearly tied eigenvalues.
TRACK_TOL = 1e-3
TRACK_MAX_HVPS = 200


# ----------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    *,
    resume_dir: str | Path | None = None,
    progress: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    command_line: str = "",
) -> TrainSummary:
    """Train as ``config`` says, in ``config.out``, or continue the run in ``resume_dir``.

    When resuming, ``config`` must be the run's (:func:`load_config`); only the run-time fields
    may differ. ``should_stop`` is polled before every step: when it returns True a checkpoint is
    saved and the summary says ``interrupted``. ``max_steps`` stops the same way (global steps).
    ``command_line`` is recorded in the metrics file, as a spectra file records its own.
    """
    with contextlib.ExitStack() as stack:
        # No rank writes before every rank has checked its input.
        with distributed.fail_together():
            config.validate()
            if resume_dir is not None:
                run_dir = Path(resume_dir)
                saved = load_config(run_dir)
                _check_same_run(config, saved.identity(), "saved configuration")
                # The files as config.json names them (which its checkpoints record too).
                config = dataclasses.replace(config, **{k: getattr(saved, k) for k in _FILES})
                if distributed.world()[0] == 0:  # the one that writes
                    _check_writable(run_dir)
            else:
                if not config.out:
                    raise UserError("say where the run goes with --out RUN_DIR.")
                run_dir = Path(config.out)
                _check_new_run_dir(run_dir)
                config = _anchored(config)
            run = _Run(config, run_dir, resume=resume_dir is not None, command_line=command_line)
        # Paths may differ between nodes (other mount points); what they hold may not.
        # Of the run-time fields only max_steps: ranks that stop at other steps wait in each
        # other's collectives. Devices differ per rank (cuda:0, cuda:1), only rank 0 writes to
        # out, and download only says how a node gets data whose digest is compared anyway.
        data = run.data.train
        distributed.check_same(
            lambda: {
                "options": repr(
                    sorted((k, v) for k, v in config.identity().items() if k not in _FILES)
                    + [("loss", run.loss_spec if split_user_spec(run.loss_spec) is None else "")]
                    + [("max_steps", config.max_steps)]
                ),
                "model": distributed.tensors_digest(run.params),  # seeded, or resumed
                "data": f"{run.samples} "
                + distributed.tensors_digest(
                    data.tensors if isinstance(data, TensorDataset) else run.track_batch
                ),
            }
        )
        if resume_dir is not None and config.max_steps is not None:
            with distributed.fail_together():
                require(
                    run.step < config.max_steps,
                    f"the run is already at step {run.step}, so --max-steps {config.max_steps} "
                    "leaves nothing to do",
                )
        with distributed.fail_together():  # the run claimed by rank 0, or every rank stops
            if run.lead:
                if resume_dir is None:
                    _write_config(run_dir, config)
                # Two processes training one run would overwrite each other's files.
                busy = f"the run in {str(run_dir)!r} is being trained by another process."
                stack.enter_context(held(run_dir / CONFIG_FILE, busy))
        return run.train(progress, should_stop)


def _check_writable(run_dir: Path) -> None:
    """A resume writes metrics and checkpoints: find out before the training, not after it."""
    for folder in (run_dir, run_dir / RUN_CHECKPOINTS):
        if folder.is_dir():
            check_directory_writable(folder)


# The configuration fields that may name files.
_FILES = ("model", "data", "loss", "data_root")


def _anchored(config: TrainConfig) -> TrainConfig:
    """The configuration with the files it names made absolute: config.json and checkpoints
    then mean the same files from any working directory (a resume, an analysis)."""
    return dataclasses.replace(config, **_anchored_fields(dataclasses.asdict(config), only=True))


def _anchored_fields(fields: dict[str, Any], *, only: bool = False) -> dict[str, Any]:
    """``fields`` (of a configuration) with the files they name made absolute; ``only``: just
    those four fields."""
    anchors = dict(zip(_FILES, (anchored, anchored_data, anchored, absolute), strict=True))
    new = {
        k: f(fields[k]) if isinstance(fields.get(k), str) else fields.get(k)
        for k, f in anchors.items()
    }
    return new if only else {**fields, **new}


def _check_same_run(config: TrainConfig, saved: dict[str, Any], where: str) -> None:
    """Refuse to resume with a configuration other than ``saved`` (the one ``where`` holds)."""
    mine = json.loads(json.dumps(config.identity()))  # as JSON has it: tuples become lists
    # A file named relative to where the run began is the same file named absolutely.
    mine, saved = _anchored_fields(mine), _anchored_fields(saved)
    differ = [k for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]
    if differ:
        raise UserError(
            f"--resume continues a run as it was configured, but {', '.join(map(flag, differ))} "
            f"differ from the {where}."
        )


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {str(run_dir)!r} is a file, not a directory.")
    if (run_dir / CONFIG_FILE).exists() or (run_dir / RUN_CHECKPOINTS).exists():
        if latest_checkpoint(run_dir) is None:  # --resume would only start it again
            raise UserError(
                f"{str(run_dir)!r} holds a run that stopped before its first checkpoint: "
                "remove it, or choose another --out."
            )
        raise UserError(
            f"{str(run_dir)!r} already holds a training run: continue it with --resume "
            f"{run_dir}, or choose another --out."
        )
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--out {str(run_dir)!r} is not empty; choose a new or empty directory.")
    ancestor = run_dir
    while not ancestor.exists():  # where the run's directory will be made
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {str(run_dir)!r} lies under {str(ancestor)!r}, a file.")
    check_directory_writable(ancestor)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``final.pt`` if the run finished, else the interruption/periodic one of the highest step."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints in step order, ``final.pt`` last."""
    folder = run_dir / RUN_CHECKPOINTS
    found = sorted(
        (int(m.group(1)), p)
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := _STEP_CHECKPOINT.fullmatch(p.name)) and p.is_file()
    )
    final = [folder / FINAL_CHECKPOINT] if (folder / FINAL_CHECKPOINT).is_file() else []
    return [p for _, p in found] + final


def _unusable(path: Path, exc: UserError) -> str:
    """Why the checkpoint a resume starts from cannot be read, and the one before it."""
    reason = str(exc).rstrip(".")
    if isinstance(exc, UntrustedCheckpoint):  # train writes none that needs it: not its own
        reason = f"checkpoint {str(path)!r} holds code that loading it would run, so it was refused"
    found = _checkpoints(path.parent.parent)
    at = found.index(path) if path in found else 0
    earlier = found[at - 1] if at > 0 else None
    if earlier is None:
        return f"{reason}."
    return f"{reason}; move it aside to resume from the one before it, {earlier.name}."


class _Diverged(Exception):
    pass


class _Run:
    """One training session: the model, data and optimizer, and the position in the run."""

    def __init__(
        self, config: TrainConfig, run_dir: Path, *, resume: bool, command_line: str
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = resolve_device(config.device)
        self.rank, self.world = distributed.world()
        self.lead = self.rank == 0
        torch.manual_seed(config.seed)  # model initialisation
        self.data = load_data(config.data, root=config.data_root, download=config.download)
        self.classify = self.data.num_classes is not None
        self.loss_spec = config.loss or default_loss(self.data.num_classes)
        self.loss_fn: LossFn = get_loss(self.loss_spec, num_classes=self.data.num_classes)
        model = build_model(
            config.model,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_outputs,
            kwargs=config.model_kwargs,
        )
        self.model = model.to(self.device)
        self.token_ids = takes_token_ids(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(f"the model {config.model!r} has no trainable parameters.")
        self.optimizer = _make_optimizer(config, self.params)
        n = self.samples = len(self.data.train)
        require(
            self.world == 1 or n >= 2 * self.world,
            f"the data has {n} samples, too few for {self.world} processes",
        )
        self.global_batch = config.batch_size * self.world
        # A trailing batch with fewer than two samples per rank is dropped: BatchNorm cannot
        # train on one sample.
        self.steps_per_epoch = max(
            1, n // self.global_batch + (n % self.global_batch >= 2 * self.world)
        )
        self.total_steps = config.epochs * self.steps_per_epoch
        self.test_batches = (
            analysis_batches(self.data.test, batch_size=config.batch_size, token_ids=self.token_ids)
            if self.data.test is not None
            else []
        )
        held_out = self.data.test if self.data.test is not None else self.data.train
        # One global batch (as one process with the same global batch tracks), split over ranks.
        rows = min(self.global_batch, len(held_out))
        self.track_batch = analysis_batches(
            held_out, batch_size=rows, num_samples=rows, token_ids=self.token_ids
        )[0]
        mine = torch.tensor(list(distributed.shard(range(rows), self.rank, self.world)))
        self.track_share: list[Batch] = (
            [(self.track_batch[0][mine], self.track_batch[1][mine])] if len(mine) else []
        )
        self._check_fits()

        # Position in the run; a resume overwrites these from the checkpoint.
        self.step = self.epoch = self.batch = 0
        self.epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
        self.track_vector: torch.Tensor | None = None
        self.lambda_max: float | None = None
        self.resumed_from = latest_checkpoint(run_dir) if resume else None
        order_state = self._restore(self.resumed_from) if self.resumed_from else None
        self.order = DataOrder(n, config.seed, order_state)
        self.metrics = MetricsLog(run_dir / METRICS_FILE, config.identity(), command_line)
        if resume:
            try:
                self.metrics.load(before_step=self.step, before_epoch=self.epoch)
            except (OSError, KeyError, ValueError) as exc:
                raise UserError(
                    f"the run's {METRICS_FILE} is damaged and cannot be resumed."
                ) from exc

    # --- setup ---------------------------------------------------------------------------

    def _check_fits(self) -> None:
        """One forward pass on two samples (eval mode: no buffer or RNG touched), so a model that
        does not fit the data, or an unusable loss, is reported before anything is written."""
        if isinstance(self.data.train, TensorDataset):
            check_finite(self.data.train.tensors[:2], "training data's")
        for batch in self.test_batches:  # a test loss that is not finite then means divergence
            check_finite(batch, "test data's")
        check_finite(self.track_batch, "held-out data's")
        if self.classify:
            if isinstance(self.data.train, TensorDataset):
                check_labels([tuple(self.data.train.tensors[:2])], self.data.num_classes)
            check_labels([self.track_batch], self.data.num_classes)
        batch = tuple(t.to(self.device) for t in self.track_batch)
        check_fits(self.model, self.loss_fn, [batch], self.data.input_shape)
        if self.config.batch_size == 1:  # later batches always hold two samples or more
            why = batch_statistics_error(self.model, batch[0][:1])
            if why is not None:
                raise UserError(
                    f"a batch of one sample cannot train this model ({why}): BatchNorm "
                    "normalises by batch statistics; use a --batch-size of 2 or more."
                )

    def _restore(self, path: Path) -> torch.Tensor:
        """Load a checkpoint of this run; return the data-order state it saved."""
        try:
            ckpt = load_checkpoint(path)
        except UserError as exc:
            raise UserError(_unusable(path, exc)) from exc
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
                raise UserError(
                    f"{str(path)!r} is damaged: its recorded configuration is not JSON."
                )
            recorded = without_unused(recorded)  # older checkpoints recorded them all
            _check_same_run(self.config, recorded, f"configuration {path.name} records")
        self._check_same_course(raw, path)
        apply_weights(self.model, ckpt.state_dict)
        try:
            self.optimizer.load_state_dict(raw["optimizer"])
        except (ValueError, KeyError) as exc:
            raise UserError(
                f"the optimizer state in {str(path)!r} does not fit a {self.config.optimizer} "
                "optimizer of this model."
            ) from exc
        state = raw["training"]
        try:
            restore_rng(raw["rng"])
            self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
            self.epoch_sums = dict(state["epoch_sums"])
            self.track_vector = state["track_vector"]
            if self.track_vector is not None:
                self.track_vector = self.track_vector.to(self.device)
            self.lambda_max = state["lambda_max"]
            DataOrder(self.samples, self.config.seed, raw["data_order"])  # restores, or fails
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise UserError(
                f"{str(path)!r} is damaged: its training state cannot be restored."
            ) from exc
        at = self.epoch * self.steps_per_epoch + self.batch
        if not (0 <= self.batch < self.steps_per_epoch and at == self.step):
            raise UserError(
                f"{str(path)!r} is damaged: its position (step {self.step}, epoch "
                f"{self.epoch}, batch {self.batch}) is not one of this run's."
            )
        return raw["data_order"]

    def _check_same_course(self, raw: dict[str, Any], path: Path) -> None:
        """The schedule and data order depend on the number of processes and of samples: a
        resume with others would follow another run's course from this one's position."""
        state = raw["training"] if isinstance(raw["training"], dict) else {}
        processes, samples = state.get("processes"), state.get("samples")
        if processes is not None and processes != self.world:
            raise UserError(
                f"this run was trained by {processes} process{'es' if processes > 1 else ''}, "
                f"not {self.world}: resume it with as many (torchrun --nproc-per-node "
                f"{processes}), since they fix its data order and schedule."
            )
        if samples is not None and samples != self.samples:
            raise UserError(
                f"this run was trained on {samples} samples, but its data "
                f"{self.config.data!r} now has {self.samples}: it cannot be resumed on other data."
            )
        scheduler = raw.get("scheduler")
        total = scheduler.get("total_steps") if isinstance(scheduler, dict) else None
        if total is not None and total != self.total_steps:  # checkpoints before 2026-11-29
            raise UserError(
                f"this run was planned as {total} steps, but the data and processes now make "
                f"{self.total_steps}: resume it with the data and number of processes it began with."
            )

    # --- the loop ------------------------------------------------------------------------

    def train(
        self,
        progress: Callable[[Event], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> TrainSummary:
        emit = progress or (lambda event: None)
        cfg = self.config
        summary = TrainSummary(
            run_dir=self.run_dir,
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            finished=self.step >= self.total_steps,
            interrupted=False,
            checkpoint=self.resumed_from,
            lambda_max=self.lambda_max,
        )
        summary.epochs = self._epoch_records()
        if summary.finished:
            return summary
        emit(
            RunStarted(
                run_dir=self.run_dir,
                start_step=self.step,
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
                epochs=cfg.epochs,
                device=str(self.device),
                num_params=sum(p.numel() for p in self.params),
                resumed_from=self.resumed_from,
            )
        )
        start_step, step_seconds = self.step, 0.0
        try:
            while self.epoch < cfg.epochs:
                perm = self.order.next_epoch()
                while self.batch < self.steps_per_epoch:
                    stop = self._anyone(should_stop is not None and should_stop())
                    if stop or (cfg.max_steps is not None and self.step >= cfg.max_steps):
                        summary.interrupted = stop
                        self._flush()  # the metrics first: a checkpoint never outruns them
                        summary.checkpoint = self._save_step_checkpoint(self.order.epoch_state)
                        return self._finish(summary, start_step, step_seconds)
                    if cfg.track_every and self.step % cfg.track_every == 0:
                        self._track()
                    gb = self.global_batch
                    idx = perm[self.batch * gb : (self.batch + 1) * gb]
                    if self.world > 1:
                        idx = idx[distributed.shard(range(len(idx)), self.rank, self.world)]
                    start = time.perf_counter()
                    loss, correct, count, lr = self._step(self._fetch(idx))
                    seconds = time.perf_counter() - start
                    step_seconds += seconds
                    self._record_step(loss, correct, count, lr, seconds)
                    emit(
                        StepDone(
                            step=self.step - 1,
                            epoch=self.epoch + 1,
                            loss=loss,
                            accuracy=self._accuracy(correct, count),
                            lr=lr,
                            lambda_max=self.lambda_max,
                            eigenvalue=getattr(self.optimizer, "last_eigenvalue", None),
                        )
                    )
                emit(self._end_epoch())
                self._flush()
                last = self.epoch == cfg.epochs
                if not last and cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0:
                    summary.checkpoint = self._save_step_checkpoint(
                        self.order.generator.get_state()
                    )
            if cfg.track_every:
                self._track()  # the final weights are always measured
            summary.finished = True
            self._flush()
            summary.checkpoint = self._save(
                self.run_dir / RUN_CHECKPOINTS / FINAL_CHECKPOINT, self.order.generator.get_state()
            )
            return self._finish(summary, start_step, step_seconds)
        except _Diverged:
            self._flush()
            kept = latest_checkpoint(self.run_dir)
            before = "no checkpoint was written"
            if kept:
                before = f"the last checkpoint, {kept}, holds weights before it"
            if self.step == start_step == 0:  # no step taken: the optimizer played no part
                raise UserError(
                    "the loss or the weights are NaN or infinite at the initial weights, before "
                    "any step: check the model, the data and the loss."
                ) from None
            raise UserError(
                f"training diverged at step {self.step} (epoch {self.epoch + 1}): the loss or "
                f"the weights became NaN or infinite; stopped ({before}). A resume would "
                "diverge again: start a new run with a lower --lr or --rho."
            ) from None
        except torch.cuda.OutOfMemoryError as exc:
            # The weights may be mid-step (perturbed): nothing is saved from them.
            self._flush()
            raise UserError(
                f"CUDA ran out of memory at step {self.step} (epoch {self.epoch + 1}); stopped, "
                f"{self._kept(' once more memory is free')}, or start a new run with a smaller "
                "--batch-size."
            ) from exc
        except BaseException:
            # Whatever stopped the run (a rank lost, SIGTERM, a second Ctrl-C), the rows of the
            # steps done are valid: write them (metrics are otherwise written per epoch).
            self._flush()
            raise

    def _kept(self, when: str = "") -> str:
        """Where a stopped run can be continued from (and ``when``), as the error says it."""
        kept = latest_checkpoint(self.run_dir)
        if kept is None:
            return "no checkpoint was written"
        return f"the last checkpoint is {kept} (continue with --resume {self.run_dir}{when})"

    def _flush(self) -> None:
        if self.lead:
            self.metrics.flush()

    def _anyone(self, flag: bool) -> bool:
        """True on every rank when any rank says so (a Ctrl-C seen by one rank stops all)."""
        if self.world == 1:
            return flag
        return bool(distributed.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def _finish(self, summary: TrainSummary, start_step: int, seconds: float) -> TrainSummary:
        """The summary of a run that stopped or ended (its metrics were written before its
        checkpoint)."""
        summary.step, summary.epoch = self.step, self.epoch
        summary.epochs = self._epoch_records()
        summary.lambda_max = self.lambda_max
        summary.steps_run, summary.step_seconds = self.step - start_step, seconds
        return summary

    def _fetch(self, idx: torch.Tensor) -> Batch:
        ds = self.data.train
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        else:
            x, y = default_collate([ds[i] for i in idx.tolist()])[:2]
        y = torch.as_tensor(y)
        y = y.float() if y.is_floating_point() else y.long()
        if self.classify and not isinstance(ds, TensorDataset):  # its labels were not all seen
            check_labels([(x, y)], self.data.num_classes)
        x = cast_inputs(x, torch.float32, self.token_ids)
        return x.to(self.device), y.to(self.device)

    def _lr(self) -> float:
        if self.config.schedule == "constant":
            return self.config.lr
        return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * self.step / self.total_steps))

    def _step(self, batch: Batch) -> tuple[float, int, int, float]:
        """One update; returns the minibatch loss and correct count at ``w``, its size, the lr."""
        x, y = batch
        opt, model = self.optimizer, self.model
        lr = self._lr()
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = self.loss_fn(out, y)
        correct, count, mean_loss = self._correct(out, y), len(y), loss.detach()
        if self.world > 1:
            totals = torch.tensor([float(mean_loss) * count, correct, count], dtype=torch.float64)
            distributed.all_reduce_sum(totals)
            mean_loss, correct, count = totals[0] / totals[2], int(totals[1]), int(totals[2])
        if not bool(torch.isfinite(mean_loss)):
            raise _Diverged
        loss.backward()
        self._average_gradients(len(y), count)
        if isinstance(opt, EigenSAM) and self.step % self.config.eig_every == 0:
            try:
                self._refresh(batch)
            except NotFinite:  # a finite loss whose curvature is not
                raise _Diverged from None
        if isinstance(opt, SAM):
            opt.first_step(zero_grad=True)
            disable_running_stats(model)  # BatchNorm statistics move on the first pass only
            try:
                self.loss_fn(model(x), y).backward()
            finally:
                enable_running_stats(model)
            self._average_gradients(len(y), count)
            opt.second_step()
        else:
            opt.step()
        if self.world > 1:  # each rank's moved on its own share: rank 0's are kept, as in DDP
            distributed.broadcast_from_lead(self.model.buffers())
        return float(mean_loss), correct, count, lr

    def _average_gradients(self, local: int, total: int) -> None:
        """Turn each rank's batch-mean gradient into the global batch mean (one all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]  # unused ones stay None
        flat = torch.cat([g.reshape(-1) for g in grads]) * (local / total)
        distributed.all_reduce_sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _refresh(self, batch: Batch) -> None:
        assert isinstance(self.optimizer, EigenSAM)
        result = self.optimizer.refresh_eigenvector(self.model, self.loss_fn, batch)
        g = self.optimizer.flat_grad(scaled=False)  # the layout of the refreshed vector
        norm = float(norms(g))
        alignment = float(dot(g, result.vector.to(g)).abs() / norm) if norm > 0 else math.nan
        self.metrics.append(
            "refresh",
            step=self.step,
            eigenvalue=result.eigenvalue,
            residual=result.residual,
            alignment=alignment,
            hvps=result.hvps,
        )

    def _track(self) -> None:
        """lambda_max of the fixed held-out batch at the current weights (BatchNorm in eval)."""
        if not self._finite():
            raise _Diverged
        # Each rank its share of the held-out batch; products and gradients are summed.
        op = HessianOperator(self.model, self.loss_fn, self.track_share, bn="eval")
        init = hint = None
        try:  # a loss or curvature that is not finite at finite weights: the run diverged
            if self.track_vector is None:
                # The first solve has no previous vector; the gradient leans toward v_1, and its
                # pass builds the kept graph the first product reuses.
                hint = op.gradient()[1]
            else:
                init = self.track_vector.reshape(1, -1)
            res = eigenpairs(
                op,
                1,
                tol=TRACK_TOL,
                max_hvps=TRACK_MAX_HVPS,
                init=init,
                hint=hint,
                seed=self.config.seed,
            )
        except NotFinite:
            raise _Diverged from None
        op.release()
        assert res.eigenvectors is not None
        self.track_vector = res.eigenvectors[0].detach()
        self.lambda_max = float(res.eigenvalues[0])
        self.metrics.append(
            "track",
            step=self.step,
            lambda_max=self.lambda_max,
            residual=float(res.residuals[0]),
            hvps=res.hvps,
        )

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    @torch.no_grad()
    def _held_out_loss_finite(self) -> bool:
        """Whether the held-out batch's loss is finite: finite weights (near 1e36) can make it
        infinite, and a run without a test split would not see it otherwise."""
        with forward_mode(self.model, "eval"):
            finite = all(
                bool(torch.isfinite(self.loss_fn(self.model(x.to(self.device)), y.to(self.device))))
                for x, y in self.track_share
            )
        return not self._anyone(not finite)

    def _correct(self, out: torch.Tensor, y: torch.Tensor) -> int:
        if not self.classify:
            return 0
        labels = y.argmax(1) if y.is_floating_point() else y
        return int((out.argmax(1) == labels).sum())

    def _accuracy(self, correct: float, count: float) -> float:
        return correct / count if self.classify and count else math.nan

    def _record_step(
        self, loss: float, correct: int, count: int, lr: float, seconds: float
    ) -> None:
        self.metrics.append(
            "steps",
            step=self.step,
            loss=loss,
            accuracy=self._accuracy(correct, count),
            lr=lr,
        )
        sums = self.epoch_sums
        sums["loss"] += loss * count
        sums["correct"] += correct
        sums["count"] += count
        sums["seconds"] += seconds
        self.step += 1
        self.batch += 1

    def _end_epoch(self) -> EpochDone:
        sums = self.epoch_sums
        test_loss, test_acc = self._evaluate()
        if self.test_batches and not math.isfinite(test_loss):  # finite weights, say 1e36
            raise _Diverged
        self.epoch += 1
        self.batch = 0
        self.metrics.append(
            "epochs",
            epoch=self.epoch,
            train_loss=sums["loss"] / sums["count"],
            train_accuracy=self._accuracy(sums["correct"], sums["count"]),
            test_loss=test_loss,
            test_accuracy=test_acc,
            seconds=sums["seconds"],
        )
        self.epoch_sums = {k: 0.0 for k in sums}
        return self._epoch_records()[-1]

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Mean loss and accuracy on the test split (eval mode), NaN without one."""
        if not self.test_batches:
            return math.nan, math.nan
        was_training = self.model.training
        self.model.eval()
        total = correct = count = 0.0
        for x, y in self.test_batches:
            x, y = x.to(self.device), y.to(self.device)
            out = self.model(x)
            total += float(self.loss_fn(out, y)) * len(y)
            correct += self._correct(out, y)
            count += len(y)
        self.model.train(was_training)
        return total / count, self._accuracy(correct, count)

    def _epoch_records(self) -> list[EpochDone]:
        """Every epoch row so far, with the last lambda_max tracked in each epoch (None where
        none was: a value carried over from an earlier epoch would pass for this one's)."""
        track_steps = self.metrics.column("track", "step")
        track_values = self.metrics.column("track", "lambda_max")
        records = []
        for row in self.metrics.rows["epochs"]:
            epoch, train_loss, train_acc, test_loss, test_acc, seconds = row
            end = epoch * self.steps_per_epoch  # steps done: the weights a track measured
            seen = [
                v
                for s, v in zip(track_steps, track_values, strict=True)
                if end - self.steps_per_epoch < s <= end
            ]
            records.append(
                EpochDone(
                    epoch=int(epoch),
                    train_loss=train_loss,
                    train_accuracy=train_acc,
                    test_loss=test_loss,
                    test_accuracy=test_acc,
                    seconds=seconds,
                    lambda_max=seen[-1] if seen else None,
                )
            )
        return records

    # --- checkpoints ---------------------------------------------------------------------

    def _save_step_checkpoint(self, order_state: torch.Tensor) -> Path:
        return self._save(self.run_dir / RUN_CHECKPOINTS / f"step{self.step:07d}.pt", order_state)

    def _save(self, path: Path, order_state: torch.Tensor) -> Path:
        """A self-describing checkpoint at a step boundary, with all a resume needs."""
        if not (self._finite() and self._held_out_loss_finite()):
            raise _Diverged
        cfg, data = self.config, self.data
        metadata = {
            "model": cfg.model,
            "model_kwargs": json.dumps(cfg.model_kwargs or {}, sort_keys=True),
            "data": cfg.data,
            # Absolute, so that analyze finds the data from any working directory.
            "data_root": str(Path(cfg.data_root).expanduser().resolve()) if cfg.data_root else None,
            "loss": self.loss_spec,
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "step": self.step,
            "epoch": self.epoch,
            "optimizer": cfg.optimizer,
            "base_optimizer": cfg.base_optimizer,
            "seed": cfg.seed,
            "config": json.dumps(cfg.identity(), sort_keys=True),
            "tool": f"hessian-cli {__version__}",
        }
        extra = {
            "optimizer": self.optimizer.state_dict(),
            # The learning rate is a closed-form function of the step: this is all its state.
            "scheduler": {
                "schedule": cfg.schedule,
                "base_lr": cfg.lr,
                "total_steps": self.total_steps,
                "step": self.step,
            },
            "rng": capture_rng(),
            "data_order": order_state,
            "training": {
                # What fixes the schedule and the data order, which a resume must find again.
                "processes": self.world,
                "samples": self.samples,
                "step": self.step,
                "epoch": self.epoch,
                "batch": self.batch,
                "epoch_sums": dict(self.epoch_sums),
                "track_vector": None if self.track_vector is None else self.track_vector.cpu(),
                "lambda_max": self.lambda_max,
            },
        }
        if self.lead:
            try:
                save_checkpoint(
                    path, state_dict=self.model.state_dict(), metadata=metadata, extra=extra
                )
            except UserError as exc:  # a full disk, say: where the run can go on from
                raise UserError(
                    f"{str(exc).rstrip('.')}; stopped at step {self.step}, {self._kept()}."
                ) from exc
        return path


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.base_optimizer == "sgd":
        base: Any = torch.optim.SGD
        kwargs = {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}
    else:
        base = torch.optim.AdamW
        kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        return base(params, **kwargs)
    if config.optimizer == "sam":
        return SAM(params, base, rho=config.rho, **kwargs)
    return EigenSAM(params, base, rho=config.rho, alpha=config.alpha, **kwargs)


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    try:
        (run_dir / RUN_CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"Could not create the run directory {str(run_dir)!r}: {exc.strerror or exc}."
        ) from exc
    text = json.dumps(
        {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "config": config.identity()}, indent=2
    )
    try:
        with atomic_path(run_dir / CONFIG_FILE, exclusive=True) as tmp:
            tmp.write_text(text + "\n")
    except FileExistsError:
        raise UserError(
            f"another run started in {str(run_dir)!r} meanwhile; choose another --out."
        ) from None


__all__ = [
    "Event",
    "EpochDone",
    "RunStarted",
    "StepDone",
    "TrainConfig",
    "TrainSummary",
    "latest_checkpoint",
    "load_config",
    "train",
]
