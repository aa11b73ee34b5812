"""Figures from report dicts and metrics columns, written atomically (never a half-written file).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by Agg, so no display,
no pyplot state and no global backend switch are involved.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from hessian_cli.atomic import atomic_path, stdout_written
from hessian_cli.errors import UserError
from hessian_cli.presentation.tables import (
    ANALYSIS_SETTINGS,
    DASH,
    OF_PAIRS,
    analyses_of_checkpoints,
    analysis_setting,
    checkpoint_of,
    counted,
    differing_settings,
    eigen_columns,
    eigen_labels,
    known_checkpoint,
    model_cell,
    model_key,
    no_scale,
    run_directory,
    run_key,
    settings_apart,
    settings_said,
    several_runs,
    trace_cell,
)
from hessian_cli.series_order import series_key
from hessian_cli.storage.files import make_folder
from hessian_cli.storage.metrics import above_tol

DPI = 120
_DENSITY_FLOOR = 1e-7  # log-scale ESD: show seven decades below the peak


class _WholeNumbers(MaxNLocator):
    """Ticks at whole numbers only (steps, epochs, places in a series). ``integer=True`` alone
    keeps fractional ticks where the view holds under two whole numbers: a one-step run's
    axis, -0.055 to 0.055, was ticked at -0.045, -0.030, ..., 0.045."""

    def __init__(self) -> None:
        super().__init__(integer=True)

    def tick_values(self, vmin: float, vmax: float) -> np.ndarray:
        ticks = super().tick_values(vmin, vmax)
        if np.array_equal(ticks, np.round(ticks)):
            return ticks
        low, high = sorted((vmin, vmax))
        whole = np.arange(math.ceil(low), math.floor(high) + 1, dtype=float)
        return whole if whole.size else ticks  # a view between two (epochs 1.25 and 1.5)


def _literal(text: Any) -> str:
    """``text`` drawn as it is: matplotlib reads ``$...$`` as mathematics."""
    return str(text).replace("$", r"\$")


def _arr(values: Any) -> np.ndarray:
    """Report numbers (``None`` for non-finite) as floats with NaN, which matplotlib skips."""
    return np.array(values if values is not None else [], dtype=float)


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    cols = panels if panels <= 3 else 2
    rows = -(-panels // cols)
    fig = Figure(figsize=(6.4 * cols, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is this process' standard output (``-o /dev/stdout``), whether that is
    a pipe or a file the shell redirected it to."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such file, or no stdout (`>&-`)
        return False


@dataclass(frozen=True)
class FigureOutput:
    """Where a figure goes and in which format, told before it is drawn: `plot -o x.weird`
    read the file and drew the figure, then refused the name."""

    path: Path
    fmt: str
    to_stdout: bool  # -o /dev/stdout (or -), written to as it is


def figure_output(out_path: str | Path) -> FigureOutput:
    """Where ``out_path`` has the figure written: format from the suffix, or its target's where
    a link has none; a name without a suffix gets ``.png``, as matplotlib's ``savefig`` gives
    it (a PNG was written under the bare name), except a link, pipe or device. A directory, a
    format matplotlib cannot write and an HDF5 file to overwrite are refused."""
    out = Path(out_path)
    if out.is_dir():  # "." was told "device or resource busy" when renamed over
        raise UserError(f"-o {out} is a directory; give a file name such as fig.png.")
    # Redirected to a file (`> fig.png`), /dev/stdout is a link to a file: it became a new
    # file /dev/stdout.png (or could not be made there), and the file got the "wrote" line.
    to_stdout = _is_stdout(out)
    supported = FigureCanvasAgg.get_supported_filetypes()
    supported.pop("pgf", None)  # needs a LaTeX installation
    # A name ending in a dot, as one typed short of its suffix or past it (-o fig., fig.png.):
    # fig..png and fig.png..png were written.
    if out.name.rstrip(".") and out.name.endswith(".") and not to_stdout and not out.is_symlink():
        out = out.with_name(out.name.rstrip("."))
    # `-o $NAME.png` with NAME unset: a hidden file .png.png was written.
    bare = out.name.startswith(".") and out.name[1:].lower() in supported
    if bare and not to_stdout and not out.is_symlink():
        raise UserError(
            f"-o {out} is a format's suffix alone; give the figure a name, such as fig{out.name}."
        )
    # A link is written through as named: `-o /dev/stderr` redirected to a file (a link to it)
    # made /dev/stderr.png.
    if not out.suffix and not to_stdout and not out.is_symlink():
        if out.is_file() or not out.exists():
            out = out.with_name(out.name + ".png")
    fmt = out.suffix.lstrip(".").lower()
    if not fmt and out.is_symlink():
        # Its target is what is written: a link to fig.pdf (or /dev/stdout redirected to it)
        # got a PNG's bytes. A target without a figure's suffix (mktemp's) still gets a PNG.
        target = Path(os.path.realpath(out)).suffix.lstrip(".").lower()
        fmt = target if target in supported else ""
    fmt = fmt or "png"
    if fmt not in supported:
        raise UserError(
            f"cannot write a {fmt!r} figure; use one of: {', '.join(sorted(supported))}."
        )
    if not to_stdout and out.is_file() and h5py.is_hdf5(out):  # the file plotted, named again
        raise UserError(f"{out} is an HDF5 file: refusing to overwrite it with a figure.")
    return FigureOutput(out, fmt, to_stdout)


def save_figure(fig: Figure, out: FigureOutput) -> Path | None:
    """Render ``fig`` to ``out`` (:func:`figure_output`) atomically. The path written, or None
    for standard output (``-o /dev/stdout``), which is written to as it is."""
    # Rendered first, written in one go: some formats seek back while writing, which a pipe
    # (-o /dev/stdout) cannot, and a drawing that fails then leaves no file at all.
    rendered = io.BytesIO()
    # PostScript draws the density's shading opaque, which it logs as a warning: fine here.
    ps_log = logging.getLogger("matplotlib.backends.backend_ps")
    level = ps_log.level
    ps_log.setLevel(logging.ERROR)
    try:
        fig.savefig(rendered, format=out.fmt, dpi=DPI)
    finally:
        ps_log.setLevel(level)
    if out.to_stdout:
        with stdout_written():
            sys.stdout.flush()
            sys.stdout.buffer.write(rendered.getbuffer())
            sys.stdout.buffer.flush()
        return None
    make_folder(out.path.parent)  # as analyze --out and train --out make theirs
    with atomic_path(out.path) as tmp, open(tmp, "wb") as fh:
        fh.write(rendered.getbuffer())
    return out.path


# --- spectra ----------------------------------------------------------------------------------


def _density_panel(ax: Axes, d: Mapping[str, Any], held: Sequence[Mapping[str, Any]] = ()) -> Axes:
    """``d``'s smoothed ESD, with the eigenvalues it found, or where it found none, those of
    the analysis of the same matrix in ``held`` that found most (:func:`_eigen_of`)."""
    dn = d["density"]
    e, source = _eigen_of(d, held)
    grid, values = _arr(dn["grid"]), _arr(dn["values"])
    drawable = bool(np.isfinite(values).any())
    peak = np.nanmax(values) if drawable else 1.0
    floor = peak * _DENSITY_FLOOR if peak > 0 else _DENSITY_FLOOR
    # One NaN throughout drew nothing, yet its legend entry said "smoothed ESD".
    label = "smoothed ESD" if drawable else "smoothed ESD: NaN throughout, not drawn"
    ax.semilogy(grid, np.maximum(values, floor), color="C0", lw=1.2, label=label)
    ax.set_ylim(bottom=floor)
    if e is not None:
        pairs = zip(e["eigenvalues"], e["converged"], strict=False)
        drawn = [(lam, ok) for lam, ok in pairs if lam is not None and math.isfinite(lam)]
        # Counted as drawn: "the 3 found" marked 2 where one was NaN.
        # Older files record no `which`: it said "(None)".
        said = [e["which"]] if e.get("which") else []
        if missing := len(e["eigenvalues"]) - len(drawn):
            said.append(f"{missing} more NaN")
        label = f"the {counted(len(drawn), 'eigenvalue')} found"
        label += f" ({'; '.join(said)})" if said else ""
        label += f" by {_literal(source)}" if source is not None else ""
        for lam, ok in drawn:
            # On the first line drawn: on the first value, one missing took the entry away.
            ax.axvline(lam, color="C2" if ok else "C3", ls="--", lw=0.8, label=label)
            label = None
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    probes, steps = counted(dn.get("num_probes"), "probe"), counted(dn.get("steps"), "step")
    # The eigenvalues it took exactly, as the table says (the title left them out).
    beside = f" beside {counted(k, 'eigenvalue')}" if (k := dn.get("known_eigenpairs")) else ""
    ax.set_title(
        f"Spectral density of the {counted(k, 'eigenvalue')} found (they span the space)"
        if dn.get("steps") == 0 and k  # "SLQ, 8 probes × 0 steps beside 10 eigenvalues"
        else f"Spectral density: SLQ, {probes} × {steps}{beside}"
    )
    ax.legend(loc="upper right", fontsize="small")
    return ax


# What, besides its checkpoint's weights, an analysis' matrix is of (analysis_setting): the
# eigenvalues of one analysis are those of another's density only where these are alike.
_OF_MATRIX = ("data", "num_samples", "batch_size", "loss", "bn")


def _matrix(d: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The Hessian the analysis ``d`` is of: its checkpoint (None where unknown), the weights
    taken from it, the model and parameters, the data, loss and batching."""
    known = known_checkpoint(d)
    if known is None:
        return None
    prov = d.get("provenance") or {}
    weights = (prov.get("weights_key"), prov.get("weights_prefix"))
    return (known, *weights, model_key(d), *(repr(analysis_setting(d, k)) for k in _OF_MATRIX))


