"""A training run's progress as the terminal shows it: a progress bar, or one line per epoch for
logs, and the table of epochs at the end."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from eigensam.config import TrainConfig
from eigensam.events import EpochDone, Event, RunStarted, StepDone
from hessian_cli.presentation import DASH, counted

TABLE_ROWS = 40  # epochs in the final table at most: the last ones
BAR_WIDTHS = (10, 40)  # the progress bar's, as the room its figures leave allows


def epoch_line(e: EpochDone, epochs: int) -> str:
    """An epoch as one plain line, for logs."""
    parts = [f"epoch {e.epoch}/{epochs}", f"train loss {_num(e.train_loss)}"]
    if not math.isnan(e.train_accuracy):
        parts.append(f"acc {_num(e.train_accuracy, '.3f')}")
    if not math.isnan(e.test_loss):
        parts.append(f"test loss {_num(e.test_loss)}")
    if not math.isnan(e.test_accuracy):
        parts.append(f"test acc {_num(e.test_accuracy, '.3f')}")
    if e.lambda_max is not None:
        parts.append(f"λmax {_num(e.lambda_max)}")
    return ", ".join(parts) + f" (step time {e.seconds:.1f} s)"


def epoch_table(epochs: list[EpochDone]) -> Table:
    """One row per epoch (the last ``TABLE_ROWS`` of a long run), without the columns that hold
    nothing, as the epoch lines leave them out: accuracy for regression, the test split's where
    there is none, lambda_max untracked (a regression without a test split showed three columns
    of dashes). Its time is the steps' (their refreshes included), as metrics.h5 records it: not
    evaluation, tracking or checkpoints, which took 5/6 of an epoch at --track-every 1, where
    "seconds" read as the epoch's."""
    shown = epochs[-TABLE_ROWS:]
    table = Table(title="Epochs", caption=_caption(len(epochs), len(shown)))
    cells: dict[str, Callable[[EpochDone], str]] = {
        "epoch": lambda e: str(e.epoch),
        "train loss": lambda e: _num(e.train_loss),
        "train acc": lambda e: _num(e.train_accuracy, ".3f"),
        "test loss": lambda e: _num(e.test_loss),
        "test acc": lambda e: _num(e.test_accuracy, ".3f"),
        "λmax": lambda e: _num(e.lambda_max),
        "step time": lambda e: f"{e.seconds:.2f} s",
    }
    columns = {name: [cell(e) for e in shown] for name, cell in cells.items()}
    kept = {name: column for name, column in columns.items() if any(c != DASH for c in column)}
    for name in kept:
        table.add_column(name, justify="right", overflow="fold")  # (a cut number reads as another)
    for row in zip(*kept.values(), strict=True):
        table.add_row(*row)
    return table


def _caption(total: int, shown: int) -> str | None:
    return f"last {shown} of {total} epochs" if shown < total else None


def _num(value: float | None, spec: str = ".4g") -> str:
    return DASH if value is None or math.isnan(value) else format(value, spec)  # as show's


class _StatsColumn(ProgressColumn):
    """The bar's figures (loss, accuracy, lambda_max), cut with an ellipsis where even the
    shortest bar leaves them too little room: every column gave way alike, and on 80 columns the
    step count and times read "34/…" and "0:0…" once the test accuracy joined the figures."""

    def __init__(self) -> None:
        # A column that may wrap is the one a table narrows first; its text is cut, not wrapped.
        super().__init__(table_column=Column(no_wrap=False))

    def render(self, task: Task) -> Text:
        return Text(task.fields["stats"], no_wrap=True, overflow="ellipsis")


