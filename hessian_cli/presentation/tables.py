"""Terminal tables (Rich renderables) built from report dicts and metrics columns.

They only format: every number comes from :func:`hessian_cli.report.analysis_to_dict` (or
:func:`hessian_cli.storage.read_metrics`), so what is shown is exactly what ``--json`` prints.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hessian_cli.presentation import DASH, counted
from hessian_cli.storage.hdf5 import FORMAT_VERSION
from hessian_cli.storage.metrics import METRICS_VERSION, above_tol, batchnorm_layers

NOT_CONVERGED = "[bold red]NOT converged[/]"
# The provenance shown above the tables; `show --json` and the HDF5 attrs hold all of it.
SUMMARY_KEYS = (
    "checkpoint",
    "weights_key",  # these two only where the weights were a part of the file
    "weights_prefix",
    "model",
    "model_kwargs",  # what was built, also where a checkpoint's names chose it (shortcut "A")
    "data",
    "loss",
    "params_glob",  # only where --params restricted the Hessian (not "*")
    "num_params",
    "num_samples",
    "dtype",
    "device",
    "step",
    "epoch",
)


def _g(x: Any, spec: str = ".6g") -> str:
    return DASH if x is None else format(x, spec)


def _missing(x: Any) -> bool:
    """A number that is absent or NaN: read from a file, or as JSON's null."""
    return x is None or math.isnan(x)


def _int(x: Any) -> str:
    return DASH if x is None else f"{int(x):,}"


def _of_samples(n: int | None) -> str:
    """How many random samples a standard error rests on (Hutch++: a third of the probes);
    with few, ± SE reads more precise than it is."""
    return "" if n is None else f" of {n:,} random sample{'s' if n != 1 else ''}"


def _with_known(k: int | None) -> str:
    """The eigenvectors that began Hutch++'s sketch, where any did."""
    return f" with {counted(k, 'eigenvector')} in its sketch" if k else ""


def _beside_known(k: int | None) -> str:
    """The eigenvalues the density took as they are, where it took any."""
    return f" beside {counted(k, 'eigenvalue')} taken exactly" if k else ""