def _eigen_of(
    d: Mapping[str, Any], held: Sequence[Mapping[str, Any]]
) -> tuple[Mapping[str, Any] | None, str | None]:
    """The eigenpairs a density panel marks, and the name of the analysis they are from where
    that is another: ``d``'s own, or those of the analysis of its matrix in ``held`` with the
    most (the latest of a tie). A checkpoint analysed with --top-k 3, then --top-k 0 --density,
    drew a density with none of the eigenvalues known marked."""
    if d.get("eigen") is not None or (matrix := _matrix(d)) is None:
        return d.get("eigen"), None
    found = [h for h in held if h.get("eigen") and _matrix(h) == matrix]
    if not found:
        return None, None
    most = max(reversed(found), key=lambda h: len(h["eigen"]["eigenvalues"]))
    return most["eigen"], str(most.get("name"))


def _run_style(n: int) -> str:
    """The line style of the ``n``-th run's densities (the figure's legend shows it)."""
    return ("-", "--", ":", "-.")[n % 4]


def _densities_panel(
    ax: Axes,
    ds: Sequence[Mapping[str, Any]],
    x: np.ndarray,
    xlabel: str,
    runs: Sequence[tuple[np.ndarray, str, str | None]],
) -> None:
    """Each checkpoint's smoothed ESD, coloured by its place in the series (a line style per
    run where several share the file)."""
    have = [j for j, d in enumerate(ds) if d.get("density")]
    curves = {j: (_arr(ds[j]["density"]["grid"]), _arr(ds[j]["density"]["values"])) for j in have}
    # One all NaN draws nothing: the title counted it as drawn.
    curves = {
        j: (grid, values) for j, (grid, values) in curves.items() if np.isfinite(values).any()
    }
    peak = max((np.nanmax(v) for _, v in curves.values()), default=1.0)
    floor = peak * _DENSITY_FLOOR if peak > 0 else _DENSITY_FLOOR
    norm = Normalize(float(np.nanmin(x[have])), float(np.nanmax(x[have])))
    cmap = colormaps["viridis"]
    for n, (at, _, _) in enumerate(runs):
        for j in (j for j in at if j in curves):
            grid, values = curves[j]
            color = cmap(norm(x[j])) if norm.vmax > norm.vmin else cmap(0.5)
            ax.semilogy(grid, np.maximum(values, floor), color=color, lw=1, ls=_run_style(n))
    ax.set_ylim(bottom=floor)
    # Steps, epochs or places, as the other panels tick them: steps 4 and 5 had 4.0, 4.2, ...
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    ax.figure.colorbar(mappable, ax=ax, label=xlabel, ticks=_WholeNumbers())
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    title = f"Spectral densities (SLQ) of {analyses_of_checkpoints([ds[j] for j in curves])}"
    missing = len(have) - len(curves)
    said = f" ({missing} more all NaN)" if missing else ""
    ax.set_title(title + said if curves else f"Spectral densities (SLQ): all {missing} NaN")


