"""The training metrics file ``metrics.h5`` (format ``hessian-cli-metrics``, version 1): written
by ``train`` (:class:`MetricsLog`), read by ``show`` and ``plot`` (:func:`read_metrics`).

Layout: root attrs as in a spectra file, ``format``, ``format_version``, ``tool_version``,
``torch_version``, ``created``, ``modified`` and ``command_line`` (the command that last wrote
it: a resume's), ``config`` (the run's configuration as JSON) and ``batchnorm_layers`` (since
2026-12-02: how many BatchNorm layers, and InstanceNorm layers with running statistics, training
normalises by the minibatch's statistics, which tracking's eval mode replaces by the running
ones); files written before 2026-11-29 name the versions ``version``, ``tool`` and ``torch`` and
have no command line. One group per kind of record, each holding equally long 1-D extendible
datasets (columns), rows in step order; a group with no rows is left out:

- ``steps``: ``step`` (global, from 0), ``loss`` and ``accuracy`` of the minibatch at the
  weights before that step's update, ``lr`` used by the update.
- ``epochs``: ``epoch`` (from 1), ``train_loss`` / ``train_accuracy`` (sample-weighted means of
  the epoch's minibatch values), ``test_loss`` / ``test_accuracy`` (NaN without a test split),
  ``seconds`` (time in training steps, eigenvector refreshes included; evaluation, tracking and
  checkpoints excluded, so optimizers compare fairly).
- ``refresh`` (Eigen-SAM): ``step``, ``eigenvalue``, ``residual``, ``alignment``
  (``|<g_hat, v>|`` of the minibatch gradient with the new ``v``), ``hvps``.
- ``track`` (``--track-every``): ``step``, ``lambda_max``, ``residual``, ``hvps`` of the fixed
  held-out batch's Hessian at the weights after ``step`` updates.

``refresh`` and ``track`` have a ``tol`` attribute (files written before 2026-11-30 do not): a
row whose ``residual`` is at most ``tol`` converged; one above it did not (its solve spent its
budget, or its residual stopped improving: the file does not say which).

Accuracy is NaN for regression. Rows live in memory and every :meth:`MetricsLog.flush` rewrites
the whole file through a temporary file and a rename, so an interruption (Ctrl-C, a crash, a full
disk) leaves either the previous file or the new one, never a damaged one. Reading is
tolerant: missing groups are simply absent and unknown groups are returned as well.
"""

from __future__ import annotations

import json
import numbers
import signal
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hessian_cli.atomic import check_replaceable
from hessian_cli.errors import UserError
from hessian_cli.storage.files import (
    file_format,
    hdf5_written,
    member,
    open_format,
    signals_deferred,
    storable_text,
)

METRICS_FORMAT_NAME = "hessian-cli-metrics"
METRICS_VERSION = 1
# Root attributes each flush writes (and those of files before 2026-11-29, which it replaces).
_OWN_ATTRS = (
    "format",
    "format_version",
    "tool_version",
    "torch_version",
    "created",
    "modified",
    "command_line",
    "config",
    "batchnorm_layers",
    "version",
    "tool",
    "torch",
)

# Columns of each group, in order, with their dtypes; the first column orders the rows.
COLUMNS: dict[str, dict[str, type]] = {
    "steps": {"step": np.int64, "loss": np.float64, "accuracy": np.float64, "lr": np.float64},
    "epochs": {
        "epoch": np.int64,
        "train_loss": np.float64,
        "train_accuracy": np.float64,
        "test_loss": np.float64,
        "test_accuracy": np.float64,
        "seconds": np.float64,
    },
    "refresh": {
        "step": np.int64,
        "eigenvalue": np.float64,
        "residual": np.float64,
        "alignment": np.float64,
        "hvps": np.int64,
    },
    "track": {"step": np.int64, "lambda_max": np.float64, "residual": np.float64, "hvps": np.int64},
}


def above_tol(residual: Any, tol: float) -> np.ndarray:
    """Which ``refresh`` or ``track`` rows (their ``residual`` column) did not converge: above
    ``tol`` (their budget spent, or their residual stalled). An infinite residual is a top
    eigenvalue of 0, which has none relative to it, not a solve short of its tol."""
    residual = np.asarray(residual, dtype=float)
    return ~(residual <= tol) & ~np.isinf(residual)


