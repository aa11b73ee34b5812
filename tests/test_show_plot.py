"""`show` and `plot` on spectra and metrics files, through the real command line."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from cli_runner import one_sentence, run
from matplotlib.figure import Figure
from test_storage import damage_attributes, full, variant  # noqa: F401  (`full`: a fixture)
from typer.testing import CliRunner

import hessian_cli.cli.commands  # noqa: F401  (registers the commands)
from hessian_cli.cli.app import app
from hessian_cli.presentation.plots import spectra_figure
from hessian_cli.presentation.tables import analyses_of_checkpoints, series_table
from hessian_cli.report import analysis_to_dict
from hessian_cli.storage import (
    FORMAT_VERSION,
    read_analyses,
    read_file_info,
    read_metrics,
    write_analyses,
)
from hessian_cli.storage.metrics import METRICS_VERSION

PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def files(full, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A one-checkpoint file (one pair NOT converged), a three-step series and a metrics file."""
    root = tmp_path_factory.mktemp("files")
    eigen = dataclasses.replace(
        full.eigen, converged=torch.tensor([True, False, True]), stop_reason="budget"
    )
    single = root / "single.h5"
    write_analyses(single, [dataclasses.replace(full, eigen=eigen)], command_line="analyze one")
    series = root / "series.h5"
    steps = [variant(full, f"ckpt_{s}", s, 1 + s / 1000) for s in (300, 100, 200)]
    write_analyses(series, steps, command_line="analyze dir", series=True)
    metrics = root / "metrics.h5"
    with h5py.File(metrics, "w") as f:
        f.attrs["format"] = "hessian-cli-metrics"
        f.attrs["format_version"] = 1
        s = np.arange(0, 60)
        f["steps/step"], f["steps/loss"] = s, 2.0 * np.exp(-s / 20)
        f["steps/lr"] = np.full(60, 0.1)
        f["epochs/epoch"] = np.arange(1, 4)
        f["epochs/train_loss"] = [1.5, 0.9, 0.5]
        f["epochs/train_accuracy"] = [0.5, 0.7, 0.8]
        f["epochs/test_accuracy"] = [0.45, 0.66, 0.74]
        f["epochs/seconds"] = [1.0, 1.1, 1.0]
        f["refresh/step"], f["refresh/eigenvalue"] = [0, 20, 40], [3.0, 4.5, 5.0]
        f["refresh/alignment"], f["refresh/hvps"] = [0.1, 0.3, 0.2], [40, 12, 12]
        # No /track group: reading must not need it.
    return {"single": single, "series": series, "metrics": metrics}