def _seconds(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{x:.2f} s" if x < 120 else f"{x / 60:.1f} min"


def cost_line(cost: Mapping[str, Any]) -> str | None:
    """``HVPs, gradient-equivalents, wall time, device`` for the parts that are known."""
    parts = []
    if cost.get("hvps") is not None:
        parts.append(counted(cost["hvps"], "HVP"))
    if cost.get("grad_equivalents") is not None:
        parts.append(f"{_g(cost['grad_equivalents'], '.4g')} gradient-equivalents")
    if cost.get("seconds") is not None:
        parts.append(f"wall {_seconds(cost['seconds'])}")
    if cost.get("device") is not None:
        parts.append(f"on {cost['device']}")
    return "cost: " + ", ".join(parts) if parts else None


# The eigenvalues a solve looked for (EigenResult.which), in words.
_WHICH_WORDS = {
    "largest": "largest eigenvalues",
    "smallest": "smallest eigenvalues",
    "both": "eigenvalues at both ends",
}

# Why a solve that left pairs unconverged ended (EigenResult.stop_reason), in words.
STOP_REASONS = {
    "stalled": "the residuals stopped improving (the products' rounding noise)",
    "slow": "the residuals improved too slowly (crowded eigenvalues)",
    "budget": "the HVP budget was spent",
    "exhausted": "the Krylov space could not grow",
    "unverified": "the full-precision check of the residuals failed",
}


def idle_ranks_note(reports: Sequence[Mapping[str, Any]]) -> str | None:
    """Under torchrun ranks share the analysed batches whole: with fewer batches than ranks
    (by default analyze takes one) the others compute nothing, which the job's speed alone
    did not say. None where every rank held a batch (or nothing was analysed)."""
    if not reports:
        return None
    batches = max(r["provenance"]["num_batches"] for r in reports)
    ranks = reports[0]["provenance"]["world_size"]
    if batches >= ranks:
        return None
    idle = ranks - batches
    return (
        f"note: {counted(batches, 'batch', 'batches')} for {ranks} ranks, so {idle} of them held "
        "none and computed nothing: a smaller --batch-size (or more --num-samples) gives every "
        "rank a share."
    )


def unconverged_warning(
    reports: Sequence[Mapping[str, Any]],
    *,
    tol: float,
    precision: str,
    dtype: str,
    budget_accepted: bool = False,
) -> str | None:
    """The warning (Rich markup) for reports with pairs that did not converge, and what to do
    about it by why they stopped (where the budget the user set, ``budget_accepted``, ran out:
    that it was accepted); None where every pair converged."""
    unconverged = [
        (r["name"], sum(not c for c in r["eigen"]["converged"]))
        for r in reports
        if r["eigen"] and not all(r["eigen"]["converged"])
    ]
    if not unconverged:
        return None
    what = escape(", ".join(f"{n}: {counted(c, 'pair')}" for n, c in unconverged))  # names: text
    # Of the unconverged only: a series' converged checkpoints ("converged") hid the budget.
    reasons = {
        r["eigen"]["stop_reason"]
        for r in reports
        if r["eigen"] and not all(r["eigen"]["converged"])
    }
    remedy = (
        " or use --precision full"
        if precision != "full"
        else " or use --dtype float64"
        if dtype != "float64"
        else ""
    )
    if budget_accepted and reasons <= {"budget"}:
        return f"[bold yellow]not converged[/] to tol {tol:g} ({what}); kept, as --max-hvps asks."
    # As the stop reason beside the table says it ("stopped improving" contradicted it there).
    # A space that could not grow holds its pairs as exactly as the products allow: more HVPs
    # change nothing (a float32 whole-space solve at tol 1e-9 was told to raise --max-hvps, and
    # with 1000 given stopped at the same 72).
    why = (
        "the residuals stopped improving"
        if "stalled" in reasons
        else "the Krylov space could not grow"
        if "exhausted" in reasons
        else "the full-precision check of the residuals failed"
    )
    advice = (
        f"{why}, so the products' rounding noise is above the tolerance: loosen --tol{remedy}"
        if reasons & {"stalled", "exhausted", "unverified"}
        else "the residuals improved too slowly for eigenvalues this crowded: loosen --tol, "
        "or pass --max-hvps to accept these"
        if "slow" in reasons
        else "raise --max-hvps to spend more or pass it to accept the budget"
    )
    return f"[bold yellow]not converged[/] to tol {tol:g} ({what}); {advice}."


def no_scale(e: Mapping[str, Any]) -> bool:
    """Whether a solve's scale for tol is the solver's floor for |λ_max|, where every Ritz
    value was 0 (an all-zero Hessian): converged then means a zero residual."""
    scale = e.get("scale")
    return scale is not None and scale <= sys.float_info.min


def _criterion(e: Mapping[str, Any]) -> str:
    """What ``converged`` meant for a solve, as its stop test compared it with tol."""
    scale = e.get("scale")
    if no_scale(e):  # it read "residual ||Hv - λv|| / 2.225e-308 <= tol"
        return "residual ||Hv - λv|| = 0 (every eigenvalue seen was 0: no |λ1| to scale tol by)"
    # The residual test adds what the products' rounding may hide of a residual (its floor,
    # recorded since 2026-12-01), so a float32 residual just below tol is not converged: the
    # caption said it was.
    floor = e.get("floor")
    measure = (
        "the bound on the eigenvalue's relative error (from residual² / gap)"
        if e.get("criterion") == "eigenvalue"
        else f"residual ||Hv - λv|| / {_g(scale, '.4g')}"
        + ("" if floor is None else f" plus its rounding floor {_g(floor, '.2g')}")
    )
    return f"{measure} <= tol {_g(e.get('tol'))}"


def _leading_runs(e: Mapping[str, Any]) -> bool:
    """Whether the pairs called converged are a leading run (of each end, with both ends), as a
    Krylov solve calls them since 2026-11-30; files written before judged each pair alone."""
    ok = [bool(c) for c in e.get("converged") or []]
    half = len(ok) // 2 if e.get("which") == "both" else 0
    return all(end == sorted(end, reverse=True) for end in (ok[:half], ok[half:]))


def _eigen_table(e: Mapping[str, Any]) -> Group:
    # A Krylov solve certifies pairs in order (whole-space ones have every eigenvalue); said
    # only where the flags are so: an older file's pair past an unconverged one was "converged
    # for it and every pair before it".
    in_order = (
        ", for it and every pair before it"
        if e.get("method") != "whole-space" and _leading_runs(e)
        else ""
    )
    how = (
        # Another tool's file may record no which: it read "None; converged means ...".
        f"{_WHICH_WORDS.get(w, w) if (w := e.get('which')) else 'eigenvalues (end not recorded)'}"
        f"{f' by {m}' if (m := e.get('method')) else ''}; "  # not recorded: it said "by None"
        f"converged means {_criterion(e)}{in_order}; "
        f"{_int(e.get('iterations'))} iteration{'' if e.get('iterations') == 1 else 's'}, "
        f"{counted(e.get('hvps'), 'HVP')}, "
        f"{_seconds(e.get('seconds'))}"
    )
    if guard := e.get("guard"):
        how += f" (and {guard} more pair{'s' if guard > 1 else ''} as a guard against skipping one)"
    if checked := e.get("check_hvps"):
        found = e.get("skipped_found") or 0
        how += f"; {checked} of the HVPs looked outside the pairs for a skipped eigenvalue, " + (
            f"found {found} and converged {'it' if found == 1 else 'them'} too"
            if found
            else "found none"
        )
    if e.get("unchecked"):  # the pairs read as checked where the budget ran out before the look
        how += (
            "; not looked outside the pairs for a skipped eigenvalue: too few of the budget's "
            "HVPs (--max-hvps) were left for it"
        )
    if not all(e.get("converged") or [True]) and e.get("stop_reason") in STOP_REASONS:
        how += f"; stopped: {STOP_REASONS[e['stop_reason']]}"
    values = e["eigenvalues"]
    errors = e.get("errors") or [None] * len(values)  # absent from files of older versions
    # Folded, as the series tables are, where a narrow terminal cannot hold the columns: cut
    # ("1.804…") a number read as another.
    table = Table(title="Eigenvalues")
    table.add_column("#", justify="right", overflow="fold")
    table.add_column("eigenvalue", justify="right", overflow="fold")
    table.add_column("residual", justify="right", overflow="fold")
    table.add_column("rel. error ≤", justify="right", overflow="fold")
    table.add_column("converged?", overflow="fold")
    # λ1, λ2, ... and λn, λn-1, ...: with both ends, "#4" read as the 4th largest.
    labels = eigen_labels({e.get("which")}, len(values))
    for i, (label, value, res, err, ok) in enumerate(
        zip(labels, values, e["residuals"], errors, e["converged"], strict=False)
    ):
        if e.get("which") == "both" and i == len(values) // 2:
            table.add_section()  # the smallest, below the largest
        status = "[green]yes[/]" if ok else NOT_CONVERGED
        table.add_row(label, _g(value), _g(res, ".2e"), _g(err, ".2e"), status)
    return Group(table, Text(how, style="dim"))


def _alignment_table(
    al: Mapping[str, Any], batch_size: int | None = None, samples: int | None = None
) -> Table:
    """The scores, with the minibatch spread over batches of ``batch_size`` samples (the spread
    of another --batch-size is another: two tables that read alike but for it said not why),
    ``samples`` in all where recorded (the data's last batch may hold fewer)."""
    mb = al.get("minibatch") or {}
    values = mb.get("values") or []
    m = len(values)
    zero = sum(1 for row in values if any(map(_missing, row)))
    if m == 0:
        caption = "minibatch: none asked for"
    elif m - zero < 2:
        caption = f"minibatch: {'one' if m - zero else 'no'} nonzero batch gradient, so no spread"
    else:
        caption = f"minibatch: over the first {m} batch gradients"
        caption += _batch_sizes(m, batch_size, samples) if batch_size else ""
    if zero:
        caption += f" ({zero} of the {m} exactly zero, left out)"
    if al.get("grad_norm") == 0:
        caption = f"the gradient is exactly zero: the scores of ĝ are undefined; {caption}"
    elif "curvature_ratio" in al and _missing(al["curvature_ratio"]):
        caption += "; curvature ratio undefined where λ1 ≤ 0"
    table = Table(title="SAM alignment", caption=caption)
    table.add_column("score", overflow="fold")  # (folded, not cut: as _eigen_table's)
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("minibatch mean ± std", justify="right", overflow="fold")
    means, stds = mb.get("mean") or [], mb.get("std") or []
    if m - zero < 2:  # files before 2026-11-30 recorded 0 for it, shown as "± 0.0000"
        stds = [None] * len(stds)
    for i, value in enumerate(al.get("alignment") or []):
        spread = (
            f"{_g(means[i], '.4f')} ± {_g(stds[i], '.4f')}"
            if i < min(len(means), len(stds))
            else ""
        )
        table.add_row(f"|<ĝ, v{i + 1}>|", _g(value, ".4f"), spread)
    table.add_row("subspace ||Vᵀĝ||", _g(al.get("subspace_alignment"), ".4f"), "")
    table.add_row("curvature ratio ĝᵀHĝ/λ1", _g(al.get("curvature_ratio"), ".4f"), "")
    table.add_row(
        f"Eigen-SAM alignment (α={_g(al.get('alpha'))})",
        _g(al.get("eigensam_alignment"), ".4f"),
        "",
    )
    table.add_row(f"SAM sharpness (ρ={_g(al.get('rho'))})", _g(al.get("sam_sharpness"), ".4g"), "")
    table.add_row("gradient norm", _g(al.get("grad_norm"), ".4g"), "")
    return table


def _batch_sizes(m: int, batch_size: int, samples: int | None) -> str:
    """The samples in each of ``m`` minibatches of ``batch_size``, ``samples`` in all: where the
    data ran out, the last holds fewer (the digits' 1,300 at --batch-size 1000: 1,000 and 300, both
    said to hold 1,000). Files written before 2026-12-02 record no ``samples``."""
    last = batch_size if samples is None else samples - (m - 1) * batch_size
    if not 0 < last < batch_size:
        return f", {counted(batch_size, 'sample')} each"
    return f", {counted(batch_size, 'sample')} each but the last, {last:,} (where the data ends)"


def _trace_line(t: Mapping[str, Any]) -> str:
    """The trace with its standard error and what it rests on, or with none where it has no
    random part."""
    cost = f"{counted(t.get('hvps'), 'HVP')}, {_seconds(t.get('seconds'))}"
    if t.get("num_samples") == 0:  # it said "± 0 (std. error of 0 random samples; ...)"
        known = t.get("known_eigenpairs") or 0
        if t.get("hvps") == 0:
            how = f"the sum of the {counted(known, 'eigenvalue')} found, which span the space"
        else:  # a sketch as large as the space: it said the eigenvalues found spanned it
            beside = f" the {counted(known, 'eigenvector')} found leave" if known else ""
            how = f"exact, one product per direction{beside}"
        return f"trace {_g(t.get('estimate'))} (no random part: {how}; {cost})"
    return (
        f"trace {_g(t.get('estimate'))} ± {_g(t.get('stderr'), '.3g')} (std. error"
        f"{_of_samples(t.get('num_samples'))}; {t.get('method') or 'method not recorded'}"
        f"{_with_known(t.get('known_eigenpairs'))}, "
        f"{_int(t.get('num_probes'))} probes, {cost})"
    )


def _peak(grid: np.ndarray, values: np.ndarray) -> float:
    """Where the smoothed density peaks: its highest grid point moved to the vertex of the
    parabola through the logs of it and its neighbours (exact for one Gaussian), to a
    thousandth of the spacing. The grid point alone was half a step off: "peak at
    λ≈-5.005e-05" beside nodes [0, 0]."""
    i = int(np.nanargmax(values))
    if not 0 < i < len(grid) - 1 or not (values[i - 1 : i + 2] > 0).all():
        return float(grid[i])
    a, b, c = np.log(values[i - 1 : i + 2])
    step = (grid[i + 1] - grid[i - 1]) / 2
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0
    return float(np.round(grid[i] / step + shift, 3) * step + 0.0)  # + 0.0: no "-0"


def _density_line(dn: Mapping[str, Any]) -> str:
    nodes = np.array(dn.get("nodes") or [], dtype=float)
    weights = np.array(dn.get("weights") or [], dtype=float)
    used = nodes[weights > 0] if nodes.shape == weights.shape else nodes.ravel()
    used = used[np.isfinite(used)]  # stored NaN: "nodes span [nan, nan]"
    support = f"[{used.min():.4g}, {used.max():.4g}]" if used.size else DASH
    grid = np.array(dn.get("grid") or [], dtype=float)
    values = np.array(dn.get("values") or [], dtype=float)
    shown = values.size == grid.size and np.isfinite(values).any()  # NaN: stored non-finite
    peak = f", peak at λ≈{_peak(grid, values):.4g}" if shown else ""
    known = dn.get("known_eigenpairs")
    how = (  # it said "SLQ: 8 probes × 0 steps beside 10 eigenvalues taken exactly"
        f"density: the {counted(known, 'eigenvalue')} found, which span the space (no SLQ)"
        if dn.get("steps") == 0 and known
        else f"density (SLQ): {counted(dn.get('num_probes'), 'probe')} × "
        f"{counted(dn.get('steps'), 'step')}{_beside_known(known)}"
    )
    return (
        f"{how}, nodes span {support}{peak}, smoothing σ={_g(dn.get('sigma'), '.3g')}, "
        f"{counted(dn.get('hvps'), 'HVP')}, {_seconds(dn.get('seconds'))}"
    )


def analysis_table(d: Mapping[str, Any], apart: Sequence[str] = ()) -> RenderableType:
    """Everything known about one checkpoint: eigenpairs, trace, alignment, density and cost;
    ``apart`` the settings that tell it from the file's other analyses of that checkpoint
    (:func:`settings_apart`)."""
    prov = d.get("provenance") or {}
    parts: list[RenderableType] = [Text(str(d.get("name")), style="bold")]
    if prov:
        shown = (
            f"{k}={prov[k]}"
            for k in SUMMARY_KEYS
            if prov.get(k) not in (None, "") and not (k == "params_glob" and prov[k] == "*")
        )
        parts.append(Text("  ".join(shown), style="dim"))
    if apart:  # two analyses that differ only in --seed (no summary key) read alike
        said = settings_said(d, apart)
        parts.append(Text(f"told from the file's other analyses of this checkpoint by: {said}"))
    parts.append(Text(f"loss {_g(d.get('loss'))}"))
    if (precision := analysis_setting(d, "precision")) == UNRECORDED:
        parts.append(Text.from_markup(f"[bold yellow]precision unrecorded:[/] {UNRECORDED_NOTE}."))
    elif precision != "full":
        parts.append(Text.from_markup(_reduced_precision_note(d, prov)))
    if (e := d.get("eigen")) is not None:
        parts.append(_eigen_table(e))
        bad = sum(not c for c in e["converged"])
        if bad:
            parts.append(
                Text.from_markup(
                    f"[bold red]warning:[/] {bad} of {len(e['converged'])} eigenpairs are NOT "
                    "converged; treat their values as estimates only."
                )
            )
    if (t := d.get("trace")) is not None:
        parts.append(Text(_trace_line(t)))
    if (dn := d.get("density")) is not None:
        parts.append(Text(_density_line(dn)))
    if (al := d.get("alignment")) is not None:
        parts.append(_alignment_table(al, prov.get("batch_size"), prov.get("minibatch_samples")))
    if (line := cost_line(d.get("cost") or {})) is not None:
        parts.append(Text(line, style="dim"))
    return Group(*parts)


def _reduced_precision_note(d: Mapping[str, Any], prov: Mapping[str, Any]) -> str:
    """What a reduced-precision analysis says above its numbers (Rich markup): which were checked
    in full precision (the eigenpairs' residuals) and which come from the rounded products."""
    rounded = [
        what
        for key, what in (
            ("trace", "trace"),
            ("density", "density"),
            ("alignment", "curvature ratio"),
        )
        if d.get(key) is not None
    ]
    said = [
        *(["the residuals below are full-precision ones"] if d.get("eigen") is not None else []),
        *([f"from the rounded products alone: {', '.join(rounded)}"] if rounded else []),
    ]
    return (
        f"[bold yellow]reduced precision:[/] products in {escape(str(prov['precision']))}, "
        f"relative error {_g(prov.get('hvp_rel_error'), '.1e')} against full precision"
        + (f" ({'; '.join(said)})" if said else "")
        + "."
    )


# What an analysis was of besides its checkpoint: analyses of one checkpoint that differ in one
# are of another matrix (or another estimate of it, or call other pairs converged), not steps of
# one trajectory. The last four are its eigen part's (:func:`analysis_setting`; tol read from the
# provenance); the others are provenance.
ANALYSIS_SETTINGS = (
    "data",
    "num_samples",
    "batch_size",
    "loss",
    "bn",
    "dtype",
    "precision",
    "seed",
    "tol",
    "criterion",
    "top_k",
    "which",
)


# The precision of a float32 analysis on CUDA by a version before --precision (2026-11-28), which
# recorded none and did not switch TF32 off.
UNRECORDED = "unrecorded"
UNRECORDED_NOTE = (
    "written on CUDA by a version before 2026-11-28, which recorded no precision, left TF32 as "
    "PyTorch sets it (on for cuDNN's convolutions) and checked no residual in full precision"
)


def analysis_setting(d: Mapping[str, Any], key: str) -> Any:
    """One of the :data:`ANALYSIS_SETTINGS` of the analysis ``d`` (None: not recorded, or no
    end searched); ``top_k`` is the eigenpairs asked at each end (0 for none: --top-k 0),
    ``which`` the end(s) searched, ``batch_size`` only under --bn train (by each batch's
    statistics, the matrix is another for another batching: the small CNN's λ1 1.157 in one
    batch of 12, 1.221 in batches of 4; by running statistics the mean is the same)."""
    e = d.get("eigen") or {}
    if key == "batch_size":
        prov = d.get("provenance") or {}
        return prov.get(key) if prov.get("bn") == "train" else None
    if key == "top_k":
        return len(e["eigenvalues"]) // (2 if e.get("which") == "both" else 1) if e else 0
    if key in ("which", "criterion"):  # criterion: what tol bounds (recorded with the pairs)
        return e.get(key)
    if key == "tol" and not e:  # files written before 2026-12-01 recorded one, never used
        return None
    if key == "precision":  # files before 2026-11-28 record none
        prov = d.get("provenance") or {}
        if prov.get(key) is not None:
            return prov[key]
        # Those versions left TF32 as PyTorch sets it, on for cuDNN's convolutions: full
        # precision only off CUDA (a CUDA file was shown as full), or in float64, which TF32
        # leaves alone.
        cuda = str(prov.get("device")).startswith("cuda")
        return UNRECORDED if cuda and prov.get("dtype") != "float64" else "full"
    return (d.get("provenance") or {}).get(key)


# Settings of the eigenpairs, which an analysis without them (--top-k 0) has none of.
OF_PAIRS = ("tol", "criterion", "top_k", "which")


def differing_settings(ds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The :data:`ANALYSIS_SETTINGS` whose values differ between the analyses ``ds``; those of
    the eigenpairs between the analyses that have some (beside a --top-k 0 analysis, tol was a
    column of one value and dashes)."""

    def values(k: str) -> set[str]:
        return {repr(analysis_setting(d, k)) for d in ds if d.get("eigen") or k not in OF_PAIRS}

    return [k for k in ANALYSIS_SETTINGS if len(values(k)) > 1]


def settings_apart(d: Mapping[str, Any], held: Sequence[Mapping[str, Any]]) -> list[str]:
    """The settings in which the analyses ``held`` of ``d``'s checkpoint
    (:func:`known_checkpoint`) differ, of those that ``d`` has (an analysis without eigenpairs
    has no tol)."""
    known = known_checkpoint(d)
    same = [h for h in held if known is not None and known_checkpoint(h) == known]
    return [k for k in differing_settings(same) if d.get("eigen") or k not in OF_PAIRS]


def settings_said(d: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The settings ``keys`` of the analysis ``d``, as "seed=1, bn=eval"."""
    return ", ".join(f"{k}={DASH if (v := analysis_setting(d, k)) is None else v}" for k in keys)


def trace_cell(t: Mapping[str, Any] | None) -> str:
    """A series row's trace, with its standard error where it has a random part."""
    if not t:
        return DASH
    random = t.get("stderr") is not None and t.get("num_samples") != 0  # 0: no random part
    return _g(t["estimate"], ".5g") + (f" ± {_g(t['stderr'], '.2g')}" if random else "")


def series_table(
    ds: Sequence[Mapping[str, Any]],
    densities_shown: str = "--json prints them",
    details: str | None = None,
) -> Table:
    """One row per checkpoint, in file order: step, epoch, top eigenvalues, trace, alignment;
    a caption says which rows hold a density, which no column shows, and ``densities_shown``
    where to see them, and ends with ``details``: where to see a row in full."""
    k = max((len(d["eigen"]["eigenvalues"]) for d in ds if d.get("eigen")), default=0)
    table = Table(title=analyses_of_checkpoints(ds), caption_justify="left")
    longest = max((len(str(d.get("name"))) for d in ds), default=10)
    table.add_column("checkpoint", min_width=min(longest, 40), overflow="fold")
    whiches = {(d.get("eigen") or {}).get("which") for d in ds}
    labels = eigen_labels(whiches, k)
    # Searches that differ between rows: each row says which of its ends the #i columns hold.
    mixed = len(whiches - {None}) > 1
    which = ["which"] if mixed else []
    # Checkpoints of different models or runs appended to one file: each row says which.
    models = ["model"] if model_count(ds) > 1 else []
    runs = ["directory"] if several_runs(ds) else []
    # Analyses of other settings (another --num-samples, say): rows that differ only in those
    # (the eigenvalue columns show how many pairs each asked, at which end).
    settings = [k for k in differing_settings(ds) if k not in ("top_k", "which")]
    # Columns of what no row holds were a column of dashes each (analyze without --trace).
    traces = ["trace"] if any(d.get("trace") for d in ds) else []
    alignments = ["|<ĝ,v1>|", "||Vᵀĝ||"] if any(d.get("alignment") for d in ds) else []
    columns = (
        *("step", "epoch", *models, *runs, *settings, *which, *labels),
        *traces,
        *alignments,
    )
    for label in columns:
        # On a narrow terminal digits fold onto a second line, never cut to "4.7…".
        table.add_column(label, justify="right", overflow="fold")
    unconverged = False
    for d in ds:
        prov = d.get("provenance") or {}
        e = d.get("eigen") or {}
        cells = []
        values, ok = e.get("eigenvalues") or [], e.get("converged") or []
        for i in eigen_columns(e, whiches, k):
            if i is None:
                cells.append(DASH)
            elif i < len(ok) and ok[i]:
                cells.append(_g(values[i], ".5g"))
            else:
                cells.append(f"[red]{_g(values[i], '.5g')}*[/]")
                unconverged = True
        t, al = d.get("trace"), d.get("alignment")
        first = (al or {}).get("alignment") or [None]
        table.add_row(
            escape(str(d.get("name"))),  # a name, not markup: net[red].pt
            str(prov.get("step", DASH)),
            str(prov.get("epoch", DASH)),
            *([escape(model_cell(prov))] if models else []),
            *([escape(run_directory(prov))] if runs else []),
            *(escape(str(DASH if (v := analysis_setting(d, k)) is None else v)) for k in settings),
            *([e.get("which") or DASH] if mixed else []),
            *cells,
            *([trace_cell(t)] if traces else []),
            *([_g(first[0], ".3f"), _g(al.get("subspace_alignment"), ".3f")] if al else []),
            *([DASH, DASH] if alignments and not al else []),
        )
    notes: list[str] = []
    if unconverged:
        notes.append(
            "* NOT converged (not within its tolerance, or behind a pair that is not; details: "
            "show -c NAME)"
        )
    if unlooked := sum(bool((d.get("eigen") or {}).get("unchecked")) for d in ds):
        notes.append(
            f"not looked outside the pairs for a skipped eigenvalue ({unlooked} of the "
            f"{len(ds)} rows): too few of the budget's HVPs (--max-hvps) were left for it"
        )
    # A series of densities alone (--top-k 0 --density) was a table of steps that said none.
    if densities := sum(bool(d.get("density")) for d in ds):
        notes.append(
            f"spectral density: {densities} of the {len(ds)} rows "
            f"{'holds' if densities == 1 else 'hold'} one, not shown here: "
            f"{densities_shown}"
        )
    unrecorded = sum(analysis_setting(d, "precision") == UNRECORDED for d in ds)
    if unrecorded:
        of = f"{unrecorded} of {analyses_of_checkpoints(ds)}"
        notes.append(f"precision unrecorded ({of}): {UNRECORDED_NOTE}")
    rounded = [d for d in ds if analysis_setting(d, "precision") not in ("full", UNRECORDED)]
    if rounded:  # as one checkpoint's table says above its numbers
        reduced = [d["provenance"] for d in rounded]
        modes = escape(", ".join(sorted({str(p["precision"]) for p in reduced})))  # a file's text
        errors = [p["hvp_rel_error"] for p in reduced if p.get("hvp_rel_error") is not None]
        # Only of what those rows hold: it spoke of both where one was not there.
        eigen, trace = (any(d.get(key) for d in rounded) for key in ("eigen", "trace"))
        checked = (
            "; the eigenvalues were checked in full precision, the traces were not"
            if eigen and trace
            else "; the eigenvalues were checked in full precision"
            if eigen
            else "; the traces were not checked in full precision"
            if trace
            else ""
        )
        notes.append(
            f"reduced precision ({len(reduced)} of {analyses_of_checkpoints(ds)}): products "
            f"in {modes}, relative error up to {_g(max(errors, default=None), '.1e')} against "
            f"full precision{checked}"
        )
    if details:
        notes.append(details)
    if notes:
        table.caption = "\n".join(notes)
    return table


def model_key(d: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """The model a checkpoint's analysis is of: model spec, the parameters its Hessian is of
    (``--params``) and their count, where its file records the spec and count (None: other
    files' checkpoints, which count as any)."""
    prov = d.get("provenance") or {}
    if "model" not in prov or "num_params" not in prov:
        return None
    return (prov["model"], _params_glob(prov), prov["num_params"])


def _params_glob(prov: Mapping[str, Any]) -> str | None:
    """The ``--params`` globs an analysis was restricted to; None for the whole model."""
    glob = prov.get("params_glob")
    return None if glob in (None, "", "*") else str(glob)


def run_key(d: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The run a checkpoint belongs to: its model (:func:`model_key`) and the directory it was
    read from (a training run's checkpoints share one); None where the file records no model."""
    model = model_key(d)
    if model is None:
        return None
    checkpoint = (d.get("provenance") or {}).get("checkpoint")
    return (*model, None if checkpoint is None else str(_run_folder(checkpoint)))


def run_directory(prov: Mapping[str, Any]) -> str:
    """The last two parts of the directory a checkpoint was read from (``exp1/checkpoints``)."""
    checkpoint = prov.get("checkpoint")
    return DASH if checkpoint is None else str(PurePath(*_run_folder(checkpoint).parts[-2:]))


# A Hugging Face Trainer's checkpoint folder (checkpoint-500/), one per saved step of a run.
_TRAINER_FOLDER = re.compile(r"checkpoint-\d+")


def _run_folder(checkpoint: Any) -> PurePath:
    """The folder of a checkpoint's run: the one it was read from, or for the weights in a
    Trainer's checkpoint folder (``out/checkpoint-500/model.safetensors``) the output folder
    that holds them all, the run they are steps of."""
    folder = PurePath(str(checkpoint)).parent
    return folder.parent if _TRAINER_FOLDER.fullmatch(folder.name) else folder


def several_runs(ds: Sequence[Mapping[str, Any]]) -> bool:
    """Whether one model's checkpoints in ``ds`` come from several directories (runs)."""
    keys = {run_key(d) for d in ds} - {None}
    return len(keys) > len({key[:-1] for key in keys})


def model_count(ds: Sequence[Mapping[str, Any]]) -> int:
    """How many models the checkpoints are of (see :func:`model_key`)."""
    return max(len({model_key(d) for d in ds} - {None}), 1)


def model_cell(prov: Mapping[str, Any]) -> str:
    """A model as the tables name it: its spec, the parameters analysed where not all, and
    their count."""
    glob = _params_glob(prov)
    part = "" if glob is None else f" [{glob}]"
    return f"{prov.get('model', DASH)}{part} ({_int(prov.get('num_params'))})"


def eigen_labels(whiches: set[str | None], count: int) -> list[str]:
    """Column labels: λ1, λ2, ... for the largest; λn, λn-1, ... for the smallest; both in turn
    for ``which="both"`` (the largest half first); positions where the files' searches differ."""
    whiches = whiches - {None}
    smallest = ["λn"] + [f"λn-{i}" for i in range(1, count)]
    if whiches == {"smallest"}:
        return smallest[:count]
    if whiches == {"both"}:
        half = count // 2
        return [f"λ{i + 1}" for i in range(half)] + smallest[:half]
    if whiches <= {"largest"}:
        return [f"λ{i + 1}" for i in range(count)]
    return [f"#{i + 1}" for i in range(count)]


def eigen_columns(e: Mapping[str, Any], whiches: set[str | None], count: int) -> list[int | None]:
    """For each of the ``count`` columns :func:`eigen_labels` names, the index of the
    checkpoint's eigenvalue that belongs there (None: it has none). With both ends, fewer
    pairs than the others fill the first columns of each end: a top-2 checkpoint's smallest
    eigenvalue stood under the λ3 of a top-3 one."""
    n = len(e.get("eigenvalues") or [])
    if whiches - {None} != {"both"}:
        return [i if i < n else None for i in range(count)]
    half, own = count // 2, n // 2
    largest = [i if i < own else None for i in range(half)]
    return largest + [own + i if i < n - own else None for i in range(half)]


def known_checkpoint(d: Mapping[str, Any]) -> Any:
    """Which checkpoint the analysis ``d`` is of: its sha256 (a path may have held another,
    latest.pt); where the file records none (another tool's or a script's), its path with its
    step and epoch, which two analyses of one file share (they were two checkpoints, never
    counted, placed or titled as one); None where it records neither, or no step or epoch (a
    path alone may have held several)."""
    prov = d.get("provenance") or {}
    if prov.get("sha256"):
        return prov["sha256"]
    place = (prov.get("step"), prov.get("epoch"))
    if prov.get("checkpoint") is None or place == (None, None):
        return None
    return (str(prov["checkpoint"]), repr(place))


def checkpoint_of(d: Mapping[str, Any], i: int) -> Any:
    """:func:`known_checkpoint` of the ``i``-th analysis ``d``, or ``i`` where that is None."""
    known = known_checkpoint(d)
    return i if known is None else known


def analyses_of_checkpoints(ds: Sequence[Mapping[str, Any]]) -> str:
    """How many checkpoints ``ds`` are analyses of, and how many analyses where more: a series
    analysed twice into one file read "6 checkpoints" for 3."""
    n = len({checkpoint_of(d, i) for i, d in enumerate(ds)})
    held = counted(n, "checkpoint")
    return held if n == len(ds) else f"{counted(len(ds), 'analysis', 'analyses')} of {held}"


def file_summary(
    path: str | Path,
    ds: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any] | None = None,
    held: Sequence[Mapping[str, Any]] | None = None,
) -> RenderableType:
    """What a spectra file is and holds; ``info`` is :func:`~hessian_cli.storage.read_file_info`,
    ``held`` every analysis in the file where ``ds`` are those --checkpoint picked."""
    info = info or {}
    lines = [Text(f"{path}", style="bold")]
    version = info.get("format_version")
    what = f"hessian-cli spectra file (format version {version})" if version else "spectra file"
    held = ds if held is None else held
    shown = "" if len(ds) == len(held) else f", {len(ds)} shown"
    lines.append(Text(f"{what}, {analyses_of_checkpoints(held)}{shown}"))
    if (note := newer_format_note(info, metrics=False)) is not None:
        lines.append(Text(note, style="yellow"))
    if (note := _initial_statistics_note(ds)) is not None:
        lines.append(Text(note, style="yellow"))
    return Group(*lines, *_written_by(info))


def newer_format_note(info: Mapping[str, Any], *, metrics: bool) -> str | None:
    """What a spectra or metrics file (root attributes ``info``) of a newer format version than
    this hessian-cli writes may hold unsaid: a version is bumped where older readers would
    misread the file (docs/hdf5.md), and `show` read one as its own. None for this version or
    an older one."""
    version = _metrics_version(info) if metrics else info.get("format_version")
    known = METRICS_VERSION if metrics else FORMAT_VERSION
    if not isinstance(version, int) or version <= known:
        return None
    return (
        f"note: format version {version} is newer than this hessian-cli reads ({known}): what "
        "that version added is not shown, and what it changed may be misread; upgrade "
        "hessian-cli to read it all."
    )


def _metrics_version(info: Mapping[str, Any]) -> Any:
    """A metrics file's format version (one written before 2026-11-29 names it ``version``)."""
    return info.get("format_version", info.get("version"))


def _initial_statistics_note(ds: Sequence[Mapping[str, Any]]) -> str | None:
    """What analyze said as it set up the analyses ``ds`` whose BatchNorm layers (or
    InstanceNorm layers with running statistics) held their initial running statistics
    (provenance ``bn_initial_statistics``, a count: the file does not say which kind), which
    `show` left unsaid; None where none did."""
    held = [d for d in ds if (d.get("provenance") or {}).get("bn_initial_statistics")]
    if not held:
        return None
    if len(ds) == 1:
        count = held[0]["provenance"]["bn_initial_statistics"]
        where = f"{counted(count, 'BatchNorm (or InstanceNorm) layer')} held"
    else:
        names = ", ".join(str(d.get("name")) for d in held[:5])
        more = f", ... ({len(held)} in all)" if len(held) > 5 else ""
        where = (
            f"in {len(held)} of the {analyses_of_checkpoints(ds)} ({names}{more}) BatchNorm (or "
            "InstanceNorm) layers held"
        )
    return (
        f"note: {where} initial running statistics (mean 0, variance 1: no training step "
        "updated them), by which eval mode does not normalise, so these are the numbers of an "
        "unnormalised network; --bn train normalises by each batch's statistics (InstanceNorm by "
        "each sample's)."
    )


def _written_by(info: Mapping[str, Any]) -> list[Text]:
    """Which versions wrote a file, when, and its last command (root attributes; a metrics file
    written before 2026-11-29 names the versions ``tool``, "hessian-cli 0.1.0", and ``torch``,
    and records no ``modified``: it showed none of them)."""
    lines = []
    tool = info.get("tool_version") or str(info.get("tool") or "").removeprefix("hessian-cli ")
    if tool:
        torch = info.get("torch_version") or info.get("torch")
        said = [f"written by hessian-cli {tool}" + (f" (torch {torch})" if torch else "")]
        said += [f"{when} {info[when]}" for when in ("created", "modified") if info.get(when)]
        lines.append(Text(", ".join(said), style="dim"))
    if info.get("command_line"):
        lines.append(Text(f"last command: {info['command_line']}", style="dim"))
    return lines


def _cell(values: np.ndarray, i: int) -> str:
    """Row ``i`` of a metrics column; a dash for NaN (a regression run's accuracy), as the
    spectra tables show a missing number."""
    v = values[i]
    if np.ndim(v):  # a row of several numbers, e.g. several eigenvalues at one refresh
        return ", ".join(DASH if _missing(x) else format(float(x), ".4g") for x in np.ravel(v))
    if values.dtype.kind in "biu":
        return str(int(v))
    return DASH if _missing(float(v)) else format(float(v), ".5g")


def columns_table(title: str, columns: Mapping[str, np.ndarray], max_rows: int = 50) -> Table:
    """A table of equally long metrics columns, showing the last ``max_rows`` rows."""
    n = max((len(c) for c in columns.values()), default=0)
    first = max(0, n - max_rows)
    table = Table(title=title, caption_justify="left")
    for name in columns:
        table.add_column(escape(name), justify="right", overflow="fold")
    for i in range(first, n):
        table.add_row(*(_cell(c, i) if i < len(c) else DASH for c in columns.values()))
    if first:
        table.caption = f"last {max_rows} of {n} rows; --json shows all"
    return table


def _ordered(columns: Mapping[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """The index column (``epoch``, ``step``) first, the rest in stored order."""
    return {k: columns[k] for k in sorted(columns, key=lambda c: c != key)}


# A metrics group's rows in words, one and several ("1 epochs, 1 refresh" before).
_ROW_NAMES = {
    "steps": ("step", "steps"),
    "epochs": ("epoch", "epochs"),
    "refresh": ("refresh", "refreshes"),
    "track": ("track", "tracks"),
}


def metrics_summary(
    path: str | Path, metrics: Mapping[str, Mapping[str, np.ndarray]], info: Mapping[str, Any]
) -> RenderableType:
    """A metrics file: counts per record kind, the epoch table, eigenvector refreshes and the
    tracked lambda_max."""
    parts: list[RenderableType] = [Text(str(path), style="bold")]
    version = _metrics_version(info)
    counts = ", ".join(
        counted(max((len(c) for c in cols.values()), default=0), *_ROW_NAMES.get(name, (name,) * 2))
        for name, cols in metrics.items()
    )
    what = "hessian-cli metrics file" + (f" (format version {version})" if version else "")
    parts.append(Text(f"{what}: {counts or 'empty'}"))
    if (note := newer_format_note(info, metrics=True)) is not None:
        parts.append(Text(note, style="yellow"))
    parts.extend(_written_by(info))
    steps = metrics.get("steps") or {}
    if "loss" in steps and np.ndim(steps["loss"]) == 1:  # 2-D: a table
        loss = np.asarray(steps["loss"], dtype=float)
        loss = loss[~np.isnan(loss)]  # NaN: a step whose minibatch held no label (no update)
        if len(loss):
            parts.append(Text(f"per-step loss: first {loss[0]:.5g}, last {loss[-1]:.5g}"))
    if metrics.get("epochs"):
        parts.append(columns_table("Epochs", _ordered(metrics["epochs"], "epoch")))
    tolerances = info.get("tolerances") or {}
    for group, title in (
        ("refresh", "Eigenvector refreshes"),
        ("track", "λmax of the held-out batch"),
    ):
        if metrics.get(group):
            parts.append(columns_table(title, _ordered(metrics[group], "step")))
            if said := _converged_rows(metrics[group], tolerances.get(group)):
                parts.append(Text(said, style="dim"))  # a caption wraps at the table's width
    if said := _batchnorm_note(metrics, batchnorm_layers(info)):
        parts.append(Text(said, style="dim"))
    return Group(*parts)


def _batchnorm_note(
    metrics: Mapping[str, Mapping[str, np.ndarray]], layers: int | None
) -> str | None:
    """Which losses the curvature tables' eigenvalues are of, where the model's normalisation
    layers make them differ (by BatchNorm 100x apart), which the tables left unsaid; None
    without such layers, or where the file does not say (written before 2026-12-02)."""
    track, refresh = bool(metrics.get("track")), bool(metrics.get("refresh"))
    if not layers or not (track or refresh):
        return None
    held, own = "λmax is of eval mode (running statistics)", "of train mode (each minibatch's)"
    if track and refresh:
        said = f"{held}, the refreshes' eigenvalues {own}, so the two differ in kind"
    else:
        said = held if track else f"the refreshes' eigenvalues are {own}"
    return f"the model has {counted(layers, 'BatchNorm (or InstanceNorm) layer')}: {said}."


def _converged_rows(columns: Mapping[str, np.ndarray], tol: float | None) -> str | None:
    """How many of a curvature group's rows met the tolerance their solves aimed for (files
    written before 2026-11-30 record none)."""
    residual = columns.get("residual")
    if tol is None or residual is None or np.ndim(residual) != 1:
        return None
    short = int(np.sum(above_tol(residual, tol)))
    # A top eigenvalue of 0 has no residual relative to it (eigensam's top_residual: inf): its
    # solve did not fall short of tol for it (an all-zero Hessian's residual is 0).
    zero = int(np.sum(np.isinf(residual)))
    met = len(residual) - short - zero
    rest = f"; {zero} found a top eigenvalue of 0 (no residual relative to it)" if zero else ""
    if short:  # "the others" where there was one; a count beside the zero ones
        # The file records no stop reason: a solve also ends above tol where its residual stops
        # improving (a track 0.036 for 1e-3 after 84 of its 200 HVPs), said to be the budget.
        who = f"{short}" if zero else "the other" if short == 1 else "the others"
        rest += (
            f"; {who} ended above it ({'its' if short == 1 else 'their'} HVP budget spent, "
            "or the residual stopped improving)"
        )
    return f"converged (residual <= tol {tol:g}): {met} of {len(residual)}{rest}"
