"""The files ``show`` and ``plot`` take: a spectra file (one checkpoint or a series) or a run's
metrics, read once, with the same refusals for both commands."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hessian_cli.cli.options import refuse_empty
from hessian_cli.errors import UserError

METRICS_FILE = "metrics.h5"  # in a training run's directory (eigensam.run_dir, which loads torch)


@dataclass
class Spectra:
    """The reports of a spectra file that ``--checkpoint`` picked, the groups that hold them,
    the file's own attributes and history, and all its reports (named by their groups where
    names repeat)."""

    reports: list[dict[str, Any]]
    groups: list[str]
    info: dict[str, Any]
    held: list[dict[str, Any]]


@dataclass
class Metrics:
    """A metrics file's ``{group: {column: values}}`` and its root attributes."""

    columns: dict[str, dict[str, Any]]
    info: dict[str, Any]


def refuse_more_files(verb: str, names: Sequence[str], reads: str, seen_in: str) -> None:
    """Refuse files past the first, which the command takes only to say how to compare them
    (Click said only "got unexpected extra argument(s)"): analysed into one file, as a series
    that ``verb`` shows ``seen_in`` (one figure, one table)."""
    if len(names) > 1:
        given = ", ".join(shlex.quote(name) for name in names)
        if any(map(_a_run, names)):  # no one file holds two runs: analyze was no advice
            first, second = (shlex.quote(name) for name in names[:2])
            raise UserError(
                f"{verb} {reads} one file (given: {given}); {verb} one training run at a time: "
                f"hessian-cli {verb} {first}, then hessian-cli {verb} {second}."
            )
        raise UserError(
            f"{verb} {reads} one file (given: {given}); to compare checkpoints {seen_in}, "
            f"analyze them into one file (hessian-cli analyze A.pt B.pt --out both.h5, or "
            f"--out {shlex.quote(names[0])} to add to it) and {verb} that."
        )


def _a_run(name: str) -> bool:
    """Whether ``name`` is a training run's metrics file, or its directory."""
    from hessian_cli.storage import METRICS_FORMAT_NAME, file_format

    try:
        path = result_file(Path(name))
        return path.is_file() and file_format(path) == METRICS_FORMAT_NAME
    except (UserError, OSError):  # told as itself once the command reads it alone
        return False


def result_file(given: Path) -> Path:
    """The file to read for ``given``: a training run's directory stands for its metrics file,
    the one result file in it."""
    if given.is_symlink() and not given.exists():  # said "does not exist", where ls shows it
        raise UserError(f"{given} is a symbolic link that leads nowhere.")
    return given / METRICS_FILE if (given / METRICS_FILE).is_file() else given


def read_result_file(file: Path, checkpoint: str | None, verb: str) -> Spectra | Metrics:
    """What ``file`` holds, or one sentence saying why it cannot be ``verb``-ed (shown,
    plotted)."""
    # Imported here, not at the top, so that --help need not load h5py and numpy.
    from hessian_cli.storage import (
        FORMAT_NAME,
        METRICS_FORMAT_NAME,
        file_format,
        read_metrics_file,
        read_spectra,
    )

    # `-c "$NAME"` with the variable unset was "holds no checkpoint named ''"
    refuse_empty((checkpoint, "--checkpoint", "final"))
    _refuse_a_run_or_checkpoint(file, verb)
    fmt = file_format(file)
    if fmt == METRICS_FORMAT_NAME:
        if checkpoint is not None:
            raise UserError("--checkpoint picks a checkpoint of a spectra file, not of metrics.")
        return Metrics(*read_metrics_file(file))
    if fmt != FORMAT_NAME:
        raise UserError(f"{file} is a {fmt!r} file, which hessian-cli cannot {verb}.")
    reports, info = read_spectra(file)
    picked = pick_checkpoint(file, reports, info["groups"], checkpoint)
    # Where names repeat, every analysis is named by its group, as the table's rows are: a
    # density's eigenvalues taken from another analysis were said to be final's, not final-2's.
    repeated = len({d["name"] for d in reports}) < len(reports)
    held = [{**d, "name": g} for d, g in zip(reports, info["groups"], strict=True)]
    return Spectra(*picked, info, held if repeated else reports)