def cli(*args: str) -> subprocess.CompletedProcess:
    """The module entry point in a process of its own (what ``python -m hessian_cli`` loads)."""
    return subprocess.run(
        [sys.executable, "-m", "hessian_cli", *args], capture_output=True, text=True, timeout=120
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["single", "metrics"])
def test_show_does_not_load_torch(files, kind):
    """It reads HDF5 only; torch (seconds to import) came in with the metrics writer once it
    shared the reader's module, and made `show` five times slower."""
    script = (
        "import sys\n"
        "from hessian_cli.cli import main\n"
        f"sys.argv = ['hessian-cli', 'show', {str(files[kind])!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_show_single_checkpoint(files, full):  # noqa: F811
    result = runner.invoke(app, ["show", str(files["single"])])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("Eigenvalues", "NOT converged", "trace", "SAM alignment", "density", "HVPs"):
        assert expected in out
    assert "last command: analyze one" in out
    words = " ".join(out.split())
    assert "stopped: the HVP budget was spent" in words
    # each part's cost: its products and its wall time
    assert f"{full.trace.hvps} HVPs, {full.trace.seconds:.2f} s)" in words
    sketch = "hutch++ with 3 eigenvectors in its sketch, 12 probes"
    assert f"(std. error of 10 random samples; {sketch}, " in words
    assert "density (SLQ): 3 probes × 10 steps beside 3 eigenvalues taken exactly, nodes" in words
    assert f"{full.density.hvps} HVPs, {full.density.seconds:.2f} s" in words


def test_pairs_converged_each_alone_are_not_said_converged_in_order(full, tmp_path):  # noqa: F811
    """Files written before 2026-11-30 judged each pair alone: one past an unconverged pair
    was shown "converged ... for it and every pair before it"."""
    for flags, in_order in (([True, False, True], False), ([True, True, False], True)):
        eigen = dataclasses.replace(full.eigen, converged=torch.tensor(flags))
        path = tmp_path / f"{flags}.h5"
        write_analyses(path, [dataclasses.replace(full, eigen=eigen)])
        out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
        assert ("for it and every pair before it" in out) == in_order


def test_show_series_and_json(files):
    result = runner.invoke(app, ["show", str(files["series"])])
    assert result.exit_code == 0, result.output
    assert "3 checkpoints" in result.output
    rows = [line for line in result.output.splitlines() if "ckpt_" in line]
    assert [r.split()[1] for r in rows] == ["ckpt_100", "ckpt_200", "ckpt_300"]
    reports = read_analyses(files["series"])
    t = reports[0]["trace"]  # each trace with its standard error
    assert f"{t['estimate']:.5g} ± {t['stderr']:.2g}" in rows[0]
    as_json = runner.invoke(app, ["show", str(files["series"]), "--json"])
    groups = ["ckpt_100", "ckpt_200", "ckpt_300"]
    reports = read_analyses(files["series"])
    expected = [{**d, "group": g} for d, g in zip(reports, groups, strict=True)]
    assert json.loads(as_json.stdout) == expected
    one = runner.invoke(app, ["show", str(files["series"]), "-c", "ckpt_200", "--json"])
    assert [d["name"] for d in json.loads(one.stdout)] == ["ckpt_200"]
    # The file's own count, and how many were picked (it said "1 checkpoint").
    one = runner.invoke(app, ["show", str(files["series"]), "-c", "ckpt_200"])
    assert "3 checkpoints, 1 shown" in one.stdout
    # A name it does not hold: the names it does (the user had to run show again to see them).
    none = runner.invoke(app, ["show", str(files["series"]), "-c", "ckpt_250"])
    assert "it holds: ckpt_100, ckpt_200, ckpt_300." in str(none.exception)


def test_plot_single_and_series(files, tmp_path):
    for kind in ("single", "series"):
        out = tmp_path / f"{kind}.png"
        result = runner.invoke(app, ["plot", str(files[kind]), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert_png(out)


def test_metrics_show_and_plot(files, tmp_path):
    metrics = read_metrics(files["metrics"])
    assert set(metrics) == {"steps", "epochs", "refresh"}
    result = runner.invoke(app, ["show", str(files["metrics"])])
    assert result.exit_code == 0, result.output
    assert "Epochs" in result.output and "Eigenvector refreshes" in result.output
    data = json.loads(runner.invoke(app, ["show", str(files["metrics"]), "--json"]).stdout)
    assert data["epochs"]["test_accuracy"] == [0.45, 0.66, 0.74]
    out = tmp_path / "metrics.png"
    assert runner.invoke(app, ["plot", str(files["metrics"]), "--output", str(out)]).exit_code == 0
    assert_png(out)


def test_all_is_refused_for_metrics_as_checkpoint_is(capsys, files):
    """`show metrics.h5 --all` printed the metrics as without it, where --checkpoint is refused."""
    code, _, err = run(capsys, "show", files["metrics"], "--all")
    assert code == 2
    assert one_sentence(err) == "error: --all shows each checkpoint of a spectra file, not metrics."


@pytest.mark.parametrize("command", ["show", "plot"])
def test_an_empty_checkpoint_name_is_refused_as_empty(capsys, files, tmp_path, command):
    """`-c "$NAME"` with the variable unset read "holds no checkpoint named ''", as if the
    file were missing one; other options given an empty name say that they need one."""
    out = () if command == "show" else ("-o", tmp_path / "fig.png")
    code, _, err = run(capsys, command, files["series"], *out, "-c", "")
    assert code == 2
    assert one_sentence(err) == "error: --checkpoint needs a name, such as final."
    assert not (tmp_path / "fig.png").exists()


def test_a_figure_is_not_printed_on_a_terminal(files):
    """`plot -o -` at a terminal printed the PNG's bytes there as text (into a pipe or a file
    they still go, as the tests of -o - below show)."""
    import pty
    import select

    terminal, tty = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hessian_cli", "plot", str(files["single"]), "-o", "-"],
            stdout=tty,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,  # (the bytes of a figure fill the terminal's buffer: a wait)
        )
        shown = os.read(terminal, 1 << 20) if select.select([terminal], [], [], 0)[0] else b""
    finally:
        os.close(tty)
        os.close(terminal)
    assert done.returncode == 2 and b"PNG" not in shown
    assert one_sentence(done.stderr) == (
        "error: -o - writes the figure's bytes to standard output, here a terminal: redirect "
        "it (-o - > fig.png) or name a file (-o fig.png)."
    )


@pytest.mark.parametrize("command", ["show", "plot"])
def test_a_link_that_leads_nowhere_is_named_as_such(capsys, tmp_path, command):
    """A dangling link, or a loop of links, was "The file x.h5 does not exist", where `ls`
    lists it; analyze says what it is."""
    (tmp_path / "gone.h5").symlink_to(tmp_path / "moved.h5")
    (tmp_path / "loop.h5").symlink_to(tmp_path / "loop.h5")
    out = () if command == "show" else ("-o", tmp_path / "fig.png")
    for name in ("gone.h5", "loop.h5"):
        code, _, err = run(capsys, command, tmp_path / name, *out)
        assert code == 2
        said = f"error: {tmp_path / name} is a symbolic link that leads nowhere."
        assert one_sentence(err) == said


def test_all_is_refused_where_it_adds_nothing(capsys, files):
    """--json and a checkpoint picked by -c are shown in full: beside them --all was silently
    unused (the same output with it and without)."""
    code, _, err = run(capsys, "show", files["series"], "--all", "--json")
    assert code == 2
    assert one_sentence(err) == "error: --json prints every checkpoint in full: leave --all out."
    code, _, err = run(capsys, "show", files["series"], "-a", "-c", "ckpt_200")
    assert code == 2
    said = "error: -c ckpt_200 shows its one checkpoint in full: leave --all out."
    assert one_sentence(err) == said
    code, out, _ = run(capsys, "show", files["series"], "--all")  # where it is used, it is taken
    assert code == 0 and out.count("Eigenvalues") == 3


def test_a_regression_run_has_no_accuracy_panel():
    """A regression run's accuracy columns are all NaN: their panel was empty, on an axis from
    -0.045 to 0.045, with a legend of lines that were not there."""
    from hessian_cli.presentation.plots import metrics_figure

    nan = np.full(3, np.nan)
    regression = {
        "steps": {"step": np.arange(3), "loss": np.ones(3), "accuracy": nan},
        "epochs": {"epoch": np.arange(1, 4), "train_loss": np.ones(3), "train_accuracy": nan},
    }
    titles = [ax.get_title() for ax in metrics_figure(regression).axes if ax.get_visible()]
    assert titles == ["Loss", "Loss per epoch"]
    # show: a dash, as the spectra tables show a missing number, not "nan"
    from hessian_cli.presentation.tables import columns_table

    table = columns_table("Epochs", regression["epochs"])
    assert list(table.columns[2].cells) == ["—"] * 3


def test_the_curvature_panel_marks_eigenvalues_that_did_not_converge():
    """A refresh or track row whose residual is above its group's tol did not converge (show
    counts them): it was drawn as if converged, where the spectra plots mark such pairs."""
    from hessian_cli.presentation.plots import metrics_figure

    refresh = {
        "step": np.array([0, 5, 10]),
        "eigenvalue": np.array([1.0, 1.1, 1.5]),
        "residual": np.array([0.007, 0.07, 0.007]),
    }
    ax = metrics_figure({"refresh": refresh}, {"refresh": 1e-2}).axes[0]
    assert ax.get_title() == "Top Hessian eigenvalue (red x: NOT converged)"
    (red,) = [line for line in ax.get_lines() if line.get_color() == "C3"]
    assert red.get_xdata().tolist() == [5] and red.get_ydata().tolist() == [1.1]
    older = metrics_figure({"refresh": refresh}).axes[0]  # files before 2026-11-30: no tol
    assert older.get_title() == "Top Hessian eigenvalue"


def test_the_curvature_panel_says_which_hessian_each_eigenvalue_is_of():
    """Tracked λ_max (a held-out batch, BatchNorm by its running statistics) and a refresh's λ1
    (its training minibatch, by the batch's) are of two Hessians, 100x apart in a BatchNorm CNN:
    the legend said "λ_max (tracked)" and "λ1 at refresh", one axis, as if of one."""
    from hessian_cli.presentation.plots import metrics_figure

    track = {"step": np.array([0, 10]), "lambda_max": np.array([120.0, 370.0])}
    refresh = {"step": np.array([0, 10]), "eigenvalue": np.array([1.1, 3.2])}
    ax = metrics_figure({"track": track, "refresh": refresh}).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    # Eval mode, which is true of a model without BatchNorm too (files before 2026-12-02 do not
    # say whether it has any).
    assert any("held-out batch (eval mode: any BatchNorm" in x for x in labels), labels
    assert any("refresh" in x and "training minibatch" in x for x in labels), labels


def _curvature_labels(capsys, monkeypatch, run_dir: Path) -> list[str]:
    """The curvature panel's legend of `plot RUN_DIR` (the figure not written: 0.9 s a time)."""
    from hessian_cli.presentation import plots

    drawn = []
    real = plots.metrics_figure
    monkeypatch.setattr(plots, "metrics_figure", lambda *a: drawn.append(real(*a)) or drawn[-1])
    monkeypatch.setattr(plots, "save_figure", lambda *a: None)
    code, _, err = run(capsys, "plot", run_dir, "-o", run_dir / "fig.png")
    assert code == 0, err
    (ax,) = [ax for ax in drawn[0].axes if ax.get_title() == "Top Hessian eigenvalue"]
    return ax.get_legend_handles_labels()[1]


def test_plot_and_show_of_a_run_say_whether_its_two_eigenvalues_differ_in_kind(
    capsys, monkeypatch, tmp_path
):
    """With BatchNorm the tracked λ_max (running statistics) and a refresh's λ1 (the
    minibatch's) are of two losses, 100x apart; without it of one kind. The metrics did not say
    which, so the legend hedged ("any BatchNorm") for every model and show said nothing; a
    metrics file without `batchnorm_layers` (before 2026-12-02) keeps the hedge."""
    from eigensam.training import TrainConfig, train

    cnn = {"model": "cnn", "data": "synthetic:1x6x6:3:32", "batch_size": 16, "device": "cpu"}
    run_with = {"eig_every": 1, "track_every": 1, "max_steps": 2}
    for name, batchnorm in (("bn", True), ("plain", False)):
        kwargs = {"widths": [4], "batchnorm": batchnorm}
        train(TrainConfig(**cnn, **run_with, model_kwargs=kwargs, out=str(tmp_path / name)))
    labels = _curvature_labels(capsys, monkeypatch, tmp_path / "bn")
    assert labels == [
        "λ_max, held-out batch (eval mode: BatchNorm by running statistics)",
        "λ1 at refresh, training minibatch (train mode: BatchNorm by batch statistics)",
    ]
    code, out, err = run(capsys, "show", tmp_path / "bn")
    assert code == 0, err
    said = (
        "the model has 1 BatchNorm (or InstanceNorm) layer: λmax is of eval mode (running "
        "statistics), the refreshes' eigenvalues of train mode (each minibatch's), so the two "
        "differ in kind."
    )
    assert said in " ".join(out.split())
    labels = _curvature_labels(capsys, monkeypatch, tmp_path / "plain")
    assert labels == ["λ_max, held-out batch", "λ1 at refresh, its training minibatch"]
    code, out, err = run(capsys, "show", tmp_path / "plain")
    assert code == 0 and "BatchNorm" not in out, err
    with h5py.File(tmp_path / "bn" / "metrics.h5", "a") as f:  # as a file before 2026-12-02
        del f.attrs["batchnorm_layers"]
    labels = _curvature_labels(capsys, monkeypatch, tmp_path / "bn")
    assert "λ_max, held-out batch (eval mode: any BatchNorm by its running statistics)" in labels
    code, out, err = run(capsys, "show", tmp_path / "bn")
    assert code == 0 and "BatchNorm" not in out, err


@pytest.mark.parametrize(
    ("groups", "said"),
    [
        (("track",), "layers: λmax is of eval mode (running statistics)."),
        (("refresh",), "layers: the refreshes' eigenvalues are of train mode (each minibatch's)."),
    ],
)
def test_show_of_one_curvature_table_says_which_statistics_its_eigenvalues_are_of(groups, said):
    """A SAM run tracks λ_max alone, and a run without --track-every refreshes alone: the note
    says what holds of the table there is, with no "two" to differ."""
    from rich.console import Console

    from hessian_cli.presentation.tables import metrics_summary

    console = Console(width=300, record=True)
    metrics = {g: {"step": np.array([0])} for g in groups}
    console.print(metrics_summary("m.h5", metrics, {"batchnorm_layers": 2}))
    assert f"the model has 2 BatchNorm (or InstanceNorm) {said}\n" in console.export_text()


def test_a_step_with_no_neighbour_to_join_is_drawn_as_a_point():
    """A run stopped after one step (or a step between two NaN ones) was a line of one point:
    the loss and accuracy panels were drawn empty."""
    from hessian_cli.presentation.plots import metrics_figure

    steps = {
        "step": np.arange(5),
        "loss": np.array([2.3, np.nan, 2.2, np.nan, np.nan]),
        "accuracy": np.array([0.1, 0.2, 0.3, np.nan, 0.5]),
    }
    loss, accuracy = (ax.get_lines()[0] for ax in metrics_figure({"steps": steps}).axes[:2])
    assert loss.get_marker() == accuracy.get_marker() == "."
    assert loss.get_markevery() == [True, False, True, False, False]
    assert accuracy.get_markevery() == [False, False, False, False, True]
    joined = {"step": np.arange(2), "loss": np.array([2.3, 2.2])}
    assert metrics_figure({"steps": joined}).axes[0].get_lines()[0].get_marker() == "None"


def test_a_padding_only_step_leaves_the_loss_on_a_log_scale():
    """A step whose minibatch held no label records a NaN loss: the per-step loss panel of such
    a run (texts a quarter of which are unlabelled) was drawn on a linear scale."""
    from hessian_cli.presentation.plots import metrics_figure

    steps = {"step": np.arange(4), "loss": np.array([np.nan, 1.6, 1.2, 0.9])}
    (ax,) = [ax for ax in metrics_figure({"steps": steps}).axes if ax.get_visible()]
    assert ax.get_yscale() == "log"
    steps["loss"][1] = 0.0  # a zero loss cannot be drawn on it
    (ax,) = [ax for ax in metrics_figure({"steps": steps}).axes if ax.get_visible()]
    assert ax.get_yscale() == "linear"


def test_the_epochs_test_loss_is_drawn_beside_the_per_step_loss():
    """Epoch rows have no step to place them among the steps: the test loss was never drawn
    where per-step losses were recorded, which train always records."""
    from hessian_cli.presentation.plots import metrics_figure

    metrics = {
        "steps": {"step": np.arange(6), "loss": np.linspace(2, 1, 6)},
        "epochs": {
            "epoch": np.arange(1, 3),
            "train_loss": np.array([1.5, 1.1]),
            "test_loss": np.array([1.7, 1.3]),
        },
    }
    axes = {ax.get_title(): ax for ax in metrics_figure(metrics).axes if ax.get_visible()}
    assert list(axes) == ["Loss", "Loss per epoch"]
    lines = {line.get_label(): line for line in axes["Loss per epoch"].get_lines()}
    assert list(lines["test"].get_ydata()) == [1.7, 1.3]
    assert list(lines["test"].get_xdata()) == [1, 2]
    assert all(ax.get_ylabel() == "loss" for ax in axes.values())
    # Epochs alone: one panel, "Loss", as before.
    only = metrics_figure({"epochs": metrics["epochs"]})
    assert [ax.get_title() for ax in only.axes if ax.get_visible()] == ["Loss"]


def test_the_training_curves_tick_steps_as_whole_numbers():
    """A short run's step axes (5 steps, a --max-steps run) had ticks at 0.5, 1.5, ..."""
    from hessian_cli.presentation.plots import metrics_figure

    steps = {"step": np.arange(5), "loss": np.linspace(2, 1, 5), "accuracy": np.full(5, 0.5)}
    track = {"step": np.array([0, 2, 4]), "lambda_max": np.array([1.0, 0.9, 1.1])}
    refresh = {"step": np.array([0, 3]), "eigenvalue": np.array([1.0, 1.2])}
    refresh["alignment"] = np.array([0.1, 0.2])
    axes = metrics_figure({"steps": steps, "track": track, "refresh": refresh}).axes
    on_steps = [ax for ax in axes if ax.get_visible() and ax.get_xlabel() == "step"]
    assert len(on_steps) == 4  # loss, accuracy, λ_max and alignment
    for ax in on_steps:
        ticks = ax.xaxis.get_major_locator().tick_values(*ax.get_xlim())
        assert all(float(t).is_integer() for t in ticks), ax.get_title()


def test_a_one_step_run_s_axes_tick_its_step_alone():
    """A run stopped after one step has one point per panel: the view around it, -0.055 to
    0.055, was ticked at -0.045, -0.030, ..., 0.045 (and a series of two runs' checkpoints at
    one step likewise)."""
    from hessian_cli.presentation.plots import metrics_figure

    steps = {"step": np.array([0]), "loss": np.array([2.3]), "accuracy": np.array([0.3])}
    refresh = {"step": np.array([0]), "eigenvalue": np.array([1.5]), "alignment": [0.2]}
    eigen = {"which": "largest", "eigenvalues": [2.0], "converged": [True]}
    ds = [
        {"name": f"r{i}/c", "eigen": eigen, "provenance": {"step": 7, "checkpoint": f"r{i}/c.pt"}}
        for i in range(2)
    ]
    figures = metrics_figure({"steps": steps, "refresh": refresh}), spectra_figure(ds)
    axes = [ax for fig in figures for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in axes] == ["step"] * 5  # loss, accuracy, λ1, alignment; λ1
    for ax in axes:
        ticks = ax.xaxis.get_major_locator().tick_values(*ax.get_xlim())
        assert ticks.tolist() == [7.0 if ax.figure is figures[1] else 0.0], ax.get_title()
    # Between two whole numbers (fractional epochs recorded) the ticks are as they were.
    for d, epoch in zip(ds, (1.25, 1.5), strict=True):
        d["provenance"] = {"epoch": epoch}
    ax = spectra_figure(ds).axes[0]
    assert ax.get_xlabel() == "epoch" and len(ax.get_xticks()) > 1


def test_the_densities_colour_bar_ticks_whole_steps():
    """The colour bar of two checkpoints' densities at steps 4 and 5 was ticked 4.0, 4.2, ...,
    5.0 (and of one step, 3.6 to 4.4)."""
    grid = np.linspace(-1.0, 3.0, 50)
    density = {"grid": list(grid), "values": list(np.exp(-(grid**2)) + 1e-3)}
    for steps, ticks in (((4, 5), [4, 5]), ((4, 4), [4]), ((0, 5000), list(range(0, 5001, 500)))):
        ds = [
            {"name": f"c{i}", "provenance": {"step": s}, "density": density}
            for i, s in enumerate(steps)
        ]
        bar = spectra_figure(ds).axes[1]
        assert bar.get_ylabel() == "step"
        assert bar.yaxis.get_major_locator().tick_values(*bar.get_ylim()).tolist() == ticks


def test_a_two_dimensional_loss_column_shows_as_json_does(files, tmp_path):
    """docs/hdf5.md allows columns of rows; the table's first/last loss line took one for a
    number and failed where --json and plot read the file."""
    path = tmp_path / "m.h5"
    shutil.copy(files["metrics"], path)
    with h5py.File(path, "a") as f:
        rows = len(f["steps/step"])
        del f["steps/loss"]
        f["steps/loss"] = np.ones((rows, 3))
    assert runner.invoke(app, ["show", str(path)]).exit_code == 0
    assert runner.invoke(app, ["show", str(path), "--json"]).exit_code == 0


def test_failed_plot_leaves_no_file(files, tmp_path, monkeypatch):
    def half_then_fail(self, fname, **kwargs):
        fname.write(PNG)  # half a figure, then the renderer fails
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    result = runner.invoke(app, ["plot", str(files["single"]), "-o", str(tmp_path / "f.png")])
    assert isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_show_and_plot(files, tmp_path):
    shown = cli("show", str(files["single"]))
    assert shown.returncode == 0, shown.stderr
    assert "NOT converged" in shown.stdout
    out = tmp_path / "fig.png"
    plotted = cli("plot", str(files["series"]), "-o", str(out))
    assert plotted.returncode == 0, plotted.stderr
    assert_png(out)


def test_a_figure_named_without_a_suffix_is_written_as_png(capsys, files, tmp_path):
    """-o fig wrote a PNG file named fig, which no viewer takes for an image; it is fig.png, as
    matplotlib's savefig names it."""
    code, out, err = run(capsys, "plot", files["series"], "-o", tmp_path / "fig")
    assert code == 0, err
    assert_png(tmp_path / "fig.png")
    assert not (tmp_path / "fig").exists() and f"wrote {tmp_path / 'fig.png'}" in out
    # A device (-o /dev/stdout into a pipe) is written as named, a PNG.
    code, out, err = run(capsys, "plot", files["series"], "-o", os.devnull)
    assert code == 0 and out == f"wrote {os.devnull}\n", err
    # So is a link (-o /dev/stderr redirected to a file made /dev/stderr.png): through it.
    (tmp_path / "latest").symlink_to(tmp_path / "target.png")
    code, out, err = run(capsys, "plot", files["series"], "-o", tmp_path / "latest")
    assert code == 0 and out == f"wrote {tmp_path / 'latest'}\n", err
    assert_png(tmp_path / "target.png")
    assert not (tmp_path / "latest.png").exists()


def test_plot_makes_the_directories_it_writes_in(capsys, files, tmp_path, monkeypatch):
    """`plot -o figs/run1/fig.png` was refused ("The output directory ... does not exist")
    where `train --out runs/e1` makes its directories: all three make them now. One that
    cannot be made (a file in the way) was found only once the figure was drawn, and said as
    "Could not create the output directory notes/figs: not a directory"."""
    figure = tmp_path / "figs" / "run1" / "fig.png"
    code, out, err = run(capsys, "plot", files["series"], "-o", figure)
    assert code == 0 and out == f"wrote {figure}\n" and err == "", err  # no note on our own file
    assert_png(figure)
    (tmp_path / "notes").write_text("my notes")

    def not_drawn(*_: object) -> None:
        raise AssertionError("drawn before the output directory was checked")

    monkeypatch.setattr("hessian_cli.presentation.plots.spectra_figure", not_drawn)
    code, _, err = run(capsys, "plot", files["series"], "-o", tmp_path / "notes" / "figs" / "f.png")
    said = f"lies under {tmp_path / 'notes'}, which is not a directory."
    assert code == 2 and said in one_sentence(err)


def test_bad_inputs_give_one_line_and_no_traceback(capsys, files, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    short = tmp_path / "short.h5"  # `converged` shorter than `eigenvalues`: drawn, not read
    short.write_bytes(files["single"].read_bytes())
    with h5py.File(short, "r+") as f:
        group = next(iter(f["checkpoints"].values()))
        del group["converged"]
        group["converged"] = [True]
    spectra_copy = tmp_path / "spectra.png"  # an HDF5 file under a figure's name
    spectra_copy.write_bytes(files["single"].read_bytes())
    cases = [
        (["show", str(tmp_path / "missing.h5")], "does not exist"),
        (["plot", str(text), "-o", str(tmp_path / "x.png")], "not an HDF5 file"),
        (["plot", str(files["single"]), "-o", str(tmp_path / "x.weird")], "cannot write a 'weird'"),
        (["plot", str(short), "-o", str(tmp_path / "x.png")], "damaged or not laid out"),
        (["plot", str(spectra_copy), "-o", str(spectra_copy)], "refusing to overwrite"),
        (["show", str(files["metrics"]), "-c", "final"], "--checkpoint picks a checkpoint"),
        (["plot", str(files["single"]), "-o", "."], "-o . is a directory"),  # "resource busy"
        (["plot", str(files["single"]), "-o", ""], "-o needs a name"),  # not "." as above
        # A directory to make: figs.png was written.
        (["plot", str(files["single"]), "-o", f"{tmp_path / 'figs'}/"], "figs/ names a directory"),
        (["show", ""], "FILE needs a name"),  # not the working directory
        (["plot", "", "-o", str(tmp_path / "x.png")], "FILE needs a name"),
        # A path drops the slash: the file was shown and drawn.
        (["show", f"{files['single']}/"], f"{files['single']} is not a directory"),
        (["plot", f"{files['single']}/", "-o", str(tmp_path / "x.png")], "is not a directory"),
    ]
    for args, message in cases:
        code, out, err = run(capsys, *args)
        assert code != 0 and "Traceback" not in out
        text = one_sentence(err)  # unwrapped: the error console wraps it to the terminal
        assert text.count("error") == 1 and message in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.h5", "short.h5", "spectra.png"]
    assert spectra_copy.read_bytes() == files["single"].read_bytes()


def test_a_run_directory_is_shown_and_a_checkpoint_says_what_to_give(capsys, files, tmp_path):
    """`show RUN_DIR` said only that it "is a directory, not an HDF5 file" (then, to give its
    metrics.h5): it shows the run's metrics, the one result file in it. A directory of
    checkpoints and `show ckpt.pt` say what to give instead (and `show RUN_DIR/config.json` is
    not told to analyse it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.h5"
    metrics.write_bytes(files["metrics"].read_bytes())
    ckpt = tmp_path / "final.pt"
    torch.save(torch.nn.Linear(2, 1).state_dict(), ckpt)
    config = run_dir / "config.json"  # train writes it beside metrics.h5
    config.write_text("{}")
    for verb, extra in (("show", []), ("plot", ["-o", str(tmp_path / "x.png")])):
        shown = run(capsys, verb, run_dir, *extra)[:2]
        assert shown[0] == 0 and shown == run(capsys, verb, metrics, *extra)[:2]
        code, _, err = run(capsys, verb, ckpt, *extra)
        assert code == 2
        assert f"hessian-cli analyze {ckpt}" in one_sentence(err, strict=True)
        code, _, err = run(capsys, verb, tmp_path, *extra)  # a directory of checkpoints
        assert code == 2
        assert f"hessian-cli analyze {tmp_path} --out" in one_sentence(err, strict=True)
        code, _, err = run(capsys, verb, config, *extra)  # no checkpoint: said to analyse it
        assert code == 2
        assert "hessian-cli analyze" not in one_sentence(err, strict=True)
    assert run(capsys, "show", run_dir)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "run", "x.png"]


def test_datasets_that_other_tools_add_among_the_checkpoints_are_ignored(files, tmp_path):
    """docs/hdf5.md: readers ignore what they do not know."""
    path = tmp_path / "annotated.h5"
    path.write_bytes(files["single"].read_bytes())
    with h5py.File(path, "r+") as f:
        f["checkpoints/README"] = "notes a colleague added"
    assert len(read_analyses(path)) == 1
    result = runner.invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert "Eigenvalues" in result.output


@pytest.mark.parametrize(
    "values, caption",
    [
        ([[0.5]], "one nonzero batch gradient, so no spread"),
        ([[0.5], [0.7]], "first 2 batch"),
        ([], "none asked for"),
        ([[None], [0.7]], "one nonzero batch gradient, so no spread (1 of the 2 exactly zero"),
        ([[float("nan")], [0.7], [0.2]], "first 3 batch gradients (1 of the 3 exactly zero"),
    ],
)
def test_alignment_caption_says_how_many_minibatches(values, caption):
    from rich.console import Console

    from hessian_cli.presentation.tables import _alignment_table

    al = {"alignment": [0.6], "minibatch": {"values": values, "mean": [0.6], "std": [0.1]}}
    console = Console(width=200, record=True)
    console.print(_alignment_table(al))
    assert caption in " ".join(console.export_text().split())


def test_an_older_files_spread_of_one_minibatch_is_not_shown_as_zero():
    """Files written before 2026-11-30 recorded the std of one batch gradient as 0: it was
    shown as "± 0.0000", a spread measured as none."""
    from hessian_cli.presentation.tables import _alignment_table

    mb = {"values": [[0.5, 0.25]], "mean": [0.5, 0.25], "std": [0.0, 0.0]}
    table = _alignment_table({"alignment": [0.6, 0.3], "minibatch": mb})
    assert list(table.columns[2].cells)[:2] == ["0.5000 ± —", "0.2500 ± —"]


@pytest.mark.parametrize(
    "which, labels",
    [
        ("largest", ["λ1", "λ2"]),
        ("smallest", ["λn", "λn-1"]),
        ("both", ["λ1", "λn"]),
    ],
)
def test_series_columns_name_which_eigenvalues_they_hold(which, labels):
    eigen = {"which": which, "eigenvalues": [2.0, -1.0], "converged": [1, 1]}
    ds = [{"name": f"c{i}", "provenance": {}, "eigen": eigen} for i in range(2)]
    columns = [str(c.header) for c in series_table(ds).columns]
    assert columns[3:5] == labels
    axes = spectra_figure(ds).axes[0]
    assert axes.get_legend_handles_labels()[1] == labels  # the plot's too
    assert axes.get_title().startswith({"largest": "Top", "smallest": "Smallest"}.get(which, "La"))
    older = [{**d, "eigen": {k: v for k, v in eigen.items() if k != "which"}} for d in ds]
    assert spectra_figure(older).axes[0].get_title().startswith("Top")  # files without `which`


def test_a_trace_with_no_random_part_says_so():
    """Where the eigenpairs found span the space the trace is their sum: it was shown as
    "± 0 (std. error of 0 random samples; ... 99 probes, 0 HVPs)"."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    t = {"estimate": 0.270075, "stderr": 0.0, "num_samples": 0, "known_eigenpairs": 10}
    d = {"name": "c", "provenance": {}, "trace": {**t, "hvps": 0, "seconds": 0.01}}
    console = Console(width=300, record=True)
    console.print(analysis_table(d))
    assert (
        "trace 0.270075 (no random part: the sum of the 10 eigenvalues found, which span the "
        "space; 0 HVPs, 0.01 s)"
    ) in console.export_text()
    table = series_table([d, d])
    # The last column: no alignment column where no row holds one (a column of dashes each).
    assert [str(c.header) for c in table.columns][-1:] == ["trace"]
    assert list(table.columns[-1].cells) == ["0.27008"] * 2  # no "± 0"
    plain = {"name": "c", "provenance": {}}
    assert [str(c.header) for c in series_table([plain] * 2).columns] == [
        "checkpoint",
        "step",
        "epoch",
    ]
    aligned = {**plain, "alignment": {"alignment": [0.5], "subspace_alignment": 0.75}}
    table = series_table([aligned, plain])
    assert [str(c.header) for c in table.columns][-2:] == ["|<ĝ,v1>|", "||Vᵀĝ||"]
    assert [list(c.cells) for c in table.columns[-2:]] == [["0.500", "—"], ["0.750", "—"]]


def test_an_exact_trace_from_products_does_not_say_the_eigenvalues_span_the_space():
    """A sketch as large as the space the eigenvectors leave takes the trace exactly, from one
    product each: `--params '3.*' --trace-probes 990` on the digits MLP (330 parameters) said
    "the sum of the 5 eigenvalues found, which span the space; 325 HVPs" (0 with --top-k 0)."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    t = {"estimate": 2.47827, "stderr": 0.0, "num_samples": 0, "seconds": 0.01}
    console = Console(width=300, record=True)
    for known, hvps in [(5, 325), (0, 330), (9, 1)]:
        d = {"name": "c", "provenance": {}, "trace": {**t, "known_eigenpairs": known, "hvps": hvps}}
        console.print(analysis_table(d))
    text = console.export_text()
    assert "span the space" not in text
    assert (
        "trace 2.47827 (no random part: exact, one product per direction the 5 eigenvectors "
        "found leave; 325 HVPs, 0.01 s)"
    ) in text
    assert "trace 2.47827 (no random part: exact, one product per direction; 330 HVPs" in text
    assert "the 9 eigenvectors found leave; 1 HVP, 0.01 s)" in text  # was "1 HVPs"


def test_a_density_of_the_eigenvalues_found_alone_says_so():
    """Where the eigenpairs found span the space no SLQ step is left: the table and the plot
    said "SLQ: 8 probes × 0 steps beside 10 eigenvalues"."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    values = [0.0, 0.5, 1.0]
    dn = {"nodes": [values], "weights": [[1 / 3] * 3], "grid": values, "values": [1.0] * 3}
    dn |= {"num_probes": 8, "steps": 0, "known_eigenpairs": 3, "sigma": 0.01}
    eigen = {"eigenvalues": [1.0, 0.5, 0.0], "residuals": [0.0] * 3, "converged": [True] * 3}
    d = {"name": "c", "provenance": {}, "density": dn, "eigen": eigen}
    console = Console(width=300, record=True)
    console.print(analysis_table({**d, "eigen": None}))
    said = "density: the 3 eigenvalues found, which span the space (no SLQ), nodes span [0, 1]"
    assert said in console.export_text()
    title = spectra_figure([d]).axes[0].get_title()
    assert title == "Spectral density of the 3 eigenvalues found (they span the space)"


@pytest.mark.parametrize(("node", "said"), [(0.0, "0"), (0.0123, "0.0123")])
def test_the_density_peak_is_where_the_smoothed_density_peaks(node, said):
    """An all-zero Hessian's density (nodes [0, 0]) was said to peak at λ≈-5.005e-05: the
    highest of a grid with no point at 0, half a step off."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    grid = np.linspace(node - 0.05, node + 0.05, 1000)
    values = np.exp(-0.5 * ((grid - node) / 0.01) ** 2) / (0.01 * np.sqrt(2 * np.pi))
    dn = {"nodes": [[node, node]], "weights": [[0.5, 0.5]], "grid": list(grid)}
    dn |= {"values": list(values), "num_probes": 1, "steps": 2, "sigma": 0.01}
    console = Console(width=300, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "density": dn}))
    assert f"nodes span [{node:.4g}, {node:.4g}], peak at λ≈{said}," in console.export_text()


def test_stored_nan_density_nodes_are_not_said_to_span_nan(capsys, files, tmp_path):
    path = tmp_path / "nodes.h5"
    shutil.copy(files["single"], path)
    with h5py.File(path, "r+") as f:
        next(iter(f["checkpoints"].values()))["density/nodes"][...] = np.nan
    code, out, _ = run(capsys, "show", str(path))
    words = " ".join(out.split())
    assert code == 0 and "nodes span —, peak at λ≈" in words


def test_a_method_the_file_does_not_record_is_not_shown_as_none(capsys, files, tmp_path):
    path = tmp_path / "methods.h5"
    shutil.copy(files["single"], path)
    with h5py.File(path, "r+") as f:
        group = next(iter(f["checkpoints"].values()))
        del group["eigenvalues"].attrs["method"], group["trace"].attrs["method"]
        del group["eigenvalues"].attrs["which"]  # another tool's file: it read "None; ..."
    code, out, _ = run(capsys, "show", str(path))
    words = " ".join(out.split())
    assert code == 0 and "None" not in words
    assert "random samples; method not recorded with 3 eigenvectors in its sketch" in words
    assert "eigenvalues (end not recorded); converged means" in words


def test_a_series_says_which_rows_were_computed_in_reduced_precision():
    """One checkpoint's table says so (and its products' error); a series' said nothing, its
    bf16 traces shown as if in full precision."""
    eigen = {"which": "largest", "eigenvalues": [2.0], "converged": [True]}
    ds = [
        {"name": name, "provenance": prov, "eigen": eigen, "trace": {"estimate": 5.0}}
        for name, prov in (
            ("a", {"precision": "full", "hvp_rel_error": 0.0}),
            ("b", {"precision": "bf16", "hvp_rel_error": 4.0e-3}),
            ("c", {"precision": "bf16", "hvp_rel_error": 3.0e-3}),
        )
    ]
    assert series_table(ds).caption == (
        "reduced precision (2 of 3 checkpoints): products in bf16, relative error up to 4.0e-03 "
        "against full precision; the eigenvalues were checked in full precision, the traces "
        "were not"
    )
    assert series_table(ds[:1]).caption is None
    head = "reduced precision (1 of 1 checkpoint): products in bf16, relative error up to 3.0e-03 "
    traces = [{**ds[2], "eigen": None}]  # it spoke of eigenvalues that were not there
    assert series_table(traces).caption == (
        f"{head}against full precision; the traces were not checked in full precision"
    )
    eigenvalues = [{**ds[2], "trace": None}]  # and of traces
    assert series_table(eigenvalues).caption == (
        f"{head}against full precision; the eigenvalues were checked in full precision"
    )


def test_notes_on_some_rows_count_the_analyses_of_one_checkpoint_once():
    """One checkpoint analysed in full precision and again in bf16 was "1 of 2 checkpoints", as
    was the note on its BatchNorm's initial statistics."""
    from rich.console import Console

    from hessian_cli.presentation.tables import file_summary

    prov = {"sha256": "ab", "bn_initial_statistics": 1}
    ds = [
        {"name": f"a{again}", "provenance": prov | {"precision": p, "hvp_rel_error": err}}
        for again, p, err in (("", "full", 0.0), ("-2", "bf16", 4.0e-3))
    ]
    assert series_table(ds).caption.startswith(
        "reduced precision (1 of 2 analyses of 1 checkpoint): products in bf16"
    )
    console = Console(width=400, record=True)
    console.print(file_summary("f.h5", ds))
    assert "note: in 2 of the 2 analyses of 1 checkpoint (a, a-2) BatchNorm" in (
        console.export_text()
    )


def test_a_file_that_records_no_precision_is_not_another_setting_beside_full(tmp_path):
    """Files written before --precision existed record none: appended to by a newer version, the
    series had a precision column of "—" and "full", and plot drew the one run as two."""
    from hessian_cli.presentation.plots import spectra_figure

    eigen = {"which": "largest", "eigenvalues": [2.0], "converged": [True]}
    prov = {"model": "mlp", "num_params": 10, "checkpoint": "run/a.pt"}
    ds = [
        {"name": name, "provenance": prov | {"step": step} | extra, "eigen": eigen}
        for name, step, extra in (("a", 1, {}), ("b", 2, {"precision": "full"}))
    ]
    assert [c.header for c in series_table(ds).columns] == ["checkpoint", "step", "epoch", "λ1"]
    assert spectra_figure(ds).get_suptitle() == "mlp (10) in run"  # one run: not "2 runs"
    bf16 = [ds[0], {**ds[1], "provenance": ds[1]["provenance"] | {"precision": "bf16"}}]
    assert "precision" in [c.header for c in series_table(bf16).columns]


def test_a_cuda_file_that_records_no_precision_is_not_called_full():
    """Versions before --precision left TF32 on for cuDNN's convolutions (PyTorch's default) and
    recorded none: their CUDA files were read as full precision, beside a newer version's full
    precision as one run. Off CUDA they are full."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    eigen = {"which": "largest", "eigenvalues": [2.0], "residuals": [1e-5], "converged": [True]}
    prov = {"model": "cnn", "num_params": 10, "checkpoint": "run/a.pt", "device": "cuda:0"}
    ds = [
        {"name": name, "provenance": prov | {"step": step} | extra, "eigen": eigen}
        for name, step, extra in (("a", 1, {}), ("b", 2, {"precision": "full"}))
    ]
    table = series_table(ds)
    assert list(table.columns[3].cells) == ["unrecorded", "full"]  # the precision column
    said = (
        "written on CUDA by a version before 2026-11-28, which recorded no precision, left TF32 "
        "as PyTorch sets it (on for cuDNN's convolutions) and checked no residual in full "
        "precision"
    )
    assert table.caption == f"precision unrecorded (1 of 2 checkpoints): {said}"
    console = Console(width=400, record=True)
    console.print(analysis_table(ds[0]))
    assert f"precision unrecorded: {said}." in console.export_text().splitlines()
    assert "precision=unrecorded" in spectra_figure(ds).legends[0].get_texts()[0].get_text()
    for exact in ({"device": "cpu"}, {"dtype": "float64"}):  # TF32 rounds float32 on CUDA only
        same = [{**d, "provenance": d["provenance"] | exact} for d in ds]
        assert series_table(same).caption is None
        assert spectra_figure(same).get_suptitle() == "cnn (10) in run"  # one run


def test_a_series_of_different_searches_says_which_end_each_row_holds():
    """One file with a top-2 and a smallest-2: the #1 column held the largest in one row and
    the smallest in the other, and nothing said which."""
    ds = [
        {"name": name, "provenance": {}, "eigen": {"which": which, "eigenvalues": [2.0, 1.0]}}
        for name, which in (("a", "largest"), ("b", "smallest"))
    ]
    table = series_table(ds)
    assert [str(c.header) for c in table.columns][3:6] == ["which", "#1", "#2"]
    assert list(table.columns[3].cells) == ["largest", "smallest"]


def test_a_series_of_both_ends_of_different_sizes_puts_each_end_under_its_labels():
    """A top-2 and a top-3 of --which both in one file: the top-2's smallest eigenvalue (-0.1)
    stood under λ3 and its second smallest under λn, in the table and the plot."""
    ds = [
        {
            "name": name,
            "provenance": {},
            "eigen": {"which": "both", "eigenvalues": values, "converged": [True] * len(values)},
        }
        for name, values in (
            ("a", [2.0, 1.0, -0.1, -0.05]),
            ("b", [3.0, 2.5, 2.0, -1.0, -0.5, -0.2]),
        )
    ]
    table = series_table(ds)
    labels = [str(c.header) for c in table.columns][3:9]
    assert labels == ["λ1", "λ2", "λ3", "λn", "λn-1", "λn-2"]
    assert [list(table.columns[i].cells) for i in (5, 6)] == [["—", "2"], ["-0.1", "-1"]]
    axes = spectra_figure(ds).axes[0]
    drawn = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert drawn["λn"] == [-0.1, -1.0]
    assert np.isnan(drawn["λ3"][0]) and drawn["λ3"][1] == 2.0


def test_a_metrics_summary_counts_its_rows_in_words():
    from rich.console import Console

    from hessian_cli.presentation.tables import metrics_summary

    console = Console(width=200, record=True)
    one = {"epochs": {"epoch": np.array([1])}, "refresh": {"step": np.array([0])}}
    console.print(metrics_summary("m.h5", one, {}))
    several = {"steps": {"step": np.arange(3)}, "refresh": {"step": np.arange(2)}}
    console.print(metrics_summary("m.h5", several, {}))
    text = console.export_text()
    assert "1 epoch, 1 refresh" in text and "3 steps, 2 refreshes" in text  # "1 epochs" before


def test_an_older_metrics_file_says_what_wrote_it(tmp_path):
    """Files written before 2026-11-29 name the versions `tool` and `torch` and record no
    `modified`: show said nothing of what wrote them."""
    path = tmp_path / "metrics.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(format="hessian-cli-metrics", version=1, tool="hessian-cli 0.1.0")
        f.attrs.update(torch="2.5.1", created="2026-11-28T10:00:00+00:00", config="{}")
        f["steps/step"], f["steps/loss"] = np.arange(3), np.ones(3)
    result = runner.invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    said = "written by hessian-cli 0.1.0 (torch 2.5.1), created 2026-11-28T10:00:00+00:00\n"
    assert said in result.output


def test_checkpoints_of_different_models_in_one_file_are_a_trajectory_each():
    """Unrelated checkpoints appended to one file were joined by lines as one training run,
    and the table did not say which model a row was; then drawn as points no one could tell
    apart. Each model is now a trajectory of its own, with a marker the legend names."""
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    ds = [
        {"name": name, "provenance": {"model": model, "num_params": n}, "eigen": eigen}
        for name, model, n in (("a", "mlp", 2410), ("b", "cnn", 1418), ("c", "mlp", 2410))
    ]
    table = series_table(ds)
    assert str(table.columns[3].header) == "model"
    assert list(table.columns[3].cells) == ["mlp (2,410)", "cnn (1,418)", "mlp (2,410)"]
    fig = spectra_figure(ds)
    assert fig.get_suptitle() == "2 runs (models, parameter sets, directories or analysis settings)"
    drawn = [line for line in fig.axes[0].get_lines() if line.get_color() == "C0"]  # λ1's
    assert [(line.get_marker(), list(line.get_ydata())) for line in drawn] == [
        ("o", [2.0, 2.0]),  # a and c, the mlp, joined
        ("s", [2.0]),  # b, the cnn
    ]
    assert drawn[0].get_linestyle() == "-"
    named = {h.get_marker(): h.get_label() for h in fig.legends[0].legend_handles}
    assert named == {"o": "mlp (2,410)", "s": "cnn (1,418)"}
    # Two runs of one model: told apart by the directory their checkpoints were read from.
    runs = [
        {**d, "provenance": {"model": "mlp", "num_params": 2410, "checkpoint": f"/r/{r}/c/s.pt"}}
        for d, r in zip(ds, ("a", "b", "a"), strict=True)
    ]
    fig = spectra_figure(runs)
    named = {h.get_marker(): h.get_label() for h in fig.legends[0].legend_handles}
    assert named == {"o": "mlp (2,410) in a/c", "s": "mlp (2,410) in b/c"}
    table = series_table(runs)
    assert [str(c.header) for c in table.columns][3] == "directory"
    assert list(table.columns[3].cells) == ["a/c", "b/c", "a/c"]
    # Runs are told apart by the whole directory, not the two parts the labels show.
    for d, root in zip(runs, ("/x", "/y", "/x"), strict=True):
        d["provenance"]["checkpoint"] = f"{root}/exp/c/s.pt"
    assert len(spectra_figure(runs).legends[0].legend_handles) == 2
    same = [{**d, "provenance": {"model": "mlp", "num_params": 2410}} for d in ds]
    same[1]["provenance"] = {}  # another tool's checkpoint, or an older file's: counts as any
    assert "model" not in [str(c.header) for c in series_table(same).columns]
    assert spectra_figure(same).axes[0].get_lines()[0].get_linestyle() == "-"


def test_a_series_analysed_again_with_the_same_settings_is_drawn_once():
    """A series analysed twice into one file was drawn at every step twice: on the file
    order's axis, as six checkpoints for three. The last written of each is drawn; an analysis
    with other settings, or of other results, is drawn beside it."""
    ds = [
        {
            "name": f"c{n}",
            "provenance": {"model": "mlp", "sha256": f"{n}", "seed": 0, "wall_seconds": t},
            "eigen": {"which": "largest", "eigenvalues": [n + t], "converged": [1]},
        }
        for n in (1, 2, 3)
        for t in (0.5, 0.25)  # as the file orders them: each, then its repeat
    ]
    (line,) = spectra_figure(ds).axes[0].get_lines()[:1]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == [1.25, 2.25, 3.25]  # the later analysis of each
    ds[1]["provenance"] = {**ds[1]["provenance"], "seed": 1}
    ds[3]["eigen"] = {**ds[3]["eigen"], "eigenvalues": [2.25, 1.0], "converged": [1, 1]}
    (line,) = spectra_figure(ds).axes[0].get_lines()[:1]
    assert list(line.get_ydata()) == [1.5, 1.25, 2.5, 2.25, 3.25]


def test_a_series_analysed_twice_is_counted_as_its_checkpoints(full, tmp_path):  # noqa: F811
    """`analyze DIR --top-k 2` and again `--top-k 0 --trace` into one file: `show` said
    "6 checkpoints" (above the file and the series) for 3, each analysed twice, as did the
    title of their densities in `plot`."""
    steps = [variant(full, f"ckpt_{s}", s) for s in (100, 200, 300)]
    path = tmp_path / "twice.h5"
    write_analyses(path, steps, series=True)
    write_analyses(path, [dataclasses.replace(a, eigen=None) for a in steps], series=True)
    out = runner.invoke(app, ["show", str(path)]).output
    assert f"format version {FORMAT_VERSION}), 6 analyses of 3 checkpoints\n" in out
    reports = read_analyses(path)
    assert series_table(reports).title == "6 analyses of 3 checkpoints"
    one = runner.invoke(app, ["show", str(path), "-c", "ckpt_200-2"]).output
    assert "6 analyses of 3 checkpoints, 1 shown" in one
    assert series_table([d for d in reports if d["eigen"]]).title == "3 checkpoints"
    titles = [ax.get_title() for ax in spectra_figure(reports).axes]
    assert "Spectral densities (SLQ) of 6 analyses of 3 checkpoints" in titles


def test_blocks_of_one_models_hessian_in_one_file_are_a_trajectory_each():
    """Two --params sets of one model with as many parameters each (two layers' blocks) were
    drawn as one trajectory and shown as one model; each is now its own, its globs named."""
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    ds = [
        {
            "name": name,
            "provenance": {"model": "mlp", "num_params": 330, "params_glob": glob},
            "eigen": eigen,
        }
        for name, glob in (("a", "3.*"), ("b", "1.*"), ("c", "3.*"))
    ]
    table = series_table(ds)
    assert str(table.columns[3].header) == "model"
    assert list(table.columns[3].cells) == ["mlp [3.*] (330)", "mlp [1.*] (330)", "mlp [3.*] (330)"]
    fig = spectra_figure(ds)
    named = {h.get_marker(): h.get_label() for h in fig.legends[0].legend_handles}
    assert named == {"o": "mlp [3.*] (330)", "s": "mlp [1.*] (330)"}
    whole = [{**d, "provenance": {**d["provenance"], "params_glob": "*"}} for d in ds]
    assert "model" not in [str(c.header) for c in series_table(whole).columns]


def test_a_table_says_which_parameters_the_hessian_is_of():
    """With --params the eigenvalues are of a block of the Hessian: the summary said only
    num_params, so a table of fc's Hessian read as the whole model's."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    def summary(glob: str) -> str:
        console = Console(width=200, record=True)
        prov = {"model": "mlp", "params_glob": glob, "num_params": 330}
        console.print(analysis_table({"name": "c", "provenance": prov}))
        return console.export_text()

    assert "model=mlp  params_glob=3.*,1.bias  num_params=330" in summary("3.*,1.bias")
    assert "params_glob" not in summary("*")  # the whole model: nothing to say


def test_a_reduced_precision_table_says_which_numbers_were_checked():
    """Its note spoke of "residuals below" where there were none (a trace alone), and did not
    say that the trace, density and curvature ratio come from the rounded products."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    def note(**parts: dict) -> str:
        console = Console(width=300, record=True)
        prov = {"precision": "bf16", "hvp_rel_error": 4e-3}
        console.print(analysis_table({"name": "c", "provenance": prov, **parts}))
        return next(line for line in console.export_text().splitlines() if "reduced" in line)

    head = "reduced precision: products in bf16, relative error 4.0e-03 against full precision"
    assert note(trace={"estimate": 5.0}) == f"{head} (from the rounded products alone: trace)."
    eigen = {"which": "largest", "eigenvalues": [1.0], "residuals": [1e-5], "converged": [True]}
    assert note(eigen=eigen, density={}) == (
        f"{head} (the residuals below are full-precision ones; from the rounded products alone: "
        "density)."
    )


def test_analyses_of_one_checkpoint_with_other_settings_are_a_trajectory_each():
    """One checkpoint analysed again with another --num-samples was drawn as one run of two
    points at its step: a vertical line between two matrices; and `show` gave two rows of one
    name and step whose λ1 differed (2.2425 and 1.8992 for the digits MLP at 128 and 512
    samples), with no word of why."""
    ds = [
        {
            "name": "m",
            "provenance": {"model": "mlp", "num_params": 2410, "step": 168, "num_samples": n},
            "eigen": {"which": "largest", "eigenvalues": [top], "converged": [1]},
        }
        for n, top in ((32, 2.55), (64, 2.08))
    ]
    fig = spectra_figure(ds)
    drawn = [line for line in fig.axes[0].get_lines() if line.get_color() == "C0"]  # λ1's
    assert [list(line.get_ydata()) for line in drawn] == [[2.55], [2.08]]
    named = {h.get_marker(): h.get_label() for h in fig.legends[0].legend_handles}
    assert named == {"o": "mlp (2,410), num_samples=32", "s": "mlp (2,410), num_samples=64"}
    table = series_table(ds)
    assert [str(c.header) for c in table.columns][3] == "num_samples"
    assert list(table.columns[3].cells) == ["32", "64"]
    assert "num_samples" not in [str(c.header) for c in series_table(ds[:1] * 2).columns]


@pytest.mark.parametrize(
    ("setting", "values", "eigenvalues"),
    [
        ("tol", (1e-2, 1e-6), ([2.2425, 1.7793], [2.2425, 1.7794])),
        ("seed", (0, 1), ([2.0, 1.0], [2.1, 1.0])),
        ("top_k", (2, 3), ([2.0, 1.0], [2.0, 1.0, 0.5])),
        ("criterion", ("residual", "eigenvalue"), ([2.0, 1.0], [2.0, 1.0])),
    ],
)
def test_analyses_at_another_tolerance_seed_or_top_k_are_a_trajectory_each(
    setting, values, eigenvalues
):
    """One checkpoint analysed at --tol 1e-2 and 1e-6 (the digits MLP: λ2 1.7793 and 1.7794)
    was drawn as one run of two points at its step, and `show` gave two rows of one step with
    no word of why; alike for --seed and --top-k. At another --criterion (what tol bounds) the
    two were drawn as one point, the second analysis taken for a repeat of the first."""

    def analysis(value: Any, eigen: list[float], step: int = 168) -> dict:
        prov = {"model": "mlp", "num_params": 2410, "step": step, "tol": 1e-4, "seed": 0}
        prov["sha256"] = f"{step:064x}"  # one checkpoint: the same file analysed twice
        if setting not in ("top_k", "criterion"):
            prov[setting] = value
        eigen = {"which": "largest", "eigenvalues": eigen, "converged": [1] * len(eigen)}
        if setting == "criterion":
            eigen[setting] = value
        return {"name": "m", "provenance": prov, "eigen": eigen}

    ds = [analysis(v, e) for v, e in zip(values, eigenvalues, strict=True)]
    later = [analysis(v, e, 336) for v, e in zip(values, eigenvalues, strict=True)]
    fig = spectra_figure(ds + later)  # two checkpoints (one alone: test_one_checkpoint_...)
    drawn = [line for line in fig.axes[0].get_lines() if line.get_color() == "C0"]  # λ1's
    assert [list(line.get_ydata()) for line in drawn] == [[e[0]] * 2 for e in eigenvalues]
    named = [h.get_label() for h in fig.legends[0].legend_handles]
    assert named == [f"mlp (2,410), {setting}={v}" for v in values]
    table = series_table(ds)
    if setting == "top_k":  # its eigenvalue columns say so: λ3 is a dash in the first row
        assert [str(c.header) for c in table.columns][3:6] == ["λ1", "λ2", "λ3"]
    else:
        assert [str(c.header) for c in table.columns][3] == setting
        assert list(table.columns[3].cells) == [str(v) for v in values]


def test_an_analysis_without_eigenpairs_is_named_as_asked_in_the_legend():
    """One checkpoint analysed with --top-k 2 and with --top-k 0 --trace of other samples: the
    second's legend entry read "top_k=None, which=None"."""
    prov = {"model": "mlp", "num_params": 2410, "step": 168}
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    trace = {"estimate": 19.3, "stderr": 0.2}
    ds = [
        {"name": "m", "provenance": prov | {"num_samples": 128}, "eigen": eigen},
        {"name": "m", "provenance": prov | {"num_samples": 512}, "eigen": None, "trace": trace},
    ]
    named = [h.get_label() for h in spectra_figure(ds).legends[0].legend_handles]
    assert named == ["mlp (2,410), num_samples=128", "mlp (2,410), num_samples=512"]


def test_a_series_traces_without_eigenpairs_join_the_series_of_its_eigenvalues():
    """`analyze DIR --top-k 2` and then `analyze DIR --top-k 0 --trace` into one file: plot drew
    "2 runs", "top_k=2, which=largest" and "top_k=0", and as one run the eigenvalues' and the
    traces' lines stopped at every step the other analysis held (points, no line)."""
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    prov = {"model": "mlp", "num_params": 2410, "tol": 1e-4, "checkpoint": "run/c.pt"}
    ds = [
        {"name": f"c{step}", "provenance": prov | {"step": step}, "eigen": eigen}
        for step in (4, 8, 12)
    ] + [
        {
            "name": f"c{step}-2",
            "provenance": prov | {"step": step, "tol": None},
            "eigen": None,
            "trace": {"estimate": 16.0 + step / 4, "stderr": 1.0},
        }
        for step in (4, 8, 12)
    ]
    fig = spectra_figure(ds)
    assert fig.get_suptitle() == "mlp (2,410) in run" and not fig.legends  # one run
    eigenvalues, trace = fig.axes[:2]
    (first, *_) = eigenvalues.get_lines()  # λ1's line through the three steps
    assert first.get_xdata().tolist() == [4, 8, 12] and first.get_ydata().tolist() == [2.0] * 3
    assert trace.get_lines()[0].get_xdata().tolist() == [4, 8, 12]
    other = [{**d, "provenance": d["provenance"] | {"checkpoint": "b/c.pt"}} for d in ds[:3]]
    named = [h.get_label() for h in spectra_figure(ds + other).legends[0].legend_handles]
    assert named == ["mlp (2,410) in run", "mlp (2,410) in b"]


def test_an_analysis_without_eigenpairs_gives_no_tolerance_column():
    """One checkpoint analysed with --top-k 2 and with --top-k 0 --trace: `show` gave a tol
    column of 0.0001 and a dash, as if the two had been solved to different tolerances, and
    the plot's legend said "tol=0.0001" of the first."""
    prov = {"model": "mlp", "num_params": 2410, "step": 168, "sha256": "ab" * 32}
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    trace = {"estimate": 19.3, "stderr": 0.2}
    ds = [
        {
            "name": "m",
            "provenance": {**prov, "tol": 1e-4},
            "eigen": {**eigen, "criterion": "residual"},
        },
        {"name": "m", "provenance": prov, "eigen": None, "trace": trace},
    ]
    headers = [str(c.header) for c in series_table(ds).columns]
    assert headers == ["checkpoint", "step", "epoch", "λ1", "λ2", "trace"]
    later = [{**d, "provenance": d["provenance"] | {"step": 336, "sha256": "cd" * 32}} for d in ds]
    assert not spectra_figure(ds + later).legends  # one run, its traces beside its eigenvalues


def test_the_title_of_many_runs_fits_a_one_panel_figure():
    """The title of 12 runs was 652.6 pixels wide in a 640-pixel figure (of 2 runs, 641.6)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    ds = [
        {"name": f"c{i}", "provenance": {"model": f"m{i}:make", "num_params": 130}, "eigen": eigen}
        for i in range(12)
    ]
    fig = spectra_figure(ds)
    assert fig.get_suptitle().startswith("12 runs")
    renderer = FigureCanvasAgg(fig).get_renderer()
    assert fig._suptitle.get_window_extent(renderer).width <= fig.bbox.width


def test_a_trainer_output_folder_is_one_run_not_a_run_per_checkpoint_folder():
    """`analyze` reads a Hugging Face Trainer's output folder as one series, the weights of its
    checkpoint-N folders; the table gave each a `directory` of its own and the plot drew each
    as a separate run (an unjoined marker per step, a legend entry each)."""
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": [1, 1]}
    ds = [
        {
            "name": f"checkpoint-{step}",
            "provenance": {
                "model": "m:make",
                "num_params": 130,
                "checkpoint": f"/r/hf/checkpoint-{step}/model.safetensors",
                "step": step,
            },
            "eigen": eigen,
        }
        for step in (50, 500, 1000)
    ]
    assert "directory" not in [str(c.header) for c in series_table(ds).columns]
    fig = spectra_figure(ds)
    assert fig.get_suptitle() != "3 runs (models, parameter sets or checkpoint directories)"
    drawn = [line for line in fig.axes[0].get_lines() if line.get_color() == "C0"]  # λ1's
    assert [list(line.get_ydata()) for line in drawn] == [[2.0, 2.0, 2.0]]
    # Two Trainer runs are still two, named by their output folders.
    other = [{**d, "provenance": {**d["provenance"]}} for d in ds[:2]]
    for d in other:
        d["provenance"]["checkpoint"] = d["provenance"]["checkpoint"].replace("/hf/", "/hf2/")
    table = series_table(ds + other)
    assert [str(c.header) for c in table.columns][3] == "directory"
    assert list(table.columns[3].cells) == ["r/hf"] * 3 + ["r/hf2"] * 2


def test_a_table_of_both_ends_names_the_smallest_from_the_bottom():
    """The smallest of --which both were rows #4, #5, #6: read as the 4th to 6th largest."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    eigen = {
        "which": "both",
        "eigenvalues": [5.0, 4.0, -1.0, -0.5],
        "residuals": [1e-5] * 4,
        "converged": [True] * 4,
        "tol": 1e-4,
    }
    console = Console(width=200, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "eigen": eigen}))
    rows = [line.split("│") for line in console.export_text().splitlines() if "│" in line]
    assert [(r[1].strip(), r[2].strip()) for r in rows if len(r) > 3] == [
        ("λ1", "5"),
        ("λ2", "4"),
        ("λn", "-1"),
        ("λn-1", "-0.5"),
    ]