class MetricsLog:
    """Rows of every group, kept in memory and written out whole by :meth:`flush`."""

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        command_line: str = "",
        tolerances: dict[str, float] | None = None,
        batchnorm_layers: int | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.command_line = command_line
        # A group's `tol` attribute: the relative residual its rows' solves aimed for.
        self.tolerances = tolerances or {}
        self.batchnorm_layers = batchnorm_layers  # None: not known, none written
        self.created = _now()
        self.rows: dict[str, list[tuple[float, ...]]] = {group: [] for group in COLUMNS}
        # What a resumed file holds that this version does not write (a newer version's, or
        # the user's own): kept as it is by every flush.
        self.foreign_attrs: dict[str, Any] = {}
        self.foreign_groups: list[str] = []

    def append(self, group: str, **values: float) -> None:
        """Add one row; every column of the group must be given."""
        columns = COLUMNS[group]
        if values.keys() != columns.keys():
            raise ValueError(f"{group} rows need exactly the columns {list(columns)}")
        self.rows[group].append(tuple(values[c] for c in columns))

    def column(self, group: str, name: str) -> list[float]:
        index = list(COLUMNS[group]).index(name)
        return [row[index] for row in self.rows[group]]

    def load(self, *, before_step: int, before_epoch: int, checkpoint: bool = True) -> None:
        """Take the rows of an existing file up to a resumed checkpoint: steps before
        ``before_step`` (tracks up to it: the one at its step measured its weights before it was
        saved; none without a ``checkpoint``, whose tracker starts afresh) and epochs up to
        ``before_epoch``, so the file ends up exactly as an uninterrupted run writes it. A
        missing file means nothing was recorded yet."""
        if not self.path.exists():
            if before_step > 0:
                raise UserError(
                    f"the run's {self.path.name} is missing, so the rows of its first "
                    f"{before_step} steps are lost: start the run again to have them."
                )
            return
        if file_format(self.path) != METRICS_FORMAT_NAME:
            raise UserError(f"{self.path} is not a hessian-cli metrics file.")
        check_replaceable(self.path)  # now, not at the first flush, after training steps
        stored = read_metrics(self.path)
        with h5py.File(self.path, "r") as f:
            # A newer layout may hold what this version misreads, and a flush would mark the
            # file as version 1: refused, as an append to a newer spectra file is.
            version = f.attrs.get("format_version", f.attrs.get("version"))
            if isinstance(version, numbers.Integral) and version > METRICS_VERSION:
                raise UserError(
                    f"the run's {self.path.name} was written by a newer hessian-cli (format "
                    f"version {version}): resume it with that version, or upgrade hessian-cli."
                )
            self.created = str(_text(f.attrs.get("created")) or self.created)
            self.foreign_attrs = {k: v for k, v in f.attrs.items() if k not in _OWN_ATTRS}
            self.foreign_groups = [name for name in f if name not in COLUMNS]
            for group in COLUMNS:
                extra = sorted(set(f[group]) - set(COLUMNS[group])) if group in f else []
                if extra:
                    raise UserError(
                        f"the run's {self.path.name} has columns this version does not write "
                        f"({group}/{extra[0]}): resume it with the version that wrote them."
                    )
        for group, columns in COLUMNS.items():
            data = stored.get(group, {})
            if not data:
                continue
            key, limit = ("epoch", before_epoch) if group == "epochs" else ("step", before_step - 1)
            if group == "track":  # of the weights after that many steps: a checkpoint's own
                limit = before_step if checkpoint else -1
            keep = np.asarray(data[key]) <= limit
            cols = [np.asarray(data[c])[keep].tolist() for c in columns]
            self.rows[group] = list(zip(*cols, strict=True))
        recorded = len(self.rows["steps"])
        if recorded != before_step:  # a crash between a checkpoint and its rows (before 11-29)
            raise UserError(
                f"the run's {self.path.name} records {recorded} steps, but its checkpoint is at "
                f"step {before_step}: resume from the checkpoint at step {recorded} or before "
                "(move the later ones aside), and the steps in between are run again."
            )

    def flush(self) -> None:
        """Rewrite the file atomically with every row so far; SIGTERM or Ctrl-C arriving
        meanwhile takes effect once the file is in place (a stopped run's rows are written in
        its unwinding, which torchrun's SIGTERM to the other ranks tends to cut short)."""
        with (
            signals_deferred(signal.SIGTERM, signal.SIGINT),
            hdf5_written(self.path) as f,
        ):
            f.attrs.update(self.foreign_attrs)
            if self.foreign_groups:
                with h5py.File(self.path, "r") as old:
                    for name in self.foreign_groups:
                        old.copy(old[name], f, name)
            f.attrs["format"] = METRICS_FORMAT_NAME
            f.attrs["format_version"] = METRICS_VERSION
            f.attrs["tool_version"] = _tool_version()
            f.attrs["torch_version"] = _torch_version()
            f.attrs["created"] = self.created
            f.attrs["modified"] = _now()
            f.attrs["command_line"] = storable_text(self.command_line)  # a name not UTF-8
            f.attrs["config"] = json.dumps(self.config, sort_keys=True)
            if self.batchnorm_layers is not None:
                f.attrs["batchnorm_layers"] = self.batchnorm_layers
            for group, columns in COLUMNS.items():
                rows = self.rows[group]
                if not rows:  # e.g. no refreshes for SAM: the group is absent, not empty
                    continue
                g = f.create_group(group, track_order=True)  # columns read in this order
                if group in self.tolerances:
                    g.attrs["tol"] = self.tolerances[group]
                for i, (name, dtype) in enumerate(columns.items()):
                    values = np.asarray([row[i] for row in rows], dtype=dtype)
                    g.create_dataset(
                        name, data=values, maxshape=(None,), chunks=(min(len(rows), 1024),)
                    )


