"""``hessian-cli show FILE``: what a spectra or metrics file (or a run directory's) holds, as
tables or JSON."""

from __future__ import annotations

from typing import Any

import typer

from hessian_cli.cli.app import app, print_json, results_console
from hessian_cli.cli.options import given_path
from hessian_cli.cli.result_files import (
    Metrics,
    read_result_file,
    refuse_more_files,
    result_file,
    say_if_newer,
    told_apart,
)
from hessian_cli.errors import UserError
from hessian_cli.launch import env_rank


def _column(values: Any) -> list:
    """A metrics column as JSON: whole numbers (steps, counts) stay integers."""
    from hessian_cli.report import numbers

    return values.tolist() if values.dtype.kind in "biu" else numbers(values)


def _metrics_json(metrics: Metrics) -> dict[str, dict[str, Any]]:
    """Each group's columns as lists; a group of residuals also with the ``tol`` they were
    solved to (its HDF5 attribute; null in files written before 2026-11-30), without which a
    reader could not tell which rows converged, as the table under it says."""
    from hessian_cli.report import number

    tolerances = metrics.info.get("tolerances") or {}
    return {
        g: {c: _column(v) for c, v in cols.items()}
        | ({"tol": number(tolerances.get(g))} if g in tolerances or "residual" in cols else {})
        for g, cols in metrics.columns.items()
    }


# Files past the first are taken, to be refused with how to compare them.
@app.command("show", context_settings={"allow_extra_args": True})
def show(
    ctx: typer.Context,
    file_name: str = typer.Argument(
        ...,
        metavar="FILE",
        help="A spectra file written by `analyze --out`, or a metrics.h5 written by `train` (or "
        "its run directory).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print the contents as JSON: for spectra the list of per-checkpoint reports "
        "(the keys of `analyze --json`, and the group that holds each), for metrics one list "
        "of values per column (and the `tol` of each group of residuals); null for a number "
        "that is not finite (a residual is infinite where its eigenvalue is 0).",
    ),
    checkpoint: str | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Show only the checkpoint with this name (see the series table for names).",
    ),
    show_all: bool = typer.Option(
        False,
        "--all",
        "-a",
        help="With several checkpoints, show the detailed table of each, not only the series.",
    ),
) -> None:
    """Show what a spectra file or a run's metrics holds, as tables or JSON."""
    refuse_more_files("show", (file_name, *ctx.args), "reads", "in one table")
    if env_rank() != 0:  # under torchrun one rank shows it
        return
    # Imported here, not at the top, so that --help need not load h5py and numpy.
    from hessian_cli.presentation.tables import (
        analysis_table,
        file_summary,
        metrics_summary,
        series_table,
        settings_apart,
    )
    from hessian_cli.storage.files import reading

    file = result_file(given_path(file_name, "FILE", "spectra.h5"))
    found = read_result_file(file, checkpoint, "show")
    console = results_console()
    if isinstance(found, Metrics):
        if show_all:  # as --checkpoint is, rather than silently unused
            raise UserError("--all shows each checkpoint of a spectra file, not metrics.")
        with reading(file):  # what is shown is the file's: a KeyError is its layout
            if as_json:
                say_if_newer(found)
                print_json(_metrics_json(found))
            else:
                console.print(metrics_summary(file, found.columns, found.info), crop=False)
        return
    ds, groups = found.reports, found.groups
    # Refused rather than silently unused, as analyze refuses an option whose feature is off.
    if show_all and as_json:
        raise UserError("--json prints every checkpoint in full: leave --all out.")
    if show_all and len(ds) == 1 and checkpoint is not None:
        raise UserError(f"-c {checkpoint} shows its one checkpoint in full: leave --all out.")
    if as_json:
        say_if_newer(found)
        print_json([{**d, "group": g} for d, g in zip(ds, groups, strict=True)])
        return
    ds = told_apart(found, checkpoint)
    with reading(file):  # all built before any is printed: no half-shown file
        tables = [file_summary(file, ds, found.info, found.held)]
        if len(ds) > 1:
            shown = "each is below" if show_all else "show -a lists each, plot draws them"
            # A series of eigenvalues alone never said how to see a row's residuals and settings.
            details = None if show_all else "a row in full: show -c NAME; every row: show -a"
            tables.append(series_table(ds, shown, details))
        if len(ds) == 1 or show_all:
            tables += [analysis_table(d, settings_apart(d, found.held)) for d in ds]
    for table in tables:
        console.print(table, crop=False)