def test_an_all_zero_hessian_says_converged_means_a_zero_residual():
    """Where every eigenvalue seen was 0 (--params of ones the loss does not use) the solver's
    scale is its floor, and the table said "residual ||Hv - λv|| / 2.225e-308 <= tol"."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    eigen = {
        "which": "largest",
        "eigenvalues": [0.0, 0.0],
        "residuals": [0.0, 0.0],
        "converged": [True, True],
        "tol": 1e-4,
        "scale": sys.float_info.min,
        "method": "block-krylov-thick-restart",
    }
    console = Console(width=400, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "eigen": eigen}))
    text = console.export_text()
    assert "e-308" not in text
    assert "converged means residual ||Hv - λv|| = 0 (every eigenvalue seen was 0" in text
    # The plot's legend named "residual" markers a log axis cannot draw (0) and a tol line no
    # residual was held to, on an axis of "/ |λ_max|".
    fig = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["converged"]
    assert fig.axes[1].get_ylabel() == "residual ||Hv-λv|| (every λ seen was 0)"


def test_the_residual_axis_names_the_scale_the_residuals_are_relative_to():
    """The residuals are relative to the largest |Ritz value| the solve saw: --which smallest
    of a digits-like MLP (λn -0.495, scale 1.177) was drawn on an axis of "/ |λ_max|"."""
    eigen = {
        "which": "smallest",
        "eigenvalues": [-0.4946, -0.4931],
        "residuals": [3e-5, 8e-5],
        "converged": [True, True],
        "tol": 1e-4,
        "scale": 1.1768,
    }
    fig = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}])
    assert fig.axes[1].get_ylabel() == "residual ||Hv-λv|| / 1.177 (largest |Ritz value|)"
    older = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen | {"scale": None}}])
    assert older.axes[1].get_ylabel() == "residual ||Hv-λv|| relative"


def test_the_tolerance_is_shown_and_drawn_as_given():
    """--tol 1.25e-4 was "tol 1.3e-04" in the table and "tol 1e-04" in the plot's legend."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    eigen = {
        "which": "largest",
        "eigenvalues": [2.0, 1.0],
        "residuals": [1e-5, 1e-5],
        "converged": [True, True],
        "tol": 1.25e-4,
        "scale": 2.0,
    }
    d = {"name": "c", "provenance": {}, "eigen": eigen}
    console = Console(width=400, record=True)
    console.print(analysis_table(d))
    assert "<= tol 0.000125," in console.export_text()
    legend = spectra_figure([d]).axes[0].get_legend()
    assert "tol 0.000125" in [t.get_text() for t in legend.get_texts()]


