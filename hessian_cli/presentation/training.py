"""A training run's progress as the terminal shows it: one line per epoch for logs, and the
table of epochs at the end."""

from __future__ import annotations

import math

from rich.table import Table

from eigensam.events import EpochDone
from hessian_cli.presentation import DASH

TABLE_ROWS = 40  # epochs in the final table at most: the last ones


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
    return ", ".join(parts) + f" ({e.seconds:.1f} s)"


def epoch_table(epochs: list[EpochDone]) -> Table:
    """One row per epoch (the last ``TABLE_ROWS`` of a long run)."""
    shown = epochs[-TABLE_ROWS:]
    table = Table(title="Epochs", caption=_caption(len(epochs), len(shown)))
    tracked = any(e.lambda_max is not None for e in shown)
    for name in ("epoch", "train loss", "train acc", "test loss", "test acc"):
        table.add_column(name, justify="right")
    if tracked:
        table.add_column("λmax", justify="right")
    table.add_column("seconds", justify="right")
    for e in shown:
        row = [
            str(e.epoch),
            _num(e.train_loss),
            _num(e.train_accuracy, ".3f"),
            _num(e.test_loss),
            _num(e.test_accuracy, ".3f"),
        ]
        if tracked:
            row.append(_num(e.lambda_max))
        row.append(_num(e.seconds, ".2f"))
        table.add_row(*row)
    return table


def _caption(total: int, shown: int) -> str | None:
    return f"last {shown} of {total} epochs" if shown < total else None


def _num(value: float | None, spec: str = ".4g") -> str:
    return DASH if value is None or math.isnan(value) else format(value, spec)  # as show's