_EIGEN_LABELS = 12  # eigenvalues labelled on a checkpoint's axis, at most about

_WHICH_TITLES = {"smallest": "Smallest eigenvalues", "both": "Largest and smallest eigenvalues"}


def _eigen_panel(ax: Axes, e: Mapping[str, Any]) -> Axes:
    values = _arr(e["eigenvalues"])
    ok = np.array(e["converged"], dtype=bool)
    idx = np.arange(1, len(values) + 1)
    labels = eigen_labels({e.get("which")}, len(values))
    ends = [slice(None)]
    if e.get("which") == "smallest":  # stored λn first: drawn as both ends draw it, λn at the right
        idx = idx[::-1]
    if e.get("which") == "both":
        # The smallest are stored λn first: drawn as the spectrum reads, λ1 ... λk, a gap, then
        # λn-k+1 ... λn (λn stood beside λk, λn-k+1 at the right end), two lines, not joined.
        half = len(values) // 2
        idx[half:] = 2 * half + 1 - np.arange(len(values) - half)
        ends = [slice(None, half), slice(half, None)]
        ax.set_xticks([half + 1], ["…"], minor=True)  # the eigenvalues between, not computed
    for part in ends:
        ax.plot(idx[part], values[part], color="0.6", lw=0.8)
    # No legend entry for markers that are not there: a NaN eigenvalue's "NOT converged" was
    # an entry with nothing drawn; the entry says which are NaN instead.
    finite = np.isfinite(values)
    if (ok & finite).any():
        ax.plot(idx[ok & finite], values[ok & finite], "o", color="C0", label="converged")
    if (~ok & finite).any():
        bad = ~ok & finite
        ax.plot(idx[bad], values[bad], "x", color="C3", ms=9, mew=2, label="NOT converged")
    if nan := [labels[i] for i in np.flatnonzero(~finite)]:
        shown = ", ".join(nan[:3]) + (f" and {len(nan) - 3} more" if len(nan) > 3 else "")
        ax.plot([], [], ls="none", label=f"{shown} NaN, not drawn")
    ax.set_ylabel("eigenvalue")
    # At most about a dozen labels, each end's own first (λ1, λn) and every so many after it:
    # 50 of them ran into one another, unreadable.
    step = math.ceil(len(values) / _EIGEN_LABELS)
    shown = [i for part in ends for i in range(len(values))[part][::step]]
    ax.set_xticks(idx[shown], [labels[i] for i in shown])
    # Converged means the measure of the criterion the solve used is within tol: draw that one.
    by_error = e.get("criterion") == "eigenvalue"
    measure = _arr(e.get("errors") if by_error else e["residuals"])
    name = "error bound" if by_error else "residual"
    ax.set_title(f"{_WHICH_TITLES.get(e.get('which'), 'Top eigenvalues')} and {name}s")
    twin = ax.twinx()
    drawn = measure > 0  # a log axis has no 0: no legend entry for markers not there
    twin.semilogy(
        idx[: len(measure)],
        np.where(drawn, measure, np.nan),
        "s",
        mfc="none",
        color="C1",
        label=name if drawn.any() else None,
    )
    # Every eigenvalue 0: no |λ_max| to scale tol by, converged meant a zero residual (the
    # table says so); it was drawn as "/ |λ_max|" beside a tol line no residual was held to.
    zero = no_scale(e)
    if e.get("tol") is not None and not zero:
        tol, floor = e["tol"], e.get("floor") or 0.0
        # A residual meets tol only with its rounding floor added: float32 residuals of 5e-8
        # were marked NOT converged beside a tol line of 2e-7 they were all below.
        if by_error or floor < tol / 100:  # no visible difference
            twin.axhline(tol, color="C1", ls=":", lw=1, label=f"tol {tol:g}")
        elif floor < tol:
            label = f"tol {tol:g} less the rounding floor {floor:.2g}"
            twin.axhline(tol - floor, color="C1", ls=":", lw=1, label=label)
        else:
            label = f"tol {tol:g}, below the rounding floor {floor:.2g}"
            twin.axhline(tol, color="C1", ls=":", lw=1, label=label)
    # The residuals are relative to the solve's scale, the largest |Ritz value| it saw: also
    # for --which smallest, where "/ |λ_max|" read as the largest eigenvalue's (or |λ_min|).
    scale = e.get("scale")
    relative = "relative" if scale is None else f"/ {scale:.4g} (largest |Ritz value|)"
    twin.set_ylabel(
        "residual ||Hv-λv|| (every λ seen was 0)"
        if zero
        else "bound on the relative eigenvalue error"
        if by_error
        else f"residual ||Hv-λv|| {relative}",
        color="C1",
    )
    handles = ax.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    # Below the axes: inside, the twin's markers were drawn under it wherever it stood.
    ax.legend(
        handles[0] + twin_handles[0],
        handles[1] + twin_handles[1],
        fontsize="small",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncols=4,
    )
    return ax


def _number(value: Any) -> float | None:
    """A provenance step or epoch as a number, None where it is none."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if numeric and np.isfinite(value) else None


def _series_ranks(ds: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Each checkpoint's place (1, 2, ...) in its series by :func:`series_key`, as the loader
    and the file order a series; ties keep the file's order. The analyses of one checkpoint
    (its sha256: a path may have held another, latest.pt) share its place: two checkpoints
    analysed with --top-k 2 and again with --top-k 0 --trace had their eigenvalues at places 1
    and 3, their traces at 2 and 4."""

    def key(j: int) -> tuple:
        prov = ds[j].get("provenance") or {}
        step, epoch = _number(prov.get("step")), _number(prov.get("epoch"))
        return (*series_key(step, epoch, str(ds[j].get("name"))), j)

    places: dict[Any, int] = {}
    ranks = np.empty(len(ds))
    for j in sorted(range(len(ds)), key=key):
        ranks[j] = places.setdefault(checkpoint_of(ds[j], j), len(places) + 1)
    return ranks