def _below_the_floor() -> dict:
    """The float32 digits MLP's eigenpairs at --tol 2e-7: residuals 5.1e-8 to 5.7e-8, every
    pair NOT converged (the rounding floor, 1.8e-7, added)."""
    return {
        "which": "largest",
        "eigenvalues": [2.24246, 1.7794],
        "residuals": [5.14e-8, 5.73e-8],
        "converged": [False, False],
        "tol": 2e-7,
        "scale": 2.24246,
        "floor": 1.8e-7,
    }


def test_the_caption_says_the_residual_test_adds_the_rounding_floor():
    """A float32 digits MLP at --tol 2e-7: residuals 5.1e-8 to 5.7e-8, every pair NOT converged
    (the rounding floor, 1.8e-7, added), under "converged means residual ||Hv - λv|| / 2.242 <=
    tol": the floor is recorded and shown."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    eigen = _below_the_floor()
    console = Console(width=400, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "eigen": eigen}))
    assert "/ 2.242 plus its rounding floor 1.8e-07 <= tol 2e-07," in console.export_text()
    del eigen["floor"]  # a file written before it was recorded
    console = Console(width=400, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "eigen": eigen}))
    assert "/ 2.242 <= tol 2e-07," in console.export_text()


def test_the_tol_line_is_the_bar_the_residuals_had_to_pass():
    """The float32 digits MLP at --tol 2e-7: residuals of 5e-8, every pair NOT converged (the
    rounding floor, 1.8e-7, added), drawn below a tol line at 2e-7."""
    eigen = _below_the_floor()
    twin = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}]).axes[1]
    (line,) = [line for line in twin.get_lines() if line.get_linestyle() == ":"]
    assert line.get_ydata()[0] == pytest.approx(2e-8)
    assert line.get_label() == "tol 2e-07 less the rounding floor 1.8e-07"
    eigen["floor"] = 1e-9  # a hundredth of tol or less: the line is tol's
    twin = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}]).axes[1]
    (line,) = [line for line in twin.get_lines() if line.get_linestyle() == ":"]
    assert line.get_ydata()[0] == 2e-7 and line.get_label() == "tol 2e-07"


def test_the_runs_legend_fits_the_figure():
    """Two checkpoints each at --tol 1e-2 and 1e-6 (four runs): three columns of
    "cnn (1,418), tol=1e-06" ran off the one-panel figure's right side (651 px of 640)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ds = [
        {
            "name": model,
            "provenance": {"model": model, "num_params": n, "step": step, "tol": tol},
            "eigen": {
                "which": "largest",
                "eigenvalues": [2.0],
                "residuals": [0.0],
                "converged": [True],
                "tol": tol,
            },
        }
        for model, n, step in (("mlp", 2410, 168), ("cnn", 1418, 840))
        for tol in (1e-2, 1e-6)
    ]
    fig = spectra_figure(ds)
    renderer = FigureCanvasAgg(fig).get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width


def test_a_single_plot_of_both_ends_draws_no_line_across_the_gap():
    eigen = {
        "which": "both",
        "eigenvalues": [5.0, 4.0, -0.5, -1.0],
        "residuals": [1e-5] * 4,
        "converged": [1] * 4,
        "tol": 1e-4,
    }
    ax = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}]).axes[0]
    grey = [list(line.get_ydata()) for line in ax.get_lines() if line.get_color() == "0.6"]
    assert grey == [[5.0, 4.0], [-0.5, -1.0]]


def test_a_single_plot_of_the_smallest_reads_as_the_bottom_of_both_ends():
    """--which smallest drew λn, λn-1, λn-2 from the left: the reverse of the bottom end of a
    --which both plot, which reads λn-2, λn-1, λn as the spectrum does."""
    eigen = {
        "which": "smallest",
        "eigenvalues": [-1.0, -0.5, -0.2],
        "residuals": [1e-5] * 3,
        "converged": [1] * 3,
        "tol": 1e-4,
    }
    ax = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}]).axes[0]
    ticks = sorted((t.get_loc(), t.label1.get_text()) for t in ax.xaxis.get_major_ticks())
    assert ticks == [(1, "λn-2"), (2, "λn-1"), (3, "λn")]
    (points,) = [line for line in ax.get_lines() if line.get_label() == "converged"]
    assert dict(zip(points.get_xdata(), points.get_ydata(), strict=True)) == {
        1: -0.2,
        2: -0.5,
        3: -1.0,
    }


def test_a_single_plot_of_both_ends_reads_as_the_spectrum_with_a_gap():
    """The x axis read λ1, λ2, λ3, λn, λn-1, λn-2: λn beside λ3, the smallest end backwards."""
    eigen = {
        "which": "both",
        "eigenvalues": [5.0, 4.0, 3.0, -1.0, -0.5, -0.2],
        "residuals": [1e-5] * 6,
        "converged": [1] * 6,
        "tol": 1e-4,
    }
    ax = spectra_figure([{"name": "c", "provenance": {}, "eigen": eigen}]).axes[0]
    ticks = sorted((t.get_loc(), t.label1.get_text()) for t in ax.xaxis.get_major_ticks())
    assert ticks == [(1, "λ1"), (2, "λ2"), (3, "λ3"), (5, "λn-2"), (6, "λn-1"), (7, "λn")]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == ["…"]
    (points,) = [line for line in ax.get_lines() if line.get_label() == "converged"]
    assert dict(zip(points.get_xdata(), points.get_ydata(), strict=True)) == {
        1: 5.0,
        2: 4.0,
        3: 3.0,
        5: -0.2,
        6: -0.5,
        7: -1.0,
    }


