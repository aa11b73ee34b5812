"""The training loop behind ``hessian-cli train``: SGD, SAM or Eigen-SAM on a model/data spec.

A run lives in a directory (:mod:`eigensam.run_dir`); what it measures besides its minibatch
loss (lambda_max tracking, the test split) is :mod:`eigensam.tracking`'s; what its checkpoints
hold, and how a resume continues it bit for bit, is :mod:`eigensam.resume`'s.

Steps are counted globally from 0; Eigen-SAM refreshes its eigenvector on the current minibatch
at every step that is a multiple of ``eig_every`` (step 0 included), or where that step's
minibatch held no label (padding only, a step without an update) at the next one that does.

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
import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from eigensam.bn import disable_running_stats, enable_running_stats
from eigensam.config import CONFIG_FILE, TrainConfig, load_config, require
from eigensam.determinism import DataOrder
from eigensam.eigen_sam import EigenSAM
from eigensam.events import EpochDone, Event, RunStarted, StepDone, TrainSummary
from eigensam.refresh import COLD_MAX_HVPS, batchnorm_mode
from eigensam.refresh import DEFAULT_TOL as REFRESH_TOL
from eigensam.resume import (
    FILE_FIELDS,
    RunPosition,
    anchored_config,
    check_same_run,
    checkpoint_payload,
    restore,
    samples_digest,
)
from eigensam.run_dir import (
    METRICS_FILE,
    check_new_run_dir,
    check_resumable_dir,
    claim_run_dir,
    final_checkpoint_path,
    latest_checkpoint,
    resume_hint,
    step_checkpoint_path,
)
from eigensam.sam import SAM
from eigensam.step_time import queued_seconds
from eigensam.tracking import (
    TRACK_TOL,
    LambdaMaxTracker,
    accuracy,
    binary_threshold,
    correct_count,
    evaluate,
    gradient_alignment,
)
from hessian_cli.engine import distributed
from hessian_cli.engine.batches import Batch, LossFn, check_range
from hessian_cli.engine.devices import resolve_device
from hessian_cli.engine.inputs import input_tensors, inputs_to, rows, run_model
from hessian_cli.engine.model_mode import batch_statistics_error, batch_statistics_layers
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.errors import NotFinite, UserError, first_line
from hessian_cli.presentation import counted
from hessian_cli.specs import (
    analysis_batches,
    build_model,
    cast_inputs,
    check_finite,
    check_fits,
    check_next_tokens,
    check_targets,
    default_loss,
    embedding_reach,
    get_loss,
    load_data,
    save_checkpoint,
    takes_token_ids,
)
from hessian_cli.specs.data import (
    collate_samples,
    data_file_digest,
    float_labels_note,
    missing_recorded_file,
    unbatchable,
)
from hessian_cli.specs.fit import guard_embedding_lookups
from hessian_cli.specs.losses import label_weight
from hessian_cli.specs.models import model_names_code, with_builtin_defaults
from hessian_cli.specs.user_code import split_user_spec
from hessian_cli.storage.metrics import MetricsLog, above_tol

# A resume compares so many of the data's first samples: they are fetched twice at every start,
# where a whole batch would be hundreds of images decoded for it.
DIGESTED_SAMPLES = 16
# A run whose last epoch's training loss is this many times its first step's diverged, finite as
# it stayed: the README's runs (cnn and mlp, eigensam and sgd) end at 0.008 to 0.98 times it,
# no epoch of theirs above 0.99 times it; the digits mlp at --lr 1 to 1000 ends at 23 to 8,500
# times it, a 3-class synthetic set's at --lr 10 at 6 times it.
GROWN_LOSS = 4.0

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
                check_same_run(config, saved.identity(), "saved configuration")
                # The files and model arguments as config.json has them (which its checkpoints
                # record too): a caller's config may leave out the built-in model's defaults.
                fields = (*FILE_FIELDS, "model_kwargs")
                config = dataclasses.replace(config, **{k: getattr(saved, k) for k in fields})
            else:
                if not config.out:
                    raise UserError("say where the run goes with --out RUN_DIR.")
                run_dir = Path(config.out)
                config = anchored_config(config)
                # The built-in model's defaults recorded too: its checkpoints then rebuild it
                # whatever the defaults become (before 2026-12-01 runs recorded only those given).
                kwargs = with_builtin_defaults(config.model, config.model_kwargs)
                config = dataclasses.replace(config, model_kwargs=kwargs)
        # Checked by rank 0 alone, the one that writes: its refusal is the job's, no rank's (an
        # --out on another node's disk, or not empty there, is no concern of the run's).
        with distributed.fail_together(lead_only=True):
            if distributed.world()[0] == 0:
                if resume_dir is not None:
                    check_resumable_dir(run_dir)
                else:
                    check_new_run_dir(run_dir)
        with distributed.fail_together():
            run = _Run(config, run_dir, resume=resume_dir is not None, command_line=command_line)
        # Paths may differ between nodes (other mount points); what they hold may not.
        # Of the run-time fields only max_steps: ranks that stop at other steps wait in each
        # other's collectives. Devices differ per rank (cuda:0, cuda:1), only rank 0 writes to
        # out, and download only says how a node gets data whose digest is compared anyway.
        data = run.data.train
        distributed.check_same(
            lambda: {
                "options": repr(
                    sorted((k, v) for k, v in config.identity().items() if k not in FILE_FIELDS)
                    + [("loss", run.loss_spec if split_user_spec(run.loss_spec) is None else "")]
                    + [("max_steps", config.max_steps)]
                ),
                "model": distributed.tensors_digest(run.params),  # seeded, or resumed
                "data": f"{run.samples} "
                + distributed.tensors_digest(
                    data.tensors
                    if isinstance(data, TensorDataset)
                    else (*input_tensors(run.track_batch[0]), run.track_batch[1])
                ),
            }
        )
        if resume_dir is not None and config.max_steps is not None:
            with distributed.fail_together():
                require(  # a finished run is reported as such by the caller, whatever the limit
                    run.step < config.max_steps or run.step >= run.total_steps,
                    f"the run is already at step {run.step:,}, so --max-steps {config.max_steps:,} "
                    "leaves nothing to do",
                )
        # The run claimed by rank 0, or every rank stops (its refusal the job's, no rank's).
        with distributed.fail_together(lead_only=True):
            if run.lead:
                stack.enter_context(claim_run_dir(run_dir, config, new=resume_dir is None))
        return run.train(progress, should_stop)


class _Diverged(Exception):
    """The loss or the weights are no longer finite; ``perturbed``: the loss at ``w + e``,
    which the optimizer's perturbation took part in (at step 0 too)."""

    def __init__(self, *, perturbed: bool = False) -> None:
        super().__init__()
        self.perturbed = perturbed


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
        self.write_failed = False  # a write of the run's files (rank 0's) failed: not retried
        torch.manual_seed(config.seed)  # model initialisation
        recorded = {"model": config.model, "data": config.data, "loss": config.loss}
        if resume and (gone := missing_recorded_file(recorded)):
            what, missing = gone
            raise UserError(
                f"the file {missing!r} that the run's {CONFIG_FILE} records for its {what} does "
                "not exist (moved or deleted?): put it back there (or a link to it) to resume "
                "the run."
            )
        self.data = load_data(config.data, root=config.data_root, download=config.download)
        self.data_digest = data_file_digest(config.data)
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
        if self.device.type != "cpu":
            guard_embedding_lookups(self.model)
        self.token_ids = takes_token_ids(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(f"the model {config.model!r} has no trainable parameters.")
        # The data as the model computes: a float64 model (small models whose Hessians are
        # studied exactly) was given float32 batches and refused as not fitting its data.
        self.dtype = next((p.dtype for p in self.params if p.is_floating_point()), torch.float32)
        require(
            self.dtype in (torch.float32, torch.float64),
            f"the model's parameters are {str(self.dtype).removeprefix('torch.')}: train runs "
            "float32 or float64 models (mixed precision is not offered)",
        )
        _check_sparse_gradients(self.model, config)
        self.optimizer = _make_optimizer(config, self.params)
        n = self.samples = len(self.data.train)
        require(
            self.world == 1 or n >= 2 * self.world,
            f"the data has {n} samples, too few for {self.world} processes",
        )
        self.global_batch = config.batch_size * self.world
        # A trailing batch with fewer than two samples per rank is dropped: BatchNorm cannot
        # train on one sample. Whatever the model: keeping it for others would change the
        # course (steps, data order) of runs begun before, which their resumes must follow.
        self.steps_per_epoch = max(
            1, n // self.global_batch + (n % self.global_batch >= 2 * self.world)
        )
        self.total_steps = config.epochs * self.steps_per_epoch
        self._batch_in_step: list[Batch] = []  # the training batch of the step under way
        self.test_batches = (
            analysis_batches(
                self.data.test,
                batch_size=config.batch_size,
                dtype=self.dtype,
                token_ids=self.token_ids,
            )
            if self.data.test is not None
            else []
        )
        held_out = self.data.test if self.data.test is not None else self.data.train
        # One global batch (as one process with the same global batch tracks), split over ranks.
        count = min(self.global_batch, len(held_out))
        self.track_batch = analysis_batches(
            held_out,
            batch_size=count,
            num_samples=count,
            dtype=self.dtype,
            token_ids=self.token_ids,
        )[0]
        # Held-out losses and lambda_max are means over the batches' labels where the built-in
        # cross-entropy averages over those (as analyze weighs them), not over their samples.
        self.batch_weight = label_weight(self.loss_spec, [self.track_batch, *self.test_batches])
        mine = torch.tensor(list(distributed.shard(range(count), self.rank, self.world)))
        track_share: list[Batch] = (
            [(rows(self.track_batch[0], mine), self.track_batch[1][mine])] if len(mine) else []
        )
        if track_share and self.batch_weight and not self.batch_weight(track_share[0][1]):
            track_share = []  # a share of padding only: nothing of the mean, as a rank without
        self._check_fits()
        self.first_samples = self._first_samples()
        self.threshold = binary_threshold(
            self.model,
            self.loss_fn,
            self.track_batch,
            self.device,
            num_classes=self.data.num_classes,
        )
        self.tracker = LambdaMaxTracker(
            track_share, seed=config.seed, device=self.device, batch_weight=self.batch_weight
        )
        self.resumed_from = latest_checkpoint(run_dir) if resume else None
        if self.resumed_from:
            position, self.order = restore(
                self.resumed_from,
                self.model,
                self.optimizer,
                config,
                processes=self.world,
                samples=n,
                steps_per_epoch=self.steps_per_epoch,
                total_steps=self.total_steps,
                device=self.device,
                data_digest=self.data_digest,
                first_samples=self.first_samples,
            )
        else:
            position, self.order = RunPosition(), DataOrder(n, config.seed)
        # The loop moves these on; _save gathers them back into a RunPosition.
        self.step, self.epoch, self.batch = position.step, position.epoch, position.batch
        self.epoch_sums = position.epoch_sums
        self.tracker.vector, self.tracker.lambda_max = position.track_vector, position.lambda_max
        # In the mode every step trains it: the layers by which a refresh's Hessian (the batch's
        # statistics) is of another loss than the tracked one (running statistics), which
        # readers of the metrics could not tell from a model without any.
        self.model.train()
        self.metrics = MetricsLog(
            run_dir / METRICS_FILE,
            config.identity(),
            command_line,
            tolerances={"refresh": REFRESH_TOL, "track": TRACK_TOL},
            batchnorm_layers=batch_statistics_layers(self.model),
        )
        if resume:
            try:
                # A run restarted from step 0 (no checkpoint) measures its step 0 again: the
                # tracker's start vector is not saved without one (a kept row left it cold).
                self.metrics.load(
                    before_step=self.step,
                    before_epoch=self.epoch,
                    checkpoint=self.resumed_from is not None,
                )
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
            for t in self.data.train.tensors[:2]:  # each step casts its batch to the model's
                check_range(t, self.dtype)
        for batch in self.test_batches:  # a test loss that is not finite then means divergence
            check_finite(batch, "test data's")
        check_finite(self.track_batch, "held-out data's")
        train = (
            [tuple(self.data.train.tensors[:2])]
            if isinstance(self.data.train, TensorDataset)
            else []
        )
        held_out = self.track_batch[1]
        if self.batch_weight and not self.batch_weight(held_out):  # its loss is checked alone
            split = "test split" if self.data.test is not None else "training data"
            raise UserError(
                f"the held-out batch (the first {len(held_out)} samples of the {split}, whose "
                "loss train checks at every checkpoint and whose lambda_max --track-every "
                "measures) holds no label but -100 (padding), so its cross-entropy is 0/0: put "
                "labelled samples among them."
            )
        # A test batch of padding only weighs nothing in the test loss, a mean over the split's
        # labels: the split is no worse for where its batches happen to end (the held-out batch,
        # whose lambda_max and loss are measured alone, must hold labels).
        test = [b for b in self.test_batches if not self.batch_weight or self.batch_weight(b[1])]
        check_targets(self.loss_spec, train + [self.track_batch, *test], self.data.num_classes)
        check_next_tokens(self.loss_spec, [self.track_batch, *self.test_batches])
        batch = (inputs_to(self.track_batch[0], self.device), self.track_batch[1].to(self.device))
        check_fits(self.model, self.loss_fn, [batch])
        if isinstance(self.optimizer, EigenSAM) or self.config.track_every:
            # A model whose Hessian autograd would get wrong, refused before any step by every
            # rank alike (the refresh's and the tracker's operators met it each on its own).
            # Two samples that hold labels: the loss of two of padding only is 0/0, and text
            # beginning with them was refused as "not finite".
            y = batch[1]
            labelled = (
                i for i in range(len(y)) if not self.batch_weight or self.batch_weight(y[i])
            )
            pick = torch.tensor(list(itertools.islice(labelled, 2)), device=y.device)
            pair = (rows(batch[0], pick), y[pick])
            try:
                HessianOperator(self.model, self.loss_fn, [pair], distributed=False).check_model()
            except NotFinite as exc:  # the engine's words, "on the analysed data", are analyze's
                raise NotFinite(
                    "the loss is NaN or infinite at the initial weights, before any step: "
                    "check the model, the data and the loss."
                ) from exc
        if isinstance(self.optimizer, EigenSAM):
            # The refresh takes the BatchNorm mode of the model, which every step trains: one
            # it cannot take was refused at the first refresh, the run directory left behind.
            self.model.train()
            batchnorm_mode(self.model)
        # The only batches of one: every batch at --batch-size 1, the only one of a one-sample
        # set (a trailing one is dropped, and under torchrun each rank holds two at least).
        if min(self.config.batch_size, self.samples) == 1:
            why = batch_statistics_error(self.model, rows(batch[0], slice(0, 1)))
            if why is not None:
                fix = (
                    "data of 2 samples or more"
                    if self.samples == 1
                    else "a --batch-size of 2 or more"
                )
                raise UserError(
                    f"a batch of one sample cannot train this model ({why}): BatchNorm "
                    f"normalises by batch statistics; use {fix}."
                )

    def _first_samples(self) -> str | None:
        """The digest of the first ``DIGESTED_SAMPLES`` training samples (in index order), which a
        resume compares; None where two fetches of them differ (augmented at random), which no
        resume repeats."""
        first = torch.arange(min(DIGESTED_SAMPLES, self.samples))
        with torch.random.fork_rng(devices=[]):  # the run's draws (dropout, ...) left unmoved
            seen = {samples_digest([self._fetch(first)]) for _ in range(2)}
        return seen.pop() if len(seen) == 1 else None

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
            lambda_max=self.tracker.lambda_max,
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
                samples=self.samples,
                global_batch=self.global_batch,
                task=_task(self.data, cfg.model, cfg.loss),
            )
        )
        start_step, step_seconds = self.step, 0.0
        written: Path | None = None  # the checkpoint of the last epoch's end, where one was due
        try:
            # The weights it starts from, where a measurement is due and was not taken: a new
            # run's, or a resume's from a checkpoint saved before the one at its step (runs
            # before 2026-11-30 took it at the start of the next step: a resume lost it).
            if cfg.track_every and self.step % cfg.track_every == 0:
                if distributed.any_rank(self.step not in self.metrics.column("track", "step")):
                    self._track()
            while self.epoch < cfg.epochs:
                perm = self.order.next_epoch()
                while self.batch < self.steps_per_epoch:
                    stop = distributed.any_rank(should_stop is not None and should_stop())
                    if stop or (cfg.max_steps is not None and self.step >= cfg.max_steps):
                        summary.interrupted = stop
                        step_seconds += self._settle_steps()  # saved in the checkpoint
                        at = step_checkpoint_path(self.run_dir, self.step)
                        if at != written:  # else written at this step, by the epoch's end
                            summary.checkpoint = self._write(at, self.order.epoch_state)
                        return self._finish(summary, start_step, step_seconds)
                    gb = self.global_batch
                    idx = perm[self.batch * gb : (self.batch + 1) * gb]
                    if self.world > 1:
                        idx = idx[distributed.shard(range(len(idx)), self.rank, self.world)]
                    start = time.perf_counter()
                    loss, correct, labelled, count, lr = self._step(self._fetch(idx))
                    seconds = time.perf_counter() - start
                    step_seconds += seconds
                    self._record_step(loss, correct, labelled, count, lr, seconds)
                    # Right after the step that makes it due: an epoch's last weights are
                    # measured before its line is printed, and a stop's checkpoint holds the
                    # measurement at its step.
                    if cfg.track_every and self.step % cfg.track_every == 0:
                        step_seconds += self._settle_steps()
                        self._track()
                    emit(
                        StepDone(
                            step=self.step - 1,
                            epoch=self.epoch + 1,
                            loss=loss,
                            accuracy=accuracy(correct, labelled, classify=self.classify),
                            lr=lr,
                            lambda_max=self.tracker.lambda_max,
                            eigenvalue=getattr(self.optimizer, "last_eigenvalue", None),
                        )
                    )
                step_seconds += self._settle_steps()  # before the epoch's time is read
                last_steps = self.epoch == cfg.epochs - 1
                if last_steps and cfg.track_every and self.step % cfg.track_every:
                    # The final weights are always measured: before the last epoch's line,
                    # which showed the measurement before (the final table, this one).
                    self._track()
                emit(self._end_epoch())
                last = self.epoch == cfg.epochs
                due = not last and cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0
                path = step_checkpoint_path(self.run_dir, self.step) if due else None
                written = self._write(path, self.order.generator.get_state())
                summary.checkpoint = written or summary.checkpoint
            summary.finished = True
            summary.checkpoint = self._write(
                final_checkpoint_path(self.run_dir), self.order.generator.get_state()
            )
            return self._finish(summary, start_step, step_seconds)
        except _Diverged as exc:
            self._flush()
            kept = latest_checkpoint(self.run_dir)
            before = "no checkpoint was written"
            if kept:
                before = f"the last checkpoint, {kept}, holds weights before it"
            # Every rank sees it at the same step (summed losses and products, the same
            # weights): said once, by rank 0, not by each rank as its own.
            error = distributed.CollectiveUserError if self.world > 1 else UserError
            if self.step == start_step == 0 and not exc.perturbed:  # the optimizer played no part
                raise error(
                    "the loss or the weights are NaN or infinite at the initial weights, before "
                    "any step: check the model, the data and the loss."
                ) from None
            raise error(
                f"training diverged at step {self.step:,} (epoch {self._epoch_in()}): the loss or "
                f"the weights became NaN or infinite; stopped ({before}). A resume would "
                f"diverge again: start a new run, in another --out, with a lower "
                f"{self._divergence_knobs()}."
            ) from None
        except IndexError as exc:  # a batch past the two samples check_fits ran
            self._flush()
            batches = [*self._batch_in_step, self.track_batch, *self.test_batches]
            reach = embedding_reach(self.model, (x for x, _ in batches), exc)
            if not reach:
                raise
            raise UserError(
                f"the data does not fit the model after {counted(self.step, 'step')} (epoch "
                f"{self._epoch_in()}): {first_line(exc)}{reach}; stopped."
            ) from exc
        except torch.cuda.OutOfMemoryError as exc:
            # The weights may be mid-step (perturbed): nothing is saved from them.
            self._flush()
            raise UserError(
                f"CUDA ran out of memory at step {self.step:,} (epoch {self._epoch_in()}); stopped, "
                f"{resume_hint(self.run_dir, ' once more memory is free')}, or start a new run "
                "with a smaller --batch-size."
            ) from exc
        except BaseException:
            # Whatever stopped the run (a rank lost, SIGTERM, a second Ctrl-C), the rows of the
            # steps done are valid: write them (metrics are otherwise written per epoch).
            self._flush()
            raise

    def _epoch_in(self) -> int:
        """The epoch a message names: the one under way, or the last once all have ended (a
        divergence seen at the final checkpoint was "at step 18 (epoch 4)" of 3 epochs)."""
        return min(self.epoch + 1, self.config.epochs)

    def _divergence_knobs(self) -> str:
        """The options that set a step's size: --rho only where the optimizer reads it,
        --alpha where it lengthens Eigen-SAM's perturbation past sqrt(2) rho (``|d| <=
        sqrt(1 + alpha^2)``; 3.4e38 diverged at once, and lowering --rho was the advice), and
        --weight-decay where its own step (lr * weight decay, 1 or more) overshoots."""
        cfg = self.config
        knobs = ["--lr"] if cfg.optimizer == "sgd" else ["--lr", "--rho"]
        if cfg.optimizer == "eigensam" and cfg.alpha > 1:
            knobs.append("--alpha")
        if cfg.lr * cfg.weight_decay >= 1:
            knobs.append("--weight-decay")
        return ", ".join(knobs[:-1]) + f" or {knobs[-1]}" if len(knobs) > 1 else knobs[0]

    def _flush(self) -> None:
        if self.lead and not self.write_failed:  # tried again, it would fail again
            self.metrics.flush()

    def _write(self, path: Path | None, order_state: torch.Tensor) -> Path | None:
        """The metrics, then (given a ``path``) a checkpoint there, at a point all ranks reach
        together; returns ``path``. Rank 0 writes, and all agree on it: where a write fails (a
        full disk) every rank stops with rank 0's sentence (it said it as its own, "rank 0:
        ...", and the others went on, to exit 0 at the end of the run)."""
        try:
            with distributed.fail_together(lead_only=True):
                try:
                    self._flush()  # the metrics first: a checkpoint never outruns them
                except UserError as exc:  # a full disk, say
                    raise self._stopped(exc) from exc
                return None if path is None else self._save(path, order_state)
        except UserError:
            self.write_failed = True
            raise

    def _stopped(self, exc: UserError) -> UserError:
        """``exc``, a write that failed, with where the run can go on from."""
        return UserError(
            f"{str(exc).rstrip('.')}; stopped at step {self.step:,}, {resume_hint(self.run_dir)}."
        )

    def _finish(self, summary: TrainSummary, start_step: int, seconds: float) -> TrainSummary:
        """The summary of a run that stopped or ended (its metrics were written before its
        checkpoint)."""
        summary.step, summary.epoch = self.step, self.epoch
        summary.epochs = self._epoch_records()
        summary.lambda_max = self.tracker.lambda_max
        summary.steps_run, summary.step_seconds = self.step - start_step, seconds
        summary.accuracy_unknown = self.threshold is not None and math.isnan(self.threshold)
        # The whole run's: a step's loss is NaN only where its batch held no label.
        summary.unlabelled_steps = sum(map(math.isnan, self.metrics.column("steps", "loss")))
        residuals = self.metrics.column("track", "residual")
        summary.tracks = len(residuals)
        summary.unconverged_tracks = _above_tol(residuals, TRACK_TOL)
        summary.loss_growth = _loss_growth(self.metrics.column("steps", "loss"), summary.epochs)
        summary.divergence_knobs = self._divergence_knobs()
        if isinstance(self.optimizer, EigenSAM):
            summary.refreshes = self.optimizer.refreshes
            summary.negative_refreshes = self.optimizer.negative_refreshes
            residuals = self.metrics.column("refresh", "residual")  # the whole run's
            summary.unconverged_refreshes = _above_tol(residuals, REFRESH_TOL)
            finite = [r for r in residuals if math.isfinite(r)]
            summary.median_refresh_residual = statistics.median(finite) if finite else math.nan
        return summary

    def _fetch(self, idx: torch.Tensor) -> Batch:
        ds = self.data.train
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        else:
            try:  # the samples met before the run were two (the fit check's)
                x, y = collate_samples([ds[i] for i in idx.tolist()])
            except (RuntimeError, TypeError, ValueError) as exc:
                raise unbatchable(exc) from exc
        y = y.to(self.dtype) if y.is_floating_point() else y.long()
        # Its targets were not all seen; a batch of padding alone has none to check (_step
        # takes no step on it).
        if not isinstance(ds, TensorDataset) and (not self.batch_weight or self.batch_weight(y)):
            check_targets(self.loss_spec, [(x, y)], self.data.num_classes)
        x = cast_inputs(x, self.dtype, self.token_ids)
        if not isinstance(ds, TensorDataset):  # a tensor set's were all checked before the run
            # A NaN among them stopped the run as "training diverged ... with a lower --lr".
            check_finite((x, y), "training data's")
        return inputs_to(x, self.device), y.to(self.device)

    def _lr(self) -> float:
        if self.config.schedule == "constant":
            return self.config.lr
        return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * self.step / self.total_steps))

    def _step(self, batch: Batch) -> tuple[float, int, int, int, float]:
        """One update; returns the minibatch loss at ``w``, how many of its labels the outputs
        there pick and how many it holds (one per sample, or per token), what its loss averages
        over (its samples, or its labels: ``batch_weight``), the lr."""
        x, y = batch
        self._batch_in_step = [batch]  # what an IndexError's message looks through
        opt, model = self.optimizer, self.model
        lr = self._lr()
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        opt.zero_grad(set_to_none=True)
        # The ranks' shares of the global minibatch weigh what their losses average over, as one
        # process's loss does over the whole of it (by samples, a language model's padded text
        # trained to other weights on 2 ranks than on one).
        share = count = int(self.batch_weight(y)) if self.batch_weight else len(y)
        # A share of padding only moves BatchNorm's statistics where the global minibatch is
        # trained on, as under DDP (rank 0's were kept unmoved, num_batches_tracked 0 after a
        # step that updated the weights); where no rank's share holds a label, they are put back.
        held = None if share else [b.clone() for b in model.buffers()]
        out = run_model(model, x)
        loss = self._share_loss(out, y, share)
        correct, labelled = correct_count(out, y, classify=self.classify, threshold=self.threshold)
        mean_loss = loss.detach()
        if self.world > 1:
            totals = torch.tensor(
                [float(mean_loss) * count, correct, labelled, count], dtype=torch.float64
            )
            distributed.all_reduce_sum(totals)
            mean_loss = totals[0] / totals[3]
            correct, labelled, count = (int(t) for t in totals[1:])
        if held is not None and not count:  # no update: the step left nothing of its own
            with torch.no_grad():
                for b, saved in zip(model.buffers(), held, strict=True):
                    b.copy_(saved)
        # A batch of padding only (every rank's share) holds nothing its loss averages over, so
        # no gradient: no update, as a rank's share of it weighs nothing (the run stopped there,
        # and a resume met the same batch again).
        if count:
            if not bool(torch.isfinite(mean_loss)):
                raise _Diverged
            self._update(loss, batch, share, count)
        if self.world > 1:  # each rank's moved on its own share: rank 0's are kept, as in DDP
            distributed.broadcast_from_lead(self.model.buffers())
        return float(mean_loss) if count else math.nan, correct, labelled, count, lr

    def _update(self, loss: torch.Tensor, batch: Batch, share: int, count: int) -> None:
        """The optimizer's step from ``loss`` at ``w`` on ``batch`` (this rank's ``share`` of
        the ``count`` the global minibatch's loss averages over)."""
        x, y = batch
        opt, model = self.optimizer, self.model
        loss.backward()
        distributed.average_gradients(self.params, share, count)
        if isinstance(opt, EigenSAM) and self._refresh_due():
            try:
                self._refresh(batch)
            except NotFinite:  # a finite loss whose curvature is not
                raise _Diverged from None
        if isinstance(opt, SAM):
            opt.first_step(zero_grad=True)
            disable_running_stats(model)  # BatchNorm statistics move on the first pass only
            try:
                perturbed = self._share_loss(run_model(model, x), y, share)
                perturbed.backward()
            finally:
                enable_running_stats(model)
            # A loss at w + e that is not finite: its gradient made the weights NaN, which only
            # the next step's loss showed ("diverged at step 4" of a run step 3 broke).
            if distributed.any_rank(not bool(torch.isfinite(perturbed.detach()))):
                opt.restore()
                raise _Diverged(perturbed=True)
            distributed.average_gradients(self.params, share, count)
            opt.second_step()
        else:
            opt.step()

    def _refresh_due(self) -> bool:
        """Whether this step refreshes Eigen-SAM's eigenvector: the first of its ``eig_every``
        steps to update (the interval's first, unless its batch held no label)."""
        made = self.metrics.column("refresh", "step")  # also a resumed run's
        start = self.step - self.step % self.config.eig_every
        return not made or made[-1] < start

    def _share_loss(self, out: torch.Tensor, y: torch.Tensor, share: int) -> torch.Tensor:
        """The loss of this rank's share of the minibatch, which weighs ``share`` in the global
        mean; one of padding only (under torchrun) weighs nothing, and its own mean, 0/0, was
        NaN in every rank's sum: zero, with a zero gradient of the same parameters."""
        if share == 0 and self.world > 1:
            return out.sum() * 0.0
        return self.loss_fn(out, y)

    def _refresh(self, batch: Batch) -> None:
        assert isinstance(self.optimizer, EigenSAM)
        budget = self.config.eig_hvps
        if self.optimizer.eigenvector is None:  # the first, cold refresh: see COLD_MAX_HVPS
            budget = max(budget, COLD_MAX_HVPS)
        result = self.optimizer.refresh_eigenvector(
            self.model, self.loss_fn, batch, max_hvps=budget, batch_weight=self.batch_weight
        )
        g = self.optimizer.flat_grad(scaled=False)  # the layout of the refreshed vector
        self.metrics.append(
            "refresh",
            step=self.step,
            eigenvalue=result.eigenvalue,
            residual=result.residual,
            alignment=gradient_alignment(g, result.vector),
            hvps=result.hvps,
        )

    def _track(self) -> None:
        """lambda_max of the fixed held-out batch at the current weights, into the metrics."""
        if not self._finite():
            raise _Diverged
        try:  # a loss or curvature that is not finite at finite weights: the run diverged
            measured = self.tracker.measure(self.model, self.loss_fn)
        except NotFinite:
            raise _Diverged from None
        self.metrics.append(
            "track",
            step=self.step,
            lambda_max=measured.lambda_max,
            residual=measured.residual,
            hvps=measured.hvps,
        )

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    def _record_step(
        self, loss: float, correct: int, labelled: int, count: int, lr: float, seconds: float
    ) -> None:
        self.metrics.append(
            "steps",
            step=self.step,
            loss=loss,
            accuracy=accuracy(correct, labelled, classify=self.classify),
            lr=lr,
        )
        sums = self.epoch_sums
        sums["loss"] += loss * count if count else 0.0  # NaN, of no label: not in the mean
        sums["correct"] += correct
        sums["labelled"] += labelled
        sums["count"] += count
        sums["seconds"] += seconds
        self.step += 1
        self.batch += 1

    def _settle_steps(self) -> float:
        """The seconds the device still took for the steps run since the last wait, added to
        the epoch's step time (on CUDA their end fell in the evaluation or measurement that
        waited next, and was lost); returned for the run's."""
        seconds = queued_seconds(self.device)
        self.epoch_sums["seconds"] += seconds
        return seconds

    def _end_epoch(self) -> EpochDone:
        sums = self.epoch_sums
        test_loss, test_acc = evaluate(
            self.model,
            self.test_batches,
            self.loss_fn,
            self.device,
            classify=self.classify,
            batch_weight=self.batch_weight or len,
            threshold=self.threshold,
        )
        if self.test_batches and not math.isfinite(test_loss):  # finite weights, say 1e36
            raise _Diverged
        self.epoch += 1
        self.batch = 0
        self.metrics.append(
            "epochs",
            epoch=self.epoch,
            train_loss=sums["loss"] / sums["count"] if sums["count"] else math.nan,
            train_accuracy=accuracy(sums["correct"], sums["labelled"], classify=self.classify),
            test_loss=test_loss,
            test_accuracy=test_acc,
            seconds=sums["seconds"],
        )
        self.epoch_sums = {k: 0.0 for k in sums}
        return self._epoch_records()[-1]

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

    def _save(self, path: Path, order_state: torch.Tensor) -> Path:
        """A self-describing checkpoint at a step boundary, with all a resume needs; raises
        ``_Diverged`` instead where the weights, or the held-out loss, are not finite."""
        if not (self._finite() and self.tracker.held_out_loss_finite(self.model, self.loss_fn)):
            raise _Diverged
        tracker = self.tracker
        position = RunPosition(
            self.step, self.epoch, self.batch, self.epoch_sums, tracker.vector, tracker.lambda_max
        )
        metadata, extra = checkpoint_payload(
            self.config,
            self.data,
            self.loss_spec,
            self.optimizer,
            position,
            order_state,
            processes=self.world,
            samples=self.samples,
            total_steps=self.total_steps,
            data_digest=self.data_digest,
            first_samples=self.first_samples,
        )
        if self.lead:
            try:
                save_checkpoint(
                    path, state_dict=self.model.state_dict(), metadata=metadata, extra=extra
                )
            except UserError as exc:  # a full disk, say
                raise self._stopped(exc) from exc
        return path