def _x_axis(ds: Sequence[Mapping[str, Any]], runs: Sequence[np.ndarray]) -> tuple[np.ndarray, str]:
    """Steps if every checkpoint knows its step and they rise along each run's series order,
    else epochs likewise, else the place in the series. Steps counted within each epoch
    (``epoch=1-step=50`` after ``epoch=0-step=100``) were drawn sorted by step: epochs
    interleaved on one zigzag line."""
    ranks = _series_ranks(ds)
    places = [
        ((d.get("provenance") or {}).get("epoch"), (d.get("provenance") or {}).get("step"))
        for d in ds
    ]
    for key in ("step", "epoch"):
        values = [_number((d.get("provenance") or {}).get(key)) for d in ds]
        if None in values:
            continue
        x = np.array(values, dtype=float)
        # Along each run, a later place in training is further right; one place (final.pt
        # beside step_300.pt), one x.
        if all(
            x[b] > x[a] or (x[b] == x[a] and places[b] == places[a])
            for at in runs
            for a, b in pairwise(at[np.argsort(ranks[at])])
        ):
            return x, key
    return ranks, "checkpoint (series order)"


# Markers that tell apart the runs (models, parameter sets, checkpoint directories, analysis
# settings) of a file.
_MODEL_MARKERS = "osD^v<>ph*"


def _run_keys(ds: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...] | None]:
    """Each checkpoint's run (:func:`run_key`) and analysis settings; None where its file
    records no model. Analyses without eigenpairs (--top-k 0: a trace or density alone) join a
    run of eigenpairs whose other settings are theirs (:func:`_joined`): a series' traces
    appended so were a run of their own ("2 runs", "top_k=0")."""
    keys = [_run_of(d, pairs=True) for d in ds]
    joined = _joined(ds, keys)
    return [
        own if d.get("eigen") or own is None else joined.get(_run_of(d, pairs=False), own)
        for d, own in zip(ds, keys, strict=True)
    ]


def _run_of(d: Mapping[str, Any], *, pairs: bool) -> tuple[Any, ...] | None:
    """``d``'s run and its analysis settings, those of the eigenpairs only where ``pairs``."""
    run = run_key(d)
    settings = (k for k in ANALYSIS_SETTINGS if pairs or k not in OF_PAIRS)
    return None if run is None else (run, tuple(analysis_setting(d, k) for k in settings))


def _joined(
    ds: Sequence[Mapping[str, Any]], keys: Sequence[tuple[Any, ...] | None]
) -> dict[Any, tuple[Any, ...]]:
    """For the --top-k 0 analyses of each run and other settings, the run of eigenpairs they
    join: of those with their settings, the one that holds most of their checkpoints, and on a
    tie the latest (its last analysis further in the file). They joined the first found, which
    could lack their later checkpoints."""
    runs: dict[Any, dict[Any, list[int]]] = {}
    alone: dict[Any, set[Any]] = {}
    for i, (d, own) in enumerate(zip(ds, keys, strict=True)):
        if own is None:
            continue
        other = _run_of(d, pairs=False)
        if d.get("eigen"):
            runs.setdefault(other, {}).setdefault(own, []).append(i)
        else:
            alone.setdefault(other, set()).add(checkpoint_of(d, i))

    def fit(at: list[int], held: set[Any]) -> tuple[int, int]:
        return len(held & {checkpoint_of(ds[i], i) for i in at}), max(at)

    return {
        other: max(runs[other], key=lambda run: fit(runs[other][run], held))
        for other, held in alone.items()
        if other in runs
    }


def _trajectories(ds: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, str, str | None]]:
    """The checkpoints' positions per run, each drawn as a trajectory of its own: positions,
    marker and the run's legend label (None where the file holds one run); the label of a run
    that --top-k 0 analyses joined among others they could have says so."""
    keys = _run_keys(ds)
    if len(set(keys) - {None}) <= 1:
        return [(np.arange(len(ds)), "o", None)]
    groups = list(dict.fromkeys(keys))
    several = several_runs(ds)
    differ = differing_settings(ds)
    # The runs of eigenpairs that each set of other settings has: where several, which one
    # the --top-k 0 analyses joined is a choice, said in the legend.
    choices: dict[Any, set[Any]] = {}
    for d, own in zip(ds, keys, strict=True):
        if d.get("eigen") and own is not None:
            choices.setdefault(_run_of(d, pairs=False), set()).add(own)
    chosen = {
        own
        for d, own in zip(ds, keys, strict=True)
        if not d.get("eigen") and len(choices.get(_run_of(d, pairs=False), ())) > 1
    }

    def label(key: tuple[Any, ...] | None) -> str:
        if key is None:
            return "model not recorded"
        # Its first analysis with eigenpairs, where it has some: their settings name it.
        at = [i for i, k in enumerate(keys) if k == key]
        first = ds[next((i for i in at if ds[i].get("eigen")), at[0])]
        prov = first.get("provenance") or {}
        where = f" in {run_directory(prov)}" if several else ""
        # None: not recorded, or no end searched (it read "top_k=None, which=None" beside a
        # run analysed with --top-k 0)
        settings = "".join(
            f", {k}={v}" for k in differ if (v := analysis_setting(first, k)) is not None
        )
        joined = ", with the top_k=0 analyses" if key in chosen else ""
        return model_cell(prov) + where + settings + joined

    return [
        (
            np.array([i for i, k in enumerate(keys) if k == key]),
            _MODEL_MARKERS[n % len(_MODEL_MARKERS)],
            label(key),
        )
        for n, key in enumerate(groups)
    ]


def _holding(ds: Sequence[Mapping[str, Any]], at: np.ndarray, part: str) -> np.ndarray:
    """The positions ``at`` of a run whose analyses hold ``part`` (eigen, trace, alignment): a
    line stops at NaN, and a run's --top-k 0 analyses broke its eigenvalues' lines at each
    step (its traces' at each of the others)."""
    return np.array([j for j in at if ds[j].get(part)], dtype=int)