def test_a_series_plot_marks_unconverged_pairs_only_where_there_are_some():
    def series(converged: list[int]) -> list[dict]:
        eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "converged": converged}
        return [{"name": f"c{i}", "provenance": {}, "eigen": eigen} for i in range(3)]

    assert spectra_figure(series([1, 1])).axes[0].get_title() == "Top eigenvalues"
    axes = spectra_figure(series([1, 0])).axes[0]
    assert axes.get_title() == "Top eigenvalues (red x: NOT converged)"
    ticks = axes.xaxis.get_major_locator().tick_values(1, 3)  # checkpoint order: no 1.5
    assert all(float(t).is_integer() for t in ticks)


def test_steps_counted_within_each_epoch_are_drawn_in_series_order():
    """Steps that restart each epoch (epoch 0 step 50, 100; epoch 1 step 50, 100) were the x
    axis, each line sorted by step: λ1 went 1, 3, 2, 4 over x 50, 50, 100, 100. The axis now
    follows the series (epoch, then step); steps saved once per epoch alike are its epochs."""

    def series(places: list[tuple[int, int]]) -> list[dict]:
        return [
            {
                "name": f"c{i}",
                "provenance": {"model": "mlp", "num_params": 10, "epoch": e, "step": s},
                "eigen": {"which": "largest", "eigenvalues": [i + 1.0], "converged": [1]},
            }
            for i, (e, s) in enumerate(places)
        ]

    ax = spectra_figure(series([(0, 50), (0, 100), (1, 50), (1, 100)])).axes[0]
    (line,) = ax.get_lines()[:1]
    assert list(line.get_ydata()) == [1.0, 2.0, 3.0, 4.0]
    assert list(line.get_xdata()) == [1.0, 2.0, 3.0, 4.0]
    assert ax.get_xlabel() == "checkpoint (series order)"
    ax = spectra_figure(series([(0, 100), (1, 100), (2, 100)])).axes[0]
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 1.0, 2.0]
    assert ax.get_xlabel() == "epoch"
    ax = spectra_figure(series([(0, 100), (1, 200), (2, 300)])).axes[0]
    assert ax.get_xlabel() == "step"


def test_the_analyses_of_one_checkpoint_share_its_place_in_the_series():
    """Two checkpoints that record no step (bare state dicts alpha.pt and beta.pt), analysed
    with --top-k 2 and again with --top-k 0 --trace: the eigenvalues were drawn at places 1
    and 3 of "checkpoint (series order)", the traces at 2 and 4."""
    eigen = {"which": "largest", "eigenvalues": [0.62, 0.45], "converged": [1, 1]}
    ds = [
        {
            "name": f"{name}{again}",
            "provenance": {"model": "mlp", "num_params": 83, "sha256": name},
            "eigen": None if again else eigen,
            "trace": {"estimate": 2.2, "stderr": 0.0} if again else None,
        }
        for name in ("alpha", "beta")
        for again in ("", "-2")
    ]
    eigenvalues, trace = spectra_figure(ds).axes[:2]
    assert eigenvalues.get_xlabel() == "checkpoint (series order)"
    assert eigenvalues.get_lines()[0].get_xdata().tolist() == [1, 2]
    assert trace.get_lines()[0].get_xdata().tolist() == [1, 2]


