"""``hessian-cli train``: parse the options, run :func:`eigensam.training.train`, render.

Ctrl-C asks the loop to stop at the next step boundary, where it saves a checkpoint; the command
then exits with status 130 (before the loop, during a download or a long load, it stops at once
and writes nothing). A second Ctrl-C stops at once (every file is written atomically, so
nothing is damaged, but the steps since the last checkpoint are lost). Under torchrun one Ctrl-C can
reach a rank more than once (see :data:`ECHO_WINDOW_S`); those copies are the same request.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console

from eigensam.config import (
    BASE_OPTIMIZERS,
    CONFIG_FILE,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    check_options_used,
    check_resume_options,
    load_config,
)
from eigensam.events import Event, RunStarted, TrainSummary
from hessian_cli.atomic import os_reason
from hessian_cli.cli.app import (
    INTERRUPTED_STATUS,
    TERMINATED_STATUS,
    OutputConsole,
    app,
    err_console,
    import_torch,
    signal_handled,
)
from hessian_cli.cli.options import (
    DATA_HELP,
    MODEL_HELP,
    command_line,
    fixed_word,
    named_path,
    parse_model_kwargs,
    refuse_empty,
)
from hessian_cli.errors import Terminated, UserError
from hessian_cli.launch import launched_by_torchrun
from hessian_cli.presentation import counted
from hessian_cli.presentation.training import TrainingDisplay, epoch_table

# Under torchrun one Ctrl-C can reach a rank more than once: torchrun forwards the SIGINT it got,
# then SIGTERM if it is signalled again while it waits for the ranks (a wrapper in its process
# group, such as `timeout`, forwards the terminal's Ctrl-C a second time); the terminal signals the
# ranks directly too where they share its process group (torchrun versions that do not start them
# in a session of their own), and a scheduler may signal every process of a job besides torchrun.
# Those copies come milliseconds apart; a person's deliberate second Ctrl-C comes seconds later.
# 3 s leaves a loaded machine (or a rank that handles the copies either side of a long operation)
# ample margin, while a second Ctrl-C still stops at once well inside the 30 s torchrun gives the
# ranks before SIGKILL.
ECHO_WINDOW_S = 3.0
_D = TrainConfig(model="", data="")  # the defaults, for the help text


def _default(name: str) -> str:
    return f" \\[default: {getattr(_D, name)}]"  # as Typer shows analyze's (\\[: not markup)


@app.command("train")
def train_command(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    out_name: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="New run directory, made with any missing above it (an existing run is never "
        "overwritten).",
    ),
    resume_name: str | None = typer.Option(
        None, "--resume", help="Continue the run in this directory exactly where it stopped."
    ),
    optimizer: str | None = typer.Option(
        None,
        "--optimizer",
        help=f"{', '.join(OPTIMIZERS)} (sgd: plain steps of --base-optimizer, no SAM)."
        + _default("optimizer"),
    ),
    base_optimizer: str | None = typer.Option(
        None,
        "--base-optimizer",
        help=f"{', '.join(BASE_OPTIMIZERS)}: the step SAM and Eigen-SAM wrap."
        + _default("base_optimizer"),
    ),
    rho: float | None = typer.Option(None, "--rho", help="SAM radius." + _default("rho")),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Eigen-SAM eigenvector weight." + _default("alpha")
    ),
    eig_every: int | None = typer.Option(
        None,
        "--eig-every",
        help="Refresh Eigen-SAM's eigenvector every N global steps." + _default("eig_every"),
    ),
    eig_hvps: int | None = typer.Option(
        None,
        "--eig-hvps",
        help="Hessian-vector products a refresh may spend from the previous vector (the first, "
        "from none, may spend more): more give vectors nearer the top eigenvector, at about 3 "
        "gradients each." + _default("eig_hvps"),
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs." + _default("epochs")),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        help="Minibatch size per process (under torchrun the global batch is this times the "
        "processes)." + _default("batch_size"),
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate." + _default("lr")),
    momentum: float | None = typer.Option(
        None, "--momentum", help="SGD momentum (base optimizer sgd)." + _default("momentum")
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="Weight decay." + _default("weight_decay")
    ),
    schedule: str | None = typer.Option(
        None,
        "--schedule",
        help=f"{', '.join(SCHEDULES)} (cosine anneals to 0 over all steps)." + _default("schedule"),
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed." + _default("seed")),
    track_every: int | None = typer.Option(
        None,
        "--track-every",
        help="Measure lambda_max of a fixed held-out batch every N steps (0: off)."
        + _default("track_every"),
    ),
    checkpoint_every: int | None = typer.Option(
        None,
        "--checkpoint-every",
        help="Save a checkpoint every N epochs (0: only at the end)."
        + _default("checkpoint_every"),
    ),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="JSON object of keyword arguments for the model."
    ),
    data_root: str | None = typer.Option(
        None, "--data-root", help="Folder holding torchvision datasets."
    ),
    download: bool = typer.Option(
        False, "--download", help="Fetch a torchvision dataset into --data-root if it is missing."
    ),
    loss: str | None = typer.Option(
        None,
        "--loss",
        help="ce, mse or module:function (torch.nn:BCEWithLogitsLoss for one output on 0/1 "
        "labels). Default: ce for class labels, else mse.",
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        help="Stop (with a checkpoint) after this many global steps; 0 saves the initial "
        "weights, which --resume continues from.",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA where present), cpu, cuda or cuda:N."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
) -> None:
    """Train with Eigen-SAM, SAM or SGD; write checkpoints and metrics.h5 into a run directory.

    Ctrl-C (or SIGTERM) stops at the next step with a checkpoint, which --resume continues
    exactly; a second one stops at once, without it.
    """
    # The loop (torch) is imported here, not at the top: --help stays instant.
    import_torch()
    from eigensam.training import train
    from hessian_cli.engine.distributed import any_rank, fail_together, world
    from hessian_cli.specs.losses import BUILTIN_LOSSES

    given = {
        "model": model,
        "data": data,
        # "Eigen-SAM", "eigen_sam", "SGD": the names as papers write them.
        "optimizer": fixed_word(optimizer, OPTIMIZERS, ignoring="-_"),
        "base_optimizer": fixed_word(base_optimizer, BASE_OPTIMIZERS),
        "model_kwargs": model_kwargs,
        "data_root": data_root,
        "loss": fixed_word(loss, BUILTIN_LOSSES),
        "rho": rho,
        "alpha": alpha,
        "eig_every": eig_every,
        "eig_hvps": eig_hvps,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "schedule": fixed_word(schedule, SCHEDULES),
        "seed": seed,
        "track_every": track_every,
        "checkpoint_every": checkpoint_every,
    }
    set_options = {k: v for k, v in given.items() if v is not None}
    with fail_together():  # under torchrun, said once (by rank 0) and every rank stops
        refuse_empty(
            (model, "--model", "mlp"),
            (data, "--data", "digits"),
            (loss, "--loss", "ce"),
            (data_root, "--data-root", "~/data"),
        )
        out = named_path(out_name, "--out", "runs/exp1")
        resume = named_path(resume_name, "--resume", "runs/exp1")
        if resume is not None:
            check_resume_options([*set_options, *(["out"] if out is not None else [])])
            config = load_config(resume)
        else:
            given = {"--model": model, "--data": data, "--out": out}
            missing = [flag for flag, value in given.items() if value is None]
            if missing:  # named where the others were given: which one was forgotten
                verb = "is" if len(missing) == 1 else "are"
                lacking = f"{' and '.join(missing)} {verb} missing: " if len(missing) < 3 else ""
                raise UserError(
                    f"{lacking}give --model, --data and --out to start a run, or --resume "
                    "RUN_DIR to continue one."
                )
            check_options_used(set_options)
            set_options["model_kwargs"] = parse_model_kwargs(model_kwargs)
            config = TrainConfig(**set_options, out=str(out))
    config = dataclasses.replace(config, max_steps=max_steps, device=device, download=download)
    console = _RunConsole()
    notes = _Notes()
    lead = world()[0] == 0  # under torchrun only rank 0 reports
    display = TrainingDisplay(console, config, quiet or not lead, resuming=resume is not None)
    stop = _StopRequest(echo_window_s=ECHO_WINDOW_S if launched_by_torchrun() else 0.0)
    try:
        with _stop_signals(stop), display:

            def progress(event: Event) -> None:
                stop.note(event)
                display(event)

            summary = train(
                config,
                resume_dir=resume,
                progress=progress,
                should_stop=stop,
                command_line=command_line(),
            )
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint of the steps since the last
        if lead:
            # Before the loop started the first Ctrl-C stops at once, and no metrics were
            # written (it said they were).
            said = (
                f"stopped at once by a second Ctrl-C: {_kept(resume, config)}"
                if stop.started
                else f"stopped at once by Ctrl-C before training began: {_claimed(resume, config)}"
            )
            err_console.print(f"{said}.", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(INTERRUPTED_STATUS) from None
    except Terminated:  # a second signal, or SIGTERM before the loop (nothing written then)
        if lead and stop.started:
            raise Terminated(f"stopped at once by SIGTERM: {_kept(resume, config)}.") from None
        raise
    if summary.interrupted:  # every rank's, agreed; the signal may have reached some ranks only
        stop.by_sigterm = any_rank(stop.by_sigterm)
    if lead:
        _report(
            console,
            notes,
            summary,
            quiet,
            resumed=resume is not None,
            stop=stop,
            eig_hvps=config.eig_hvps,
        )
    elif summary.interrupted:
        raise typer.Exit(stop.exit_status)
    if console.failed:  # as analyze: said once the run's files are written
        went = (
            f"the run in {summary.run_dir} had already finished, nothing was run"
            if _already_finished(summary, resumed=resume is not None)
            else f"the run went on without it, its checkpoints and metrics are in {summary.run_dir}"
        )
        raise UserError(f"{str(console.failed).rstrip('.')}; {went}.")
    if notes.failed:  # said nowhere (stderr is where it would be), but the status tells
        raise UserError(f"{notes.failed}; the run's files are in {summary.run_dir}.")


def _kept(resume: Path | None, config: TrainConfig) -> str:
    """What a run stopped at once keeps, and how to continue it."""
    from eigensam.run_dir import resume_hint  # loads torch: not at the top, for --help

    run_dir = Path(resume if resume is not None else config.out)
    return (
        "the metrics of the steps done are written, the steps since the last checkpoint are "
        f"not; {resume_hint(run_dir)}"
    )


def _claimed(resume: Path | None, config: TrainConfig) -> str:
    """What a run stopped before its loop left: a new one's config.json where it had claimed
    its directory (said to be nothing, where --out was then refused as a run's), else nothing."""
    claimed = Path(config.out) / CONFIG_FILE
    if resume is not None or not claimed.is_file():
        return "nothing was written"
    return f"only {claimed} was written (--resume {config.out} starts the run at step 0)"


class _RunConsole(OutputConsole):
    """Standard output for a run, whose directory holds all it prints: a write there that fails
    (a full disk under ``> train.log``) silences it and the run goes on, as for a closed pipe;
    ``failed`` says why, for the end. The failure stopped the run at its first line, its
    directory left without a checkpoint, where ``analyze`` writes its --out before saying it."""

    failed: UserError | None = None

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        except UserError as exc:
            self.failed = self.failed or exc
            self.on_broken_pipe()


class _StopRequest:
    """Polled by the loop; the first Ctrl-C or SIGTERM asks for a clean stop (a checkpoint at
    the next step: a scheduler's preemption keeps the steps done), the second stops at once.

    Signals within ``echo_window_s`` of the first are copies of it (torchrun's forwarding, see
    :data:`ECHO_WINDOW_S`), not a second request; 0 outside torchrun.
    """

    def __init__(self, echo_window_s: float = 0.0) -> None:
        self.requested = False
        self.by_sigterm = False
        self.started = False  # the loop: before it, nothing is worth a checkpoint
        self.echo_window_s = echo_window_s
        self._requested_at = 0.0

    def note(self, event: Event) -> None:
        self.started = self.started or isinstance(event, RunStarted)

    def __call__(self) -> bool:
        return self.requested

    def _echo(self) -> bool:
        """Whether a signal now is a copy of the first request rather than a second one."""
        return self.requested and time.monotonic() - self._requested_at < self.echo_window_s

    def _request(self, *, by_sigterm: bool) -> None:
        self.requested, self.by_sigterm = True, by_sigterm
        self._requested_at = time.monotonic()

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(by_sigterm=False)

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(by_sigterm=True)

    def _on_signal(self, *, by_sigterm: bool) -> None:
        """The first signal asks for a stop at the next step boundary, or stops at once before
        the loop (no step to finish during a download or a long load); a second stops at once;
        a copy of the first (torchrun's) is nothing, also before the loop (it raised again
        while the first one's stop was under way)."""
        if self._echo():
            return
        if self.requested or not self.started:
            if not self.requested:  # before the loop: its copies are to come
                self._request(by_sigterm=by_sigterm)
            raise Terminated if by_sigterm else KeyboardInterrupt
        self._request(by_sigterm=by_sigterm)

    @property
    def exit_status(self) -> int:
        return TERMINATED_STATUS if self.by_sigterm else INTERRUPTED_STATUS


@contextmanager
def _stop_signals(stop: _StopRequest) -> Iterator[None]:
    with (
        signal_handled(signal.SIGINT, stop.on_sigint),
        signal_handled(signal.SIGTERM, stop.on_sigterm),
    ):
        yield


class _Notes:
    """The end of a run's lines on stderr, beside its results (yellow, unwrapped). A write there
    that fails (``2> /dev/full``) loses them, as a failed stdout loses its lines, and ``failed``
    ends the run with status 2 as stdout's does (it was status 1: the error, unprintable, went
    unsaid)."""

    failed: UserError | None = None

    def __call__(self, text: str) -> None:
        try:
            err_console.print(text, style="yellow", highlight=False, markup=False, soft_wrap=True)
        except OSError as exc:  # from now on stderr goes nowhere, Python's last flush too
            self.failed = self.failed or UserError(
                f"could not write to standard error: {os_reason(exc)}."
            )
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _its(count: int, thing: str) -> str:
    """``its vector was`` of one, ``their vectors were`` of several ("1 of 4 refreshes ...")."""
    return f"its {thing} was" if count == 1 else f"their {thing}s were"


def _already_finished(summary: TrainSummary, *, resumed: bool) -> bool:
    """Whether this call resumed a run that had finished: it ran no step."""
    return resumed and summary.steps_run == 0 and summary.finished


def _report(
    console: Console,
    note: _Notes,
    summary: TrainSummary,
    quiet: bool,
    *,
    resumed: bool,
    stop: _StopRequest,
    eig_hvps: int,
) -> None:
    from eigensam.refresh import DEFAULT_TOL  # loads torch, as _kept says
    from eigensam.run_dir import METRICS_FILE, resume_hint

    where = summary.run_dir
    if _already_finished(summary, resumed=resumed):
        console.print(
            f"the run in {where} has already finished (step {summary.step:,} of "
            f"{summary.total_steps:,}); nothing to do.",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return
    if not quiet and summary.epochs:
        console.print(epoch_table(summary.epochs))
    if summary.negative_refreshes:  # counted by EigenSAM, said nowhere else
        refreshes = counted(summary.refreshes, "Eigen-SAM refresh", "Eigen-SAM refreshes")
        note(
            f"warning: {summary.negative_refreshes} of {refreshes} found no positive curvature "
            f"(top eigenvalue <= 0); {_its(summary.negative_refreshes, 'vector')} used all the "
            f"same (the eigenvalues are in {where / METRICS_FILE}).",
        )
    # Where most refreshes were short of it: one or two of 7 were said at the end of nearly
    # every run (the README's 3 of 7, the digits mlp's 1 of 7, median residuals 9e-3 and 4e-3).
    if summary.median_refresh_residual > DEFAULT_TOL:  # shown by show and plot, said nowhere else
        refreshes = counted(summary.refreshes, "Eigen-SAM refresh", "Eigen-SAM refreshes")
        note(
            f"note: {summary.unconverged_refreshes} of {refreshes} ended above the tolerance "
            f"{DEFAULT_TOL:.0e} (median residual {summary.median_refresh_residual:.1e}: the HVP "
            "budget spent, or the residual stopped improving); "
            f"{_its(summary.unconverged_refreshes, 'vector')} used all the same (the residuals "
            f"are in {where / METRICS_FILE}; a run with --eig-hvps above {eig_hvps} spends more "
            "products on each).",
        )
    if summary.unlabelled_steps:  # their loss is NaN in the metrics, said nowhere else
        n = summary.unlabelled_steps
        note(
            f"note: {counted(n, 'minibatch', 'minibatches')} held no label but -100 (padding): "
            f"no update was made on {'it' if n == 1 else 'them'}.",
        )
    if summary.accuracy_unknown:  # no accuracy in the lines or the table, said nowhere else
        note(
            "note: no accuracy is given: the loss does not say whether the model's one output "
            "is a logit (label 1 above 0) or a probability (above 0.5).",
        )
    if summary.unconverged_tracks:  # the tables show their values as they show the others
        from eigensam.tracking import TRACK_TOL

        tracks = counted(summary.tracks, "lambda_max measurement")
        note(
            f"note: {summary.unconverged_tracks} of {tracks} (--track-every) ended above the "
            f"tolerance {TRACK_TOL:.0e} (the HVP budget spent, or the residual stopped "
            "improving), so "
            f"{'its value' if summary.unconverged_tracks == 1 else 'their values'} may be off "
            f"(the residuals are in {where / METRICS_FILE}).",
        )
    if summary.loss_growth:  # finite, so nothing stopped the run
        first, last = summary.loss_growth
        diverged = (
            f"training diverged: its loss grew from {first:.4g} at the first step to {last:.4g} "
            f"in epoch {summary.epochs[-1].epoch:,} without becoming NaN (its checkpoints and "
            f"metrics are in {where}); start a new run, in another --out, with a lower "
            f"{summary.divergence_knobs}"
        )
        if summary.finished:  # said in place of "done", and the status tells
            raise UserError(f"{diverged}.")
        note(f"warning: {diverged}.")
    if summary.finished:
        if not quiet:
            console.print(
                f"done: {counted(summary.total_steps, 'step')}; final checkpoint {summary.checkpoint}, "
                f"metrics {where / METRICS_FILE}.",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return
    why = (
        ("stopped by SIGTERM" if stop.by_sigterm else "interrupted")
        if summary.interrupted
        else "stopped (--max-steps)"
    )
    message = f"{why} at step {summary.step:,} of {summary.total_steps:,}: {resume_hint(where)}."
    if summary.interrupted:
        note(message)
        raise typer.Exit(stop.exit_status)
    if not quiet:
        console.print(message, highlight=False, markup=False, soft_wrap=True)