def _one_run_said(ds: Sequence[Mapping[str, Any]]) -> str | None:
    """The run a series of one is of, as the legend of several names each (its model, and the
    directory its checkpoints were read from); None where its file records no model."""
    prov = next((p for d in ds if "model" in (p := d.get("provenance") or {})), None)
    if prov is None:
        return None
    return model_cell(prov) + (f" in {run_directory(prov)}" if prov.get("checkpoint") else "")


def _spectrum_order(whiches: set[str | None], k: int) -> list[int]:
    """The ``k`` eigenvalue columns from the spectrum's top down: both ends' smallest are
    stored λn first, which the series' legend listed above λn-1 (λ1, λ2, λn, λn-1)."""
    if whiches != {"both"}:
        return list(range(k))
    half = k // 2
    return [*range(half), *range(k - 1, half - 1, -1)]


def _eigen_color(i: int, k: int) -> Any:
    """The colour of the ``i``-th of ``k`` eigenvalues' trajectories: the default cycle's where
    it holds them all, else a colour map's (the cycle repeats after ten: λ11 was drawn as λ1)."""
    return f"C{i}" if k <= 10 else _eigen_colors(k)(i)


def _eigen_colors(k: int) -> ListedColormap:
    """The colours of more than ten eigenvalues: plasma's (viridis colours the densities by
    step), short of its pale yellow end, which a white panel hid."""
    return ListedColormap(colormaps["plasma"](np.linspace(0, 0.85, k)))


def _eigen_key(ax: Axes, labels: Sequence[str]) -> None:
    """Which trajectory is which eigenvalue: a legend of up to ten, else a colour bar of
    :func:`_eigen_color`'s colours, λ1 on top, the last at the bottom (a legend of 50 ran off
    the panel, over it)."""
    k = len(labels)
    if k <= 10:
        ax.legend(fontsize="small", ncols=2 if k > 5 else 1)
        return
    colors = ScalarMappable(Normalize(-0.5, k - 0.5), _eigen_colors(k))
    bar = ax.figure.colorbar(colors, ax=ax)
    step = math.ceil(k / _EIGEN_LABELS)
    shown = list(range(0, k, step))
    # The bottom end labelled too (both ends' λn), in place of a tick too close above it.
    shown = shown[:-1] if k - 1 - shown[-1] < step / 2 else shown
    shown.append(k - 1)
    bar.set_ticks(shown, labels=[labels[i] for i in shown])
    bar.ax.invert_yaxis()


