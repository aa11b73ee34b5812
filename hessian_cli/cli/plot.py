"""``hessian-cli plot FILE -o fig.png``: ESD, eigenvalues and trajectories, or training curves."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hessian_cli.cli.app import app
from hessian_cli.errors import UserError


@app.command("plot")
def plot(
    file: Path = typer.Argument(
        ..., help="A spectra file written by `analyze --out` or a metrics.h5 written by `train`."
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Where to write the figure; the suffix picks the format (.png, .pdf, .svg).",
    ),
) -> None:
    """Plot a spectra file's ESD, eigenvalues or trajectories, or a run's training curves."""
    # Imported here, not at the top, so that --help need not load matplotlib and h5py.
    from hessian_cli.presentation.plots import plot_file, plot_metrics
    from hessian_cli.storage import (
        FORMAT_NAME,
        METRICS_FORMAT_NAME,
        file_format,
        read_analyses,
        read_metrics,
    )

    fmt = file_format(file)
    if fmt == METRICS_FORMAT_NAME:
        written = plot_metrics(read_metrics(file), output)
    elif fmt == FORMAT_NAME:
        written = plot_file(read_analyses(file), output)
    else:
        raise UserError(f"{file} is a {fmt!r} file, which hessian-cli cannot plot.")
    Console().print(f"wrote {written}", highlight=False)