def test_a_series_of_densities_alone_is_drawn(full, tmp_path):  # noqa: F811
    """`analyze DIR --top-k 0 --density` wrote a series that `plot` refused ("no eigenvalues or
    traces to plot"): each checkpoint's ESD is drawn, coloured by its step."""
    steps = [variant(full, f"ckpt_{s}", s) for s in (100, 200, 300)]
    spectra = [dataclasses.replace(a, eigen=None, trace=None, alignment=None) for a in steps]
    path = tmp_path / "densities.h5"
    write_analyses(path, spectra, command_line="analyze dir --top-k 0 --density", series=True)
    out = tmp_path / "densities.png"
    result = runner.invoke(app, ["plot", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert_png(out)
    figure = spectra_figure([analysis_to_dict(a) for a in spectra])
    panel = figure.axes[0]  # then its colour bar
    assert panel.get_title() == "Spectral densities (SLQ) of 3 checkpoints"
    assert len(panel.get_lines()) == 3 and figure.axes[1].get_ylabel() == "step"


def test_a_series_says_which_rows_hold_a_density(full, tmp_path):  # noqa: F811
    """`analyze DIR --top-k 0 --density`: `show` was a table of checkpoint, step and epoch that
    did not say the file held the densities, which only -a showed."""
    steps = [variant(full, f"ckpt_{s}", s) for s in (100, 200, 300)]
    spectra = [dataclasses.replace(a, eigen=None, trace=None, alignment=None) for a in steps]
    path = tmp_path / "densities.h5"
    write_analyses(path, spectra, series=True)
    said = "spectral density: 3 of the 3 rows hold one, not shown here:"
    out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
    assert f"{said} show -a lists each, plot draws them" in out
    out = " ".join(runner.invoke(app, ["show", str(path), "-a"]).output.split())
    assert f"{said} each is below" in out
    plain = [dataclasses.replace(a, density=None) for a in steps]
    ds = [analysis_to_dict(a) for a in (*spectra[:1], *plain[1:])]
    assert series_table(ds).caption == (
        "spectral density: 1 of the 3 rows holds one, not shown here: --json prints them"
    )
    assert series_table(ds[1:]).caption is None


def test_plot_onto_a_link_replaces_its_target_and_keeps_the_link(files, tmp_path):
    (tmp_path / "real.png").write_text("an older figure")
    (tmp_path / "fig.png").symlink_to("real.png")
    (tmp_path / "new.png").symlink_to("made.png")  # a link to nothing yet
    for name in ("fig.png", "new.png"):
        result = runner.invoke(app, ["plot", str(files["series"]), "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).is_symlink()
    assert_png(tmp_path / "real.png")
    assert_png(tmp_path / "made.png")


def test_a_link_without_a_suffix_is_written_in_its_targets_format(capsys, files, tmp_path):
    """`-o latest`, a link to fig.pdf, wrote a PNG's bytes into fig.pdf; a target named as no
    figure is (mktemp's tmp.AbX12q) still gets a PNG."""
    (tmp_path / "latest").symlink_to("fig.pdf")
    (tmp_path / "scratch").symlink_to("tmp.AbX12q")
    for link, target, magic in (("latest", "fig.pdf", b"%PDF"), ("scratch", "tmp.AbX12q", PNG)):
        code, out, err = run(capsys, "plot", files["series"], "-o", tmp_path / link)
        assert code == 0 and out == f"wrote {tmp_path / link}\n", err
        assert (tmp_path / target).read_bytes().startswith(magic)


def test_plot_onto_a_read_only_figure_refuses_it(capsys, files, tmp_path):
    """The rename that replaces a figure asks only the directory: a chmod a-w one was
    replaced unsaid."""
    out = tmp_path / "fig.png"
    out.write_text("a figure kept")
    out.chmod(0o444)
    code, _, err = run(capsys, "plot", files["series"], "-o", out)
    assert code == 2
    assert f"{out} is read-only; refusing to write to it" in one_sentence(err)
    assert out.read_text() == "a figure kept"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_plot_into_a_named_pipe_writes_through_it(files, tmp_path):
    # As `-o /dev/null` does: a device or pipe is written to, never replaced by a file.
    fifo = tmp_path / "fig.png"  # a format that seeks back while it is written
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = runner.invoke(app, ["plot", str(files["series"]), "-o", str(fifo)])
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received[0][:8] == PNG


PNG_END = b"IEND\xaeB`\x82"  # a PNG's last chunk


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_plot_onto_standard_output_writes_the_figure_alone(files, tmp_path):
    """Into a pipe, `-o /dev/stdout` put "wrote /dev/stdout" after the figure's bytes;
    redirected to a file it made /dev/stdout.png (a root may write to /dev) and left that file
    empty. /proc/self/fd/1 is the same link, in a directory where nothing can be made."""
    plot = ["plot", str(files["series"]), "-o"]
    # Both names into one pipe from one process (a second interpreter and matplotlib cost more
    # than the figure): each figure's bytes, then the next's, nothing between or after.
    twice = (
        "import sys\nfrom hessian_cli.__main__ import main\n\n"
        "for name in sys.argv[1:]:\n"
        f"    sys.argv = ['hessian-cli', *{plot!r}, name]\n"
        "    try:\n        main()\n"
        "    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
    )
    piped = subprocess.run(
        [sys.executable, "-c", twice, "/dev/stdout", "-"],  # "-" made a file named -.png
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    figures = piped.stdout.split(PNG_END)
    assert len(figures) == 3 and figures[0][:8] == figures[1][:8] == PNG and figures[2] == b""
    plot = [sys.executable, "-m", "hessian_cli", *plot]
    figure = tmp_path / "fig.png"
    with figure.open("wb") as redirected:
        done = subprocess.run(
            [*plot, "/proc/self/fd/1"], stdout=redirected, stderr=subprocess.PIPE, timeout=120
        )
    assert done.returncode == 0, done.stderr
    data = figure.read_bytes()
    assert data[:8] == PNG and data.endswith(PNG_END)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_closed_standard_output_never_leads_a_figure_into_another_file(files, tmp_path):
    """With standard output closed (`plot FILE -o - >&-`), the next file the command opened
    took its number, 1, and /dev/stdout led there: matplotlib's fallback font was replaced
    by the figure. Here that file is one the command holds open as it draws."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    wrapper = tmp_path / "closed_stdout.py"
    wrapper.write_text(
        "import os\nimport sys\n\n"
        "import hessian_cli.cli.plot as plot\nfrom hessian_cli.cli import main\n\n"
        "os.close(1)  # as `>&-` leaves it, where Python sets no sys.stdout\n"
        "sys.stdout = None\n"
        "read, held = plot.read_result_file, []\n\n\n"
        "def reading(*args):\n"
        f"    held.append(open({str(victim)!r}, 'rb'))\n"
        "    return read(*args)\n\n\n"
        "plot.read_result_file = reading\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, str(wrapper), "plot", str(files["series"]), "-o", "-"],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("command", "status"),
    [(["show", "--all"], 0), (["show", "--json"], 0), (["plot", "-o", "/dev/stdout"], 141)],
)
def test_a_reader_that_closes_the_pipe_ends_the_command_as_other_tools(files, command, status):
    """`show FILE | head` exited 1 with nothing said, as an error does (rich and Click end so
    where standard output's reader went away): its text is dropped and it ends as it would have;
    a figure, the command's whole work, lost in such a pipe ends as `seq 1 100000 | head -1`
    does, with SIGPIPE's status, 141, and nothing said."""
    read, write = os.pipe()
    os.close(read)  # the reader gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hessian_cli", command[0], str(files["series"]), *command[1:]],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (status, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "command", [["show"], ["show", "--json"], ["plot", "-o", "-"], ["plot", "-o", "{tmp}/f.png"]]
)
def test_standard_output_that_cannot_be_written_is_one_sentence(files, tmp_path, command):
    """Redirected to a full disk (`show FILE --json > out.json`), each said "unexpected
    OSError: [Errno 28] No space left on device" (plot: of its "wrote" line)."""
    args = [a.format(tmp=tmp_path) for a in command[1:]]
    with open("/dev/full", "w") as full_disk:  # every write to it fails: no space left
        done = subprocess.run(
            [sys.executable, "-m", "hessian_cli", command[0], str(files["series"]), *args],
            stdout=full_disk,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    said = "error: could not write to standard output: no space left on device."
    assert one_sentence(done.stderr) == said


def test_show_says_where_batchnorm_held_its_initial_statistics(capsys, full, tmp_path):  # noqa: F811
    """analyze says so as it sets up, and --json and the file record it, but `show` said
    nothing: the numbers of an unnormalised network read as the trained one's."""
    untrained = dataclasses.replace(
        full, provenance={**full.provenance, "bn_initial_statistics": 2}
    )
    trained = dataclasses.replace(full, provenance={**full.provenance, "bn_initial_statistics": 0})
    single, series = tmp_path / "single.h5", tmp_path / "series.h5"
    write_analyses(single, [untrained], command_line="analyze one")
    steps = [variant(a, f"ckpt_{s}", s) for a, s in ((untrained, 100), (trained, 200))]
    write_analyses(series, steps, command_line="analyze dir", series=True)
    said = (
        "initial running statistics (mean 0, variance 1: no training step updated them), by "
        "which eval mode does not normalise, so these are the numbers of an unnormalised "
        "network; --bn train normalises by each batch's statistics (InstanceNorm by each "
        "sample's)."
    )
    for path, where in (
        (single, "2 BatchNorm (or InstanceNorm) layers held"),
        (series, "in 1 of the 2 checkpoints (ckpt_100) BatchNorm (or InstanceNorm) layers held"),
    ):
        code, out, err = run(capsys, "show", path)
        assert code == 0, err
        assert f"note: {where} {said}" in " ".join(out.split())
    code, out, err = run(capsys, "show", series, "-c", "ckpt_200")
    assert code == 0 and "note:" not in out, err


def test_show_says_a_file_of_a_newer_format_version_may_be_misread(capsys, files, tmp_path):
    """A newer format version is one that older readers misread (docs/hdf5.md), and `show`
    read it as its own without a word."""
    for kind, known in (("series", FORMAT_VERSION), ("metrics", METRICS_VERSION)):
        newer = tmp_path / f"{kind}.h5"
        shutil.copyfile(files[kind], newer)
        with h5py.File(newer, "r+") as f:
            f.attrs["format_version"] = known + 1
        code, out, err = run(capsys, "show", newer)
        assert code == 0, err
        said = (
            f"note: format version {known + 1} is newer than this hessian-cli reads ({known}): "
            "what that version added is not shown, and what it changed may be misread; "
            "upgrade hessian-cli to read it all."
        )
        assert said in " ".join(out.split())
    code, out, err = run(capsys, "show", files["series"])  # its own version: nothing said
    assert code == 0 and "note:" not in out, err


def test_json_and_plot_say_a_file_of_a_newer_format_version_may_be_misread(capsys, files, tmp_path):
    """`show` said it above its tables; `show --json` and `plot` read such a file without a
    word."""
    for kind, known in (("series", FORMAT_VERSION), ("metrics", METRICS_VERSION)):
        newer = tmp_path / f"{kind}.h5"
        shutil.copyfile(files[kind], newer)
        with h5py.File(newer, "r+") as f:
            f.attrs["format_version"] = known + 1
        said = f"note: format version {known + 1} is newer than this hessian-cli reads ({known})"
        code, out, err = run(capsys, "show", newer, "--json")
        assert code == 0 and said in " ".join(err.split())
        assert json.loads(out)  # said beside the JSON, not in it
        code, _, err = run(capsys, "plot", newer, "-o", tmp_path / f"{kind}.png")
        assert code == 0 and said in " ".join(err.split())
    # A file of this version plotted says nothing: test_plot_makes_the_directories_it_writes_in.


def test_a_damaged_group_is_one_sentence_that_names_it(capsys, files, tmp_path):
    path = tmp_path / "damaged.h5"
    path.write_bytes(files["series"].read_bytes())
    damage_attributes(path, "checkpoints/ckpt_200")
    for args in (["show", str(path)], ["plot", str(path), "-o", str(tmp_path / "f.png")]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "checkpoint group 'ckpt_200' is damaged" in one_sentence(err)
    assert not (tmp_path / "f.png").exists()


def test_a_checkpoint_analysed_twice_is_picked_by_its_group(full, tmp_path):  # noqa: F811
    """Where names repeat the series table names each row by its group: -c final-2 picked the
    checkpoint named final-2 (the row final-2-2), not the row final-2 (final's second)."""
    path = tmp_path / "twice.h5"
    write_analyses(path, [variant(full, "final", 1)], command_line="first")
    write_analyses(path, [variant(full, "final", None, 2.0)], command_line="second")
    first, second = read_file_info(path)["groups"]
    assert (first, second) == ("final", "final-2")
    write_analyses(path, [variant(full, "final-2", 9)], command_line="a checkpoint named so")
    table = runner.invoke(app, ["show", str(path)]).stdout
    rows = {row.split()[1]: row.split()[3] for row in table.splitlines() if "│ final" in row}
    assert rows == {first: "1", second: "—", f"{second}-2": "9"}  # group: step
    for name, step in rows.items():  # as the table shows them
        result = runner.invoke(app, ["show", str(path), "-c", name, "--json"])
        picked = [(d["group"], d["provenance"].get("step")) for d in json.loads(result.stdout)]
        assert picked == [(name, None if step == "—" else int(step))]
    out = tmp_path / "one.svg"  # one checkpoint's figure, not the series'
    assert runner.invoke(app, ["plot", str(path), "-c", first, "-o", str(out)]).exit_code == 0
    assert "Spectral density" in out.read_text()


def test_names_are_shown_and_drawn_as_they_are(full, tmp_path):  # noqa: F811
    path = tmp_path / "odd.h5"
    names = ["net[red]", "net[bold]", "net_$_^_$"]
    write_analyses(path, [variant(full, n, i) for i, n in enumerate(names)], command_line="x")
    shown = runner.invoke(app, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert all(name in shown.output for name in names[:2])
    # A path that reads as markup (figs[/x]), longer than 80 columns: one line into a pipe,
    # as a script reading it needs (it was folded at 80, inside the path).
    folder = tmp_path / "figs[" / ("x]" + "_long" * 20)
    folder.mkdir(parents=True)
    out = folder / "fig.png"
    plotted = runner.invoke(app, ["plot", str(path), "-c", names[2], "-o", str(out)])
    assert plotted.exit_code == 0, plotted.output
    assert f"wrote {out}\n" in plotted.output
    assert_png(out)


def test_a_long_checkpoint_name_is_cut_in_the_middle_to_fit_the_title(full):  # noqa: F811
    """A 230-character name ran off both sides of the figure (2133 pixels wide in 640)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    name = "experiment_resnet20_cifar10_lr0.1_wd5e-4_$rho$" * 5 + "epoch=199-step=78200"
    d = {**json.loads(json.dumps(analysis_to_dict(full))), "name": name}
    fig = spectra_figure([d])
    title = fig.get_suptitle().splitlines()[0]  # the trace below it
    head, tail = title.split("…")
    assert name.startswith(head.replace(r"\$", "$")) and name.endswith(tail.replace(r"\$", "$"))
    assert tail.endswith("epoch=199-step=78200") and len(head) > 10
    renderer = FigureCanvasAgg(fig).get_renderer()
    assert fig._suptitle.get_window_extent(renderer).width <= fig.bbox.width


def test_tables_are_never_cut_short(files, monkeypatch):
    from rich.console import Console

    monkeypatch.delenv("COLUMNS", raising=False)
    values = [f"{v:.5g}" for d in read_analyses(files["series"]) for v in d["eigen"]["eigenvalues"]]
    piped = runner.invoke(app, ["show", str(files["series"])])  # not a terminal: as wide as needed
    assert all(v in piped.output for v in values) and "…" not in piped.output
    terminal = Console(width=50, force_terminal=True, record=True)  # a narrow one: cells fold
    terminal.print(series_table(read_analyses(files["series"])), crop=False)
    text = terminal.export_text()
    # Below the title and above the caption: every row still has its last column.
    rows = text.split("└")[0].splitlines()[1:]
    assert "…" not in text and all(row.rstrip()[-1] in "┃│┓┩┫┤┐┘" for row in rows), text


def test_one_analysis_tables_fold_numbers_rather_than_cut_them(full):  # noqa: F811
    """At 40 columns the eigenvalue and alignment tables cut their numbers ("1.804…", "2.62e…"),
    each then read as another; the series tables already folded theirs."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table

    d = json.loads(json.dumps(analysis_to_dict(full)))
    terminal = Console(width=40, force_terminal=True, record=True)
    terminal.print(analysis_table(d), crop=False)
    text = terminal.export_text()
    assert "Eigenvalues" in text and "SAM alignment" in text
    assert "…" not in text, text


def test_the_eigen_panel_draws_what_the_criterion_compares_with_tol(full):  # noqa: F811
    d = json.loads(json.dumps(analysis_to_dict(full)))
    d["eigen"]["criterion"] = "eigenvalue"
    twin = spectra_figure([d]).axes[-1]
    assert "eigenvalue error" in twin.get_ylabel()
    plotted = [line for line in twin.get_lines() if line.get_label() == "error bound"]
    errors = np.array(d["eigen"]["errors"], dtype=float)
    np.testing.assert_allclose(plotted[0].get_ydata(), np.where(errors > 0, errors, np.nan))


def test_the_eigen_panel_has_no_legend_for_markers_it_did_not_draw(full):  # noqa: F811
    """A panel where no pair converged had a "converged" entry in its legend."""
    d = json.loads(json.dumps(analysis_to_dict(full)))
    d["eigen"]["converged"] = [False] * len(d["eigen"]["converged"])
    fig = spectra_figure([d])
    eigen_axes = next(
        ax for ax in fig.axes if ax.get_legend() is not None and "eigenvalue" in ax.get_ylabel()
    )
    labels = [t.get_text() for t in eigen_axes.get_legend().get_texts()]
    assert "converged" not in labels and "NOT converged" in labels


def test_the_density_panel_says_what_it_took_and_found(full):  # noqa: F811
    """Its title left out the eigenvalues the density took exactly (the table says them), and
    a file that records no `which` had "(None)" in its legend."""
    d = json.loads(json.dumps(analysis_to_dict(full)))
    del d["eigen"]["which"]
    density_axes = spectra_figure([d]).axes[0]
    assert (
        density_axes.get_title()
        == "Spectral density: SLQ, 3 probes × 10 steps beside 3 eigenvalues"
    )
    labels = [t.get_text() for t in density_axes.get_legend().get_texts()]
    assert labels == ["smoothed ESD", "the 3 eigenvalues found"]


def test_the_density_legend_names_the_eigenvalues_where_the_first_is_missing(full):  # noqa: F811
    """The entry was set on the first eigenvalue only: where it was not finite (stored as
    missing), the legend lost its entry though two of their lines were drawn; then it said
    "the 3 eigenvalues found" of the two lines."""
    d = json.loads(json.dumps(analysis_to_dict(full)))
    d["eigen"]["eigenvalues"][0] = None
    density_axes = spectra_figure([d]).axes[0]
    labels = [t.get_text() for t in density_axes.get_legend().get_texts()]
    said = f"the 2 eigenvalues found ({d['eigen']['which']}; 1 more NaN)"
    assert labels == ["smoothed ESD", said]
    assert len([line for line in density_axes.get_lines() if line.get_linestyle() == "--"]) == 2


@pytest.mark.parametrize(
    ("fmt", "said"),
    [
        (np.array([1, 2]), "is an HDF5 file but not one written by hessian-cli."),
        (3, "is an HDF5 file but not one written by hessian-cli."),
        (np.bytes_(b"\xffab"), "is a '\\\\xffab' file, which hessian-cli cannot show."),
    ],
)
def test_a_format_attribute_that_is_no_name_is_refused_in_one_sentence(capsys, tmp_path, fmt, said):
    """An array was "a '[1 2]' file"; bytes that are not UTF-8 crashed (UnicodeDecodeError)."""
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = fmt
    code, _, err = run(capsys, "show", path)
    assert code == 2
    assert one_sentence(err) == f"error: {path} {said}"


def test_small_things_show_and_plot_refuse_clearly(capsys, files, tmp_path):
    metrics = json.loads(runner.invoke(app, ["show", str(files["metrics"]), "--json"]).stdout)
    assert metrics["steps"]["step"][:3] == [0, 1, 2]  # whole numbers stay whole
    nan_density = tmp_path / "nan.h5"
    nan_density.write_bytes(files["single"].read_bytes())
    with h5py.File(nan_density, "r+") as f:
        group = next(iter(f["checkpoints"].values()))
        group["density/values"][...] = np.nan  # how non-finite values are stored
    assert runner.invoke(app, ["show", str(nan_density)]).exit_code == 0
    code, _, err = run(capsys, "plot", files["single"], "-o", tmp_path / "f.pgf")  # needs LaTeX
    assert code == 2 and "cannot write a 'pgf'" in one_sentence(err)


def test_under_torchrun_one_rank_shows_and_draws(files, tmp_path, monkeypatch):
    """Every rank printed the whole report, and wrote the same figure at once."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shown = runner.invoke(app, ["show", str(files["series"])])
    drawn = runner.invoke(app, ["plot", str(files["series"]), "-o", str(tmp_path / "f.png")])
    assert shown.exit_code == drawn.exit_code == 0
    assert shown.output == drawn.output == ""
    assert not (tmp_path / "f.png").exists()
    monkeypatch.setenv("RANK", "0")
    drawn = runner.invoke(app, ["plot", str(files["series"]), "-o", str(tmp_path / "f.png")])
    assert drawn.exit_code == 0 and (tmp_path / "f.png").exists()


def test_the_warning_of_a_space_that_could_not_grow_does_not_ask_for_more_hvps():
    """A float32 solve of 42 parameters at tol 1e-9 took the whole space (stop reason
    "exhausted", its floor 1.5e-7 above tol) and was told to raise --max-hvps: with 1000 it
    stopped at the same 72 products, told the same."""
    from hessian_cli.presentation.tables import unconverged_warning

    reports = [{"name": "c", "eigen": {"converged": [False] * 3, "stop_reason": "exhausted"}}]
    for accepted in (False, True):
        warning = unconverged_warning(
            reports, tol=1e-9, precision="full", dtype="float32", budget_accepted=accepted
        )
        assert warning is not None and "--max-hvps" not in warning
        assert warning.endswith(
            "the Krylov space could not grow, so the products' rounding noise is above the "
            "tolerance: loosen --tol or use --dtype float64."
        )


def test_show_says_which_curvature_rows_met_their_tolerance(tmp_path):
    """The rows' residuals were shown with nothing to read them against; those above tol were
    said to have stopped at their HVP budget, which the file does not record (a track ended at
    0.036 for 1e-3 after 84 of its 200 HVPs, its residual stalled)."""
    from hessian_cli.storage.metrics import MetricsLog

    path = tmp_path / "metrics.h5"
    # A library's own tolerance is said as it is: 2.5e-3 read "tol 2e-03".
    log = MetricsLog(path, {"model": "mlp"}, tolerances={"refresh": 1e-2, "track": 2.5e-3})
    for step, residual in ((0, 5e-3), (5, 2e-2), (10, 9e-3)):
        log.append("refresh", step=step, eigenvalue=1.0, residual=residual, alignment=0.5, hvps=6)
    log.append("track", step=0, lambda_max=1.0, residual=1e-4, hvps=12)
    log.flush()
    out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
    assert (
        "converged (residual <= tol 0.01): 2 of 3; the other ended above it (its HVP budget "
        "spent, or the residual stopped improving)" in out
    )
    assert "converged (residual <= tol 0.0025): 1 of 1" in out
    log.append("refresh", step=15, eigenvalue=1.0, residual=3e-2, alignment=0.5, hvps=6)
    log.flush()
    out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
    assert (
        "converged (residual <= tol 0.01): 2 of 4; the others ended above it (their HVP budget "
        "spent, or the residual stopped improving)" in out
    )


def test_show_json_gives_the_tolerance_of_the_residuals(tmp_path):
    """`show --json` gave the residuals without the tol they were solved to, which the table
    counts them against: a reader could not tell which rows converged."""
    from hessian_cli.storage.metrics import MetricsLog

    path = tmp_path / "metrics.h5"
    log = MetricsLog(path, {"model": "mlp"}, tolerances={"refresh": 1e-2, "track": 2.5e-3})
    log.append("steps", step=0, loss=1.0, accuracy=0.5, lr=0.1)
    log.append("refresh", step=0, eigenvalue=1.0, residual=5e-3, alignment=0.5, hvps=6)
    log.append("track", step=0, lambda_max=1.0, residual=1e-4, hvps=12)
    log.flush()
    data = json.loads(runner.invoke(app, ["show", str(path), "--json"]).stdout)
    assert (data["refresh"]["tol"], data["track"]["tol"]) == (1e-2, 2.5e-3)
    assert data["refresh"]["residual"] == [5e-3] and "tol" not in data["steps"]
    with h5py.File(path, "r+") as f:  # as written before 2026-11-30
        del f["refresh"].attrs["tol"]
    data = json.loads(runner.invoke(app, ["show", str(path), "--json"]).stdout)
    assert data["refresh"]["tol"] is None and data["track"]["tol"] == 2.5e-3


def test_a_zero_top_eigenvalue_is_not_said_to_have_spent_its_budget(tmp_path):
    """A row whose top eigenvalue is 0 has an infinite residual (none relative to 0): show
    counted it as stopped at the HVP budget, and plot marked it NOT converged."""
    from hessian_cli.presentation.plots import metrics_figure
    from hessian_cli.storage.metrics import MetricsLog

    path = tmp_path / "metrics.h5"
    log = MetricsLog(path, {"model": "mlp"}, tolerances={"refresh": 1e-2})
    rows = ((0, 1.0, 5e-3), (5, 0.0, np.inf), (10, 1.0, 2e-2))
    for step, eigenvalue, residual in rows:
        log.append(
            "refresh", step=step, eigenvalue=eigenvalue, residual=residual, alignment=0.5, hvps=6
        )
    log.flush()
    out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
    assert (
        "converged (residual <= tol 0.01): 1 of 3; 1 found a top eigenvalue of 0 (no residual "
        "relative to it); 1 ended above it (its HVP budget spent, or the residual stopped "
        "improving)" in out
    )
    steps, eigenvalues, residuals = (np.array(c) for c in zip(*rows, strict=True))
    refresh = {"step": steps, "eigenvalue": eigenvalues, "residual": residuals}
    ax = metrics_figure({"refresh": refresh}, {"refresh": 1e-2}).axes[0]
    (red,) = [line for line in ax.get_lines() if line.get_color() == "C3"]
    assert red.get_xdata().tolist() == [10]


def test_show_s_per_step_loss_passes_over_steps_without_labels(tmp_path):
    """A step whose minibatch held no label records a NaN loss: "per-step loss: first nan"."""
    from hessian_cli.storage.metrics import MetricsLog

    path = tmp_path / "metrics.h5"
    log = MetricsLog(path, {"model": "mlp"})
    for step, loss in enumerate((np.nan, 2.5, 2.25, np.nan)):
        log.append("steps", step=step, loss=loss, accuracy=0.5, lr=0.1)
    log.flush()
    out = " ".join(runner.invoke(app, ["show", str(path)]).output.split())
    assert "per-step loss: first 2.5, last 2.25" in out


def test_the_legend_of_several_runs_names_their_densities_line_styles():
    """The densities panel draws each run's densities in a line style of its own, but the
    figure's legend showed only the runs' markers: which curves were which run's was said
    nowhere. Its entries now carry the line styles, where densities are drawn."""
    density = {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0, 0.1]}
    eigen = {"which": "largest", "eigenvalues": [2.0], "converged": [1]}
    ds = [
        {
            "name": name,
            "provenance": {"model": "mlp", "num_params": 330, "params_glob": glob, "step": step},
            "eigen": eigen,
            "density": density,
        }
        for name, glob, step in (("a", "3.*", 1), ("b", "1.*", 1), ("c", "3.*", 2))
    ]
    fig = spectra_figure(ds)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("Spectral densities"))
    drawn = {line.get_linestyle() for line in panel.get_lines()}
    legend = {h.get_label(): h.get_linestyle() for h in fig.legends[0].legend_handles}
    assert len(drawn) == 2 and set(legend.values()) == drawn
    assert legend["mlp [1.*] (330)"] == panel.get_lines()[-1].get_linestyle()  # b's, drawn last
    no_density = [{k: v for k, v in d.items() if k != "density"} for d in ds]
    kept = {h.get_linestyle() for h in spectra_figure(no_density).legends[0].legend_handles}
    assert kept == {"None"}  # markers alone, as before


def test_one_product_is_one_hvp():
    """The cost, eigenvalue and density lines said "1 HVPs"."""
    from rich.console import Console

    from hessian_cli.presentation.tables import analysis_table, cost_line

    assert cost_line({"hvps": 1}) == "cost: 1 HVP"
    assert cost_line({"hvps": 2}) == "cost: 2 HVPs"
    eigen = {"eigenvalues": [1.0], "residuals": [0.0], "converged": [True], "hvps": 1}
    eigen |= {"iterations": 1, "seconds": 0.01, "which": "largest", "method": "whole-space"}
    dn = {"nodes": [[1.0]], "weights": [[1.0]], "grid": [1.0], "values": [1.0], "hvps": 1}
    dn |= {"num_probes": 1, "steps": 1, "known_eigenpairs": 0, "sigma": 0.01, "seconds": 0.01}
    console = Console(width=300, record=True)
    console.print(analysis_table({"name": "c", "provenance": {}, "eigen": eigen, "density": dn}))
    text = console.export_text()
    assert "1 HVPs" not in text and text.count("1 HVP, 0.01 s") == 2, text


def test_one_analysis_says_what_tells_it_from_the_others_of_its_checkpoint(full, tmp_path):  # noqa: F811
    """show -c of one checkpoint analysed at --seed 0 and --seed 1 showed two tables that read
    alike but for their numbers: neither said its seed (nor --bn), which the series table's
    column did; each now says the settings that tell it apart, and a lone analysis none."""
    path = tmp_path / "seeds.h5"
    for seed in (0, 1):
        seeded = dataclasses.replace(full, provenance={**full.provenance, "seed": seed})
        write_analyses(path, [seeded], command_line=f"analyze --seed {seed}")
    write_analyses(path, [variant(full, "other", 7)], command_line="another checkpoint")
    held = json.loads(runner.invoke(app, ["show", str(path), "--json"]).stdout)
    said = {}
    for d in held:
        shown = runner.invoke(app, ["show", str(path), "-c", d["group"]], terminal_width=300)
        lines = [line for line in shown.stdout.splitlines() if "told from" in line]
        said[d["provenance"].get("seed")] = [line.split(": ")[-1] for line in lines]
    assert said == {0: ["seed=0"], 1: ["seed=1"], None: []}


def test_a_name_it_does_not_hold_lists_the_groups_where_names_repeat(full, tmp_path):  # noqa: F811
    """-c of a name the file does not hold listed 'it holds: final', where the table's rows
    and what -c takes were final and final-2 (final analysed twice)."""
    path = tmp_path / "twice.h5"
    for scale in (1.0, 2.0):
        write_analyses(path, [variant(full, "final", 1, scale)], command_line="analyze")
    none = runner.invoke(app, ["show", str(path), "-c", "last"])
    assert "holds no checkpoint named 'last'; it holds: final, final-2." in str(none.exception)


def test_one_analysis_s_figure_says_what_tells_it_from_the_others_of_its_checkpoint(full, tmp_path):  # noqa: F811
    """plot -c of one checkpoint analysed at --seed 0 and --seed 1 titled both figures with the
    name alone; each title now says its seed, and a lone analysis' its name alone."""
    path = tmp_path / "seeds.h5"
    for seed in (0, 1):
        seeded = dataclasses.replace(full, provenance={**full.provenance, "seed": seed})
        write_analyses(path, [seeded], command_line=f"analyze --seed {seed}")
    held = read_analyses(path)
    titles = [spectra_figure([d], held).get_suptitle().splitlines()[0] for d in held]
    assert titles == [f"run/ckpt_100.pt (seed={seed})" for seed in (0, 1)]
    lone = spectra_figure(held[:1], held[:1]).get_suptitle().splitlines()[0]
    assert lone == "run/ckpt_100.pt"
    out = tmp_path / "one.svg"
    result = runner.invoke(app, ["plot", str(path), "-c", "run_ckpt_100.pt-2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(seed=1)" in out.read_text()


def test_one_checkpoint_analysed_twice_is_drawn_as_one_checkpoint():
    """`analyze final.pt --top-k 2`, then `--top-k 0 --trace` into one file: plot drew a
    "series" of one step (eigenvalues and a trace as points at step 168); it draws the
    checkpoint as its one analysis would be, and a panel per analysis where several hold
    eigenvalues or a density, each titled with what tells it from the others."""
    prov = {"model": "mlp", "num_params": 2410, "step": 168, "sha256": "ab" * 32, "seed": 0}
    eigen = {
        "which": "largest",
        "eigenvalues": [2.0, 1.0],
        "residuals": [1e-6, 1e-6],
        "converged": [1, 1],
    }
    pairs = {"name": "final", "provenance": prov, "eigen": eigen}
    trace = {"name": "final-2", "provenance": prov, "trace": {"estimate": 19.3, "stderr": 0.2}}
    fig = spectra_figure([pairs, trace], [pairs, trace])
    assert fig.get_suptitle() == "final\nHessian trace 19.3 ± 0.2 (final-2)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["λ1", "λ2"]
    again = {**pairs, "name": "final-3", "provenance": prov | {"seed": 1}}
    fig = spectra_figure([pairs, trace, again], [pairs, trace, again])
    title = "final and final-3: analyses of one checkpoint"
    assert fig.get_suptitle() == f"{title}\nHessian trace 19.3 ± 0.2 (final-2)"
    titles = [ax.get_title().split("\n")[-1] for ax in fig.axes if ax.get_title()]
    assert titles == ["final (seed=0)", "final-3 (seed=1)"]


def test_a_series_traces_join_the_run_of_eigenpairs_they_share_most_with_and_say_so():
    """A series analysed with --top-k 2 at steps 4 and 8, again with --top-k 3 at steps 4, 8
    and 12, then with --top-k 0 --trace at all three: the traces joined the first run found
    (top_k=2, which lacks step 12), and the legend did not say where they went. They join the
    run holding most of their checkpoints (the latest on a tie), whose entry says so."""
    prov = {"model": "mlp", "num_params": 2410, "tol": 1e-4, "checkpoint": "run/c.pt"}

    def analysis(step: int, top_k: int) -> dict:
        eigen = {"which": "largest", "eigenvalues": [2.0, 1.0, 0.5][:top_k], "converged": [1] * 3}
        trace = {"estimate": 16.0 + step / 4, "stderr": 1.0}
        return {
            "name": f"c{step}",
            "provenance": prov | {"step": step, "sha256": f"{step:064x}"},
            "eigen": eigen if top_k else None,
            "trace": None if top_k else trace,
        }

    # In series order: by step, then as written (top_k 2, 3, then 0).
    ds = [analysis(s, k) for s in (4, 8, 12) for k in (2, 3, 0) if (s, k) != (12, 2)]
    fig = spectra_figure(ds)
    named = {h.get_marker(): h.get_label() for h in fig.legends[0].legend_handles}
    assert named == {
        "o": "mlp (2,410), top_k=2",
        "s": "mlp (2,410), top_k=3, with the top_k=0 analyses",
    }
    (trace,) = [ln for ln in fig.axes[1].lines if len(ln.get_xdata()) and ln.get_marker() != "_"]
    assert trace.get_marker() == "s" and trace.get_xdata().tolist() == [4, 8, 12]
    tied = [d for d in ds if d["name"] != "c12"]  # the latest: top_k=3
    named = [h.get_label() for h in spectra_figure(tied).legends[0].legend_handles]
    assert named == ["mlp (2,410), top_k=2", "mlp (2,410), top_k=3, with the top_k=0 analyses"]


def test_analyses_of_one_checkpoint_in_a_file_that_records_no_sha256_are_of_one_checkpoint(
    full,  # noqa: F811
    tmp_path,
):
    """A script's file (write_analyses of its own provenance, no sha256) of final.pt analysed
    at --seed 0 and 1: show read "2 checkpoints", its -c tables did not say their seeds, and
    plot drew two runs of one point. Its path, step and epoch now name the checkpoint."""
    prov = {k: v for k, v in full.provenance.items() if k != "sha256"}
    seeds = [dataclasses.replace(full, provenance=prov | {"seed": s}) for s in (0, 1)]
    path = tmp_path / "script.h5"
    write_analyses(path, seeds, command_line="my_script.py")
    result = runner.invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 analyses of 1 checkpoint" in result.output
    result = runner.invoke(app, ["show", str(path), "-c", "run_ckpt_100.pt-2"])
    assert "told from the file's other analyses of this checkpoint by: seed=1" in result.output
    ds = read_analyses(path)
    fig = spectra_figure(ds, ds)
    assert fig.get_suptitle().splitlines()[0].endswith(": analyses of one checkpoint")
    moved = [{**d, "provenance": d["provenance"] | {"step": 200}} for d in ds[1:]]
    assert analyses_of_checkpoints(ds[:1] + moved) == "2 checkpoints"  # another step: another


def test_under_batch_statistics_another_batch_size_is_another_analysis():
    """A BatchNorm model's series analysed with --bn train at --batch-size 4 and again at 12
    (--num-samples 12 both): by each batch's statistics the matrices differ (λ1 1.221 and
    1.157 for the small CNN), yet the two were drawn as one run, two points at each step, and
    `show` gave rows of one step that differed with no word of why. By running statistics
    (--bn eval) the batching changes nothing, and is no setting."""

    def analysis(step: int, batch_size: int, top: float, bn: str = "train") -> dict:
        prov = {"model": "cnn", "num_params": 140, "step": step, "sha256": f"{step:064x}"}
        prov |= {"bn": bn, "batch_size": batch_size, "num_samples": 12}
        return {
            "name": f"c{step}",
            "provenance": prov,
            "eigen": {"which": "largest", "eigenvalues": [top], "converged": [1]},
        }

    ds = [analysis(s, b, t) for s in (4, 8) for b, t in ((4, 1.221), (12, 1.157))]
    table = series_table(ds)
    assert str(table.columns[3].header) == "batch_size"
    assert list(table.columns[3].cells) == ["4", "12", "4", "12"]
    named = [h.get_label() for h in spectra_figure(ds).legends[0].legend_handles]
    assert named == ["cnn (140), batch_size=4", "cnn (140), batch_size=12"]
    held = [analysis(s, b, 1.0, "eval") for s in (4, 8) for b in (4, 12)]
    assert "batch_size" not in [str(c.header) for c in series_table(held).columns]


def test_the_minibatch_spread_says_the_batch_size_it_is_of(capsys, full, tmp_path):  # noqa: F811
    """One checkpoint analysed with --alignment at --batch-size 32 and 64 (--num-samples 128):
    the digits MLP's |<ĝ, v1>| minibatch mean ± std read 0.2275 ± 0.1807 and 0.2867 ± 0.1471
    in two tables otherwise alike, neither saying its batches' size."""
    path = tmp_path / "bs.h5"
    prov = full.provenance
    write_analyses(path, [dataclasses.replace(full, provenance=prov | {"batch_size": 32})])
    code, out, err = run(capsys, "show", str(path))
    assert code == 0, err
    assert "minibatch: over the first 2 batch gradients, 32 samples each" in " ".join(out.split())


def test_a_truncated_file_is_said_to_be_truncated(capsys, files, tmp_path):
    """A spectra file cut short (a copy that did not finish) read "unable to synchronously open
    file (truncated file: eof = 5000, sblock->base_addr = 0, stored_eof = ...)"."""
    whole = files["series"].read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole[:5000])
    for args in (["show", str(cut)], ["plot", str(cut), "-o", str(tmp_path / "f.png")]):
        code, _, err = run(capsys, *args)
        assert code != 0
        said = one_sentence(err, strict=True)
        assert said.endswith(
            f"it is truncated, 5,000 of its {len(whole):,} bytes (a copy, "
            "download or write cut short)."
        )
    assert not (tmp_path / "f.png").exists()


def test_plotting_a_trace_alone_says_show_prints_it(capsys, full, tmp_path):  # noqa: F811
    """`analyze final.pt --top-k 0 --trace --out t.h5`, then `plot t.h5`: "has no eigenvalues
    or density to plot" said nothing of the trace it holds."""
    path = tmp_path / "t.h5"
    write_analyses(path, [dataclasses.replace(full, eigen=None, density=None, alignment=None)])
    code, _, err = run(capsys, "plot", str(path), "-o", str(tmp_path / "t.png"))
    assert code != 0
    assert one_sentence(err).endswith(
        "has no eigenvalues or density to plot; show prints the trace it holds."
    )


def test_blocks_of_one_checkpoints_hessian_are_titled_with_their_parameters():
    """One checkpoint analysed with --params '0.*' and again with --params '2.*': the panel
    of each was titled with its row's name alone, not the block of the Hessian it is of."""
    eigen = {"which": "largest", "eigenvalues": [2.0], "residuals": [1e-6], "converged": [1]}
    prov = {"model": "mlp", "num_params": 330, "step": 168, "sha256": "ab" * 32}
    ds = [
        {"name": name, "provenance": prov | {"params_glob": glob}, "eigen": eigen}
        for name, glob in (("m", "0.*"), ("m-2", "2.*"))
    ]
    titles = [
        ax.get_title().split("\n")[-1] for ax in spectra_figure(ds, ds).axes if ax.get_title()
    ]
    assert titles == ["m (mlp [0.*] (330))", "m-2 (mlp [2.*] (330))"]


def test_a_directory_of_results_names_them(capsys, files, tmp_path):
    """`show results/` of a directory of `analyze --out` files was told to analyse it as
    checkpoints ("hessian-cli analyze results --out FILE.h5"); it names the files to give."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("b.h5", "a.h5"):
        shutil.copy(files["series"], results / name)
    (results / "other.h5").write_bytes(b"")  # not a result file: not named
    for verb, extra in (("show", []), ("plot", ["-o", str(tmp_path / "x.png")])):
        code, _, err = run(capsys, verb, results, *extra)
        assert code == 2
        assert one_sentence(err, strict=True).endswith(
            f"{verb} reads one file, such as {results / 'a.h5'} (its result files: a.h5, b.h5)."
        )


def test_traces_alone_of_one_checkpoint_at_two_seeds_are_not_a_series(capsys, full, tmp_path):  # noqa: F811
    """`analyze final.pt --top-k 0 --trace --seed 0`, then `--seed 1`, into one file: plot drew
    a "series" of two runs at one step ("2 runs", a step axis); as for one such analysis, it
    says there is nothing to draw and that show prints the traces."""
    path = tmp_path / "t.h5"
    for seed in (0, 1):
        prov = full.provenance | {"seed": seed}
        bare = dataclasses.replace(full, eigen=None, density=None, alignment=None, provenance=prov)
        write_analyses(path, [bare])
    code, _, err = run(capsys, "plot", str(path), "-o", str(tmp_path / "t.png"))
    assert code != 0
    assert one_sentence(err).endswith(
        "no eigenvalues or density to plot in its analyses run_ckpt_100.pt and "
        "run_ckpt_100.pt-2; show prints the traces they hold."
    )
    assert not (tmp_path / "t.png").exists()


def test_a_dash_for_the_file_says_standard_input_is_not_read(capsys, files, tmp_path):
    """`show -` (standard input's usual name, `cat s.h5 | hessian-cli show -`) said "The file -
    does not exist."; it says the file is given by its path."""
    for verb, extra in (("show", []), ("plot", ["-o", str(tmp_path / "x.png")])):
        code, _, err = run(capsys, verb, "-", *extra)
        assert code == 2
        assert one_sentence(err, strict=True).endswith(
            "FILE - names standard input, which hessian-cli does not read: give a path, such "
            "as spectra.h5 (./- for a file named -)."
        )


def test_a_density_marks_the_eigenvalues_another_analysis_of_its_matrix_found():
    """`analyze final.pt --top-k 3`, then `--top-k 0 --density` into one file: the density
    panel drew none of the eigenvalues the file holds for that checkpoint. They are marked,
    said to be the other analysis', and only where that is of the same matrix (data, samples,
    loss, BatchNorm mode, parameters)."""
    prov = {"model": "mlp", "num_params": 2410, "step": 168, "sha256": "ab" * 32}
    prov |= {"data": "digits", "num_samples": 128, "loss": "ce", "bn": "eval"}
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.5, 1.0], "converged": [1, 1, 0]}
    eigen |= {"residuals": [1e-6, 1e-6, 1e-2]}
    grid = np.linspace(-1.0, 3.0, 50).tolist()
    density = {"grid": grid, "values": [1.0] * 50, "num_probes": 8, "steps": 20}
    pairs = {"name": "final", "provenance": prov | {"seed": 0}, "eigen": eigen}
    esd = {"name": "final-2", "provenance": prov | {"seed": 1}, "density": density}

    def marked(ds: list[dict]) -> tuple[list[float], str | None]:
        fig = spectra_figure(ds, ds)
        (ax,) = [ax for ax in fig.axes if ax.get_ylabel() == "density (log scale)"]
        lines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        labels = [ln.get_label() for ln in lines if not ln.get_label().startswith("_")]
        return [ln.get_xdata()[0] for ln in lines], labels[0] if labels else None

    values, label = marked([pairs, esd])
    assert values == [2.0, 1.5, 1.0]
    assert label == "the 3 eigenvalues found (largest) by final"
    other = {**esd, "provenance": esd["provenance"] | {"num_samples": 256}}
    assert marked([pairs, other]) == ([], None)  # another matrix: none
    assert marked([esd]) == ([], None)  # the file holds none


def test_the_minibatch_caption_says_the_last_batch_where_the_data_ran_out(capsys, tmp_path):
    """`analyze digits_mlp.pt --alignment --batch-size 1000`: the digits' training split ends
    inside the second minibatch, yet the caption said "1,000 samples each"; it says the last's."""
    from hessian_cli.specs.data import load_data

    held = len(load_data("digits").train)
    example = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    path = tmp_path / "a.h5"
    flags = ("--top-k", "1", "--alignment", "--batch-size", "1000", "-q", "--out", str(path))
    code, _, err = run(capsys, "analyze", example, *flags)
    assert code == 0, err
    report = read_analyses(path)[0]
    assert report["provenance"]["minibatch_samples"] == held
    code, out, err = run(capsys, "show", str(path))
    assert code == 0, err
    said = " ".join(out.split())
    assert (
        "over the first 2 batch gradients, 1,000 samples each but the last, "
        f"{held - 1000:,} (where the data ends)" in said
    )


def test_a_density_names_the_analysis_its_eigenvalues_are_from_as_the_table_does(full, tmp_path):  # noqa: F811
    """One checkpoint analysed with --top-k 0 --density, then with --top-k 3 (groups final and
    final-2, one name): plot -c of the density said its eigenvalues were found by the name
    both share, not by the row final-2 that holds them."""
    path = tmp_path / "two.h5"
    write_analyses(path, [dataclasses.replace(full, eigen=None, alignment=None)])
    write_analyses(path, [dataclasses.replace(full, density=None, alignment=None)])
    out = tmp_path / "one.svg"
    result = runner.invoke(app, ["plot", str(path), "-c", "run_ckpt_100.pt", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "found (largest) by run_ckpt_100.pt-2" in out.read_text()


def test_the_training_bar_shows_a_step_without_a_loss_as_the_tables_do():
    """A minibatch of padding alone (every label -100) makes no update and has no loss: the
    progress bar read "loss nan" where the epoch lines and `show` have a dash."""
    from io import StringIO
    from types import SimpleNamespace

    from rich.console import Console
    from rich.progress import Progress

    from eigensam.events import StepDone
    from hessian_cli.presentation import DASH
    from hessian_cli.presentation.training import TrainingDisplay

    console = Console(file=StringIO(), force_terminal=True)
    display = TrainingDisplay(console, SimpleNamespace(epochs=2), False, resuming=False)
    display.progress = Progress(console=console)
    display.task = display.progress.add_task("", total=4, stats="")
    nan = float("nan")
    display(
        StepDone(step=1, epoch=1, loss=nan, accuracy=nan, lr=0.1, lambda_max=2.5, eigenvalue=None)
    )
    assert display.progress.tasks[0].fields["stats"] == f"loss {DASH}  λmax 2.5"


def test_a_single_checkpoint_figure_says_its_trace_and_alignment(full):  # noqa: F811
    """`analyze CKPT --trace --alignment --out a.h5; plot a.h5` drew the ESD and eigenvalues,
    and no trace or alignment anywhere: they are lines under the title, each value named by its
    analysis where several are of the checkpoint (one analysed again with --top-k 0 --trace
    draws no panel of its own)."""
    t, al = full.trace, full.alignment
    trace = f"{t.estimate:.5g} ± {t.stderr:.2g}"
    aligned = f"|<ĝ, v1>| {al.alignment[0]:.3f}, ||Vᵀĝ|| {al.subspace_alignment:.3f}"
    title = spectra_figure([analysis_to_dict(full)]).get_suptitle().splitlines()
    assert title == [full.name, f"Hessian trace {trace}", f"SAM alignment {aligned}"]
    again = dataclasses.replace(
        full,
        name="again",
        eigen=None,
        density=None,
        alignment=None,
        trace=dataclasses.replace(t, estimate=2 * t.estimate),
    )
    ds = [analysis_to_dict(a) for a in (full, again)]
    assert spectra_figure(ds, ds).get_suptitle().splitlines()[1:] == [
        f"Hessian trace {trace} ({full.name}); {2 * t.estimate:.5g} ± {t.stderr:.2g} (again)",
        f"SAM alignment {aligned} ({full.name})",
    ]
    neither = dataclasses.replace(full, trace=None, alignment=None)
    assert spectra_figure([analysis_to_dict(neither)]).get_suptitle() == full.name


def test_a_figure_name_that_cannot_be_written_is_refused_before_the_file_is_read(
    capsys, files, tmp_path, monkeypatch
):
    """`plot big.h5 -o fig.weird` (or -o a directory, or over an HDF5 file) read the file and
    drew the figure, then refused the name."""

    def not_read(*_: object) -> None:
        raise AssertionError("read before the figure's name was checked")

    monkeypatch.setattr("hessian_cli.cli.plot.read_result_file", not_read)
    spectra_copy = tmp_path / "spectra.png"  # an HDF5 file under a figure's name
    spectra_copy.write_bytes(files["single"].read_bytes())
    for name, said in (
        (tmp_path / "fig.weird", "cannot write a 'weird' figure"),
        (tmp_path, "is a directory"),
        (spectra_copy, "refusing to overwrite it"),
    ):
        code, _, err = run(capsys, "plot", files["single"], "-o", name)
        assert code == 2 and said in one_sentence(err)


def test_a_figure_named_by_its_suffix_alone_is_refused(capsys, files, tmp_path):
    """`plot a.h5 -o $NAME.png`, NAME unset: a hidden file .png.png was written (a PDF .pdf.png);
    a hidden name that is no format's, or a name ending in one, is still a figure's."""
    for name in (".png", ".PDF", ".svg"):
        code, _, err = run(capsys, "plot", files["single"], "-o", tmp_path / name)
        assert code == 2 and "is a format's suffix alone" in one_sentence(err)
        assert f"such as fig{name}." in one_sentence(err) and not list(tmp_path.iterdir())
    for kept, written in ((".fig", ".fig.png"), ("xpng", "xpng.png")):
        code, out, err = run(capsys, "plot", files["single"], "-o", tmp_path / kept)
        assert code == 0 and out == f"wrote {tmp_path / written}\n", err


def test_runs_in_directories_of_long_names_are_told_apart_in_a_legend_that_fits():
    """Two runs in directories of 190-letter names that end apart (…seed0_A, …seed0_B): their
    one-column legend was 1,735 pixels wide in 640, both ends cut off, and with them what tells
    the runs apart. Each label is cut in the middle instead, and the legend fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    long = "experiment_resnet20_cifar10_lr0.1_wd5e-4_rho0.05_$alpha$0.2_seed0_" * 3
    ds = [
        {
            "name": f"step{step}",
            "provenance": {
                "model": "mlp",
                "num_params": 2410,
                "step": step,
                "sha256": f"{end}{step:063x}",
                "checkpoint": f"/runs/{long}{end}/checkpoints/step{step}.pt",
            },
            "eigen": {"which": "largest", "eigenvalues": [2.0], "converged": [True]},
        }
        for end in "AB"
        for step in (10, 20)
    ]
    fig = spectra_figure(ds)
    (legend,) = fig.legends
    box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    for text, end in zip(legend.get_texts(), "AB", strict=True):
        head, tail = text.get_text().replace(r"\$", "$").split("…")
        assert head.startswith(f"mlp (2,410) in {long[:10]}") and len(head) > 20
        assert tail.endswith(f"{long[-20:]}{end}/checkpoints")


def test_a_series_of_more_than_ten_eigenvalues_draws_each_in_its_own_colour():
    """--top-k 12 over a series: the colour cycle repeats after ten, so λ11 and λ12 were drawn
    in λ1's and λ2's colours, which the legend could not tell apart."""
    from matplotlib.colors import to_hex

    ds = [
        {
            "name": f"step{step}",
            "provenance": {"model": "mlp", "num_params": 2410, "step": step},
            "eigen": {
                "which": "largest",
                "eigenvalues": [*range(12, 0, -1)],
                "converged": [1] * 12,
            },
        }
        for step in (10, 20)
    ]
    lines = [ln for ln in spectra_figure(ds).axes[0].get_lines() if ln.get_label()[0] == "λ"]
    assert [ln.get_label() for ln in lines] == [f"λ{i}" for i in range(1, 13)]
    assert len({to_hex(ln.get_color()) for ln in lines}) == 12


def test_a_link_to_a_folder_yet_to_be_made_is_written_through_as_analyze_does(
    capsys, files, tmp_path
):
    """figs -> /scratch/figs, wiped: `analyze --out figs/s.h5` made the folder and wrote there,
    `plot -o figs/fig.png` drew the figure, then said "could not create the output directory
    figs: file exists". A link to a place under a file is refused before the drawing."""
    (tmp_path / "figs").symlink_to(tmp_path / "scratch" / "figs")
    code, out, err = run(capsys, "plot", files["single"], "-o", tmp_path / "figs" / "fig.png")
    assert code == 0 and out == f"wrote {tmp_path / 'figs' / 'fig.png'}\n", err
    assert_png(tmp_path / "scratch" / "figs" / "fig.png")
    (tmp_path / "notes").write_text("my notes")
    (tmp_path / "under").symlink_to(tmp_path / "notes" / "figs")
    code, _, err = run(capsys, "plot", files["single"], "-o", tmp_path / "under" / "fig.png")
    assert code == 2 and f"lies under {tmp_path / 'notes'}, which is not a" in one_sentence(err)


def test_a_figure_that_cannot_be_written_where_named_is_refused_before_the_file_is_read(
    capsys, files, tmp_path, monkeypatch
):
    """A read-only figure to replace (or a link to one), or a directory that takes no new
    file, was refused only once the file was read and the figure drawn. Standard output is
    not probed: it is written to as it is."""

    def not_read(*_: object) -> None:
        raise AssertionError("read before the figure's place was checked")

    monkeypatch.setattr("hessian_cli.cli.plot.read_result_file", not_read)
    kept = tmp_path / "kept.png"
    kept.write_bytes(PNG)
    kept.chmod(0o444)
    (tmp_path / "latest").symlink_to(kept)
    refused = [(kept, f"{kept} is read-only"), (tmp_path / "latest", "is read-only")]
    if Path("/proc/self").is_dir():
        refused.append((Path("/proc/fig.png"), "directory /proc: it takes no new files"))
    for name, said in refused:
        code, _, err = run(capsys, "plot", files["single"], "-o", name)
        assert code == 2 and said in one_sentence(err)
    assert kept.read_bytes() == PNG


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_a_checkpoint_of_many_eigenvalues_labels_a_readable_few(which):
    """--top-k 50: fifty labels, λ1 to λ50, ran into one another under the axis. About a dozen
    are labelled, each end's first (λ1, λn) among them, each under its own eigenvalue."""
    k = 50
    values = list(np.linspace(10, 1, k))
    d = {
        "name": "final",
        "provenance": {"model": "mlp", "num_params": 2410},
        "eigen": {
            "which": which,
            "eigenvalues": values,
            "residuals": [0.0] * k,
            "converged": [1] * k,
        },
    }
    ax = spectra_figure([d]).axes[0]
    ticks = {t.get_text(): t.get_position()[0] for t in ax.get_xticklabels()}
    assert 5 <= len(ticks) <= 12
    ends = {"largest": {"λ1"}, "smallest": {"λn"}, "both": {"λ1", "λn"}}[which]
    assert ends <= ticks.keys()
    # Each label under its own eigenvalue: stored λ1 first, and the smallest λn first.
    smallest = values[k // 2 :] if which == "both" else values
    drawn = {x: y for line in ax.get_lines() for x, y in zip(*line.get_data(), strict=True)}
    for label, x in ticks.items():
        below = label.startswith("λn")
        stored = smallest[int(label[3:] or 0)] if below else values[int(label[1:]) - 1]
        assert drawn[x] == stored, label


def test_a_series_of_many_eigenvalues_says_which_is_which_in_a_colour_bar():
    """--top-k 50 over a series: a legend of fifty entries in two columns ran off the panel,
    over the trajectories. A colour bar says which colour is which eigenvalue, λ1 on top."""
    k = 50
    ds = [
        {
            "name": f"step{step}",
            "provenance": {"model": "mlp", "num_params": 2410, "step": step},
            "eigen": {
                "which": "largest",
                "eigenvalues": list(np.linspace(10, 1, k)),
                "converged": [1] * k,
            },
        }
        for step in (10, 20)
    ]
    fig = spectra_figure(ds)
    panel, bar = fig.axes
    assert panel.get_legend() is None
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert ticks[0] == "λ1" and 5 <= len(ticks) <= 12 and bar.yaxis_inverted()


def test_panels_of_analyses_of_a_long_named_checkpoint_are_titled_within_their_width():
    """One checkpoint of a 200-letter name analysed at --seed 0 and 1: each panel's title
    named its analysis in full, 1,900 pixels wide over panels of 500, so that the two ran over
    one another, unreadable. Each is cut in the middle, its seed kept."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    name = "experiment_resnet20_cifar10_lr0.1_wd5e-4_rho0.05_$alpha$0.2_" * 3 + "step=78200"
    prov = {"model": "mlp", "num_params": 2410, "step": 168, "sha256": "ab" * 32}
    eigen = {"which": "largest", "eigenvalues": [2.0, 1.0], "residuals": [0.0] * 2}
    eigen["converged"] = [True, True]
    ds = [
        {"name": f"{name}-{seed}", "provenance": prov | {"seed": seed}, "eigen": eigen}
        for seed in (0, 1)
    ]
    fig = spectra_figure(ds, ds)
    renderer = FigureCanvasAgg(fig).get_renderer()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 2
    for ax, seed in zip(titled, (0, 1), strict=True):
        assert ax.title.get_window_extent(renderer).width <= ax.bbox.width
        head, tail = ax.get_title().splitlines()[1].replace(r"\$", "$").split("…")
        assert name.startswith(head) and len(head) > 10
        assert tail.endswith(f"step=78200-{seed} (seed={seed})")


def test_a_runs_training_curves_are_titled_with_the_run(capsys, tmp_path, monkeypatch):
    """`plot run_a -o a.png; plot run_b -o b.png`: the training curves had no title, so that
    nothing in the figures told the two runs apart. Each is titled with its run directory and
    what its config says was trained, and how."""
    from hessian_cli.presentation import plots
    from hessian_cli.storage.metrics import MetricsLog, read_metrics_file

    monkeypatch.chdir(tmp_path)
    runs = {
        "run_a": {"model": "cnn", "data": "digits", "optimizer": "eigensam", "rho": 0.1},
        "run_b": {"model": "mlp", "data": "digits", "optimizer": "sgd", "base_optimizer": "adamw"},
    }
    for name, config in runs.items():
        Path(name).mkdir()
        log = MetricsLog(Path(name) / "metrics.h5", {**config, "alpha": 0.3})
        log.append("steps", step=0, loss=1.0, accuracy=0.5, lr=0.1)
        log.flush()
    drawn = []
    real = plots.metrics_figure
    monkeypatch.setattr(plots, "metrics_figure", lambda *a: drawn.append(real(*a)) or drawn[-1])
    code, _, err = run(capsys, "plot", "run_a", "-o", "a.png")
    assert code == 0, err
    assert drawn[0].get_suptitle() == "run_a: cnn on digits with eigensam (sgd, ρ=0.1, α=0.3)"
    info = read_metrics_file(Path("run_b") / "metrics.h5")[1]
    assert plots.run_title(Path("run_b") / "metrics.h5", info) == "run_b: mlp on digits with adamw"
    assert plots.run_title(Path("copy.h5"), {}) == "copy.h5"  # another tool's: no config


def test_a_series_of_one_run_is_titled_with_the_run():
    """`plot a.h5 -o a.png; plot b.h5 -o b.png` of two runs' series: nothing in either figure
    said which run it was of. It is titled with the run's model and checkpoint directory, as a
    legend of several runs names each; a file that records no model is not titled."""
    eigen = {"which": "largest", "eigenvalues": [2.0], "converged": [True]}
    prov = {"model": "cnn", "num_params": 1418, "checkpoint": "/runs/exp1/checkpoints/s.pt"}
    ds = [
        {"name": f"s{step}", "provenance": prov | {"step": step}, "eigen": eigen}
        for step in (10, 20)
    ]
    assert spectra_figure(ds).get_suptitle() == "cnn (1,418) in exp1/checkpoints"
    foreign = [{**d, "provenance": {"step": d["provenance"]["step"]}} for d in ds]
    assert spectra_figure(foreign).get_suptitle() == ""


def test_a_figure_named_with_a_dot_at_its_end_is_written_under_the_name_meant(
    capsys, files, tmp_path
):
    """-o fig. (typed short of its suffix) wrote fig..png, and -o fig.pdf. (past it) a PNG
    named fig.pdf..png."""
    for name, written, start in (("fig.", "fig.png", PNG), ("fig.pdf.", "fig.pdf", b"%PDF")):
        code, out, err = run(capsys, "plot", files["single"], "-o", f"{tmp_path / name}")
        assert code == 0 and out == f"wrote {tmp_path / written}\n", err
        assert (tmp_path / written).read_bytes().startswith(start)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]


def test_the_command_list_says_show_prints_json_and_reads_a_run():
    """`hessian-cli --help` said show prints "tables" of "a spectra or metrics HDF5 file": a
    reader looked elsewhere for JSON and for a run directory's metrics, both of which it takes."""
    import typer

    line = typer.main.get_command(app).commands["show"].get_short_help_str(limit=200)
    assert "JSON" in line and "run" in line, line


def test_a_series_table_says_how_to_see_a_row_in_full(files):
    """A series of eigenvalues alone (no density, whose note named -a) never said that -c NAME
    shows a row's residuals and settings, or -a every row's."""
    said = "a row in full: show -c NAME; every row: show -a"
    out = " ".join(runner.invoke(app, ["show", str(files["series"])]).output.split())
    assert said in out
    out = " ".join(runner.invoke(app, ["show", str(files["series"]), "-a"]).output.split())
    assert "show -c NAME" not in out


def test_plot_of_two_files_says_how_to_compare_them(capsys, files, tmp_path):
    """`plot a.h5 b.h5` said Click's "got unexpected extra argument(s) (b.h5)", which told
    neither that plot draws one file nor how to compare two in one figure."""
    out = tmp_path / "both.png"
    code, _, err = run(capsys, "plot", files["single"], files["series"], "-o", out)
    assert code == 2 and one_sentence(err) == (
        f"error: plot draws one file (given: {files['single']}, {files['series']}); to compare "
        "checkpoints in one figure, analyze them into one file (hessian-cli analyze A.pt B.pt "
        f"--out both.h5, or --out {files['single']} to add to it) and plot that."
    )
    assert not out.exists()


def test_show_of_two_files_says_how_to_compare_them(capsys, files):
    """`show a.h5 b.h5` said Click's "got unexpected extra argument(s) (b.h5)", which told
    neither that show reads one file nor how to see two side by side, as plot's refusal does."""
    code, out, err = run(capsys, "show", files["single"], files["series"], "--json")
    assert code == 2 and out == ""
    assert one_sentence(err, strict=True) == (
        f"error: show reads one file (given: {files['single']}, {files['series']}); to compare "
        "checkpoints in one table, analyze them into one file (hessian-cli analyze A.pt B.pt "
        f"--out both.h5, or --out {files['single']} to add to it) and show that."
    )


@pytest.mark.parametrize("command", ["show", "plot"])
def test_two_training_runs_are_told_to_go_one_at_a_time(capsys, files, tmp_path, command):
    """Two runs' metrics were told to be analyzed into one file, which holds checkpoints'
    spectra, never a run's metrics."""
    run_dir = tmp_path / "run 2"
    run_dir.mkdir()
    shutil.copy(files["metrics"], run_dir / "metrics.h5")
    for given in [(files["metrics"], run_dir), (files["single"], run_dir)]:
        out = ("-o", tmp_path / "x.png") if command == "plot" else ()
        code, _, err = run(capsys, command, *given, *out)
        first, second = (shlex.quote(str(g)) for g in given)
        assert code == 2 and one_sentence(err, strict=True) == (
            f"error: {command} {'reads' if command == 'show' else 'draws'} one file (given: "
            f"{first}, {second}); {command} one training run at a time: hessian-cli {command} "
            f"{first}, then hessian-cli {command} {second}."
        )


@pytest.mark.parametrize("k", [4, 50])
def test_a_series_of_both_ends_is_keyed_from_the_top_of_the_spectrum_down(k):
    """--which both: the legend read λ1, λ2, λn, λn-1 (the smallest end is stored λn first),
    λn above the λn-1 drawn above it; a colour bar of 50 labelled λn in its middle, or not."""
    half = k // 2
    values = [*np.linspace(10, 1, half), *np.linspace(-1, -0.1, half)]  # λn (-1) first
    ds = [
        {
            "name": f"step{step}",
            "provenance": {"model": "mlp", "num_params": 2410, "step": step},
            "eigen": {"which": "both", "eigenvalues": values, "converged": [1] * k},
        }
        for step in (10, 20)
    ]
    fig = spectra_figure(ds)
    if k == 4:
        legend = fig.axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["λ1", "λ2", "λn-1", "λn"]
        drawn = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
        assert (drawn["λn-1"], drawn["λn"]) == ([-0.1] * 2, [-1.0] * 2)
    else:
        ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
        assert ticks[0] == "λ1" and ticks[-1] == "λn" and 5 <= len(ticks) <= 13


def test_a_series_density_title_counts_the_densities_drawn(full):  # noqa: F811
    """A checkpoint whose density is NaN throughout draws no line, yet the title counted it:
    "of 3 checkpoints" over two curves."""
    steps = [variant(full, f"ckpt_{s}", s) for s in (100, 200, 300)]
    bare = [dataclasses.replace(a, eigen=None, trace=None, alignment=None) for a in steps]
    ds = [analysis_to_dict(a) for a in bare]
    ds[1]["density"]["values"] = [None] * len(ds[1]["density"]["values"])
    panel = spectra_figure(ds).axes[0]
    assert panel.get_title() == "Spectral densities (SLQ) of 2 checkpoints (1 more all NaN)"
    assert len(panel.get_lines()) == 2
    for d in ds:
        d["density"]["values"] = [None] * len(d["density"]["values"])
    panel = spectra_figure(ds).axes[0]
    assert panel.get_title() == "Spectral densities (SLQ): all 3 NaN"


def test_the_numbers_under_a_title_of_long_named_analyses_stay_within_the_figure(full):  # noqa: F811
    """One checkpoint analysed at --seed 0, 1 and 2 under a long name: its traces and
    alignments, each named by its analysis, made lines 2,956 pixels wide over a figure of
    1,280, both ends off it; they break between the analyses, each value kept whole."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    name = "experiment_resnet20_cifar10_lr0.1_wd5e-4_rho0.05_alpha0.2_step=78200"
    d = analysis_to_dict(full)
    prov = d["provenance"] | {"sha256": "ab" * 32}
    ds = [
        {**d, "name": f"{name}-{seed}", "provenance": prov | {"seed": seed}} for seed in (0, 1, 2)
    ]
    fig = spectra_figure(ds, ds)
    renderer = FigureCanvasAgg(fig).get_renderer()
    title = fig._suptitle
    assert title.get_window_extent(renderer).width <= fig.bbox.width
    said = title.get_text()
    for seed in (0, 1, 2):
        assert f"({name}-{seed})" in said and said.count(f"{name}-{seed}") == 2, said


def test_a_density_that_is_nan_throughout_says_so_in_its_legend(full):  # noqa: F811
    """Its panel was empty under a legend entry "smoothed ESD", as if a curve were drawn."""
    d = analysis_to_dict(full)
    d["density"]["values"] = [None] * len(d["density"]["values"])
    panel = spectra_figure([d]).axes[0]
    labels = [t.get_text() for t in panel.get_legend().get_texts()]
    assert labels[0] == "smoothed ESD: NaN throughout, not drawn"


def test_a_nan_eigenvalue_is_said_in_the_legend_not_drawn_as_a_marker(full):  # noqa: F811
    """A NaN λ1 (not converged) gave the legend a "NOT converged" entry with no marker drawn
    anywhere, and no word of λ1."""
    d = analysis_to_dict(full)
    d["eigen"]["eigenvalues"][0] = None
    d["eigen"]["converged"][0] = False
    d["density"] = None
    panel = spectra_figure([d]).axes[0]
    labels = [t.get_text() for t in panel.get_legend().get_texts()]
    assert "NOT converged" not in labels and "λ1 NaN, not drawn" in labels, labels