def _series_figure(ds: Sequence[Mapping[str, Any]]) -> Figure:
    k = max((len(d["eigen"]["eigenvalues"]) for d in ds if d.get("eigen")), default=0)
    whiches = {(d.get("eigen") or {}).get("which") for d in ds} - {None}  # None: older files
    labels = eigen_labels(whiches, k)
    has_trace = any(d.get("trace") for d in ds)
    has_alignment = any(d.get("alignment") for d in ds)
    has_density = any(d.get("density") for d in ds)
    if not k and not has_trace and not has_density:
        raise UserError("the file holds no eigenvalues, traces or densities to plot.")
    fig, axes = _figure(bool(k) + has_trace + has_alignment + has_density)
    # Checkpoints of different models, parameter sets, runs (checkpoint directories) or analysis
    # settings appended to one file: a trajectory and a marker for each (they were drawn as one).
    trajectories = _trajectories(ds)
    x, xlabel = _x_axis(ds, [at for at, _, _ in trajectories])
    runs = [(at[np.argsort(x[at], kind="stable")], m, lab) for at, m, lab in trajectories]
    if len(runs) > 1:  # points of files that record no model are not counted as a run
        counted_runs = len(set(_run_keys(ds)) - {None})
        # Short enough for a one-panel figure: with "checkpoint directories" it was 641.6
        # pixels wide in 640, 652.6 with 10 runs or more.
        fig.suptitle(
            f"{counted_runs} runs (models, parameter sets, directories or analysis settings)"
        )
    elif (said := _one_run_said(ds)) is not None:  # nothing told two series' figures apart
        _fitted_title(fig, said)
    panels = iter(axes)
    if k:
        ax = next(panels)
        any_bad = False
        columns = [eigen_columns(d.get("eigen") or {}, whiches, k) for d in ds]
        order = _spectrum_order(whiches, k)
        for place, i in enumerate(order):  # drawn, so keyed, as the spectrum reads
            lam = np.full(len(ds), np.nan)
            bad = np.zeros(len(ds), dtype=bool)
            for j, d in enumerate(ds):
                e, at = d.get("eigen"), columns[j][i]
                if e and at is not None and e["eigenvalues"][at] is not None:
                    lam[j] = e["eigenvalues"][at]
                    bad[j] = not e["converged"][at]
            for n, (at, marker, _) in enumerate(runs):
                label = labels[i] if n == 0 else None
                at = _holding(ds, at, "eigen")
                color = _eigen_color(place, k)
                ax.plot(x[at], lam[at], marker=marker, ms=3, color=color, label=label)
            ax.plot(x[bad], lam[bad], "x", color="C3", ms=8, mew=2)
            any_bad |= bool(bad.any())
        title = (
            _WHICH_TITLES.get(next(iter(whiches), "largest"), "Top eigenvalues")
            if len(whiches) <= 1
            else "Eigenvalues"  # searches of different kinds: labelled #1, #2, ...
        )
        ax.set_title(f"{title} (red x: NOT converged)" if any_bad else title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eigenvalue")
        _eigen_key(ax, [labels[i] for i in order])
    if has_trace:
        ax = next(panels)
        est = _arr([(d.get("trace") or {}).get("estimate") for d in ds])
        err = np.nan_to_num(_arr([(d.get("trace") or {}).get("stderr") for d in ds]))
        for at, marker, _ in runs:
            at = _holding(ds, at, "trace")
            ax.errorbar(x[at], est[at], yerr=err[at], marker=marker, ms=3, capsize=3, color="C4")
        ax.set_title("Hessian trace (± std. error)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("trace")
    if has_alignment:
        ax = next(panels)
        first = _arr([((d.get("alignment") or {}).get("alignment") or [None])[0] for d in ds])
        sub = _arr([(d.get("alignment") or {}).get("subspace_alignment") for d in ds])
        for n, (at, marker, _) in enumerate(runs):
            at = _holding(ds, at, "alignment")
            ax.plot(
                x[at], first[at], marker=marker, ms=3, color="C0", label=None if n else "|<ĝ, v1>|"
            )
            ax.plot(
                x[at],
                sub[at],
                marker=marker,
                ms=3,
                ls="--",
                color="C1",
                label=None if n else "||Vᵀĝ||",
            )
        ax.set_ylim(0, 1.05)
        ax.set_title("SAM alignment of the gradient")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize="small")
    if has_density:
        _densities_panel(next(panels), ds, x, xlabel, runs)
    if len(runs) > 1:  # which marker is which model, below the panels
        _runs_legend(fig, runs, has_density)
    for ax in axes[: len(axes) - has_density]:  # steps, epochs and places: whole numbers
        ax.xaxis.set_major_locator(_WholeNumbers())
    return fig


def _runs_legend(
    fig: Figure, runs: Sequence[tuple[np.ndarray, str, str | None]], has_density: bool
) -> None:
    """Which marker (and line style, where densities are drawn) is which run, below the panels,
    in as many columns (up to three) as fit the figure's width, in one whose labels are cut in
    the middle where even that is wider."""
    handles = [
        Line2D(
            [],
            [],
            color="black",
            marker=m,
            ls=_run_style(n) if has_density else "",
            label=_literal(lab),
        )
        for n, (_, m, lab) in enumerate(runs)
    ]
    # Labels grow with what tells runs apart (", tol=1e-06", a directory): three columns
    # of them ran off a one-panel figure's sides, cutting the last run's name.
    renderer = FigureCanvasAgg(fig).get_renderer()
    room = 0.98 * fig.bbox.width
    for cols in range(min(len(runs), 3), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=cols)
        if cols == 1 or legend.get_window_extent(renderer).width <= room:
            break
        legend.remove()
    # Runs in directories of long names ran off both sides, the ends that tell them apart
    # (…seed0_A, …seed0_B) with them.
    labels = [str(lab) for _, _, lab in runs]
    keep = max(map(len, labels))
    while keep > 1 and (width := legend.get_window_extent(renderer).width) > room:
        keep = min(keep - 1, int(keep * room / width))
        for text, label in zip(legend.get_texts(), labels, strict=True):
            text.set_text(_literal(_middle_cut(label, keep)))


def _middle_cut(text: str, keep: int) -> str:
    """``text`` in at most ``keep`` characters, its middle left out (…): its start and its
    end, which tell names apart."""
    if len(text) <= keep:
        return text
    head = (keep - 1) // 2
    return f"{text[:head]}…{text[len(text) - (keep - 1 - head) :]}"


def _checkpoint_figure(
    ds: Sequence[Mapping[str, Any]], held: Sequence[Mapping[str, Any]]
) -> Figure:
    """ESD and eigenvalues of one checkpoint, from each of its analyses ``ds`` that holds some:
    a panel each, titled with the analysis (its name, as show's rows, and the settings that tell
    it from the others in ``held``, and its model or parameters where those do) where several
    do. Analysed once with --top-k 2 and again with --top-k 0 --trace, one checkpoint was drawn
    as a series of one step."""
    drawn = [d for d in ds if d.get("eigen") is not None or d.get("density") is not None]
    if not drawn:  # a trace alone (--top-k 0 --trace): it said nothing of it
        held = "trace it holds" if len(ds) == 1 else "traces they hold"
        said = f"; show prints the {held}" if any(d.get("trace") for d in ds) else ""
        # Several (at --seed 0 and 1): they were drawn as a "series" of two runs at one step.
        which = f" in its analyses {' and '.join(str(d.get('name')) for d in ds)}"
        raise UserError(
            f"checkpoint {ds[0].get('name')!r} has no eigenvalues or density to plot"
            f"{which if len(ds) > 1 else ''}{said}."
        )
    fig, axes = _figure(
        sum((d.get("density") is not None) + (d.get("eigen") is not None) for d in drawn)
    )
    panels = iter(axes)
    names = []
    models = len({model_key(d) for d in drawn}) > 1  # blocks of its Hessian (--params), say
    for d in drawn:
        apart = settings_apart(d, held)
        said = [model_cell(d.get("provenance") or {})] if models else []
        said += [settings_said(d, apart)] if apart else []
        names.append(f"{d.get('name')}" + (f" ({', '.join(said)})" if said else ""))
        own = [_density_panel(next(panels), d, held or ds)] if d.get("density") is not None else []
        if d.get("eigen") is not None:
            own.append(_eigen_panel(next(panels), d["eigen"]))
        for ax in own if len(drawn) > 1 else ():
            # Cut to the panel's width: long names ran over the next panel's, both unreadable.
            what = ax.get_title()
            ax.set_title(f"{what}\n{_fitted_line(ax.title, names[-1], ax.bbox.width)}")
    if len(drawn) > 1:
        names = [f"{' and '.join(str(d.get('name')) for d in drawn)}: analyses of one checkpoint"]
    _fitted_title(fig, names[0], _numbers_said(ds))
    return fig


def _numbers_said(ds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The traces and SAM alignments the analyses ``ds`` of one checkpoint hold, a line each
    under the figure's title, each value named by its analysis where there are several: no
    panel draws one number, and `analyze --trace --alignment` then `plot` showed neither."""
    named = len(ds) > 1

    def said(d: Mapping[str, Any], value: str) -> str:
        return f"{value} ({d.get('name')})" if named else value

    def aligned(al: Mapping[str, Any]) -> str:
        first = (al.get("alignment") or [None])[0]
        return f"|<ĝ, v1>| {_fixed(first)}, ||Vᵀĝ|| {_fixed(al.get('subspace_alignment'))}"

    traces = [said(d, trace_cell(d["trace"])) for d in ds if d.get("trace")]
    alignments = [said(d, aligned(d["alignment"])) for d in ds if d.get("alignment")]
    return [
        f"{what} {'; '.join(values)}"
        for what, values in (("Hessian trace", traces), ("SAM alignment", alignments))
        if values
    ]


def _fixed(value: float | None) -> str:
    """A score in [0, 1] as the series table shows it, a dash where it is not a number."""
    return DASH if value is None else f"{value:.3f}"


def _fitted_title(fig: Figure, title: str, below: Sequence[str] = ()) -> None:
    """``title`` above ``fig``, cut in the middle where it is wider than the figure (a long
    checkpoint name ran off both sides): its start and its end, which tells checkpoints apart.
    The lines ``below`` (of numbers) go under it, broken where wider (:func:`_wrapped`)."""
    text = fig.suptitle("")
    room = 0.98 * fig.bbox.width
    lines = [_fitted_line(text, title, room)]
    for line in below:
        lines += _wrapped(text, line, room)
    text.set_text("\n".join(lines))


def _wrapped(text: Text, line: str, room: float) -> list[str]:
    """``line`` broken after each "; " that leaves it wider than ``room`` pixels, each part cut
    in the middle where it alone is: the traces of several long-named analyses ran off the
    figure's sides."""
    parts = line.split("; ")
    lines = [parts[0]]
    for part in parts[1:]:
        if _width(text, f"{lines[-1]}; {part}") <= room:
            lines[-1] += f"; {part}"
        else:
            lines[-1] += ";"
            lines.append(part)
    return [_fitted_line(text, part, room) for part in lines]


def _width(text: Text, line: str) -> float:
    """How many pixels wide ``text`` draws ``line`` (which it is set to)."""
    fig = text.figure
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    text.set_text(_literal(line))
    return text.get_window_extent(canvas.get_renderer()).width


def _fitted_line(text: Text, line: str, room: float) -> str:
    """``line`` as ``text`` draws it (which it is set to), cut in the middle (:func:`_middle_cut`)
    where it is wider than ``room`` pixels."""
    keep = len(line)
    while (width := _width(text, _middle_cut(line, keep))) > room and keep > 1:
        keep = min(keep - 1, int(keep * room / width))
    return text.get_text()


# What an analysis repeated with the same settings may differ in: its cost, as timed and counted.
_COST = frozenset({"wall_seconds", "grad_seconds", "grad_equivalents", "hvps", "hvp_rel_error"})


def _latest(ds: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each checkpoint (its sha256) analysed again as before (the same provenance but its cost,
    and the same results asked) once: the last written, which the file orders after the
    others. A series analysed twice into one file was drawn at every step twice (on the file
    order's axis, six checkpoints for three)."""

    def asked(i: int, d: Mapping[str, Any]) -> tuple:
        prov, e = d.get("provenance") or {}, d.get("eigen") or {}
        if known_checkpoint(d) is None:  # another tool's file: not known the same
            return (i,)
        kept = repr(sorted((k, v) for k, v in prov.items() if k not in _COST))
        parts = tuple(bool(d.get(p)) for p in ("trace", "alignment", "density"))
        return (kept, len(e.get("eigenvalues") or []), e.get("which"), e.get("criterion"), parts)

    last = {asked(i, d): i for i, d in enumerate(ds)}
    return [d for i, d in enumerate(ds) if last[asked(i, d)] == i]


def spectra_figure(
    ds: Sequence[Mapping[str, Any]], held: Sequence[Mapping[str, Any]] = ()
) -> Figure:
    """ESD and eigenvalues for one checkpoint, titled with the settings that tell it from the
    other analyses of that checkpoint in ``held`` (the file's); trajectories over step for
    several, each analysis repeated with the same settings drawn once (:func:`_latest`)."""
    if not ds:
        raise UserError("the file holds no checkpoints to plot.")
    ds = _latest(ds)
    if len({checkpoint_of(d, i) for i, d in enumerate(ds)}) == 1:
        return _checkpoint_figure(ds, held)
    return _series_figure(ds)


# --- training metrics -------------------------------------------------------------------------


def _curve(ax: Axes, cols: Mapping[str, np.ndarray], x: str, y: str, **kw: Any) -> bool:
    """Plot column ``y`` against ``x`` (row index if ``x`` is missing) if ``y`` was recorded.

    Rows of a 2-D column (several eigenvalues per refresh) contribute their first entry.
    """
    if not _recorded(cols, y):
        return False
    values = np.asarray(cols[y], dtype=float)
    xs = np.asarray(cols[x]) if x in cols else np.arange(len(values))
    n = min(len(xs), len(values))
    values = values[:n] if values.ndim == 1 else values[:n, 0]
    if "marker" not in kw:
        # A line draws nothing of a point with no finite neighbour: a run stopped after one
        # step had empty loss and accuracy panels (as had a step between two whose minibatch
        # held no label, NaN).
        finite = np.isfinite(values)
        alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
        if alone.any():
            kw |= {"marker": ".", "markevery": alone.tolist()}
    ax.plot(xs[:n], values, **kw)
    return True


def _recorded(cols: Mapping[str, np.ndarray], *names: str) -> bool:
    """Whether any of the columns ``names`` holds a number (a regression run's accuracy is all
    NaN: a panel for it drew no line, on an axis from -0.045 to 0.045)."""
    return any(
        name in cols and np.isfinite(np.asarray(cols[name], dtype=float)).any() for name in names
    )


def _epoch_axis(ax: Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_WholeNumbers())


def _step_axis(ax: Axes) -> None:
    """Steps are whole numbers: a short run's axis had ticks at 0.5, 1.5, ..."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(_WholeNumbers())


def _loss_axis(ax: Axes, title: str) -> None:
    """Title, label and legend of a loss panel, on a log scale where every loss is positive."""
    # NaN (a step whose minibatch held no label) is no loss: one put the whole run on a linear
    # scale.
    if not any((np.asarray(line.get_ydata()) <= 0).any() for line in ax.get_lines()):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")


def _mark_unconverged(ax: Axes, cols: Mapping[str, np.ndarray], y: str, tol: float | None) -> bool:
    """A red x on each row of ``y`` whose residual is above the ``tol`` its solve aimed for
    (its budget spent, or its residual stalled), as the spectra plots mark pairs NOT converged;
    whether any is."""
    if tol is None or not {"step", "residual", y} <= cols.keys():
        return False
    step, value, residual = (np.asarray(cols[c], dtype=float) for c in ("step", y, "residual"))
    first = value if value.ndim == 1 else value[:, 0]  # as _curve draws a 2-D column
    residual = residual if residual.ndim == 1 else residual[:, 0]
    bad = above_tol(residual, tol)  # as show and train count them
    ax.plot(step[bad], first[bad], "x", color="C3", ms=8, mew=2)
    return bool(bad.any())


def run_title(path: Path, info: Mapping[str, Any]) -> str:
    """What a metrics file's figure is of: its run directory (the file, where it is not a run's
    metrics.h5), and the model, data and optimizer its config records. The figures of two runs
    were told apart by nothing."""
    run = path.resolve().parent.name if path.name == "metrics.h5" else path.name
    try:
        cfg = json.loads(info["config"])
    except (KeyError, TypeError, ValueError):  # none, or not JSON: another tool's file
        return run
    if not isinstance(cfg, dict) or not {"model", "data", "optimizer"} <= cfg.keys():
        return run
    sam = {"rho": "ρ", "alpha": "α"} if cfg["optimizer"] == "eigensam" else {"rho": "ρ"}
    how = ", ".join(f"{sign}={cfg[k]}" for k, sign in sam.items() if k in cfg)
    base = cfg.get("base_optimizer") or "sgd"
    # sgd: the base optimizer's own steps (no SAM), as train's first line says it
    how = (
        base
        if cfg["optimizer"] == "sgd"
        else f"{cfg['optimizer']} ({base}{', ' + how if how else ''})"
    )
    return f"{run}: {cfg['model']} on {cfg['data']} with {how}"


def metrics_figure(
    metrics: Mapping[str, Mapping[str, np.ndarray]],
    tolerances: Mapping[str, float] | None = None,
    heading: str = "",
    batchnorm_layers: int | None = None,
) -> Figure:
    """Training curves: loss, accuracy, lambda_max and alignment, where recorded; ``tolerances``
    (the file's ``tol`` of each curvature group) mark the eigenvalues that did not converge;
    ``heading`` (:func:`run_title`) above them; ``batchnorm_layers`` (the file's, None where it
    records none) says which losses the two eigenvalues are of."""
    steps, epochs = metrics.get("steps") or {}, metrics.get("epochs") or {}
    refresh, track = metrics.get("refresh") or {}, metrics.get("track") or {}
    panels = []
    if _recorded(steps, "loss"):
        panels.append("loss")
    # Epoch rows hold no step to place them on the steps' axis: a panel of their own (the
    # test loss was not drawn where per-step losses were).
    if _recorded(epochs, "train_loss", "test_loss"):
        panels.append("epoch loss")
    if _recorded(steps, "accuracy") or _recorded(epochs, "train_accuracy", "test_accuracy"):
        panels.append("accuracy")
    if _recorded(track, "lambda_max") or _recorded(refresh, "eigenvalue"):
        panels.append("curvature")
    if _recorded(refresh, "alignment"):
        panels.append("alignment")
    if not panels:
        raise UserError("the metrics file holds no loss, accuracy or curvature to plot.")
    fig, axes = _figure(len(panels))
    ax_of = dict(zip(panels, axes, strict=True))
    if ax := ax_of.get("loss"):
        _curve(ax, steps, "step", "loss", lw=0.8, alpha=0.7, label="train (per step)")
        _step_axis(ax)
        _loss_axis(ax, "Loss")
    if ax := ax_of.get("epoch loss"):
        _curve(ax, epochs, "epoch", "train_loss", marker="o", label="train")
        _curve(ax, epochs, "epoch", "test_loss", marker="o", label="test")
        _epoch_axis(ax)
        _loss_axis(ax, "Loss per epoch" if "loss" in ax_of else "Loss")
    if ax := ax_of.get("accuracy"):
        train = _curve(ax, epochs, "epoch", "train_accuracy", marker="o", label="train")
        test = _curve(ax, epochs, "epoch", "test_accuracy", marker="o", label="test")
        if train or test:
            _epoch_axis(ax)
        else:
            _curve(ax, steps, "step", "accuracy", lw=0.8, label="train (per step)")
            _step_axis(ax)
        ax.set_title("Accuracy")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize="small")
    if ax := ax_of.get("curvature"):
        # Two Hessians: with BatchNorm 100x apart (running statistics against the batch's), and
        # "tracked" beside "at refresh" said not why. Files before 2026-12-02 do not say whether
        # the model has BatchNorm: "running BatchNorm statistics" was said of models without any.
        held, own = "λ_max, held-out batch", "λ1 at refresh, its training minibatch"
        if batchnorm_layers is None:
            held += " (eval mode: any BatchNorm by its running statistics)"
        elif batchnorm_layers:  # "its" left out: the legend fits the panel
            held += " (eval mode: BatchNorm by running statistics)"
            own = "λ1 at refresh, training minibatch (train mode: BatchNorm by batch statistics)"
        _curve(ax, track, "step", "lambda_max", marker=".", label=held)
        _curve(ax, refresh, "step", "eigenvalue", ls="", marker="x", label=own)
        tol = tolerances or {}
        bad = [_mark_unconverged(ax, track, "lambda_max", tol.get("track"))]
        bad.append(_mark_unconverged(ax, refresh, "eigenvalue", tol.get("refresh")))
        _step_axis(ax)
        ax.set_ylabel("eigenvalue")
        title = "Top Hessian eigenvalue"  # a row above its tol was drawn as if converged
        ax.set_title(f"{title} (red x: NOT converged)" if any(bad) else title)
        ax.legend(fontsize="small")
    if ax := ax_of.get("alignment"):
        _curve(ax, refresh, "step", "alignment", marker="o", ms=3)
        _step_axis(ax)
        ax.set_ylabel("|<ĝ, v1>|")
        ax.set_title("Gradient alignment at eigenvector refresh")
    if heading:
        _fitted_title(fig, heading)
    return fig