def _refuse_a_run_or_checkpoint(file: Path, verb: str) -> None:
    """Say what to give instead, where a user gives what the files come from: a directory of
    checkpoints or a checkpoint (which `analyze` reads)."""
    import h5py

    if file.is_dir():  # checkpoints, most likely; or the results of several analyses
        if held := _result_files(file):
            names = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise UserError(
                f"{file} is a directory: {verb} reads one file, such as {file / held[0]} (its "
                f"result files: {names})."
            )
        raise UserError(
            f"{file} is a directory: {verb} reads a file `analyze --out` or `train` writes (to "
            f"analyse the checkpoints in it: hessian-cli analyze {file} --out FILE.h5)."
        )
    if file.is_file() and not h5py.is_hdf5(file):
        # Only here, refusing: the suffixes' module loads torch, which show need not.
        from hessian_cli.specs.checkpoints import CHECKPOINT_SUFFIXES

        # A checkpoint is what analyze reads; a run's config.json or a figure is not.
        hint = (
            f" (to analyse a checkpoint: hessian-cli analyze {file})"
            if file.name.lower().endswith(CHECKPOINT_SUFFIXES)
            else ""
        )
        raise UserError(
            f"{file} is not an HDF5 file: {verb} reads the files `analyze --out` and `train` "
            f"write{hint}."
        )


def _result_files(folder: Path) -> list[str]:
    """The names of the spectra and metrics files in ``folder`` (a directory of `analyze --out`
    results was told to be analysed as checkpoints)."""
    from hessian_cli.storage import FORMAT_NAME, METRICS_FORMAT_NAME, file_format

    def readable(path: Path) -> bool:
        try:
            return file_format(path) in (FORMAT_NAME, METRICS_FORMAT_NAME)
        except UserError:  # another tool's, damaged
            return False

    try:
        names = [p for p in folder.iterdir() if p.suffix.lower() in (".h5", ".hdf5")]
    except OSError:  # not listable: said as before
        return []
    return sorted(p.name for p in names if readable(p))


def pick_checkpoint(
    file: Path, reports: Sequence[dict[str, Any]], groups: Sequence[str], name: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The reports (and their groups) that ``--checkpoint NAME`` names, as the series table
    shows them: the one checkpoint of that name, else the group of that name (a checkpoint
    analysed twice is stored as name and name-2, which the table then shows), else every
    checkpoint of that name; all without ``name``. Where names repeat, the table names every
    row by its group, and so does NAME: a checkpoint named final-2 (group final-2-2) was picked
    for the row final-2, final's second analysis."""
    pairs = list(zip(reports, groups, strict=True))
    if name is not None:
        named = [(d, g) for d, g in pairs if d["name"] == name]
        grouped = [(d, g) for d, g in pairs if g == name]
        repeated = len({d["name"] for d in reports}) < len(reports)
        pairs = grouped if repeated and grouped else named if len(named) == 1 else grouped or named
        if not pairs:  # what NAME takes: the names, or where they repeat the groups
            held = list(groups) if repeated else [d["name"] for d in reports]
            shown = ", ".join(held[:10]) + (f", ... ({len(held)} in all)" if len(held) > 10 else "")
            raise UserError(
                f"{file} holds no checkpoint named {name!r}; it holds: {shown or 'none'}."
            )
    return [d for d, _ in pairs], [g for _, g in pairs]


def told_apart(spectra: Spectra, checkpoint: str | None) -> list[dict[str, Any]]:
    """The reports named as the series table shows them: by their group where the names repeat
    (a checkpoint analysed twice is stored as name and name-2), and where ``--checkpoint``
    picked one by its group (``-c name-2`` was headed by the name both share)."""
    ds, groups = spectra.reports, spectra.groups
    if checkpoint in groups or len({d["name"] for d in ds}) < len(ds):
        return [{**d, "name": g} for d, g in zip(ds, groups, strict=True)]
    return ds


def say_if_newer(found: Spectra | Metrics) -> None:
    """Say on standard error that ``found``'s file is of a newer format version, which this
    hessian-cli may misread (show's tables say it above themselves; --json and plot here)."""
    from hessian_cli.cli.app import err_console
    from hessian_cli.presentation.tables import newer_format_note

    note = newer_format_note(found.info, metrics=isinstance(found, Metrics))
    if note is not None:
        err_console.print(note, style="yellow", highlight=False, soft_wrap=True)