def _above_tol(residuals: list[float], tol: float) -> int:
    """How many solves ended with a residual above ``tol`` (their HVP budget spent, or stalled
    on rounding). An infinite residual is a top eigenvalue of 0, which has none relative to it,
    not a solve short of its tol (as show counts it; a linear model's linear loss: every
    refresh and track was said to be)."""
    return int(above_tol(residuals, tol).sum())


def _loss_growth(losses: list[float], epochs: list[EpochDone]) -> tuple[float, float] | None:
    """(the first step's loss, the last epoch's) where the last is ``GROWN_LOSS`` times the
    first or more: a run that diverged, whose finite loss stopped nothing (a loss that may be
    negative or 0 tells no growth)."""
    first = next((loss for loss in losses if not math.isnan(loss)), math.nan)
    last = epochs[-1].train_loss if epochs else math.nan
    if 0 < first < math.inf and last >= GROWN_LOSS * first:
        return first, last
    return None


def _task(data: Any, model: str, loss: str | None) -> str:
    """What the data asks of the model, for the run's first line: class labels stored as real
    numbers trained a built-in model's one-output regression without a word (unless a --loss
    was named: whole numbers, counts say, may be what it regresses onto)."""
    if loss is None and not model_names_code(model) and (labels := float_labels_note(data)):
        return labels
    if data.num_classes is not None:
        per = ", a class per token" if data.target_shape else ""
        return f"{counted(data.num_classes, 'class', 'classes')}{per}"
    outputs = data.num_outputs
    return f"regression, {outputs:,} target{'s' if outputs != 1 else ''}"


def _check_sparse_gradients(model: nn.Module, config: TrainConfig) -> None:
    """Refuse an embedding with ``sparse=True`` where the base step cannot take its sparse
    gradients (torch's AdamW none, its SGD none with weight decay): the run stopped at its first
    step with "unexpected RuntimeError: add(sparse, dense) is not supported"."""
    sparse = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
    ]
    if not sparse:
        return
    if config.base_optimizer != "sgd":
        why, fix = "AdamW cannot take", "--base-optimizer sgd --weight-decay 0"
    elif config.weight_decay:
        why, fix = "SGD cannot apply --weight-decay to", "--weight-decay 0"
    else:
        return
    name = f" {sparse[0]!r}" if sparse[0] else ""  # "": the model is the embedding
    raise UserError(
        f"the model's embedding{name} has sparse=True, whose sparse gradients {why}: give "
        f"{fix}, or make it dense (sparse=False)."
    )


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
