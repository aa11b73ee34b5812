"""``hessian-cli plot FILE -o fig.png``: ESD, eigenvalues and trajectories, or training curves."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from hessian_cli.atomic import check_replaceable, written_at
from hessian_cli.cli.app import app, results_console
from hessian_cli.cli.options import file_path, given_path
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


# Files past the first are taken, to be refused with how to compare them.
@app.command("plot", context_settings={"allow_extra_args": True})
def plot(
    ctx: typer.Context,
    file_name: str = typer.Argument(
        ...,
        metavar="FILE",
        help="A spectra file written by `analyze --out`, or a metrics.h5 written by `train` (or "
        "its run directory).",
    ),
    output_name: str = typer.Option(
        ...,
        "--output",
        "--out",  # as analyze and train name theirs
        "-o",
        help="Where to write the figure; the suffix picks the format (.png, .pdf, .svg; none: "
        ".png is added, except to a link, pipe or device such as /dev/stdout, whose target's "
        "suffix picks it; - is standard output); missing directories are made.",
    ),
    checkpoint: str | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Plot only this checkpoint of a series (its ESD and eigenvalues; names as in show).",
    ),
) -> None:
    """Plot a spectra file's ESD, eigenvalues or trajectories, or a run's training curves."""
    refuse_more_files("plot", (file_name, *ctx.args), "draws", "in one figure")
    if env_rank() != 0:  # under torchrun one rank draws it (each wrote the same file)
        return
    # Imported here, not at the top, so that --help need not load matplotlib and h5py.
    from hessian_cli.presentation.plots import (
        figure_output,
        metrics_figure,
        run_title,
        save_figure,
        spectra_figure,
    )
    from hessian_cli.storage.files import check_folder_makeable, reading
    from hessian_cli.storage.metrics import batchnorm_layers

    # `-o -`: standard output, as other tools take it (the figure's bytes alone), but not a
    # terminal's, where the PNG's bytes were printed as text
    if output_name == "-" and os.isatty(1):  # (fd 1: /dev/stdout's, also where sys has none)
        raise UserError(
            "-o - writes the figure's bytes to standard output, here a terminal: redirect it "
            "(-o - > fig.png) or name a file (-o fig.png)."
        )
    output = Path("/dev/stdout") if output_name == "-" else file_path(output_name, "-o", "fig.png")
    # Refused before the drawing, as analyze --out refuses it: a file in the way first, then
    # the name, then a read-only directory (or file, or /proc), which was found only once the
    # figure was drawn. A device or pipe is written to as it is (-o /dev/stdout's /dev takes
    # no new file).
    if not output.parent.is_dir():
        check_folder_makeable(output.parent, f"-o {output_name}")
    target = figure_output(output)
    if not target.to_stdout and (target.path.is_file() or not target.path.exists()):
        check_folder_makeable(written_at(target.path).parent, f"-o {output_name}")
        check_replaceable(target.path)
    file = result_file(given_path(file_name, "FILE", "spectra.h5"))
    found = read_result_file(file, checkpoint, "plot")
    with reading(file):  # what the figure draws is the file's: a KeyError is its layout
        if isinstance(found, Metrics):
            title = run_title(file, found.info)
            layers = batchnorm_layers(found.info)
            figure = metrics_figure(found.columns, found.info.get("tolerances"), title, layers)
        else:
            figure = spectra_figure(told_apart(found, checkpoint), found.held)
    say_if_newer(found)
    written = save_figure(figure, target)
    if written is not None:  # none to say after a figure on stdout: the line followed its bytes
        # unwrapped into a pipe: a long path cut over two lines broke a script reading it
        results_console().print(f"wrote {written}", highlight=False, markup=False, crop=False)