class TrainingDisplay:
    """What the loop's events show: a progress bar (loss, accuracy, lambda_max, test accuracy) on
    a terminal; one plain line per epoch into a pipe or log file, where a bar would be cut."""

    def __init__(
        self, console: Console, config: TrainConfig, quiet: bool, *, resuming: bool
    ) -> None:
        self.console = console
        self.config = config
        self.quiet = quiet
        self.resuming = resuming
        self.progress: Progress | None = None
        self.bar = BarColumn(bar_width=BAR_WIDTHS[1])
        self.task: Any = None
        self.epochs = config.epochs
        self.test_accuracy = math.nan
        self.last_step: StepDone | None = None

    def __enter__(self) -> TrainingDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if isinstance(event, RunStarted):
            self._start(event)
        elif isinstance(event, StepDone):
            self.last_step = event
            self._update()
        elif isinstance(event, EpochDone):
            self.test_accuracy = event.test_accuracy
            if self.progress is None:  # a pipe or log file
                self.console.print(
                    epoch_line(event, self.epochs), highlight=False, markup=False, soft_wrap=True
                )
            self._update()  # the bar's last state shows the epoch's test accuracy too

    def _update(self) -> None:
        event = self.last_step
        if self.progress is None or event is None:
            return
        # A minibatch of padding alone has no loss (NaN): the bar read "loss nan", the epoch
        # lines and show a dash.
        stats = f"loss {_num(event.loss)}"
        if not math.isnan(event.accuracy):
            stats += f"  acc {event.accuracy:.3f}"
        if event.lambda_max is not None:
            stats += f"  λmax {_num(event.lambda_max)}"
        elif event.eigenvalue is not None:
            stats += f"  λ1 {_num(event.eigenvalue)}"
        if not math.isnan(self.test_accuracy):
            stats += f"  test acc {self.test_accuracy:.3f}"
        self.progress.update(
            self.task,
            completed=event.step + 1,
            description=f"epoch {event.epoch}/{self.epochs}",
            stats=stats,
        )
        self._fit_bar()

    def _fit_bar(self) -> None:
        """Make the bar as long as the other columns leave room for (the terminal's width now),
        within ``BAR_WIDTHS``: the figures beside it are worth more than its length."""
        assert self.progress is not None
        task = self.progress.tasks[0]
        others = [c for c in self.progress.columns if c is not self.bar]
        # Their widths and the one space between each two columns.
        used = sum(self.console.measure(c(task)).maximum + 1 for c in others)
        least, most = BAR_WIDTHS
        self.bar.bar_width = max(least, min(most, self.console.width - used))

    def _start(self, event: RunStarted) -> None:
        cfg = self.config
        # sgd: the base optimizer's own steps (no SAM), which may be AdamW's
        how = (
            cfg.base_optimizer
            if cfg.optimizer == "sgd"
            else f"{cfg.optimizer} ({cfg.base_optimizer})"
        )
        verb = (
            f"Resuming at step {event.start_step:,}"
            if event.resumed_from
            else "Starting again at step 0 (the run holds no checkpoint to resume)"
            if self.resuming
            else "Training"
        )
        whole = (
            f"; a batch of {event.global_batch:,} is all {event.samples:,} samples"
            if event.global_batch > event.samples
            else ""
        )
        self.console.print(
            f"{verb}: {cfg.model} on {cfg.data} ({event.task}) with {how}, "
            f"{counted(event.num_params, 'parameter')}, {counted(event.total_steps, 'step')} "
            f"({counted(event.epochs, 'epoch')} of {event.steps_per_epoch:,}{whole}) on "
            f"{event.device}; run directory {event.run_dir}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        # What the epochs' whole batches and a kept last batch leave: said, since a plain
        # DataLoader would train on it.
        left_out = event.samples - event.steps_per_epoch * event.global_batch
        if left_out > 0:
            self.console.print(
                f"note: each epoch leaves out {left_out:,} of its {counted(event.samples, 'sample')} "
                "(the last of its shuffled order): a last batch of fewer than two samples per "
                "process is not trained on, since BatchNorm cannot train on one.",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        if not self.console.is_terminal:
            return  # one line per epoch instead
        self.progress = Progress(
            TextColumn("{task.description}"),
            self.bar,
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            _StatsColumn(),
            console=self.console,
        )
        # The bar runs to where this call stops: to the run's end it said hours remaining of a
        # --max-steps 100 that stopped in a minute.
        end = event.total_steps if cfg.max_steps is None else min(cfg.max_steps, event.total_steps)
        self.task = self.progress.add_task(
            "starting", total=end, completed=event.start_step, stats=""
        )
        self.progress.start()