def _tool_version() -> str:
    """Read from the package metadata here, not at import: ``show`` and ``plot`` read it
    for nothing (5-20 ms, twice an import) otherwise."""
    from hessian_cli import __version__

    return __version__


def _torch_version() -> str:
    """Imported here, not at the top: ``show`` and ``plot`` read this module and start faster
    without torch (the writer runs in ``train``, where torch is loaded already)."""
    import torch

    return str(torch.__version__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def read_metrics(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {column: values}}`` for every group of datasets in a metrics file."""
    return read_metrics_file(path)[0]


def read_metrics_file(
    path: str | Path,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, object]]:
    """:func:`read_metrics` and the file's root attributes (format, version, and whatever else
    train wrote; under ``tolerances`` the ``tol`` of each group that records one) from one
    opening, so that a run appending in between cannot make them disagree."""
    with open_format(path, METRICS_FORMAT_NAME, "metrics") as f:
        metrics = {
            name: {
                col: np.asarray(ds[()])
                for col in group
                if isinstance(ds := member(group, col), h5py.Dataset) and ds.dtype.kind in "biuf"
            }
            for name in f
            if isinstance(group := member(f, name), h5py.Group)
        }
        for name, columns in metrics.items():
            _check_rows(name, columns)
        info = _attributes(f)
        # The relative residual each curvature group's solves aimed for (since 2026-11-30).
        tolerances = {
            name: float(f[name].attrs["tol"]) for name in metrics if "tol" in f[name].attrs
        }
        if tolerances:
            info["tolerances"] = tolerances
        return metrics, info


def batchnorm_layers(info: Mapping[str, object]) -> int | None:
    """A metrics file's ``batchnorm_layers`` (from its root attributes ``info``); None where it
    records none (written before 2026-12-02) or no count (another tool's)."""
    layers = info.get("batchnorm_layers")
    return layers if type(layers) is int and layers >= 0 else None


def _check_rows(group: str, columns: dict[str, np.ndarray]) -> None:
    """Refuse (a ValueError, one sentence in :func:`open_format`) columns that are not rows of
    one table: a column shorter than the others would be drawn against the wrong steps."""
    lengths = {}
    for col, values in columns.items():
        if values.ndim == 0:
            raise ValueError(f"{group}/{col} is a single value, not a column")
        lengths[col] = len(values)
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{col} {n}" for col, n in lengths.items())
        raise ValueError(f"the columns of /{group} differ in length ({shown})")


def _attributes(f: h5py.File) -> dict[str, object]:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
