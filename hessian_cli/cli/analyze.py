"""``hessian-cli analyze``: parse the options, call :mod:`hessian_cli.analysis`, render."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hessian_cli.cli.app import (
    app,
    err_console,
    exit_interrupted,
    import_torch,
    print_json,
    results_console,
)
from hessian_cli.cli.options import (
    DATA_HELP,
    MODEL_HELP,
    command_line,
    file_path,
    fixed_word,
    given_path,
    parse_model_kwargs,
    refuse_empty,
    refuse_unused,
)
from hessian_cli.engine.solver_defaults import (
    BLOCK_PER_PAIRS,
    BUDGET_PER_PAIR,
    CHECK_REACH,
    CHECK_STEPS,
    DEFAULT_BLOCK_SIZE,
    GUARD_PER_PAIRS,
    LOOSE_CHECK,
    LOOSE_TOL,
    MIN_BUDGET,
)
from hessian_cli.errors import Terminated, UserError

EXIT_UNCONVERGED = 3
# What a phase's progress counts, as its bar says it ("trace (33/99 HVPs)").
_COUNTED = {"eigenpairs": "converged", "trace": "HVPs", "density": "Lanczos steps"}


@app.command()
def analyze(
    ctx: typer.Context,
    target_names: list[str] = typer.Argument(
        ...,
        metavar="TARGET",
        help="A checkpoint file, or a directory of them (.pt, .pth, .pth.tar, .th, .ckpt, .pkl, "
        ".safetensors; also a `train` run's directory, a Hugging Face Trainer's output (its "
        "checkpoint-N folders) or DeepSpeed's (its global_stepN folders)), or several files or "
        "checkpoint folders (a shell glob, unquoted: run/step*.pt, checkpoints/checkpoint_*), "
        "analysed in order of their recorded epoch and step, else of their names.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help=f"{MODEL_HELP} Default: from the checkpoint.",
    ),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="JSON object of keyword arguments for the model factory."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        "-d",
        help=f"{DATA_HELP} Default: from the checkpoint.",
    ),
    data_root: str | None = typer.Option(
        None, "--data-root", help="Folder holding torchvision datasets."
    ),
    download: bool = typer.Option(
        False, "--download", help="Fetch a torchvision dataset into --data-root if it is missing."
    ),
    loss: str | None = typer.Option(
        None,
        "--loss",
        help="ce, mse or module:function. Default: from the checkpoint, else ce for class labels "
        "and mse for real targets.",
    ),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Number of eigenpairs (0 to skip)."),
    which: str = typer.Option(
        "largest",
        "--which",
        help="largest, smallest (most negative) or both (--top-k at each end, 2K in all).",
    ),
    tol: float = typer.Option(
        1e-4,
        "--tol",
        help="Converged when ||Hv - lambda v||, plus what the products' rounding may hide "
        "of it, <= tol * |lambda_max| (with --criterion eigenvalue: when each eigenvalue's "
        "relative error bound <= tol).",
    ),
    criterion: str = typer.Option(
        "residual",
        "--criterion",
        help="What --tol bounds: residual (eigenvectors and eigenvalues) or eigenvalue (a bound "
        "on each eigenvalue's relative error, residual^2 / gap: fewer HVPs, eigenvectors less "
        "accurate).",
    ),
    max_hvps: int | None = typer.Option(
        None,
        "--max-hvps",
        help=f"HVP budget for the eigensolver (default: {MIN_BUDGET} or {BUDGET_PER_PAIR} per "
        "pair, guard included, whichever is more; n where it takes every column); giving one "
        "accepts unconverged pairs (exit 0).",
    ),
    block_size: int | None = typer.Option(
        None,
        "--block-size",
        help=f"Eigensolver vectors per Hessian pass (default {DEFAULT_BLOCK_SIZE}, fewest "
        f"products, up to {2 * BLOCK_PER_PAIRS - 1} pairs, then one per {BLOCK_PER_PAIRS} "
        "pairs; use at least the multiplicity of a repeated eigenvalue).",
    ),
    guard: int | None = typer.Option(
        None,
        "--guard",
        help="Eigenpairs converged beyond --top-k and dropped, so that none of the top k is "
        f"skipped (default top-k / {GUARD_PER_PAIRS}; 0 saves up to a fifth of the HVPs, at "
        "that risk).",
    ),
    check_steps: int | None = typer.Option(
        None,
        "--check-steps",
        help="HVPs that look for a skipped eigenvalue once the pairs have converged, from a "
        "fresh random start outside them; one found is taken in, and the look repeated "
        f"(default {CHECK_STEPS}, times sqrt(|λ_max| / |λ_1|) toward an end nearer 0 and "
        f"{LOOSE_CHECK:g} from --tol {LOOSE_TOL:g} on, at most {CHECK_REACH:g} times; 0 saves "
        "them, at that risk).",
    ),
    trace: bool = typer.Option(
        False, "--trace", help="Estimate the trace with its standard error."
    ),
    trace_probes: int = typer.Option(
        99,
        "--trace-probes",
        help="HVPs spent on the trace, at most: where they reach the parameter count (less "
        "--top-k's eigenvectors), hutch++ takes the trace exactly, from one per direction.",
    ),
    trace_method: str = typer.Option(
        "hutch++",
        "--trace-method",
        help="hutch++ (a third of the probes sketch the top of the spectrum, whose trace is "
        "exact; best when a few eigenvalues dominate; the converged --top-k eigenvectors join "
        "the sketch at no HVP) or hutchinson (every probe random).",
    ),
    density: bool = typer.Option(
        False, "--density", help="Spectral density by stochastic Lanczos quadrature."
    ),
    density_probes: int = typer.Option(
        8, "--density-probes", help="Random probes for the density."
    ),
    density_steps: int = typer.Option(64, "--density-steps", help="Lanczos steps per probe."),
    density_sigma: float | None = typer.Option(
        None,
        "--density-sigma",
        help="Width of the Gaussian that smooths the density, in eigenvalue units (default: "
        "1% of the spread of the quadrature nodes; narrower shows a bulk beside outliers).",
    ),
    alignment: bool = typer.Option(
        False, "--alignment", help="SAM-alignment scores of the gradient with the top eigenvectors."
    ),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius for sam_sharpness."),
    alpha: float = typer.Option(0.2, "--alpha", help="Eigen-SAM alpha for eigensam_alignment."),
    minibatches: int = typer.Option(
        8,
        "--minibatches",
        help="Minibatch gradients for the alignment statistics: the data's first M batches of "
        "--batch-size, however many the Hessian is taken over.",
    ),
    params: list[str] | None = typer.Option(
        None,
        "--params",
        help="Glob over parameter names (repeatable or comma-separated), e.g. 'fc.*,conv1.*'.",
    ),
    bn: str = typer.Option(
        "eval", "--bn", help="BatchNorm statistics: eval (running) or train (batch)."
    ),
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="Samples per forward pass."),
    num_samples: int | None = typer.Option(
        None, "--num-samples", help="Analyse the first N samples (default: one batch)."
    ),
    num_batches: int | None = typer.Option(
        None, "--num-batches", help="Analyse the first N batches."
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA where present), cpu, cuda or cuda:N."
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="float32 or float64. Default: float64 for a checkpoint whose weights are float64 "
        "(at --precision full), else float32.",
    ),
    precision: str = typer.Option(
        "full",
        "--precision",
        help="HVP arithmetic: full (default; TF32 off), or the faster, far less accurate tf32 or "
        "bf16 (autocast). Residuals are always checked in full precision.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random start and probes."),
    trust_checkpoint: bool = typer.Option(
        False,
        "--trust-checkpoint",
        help="Allow checkpoints that need arbitrary unpickling (runs code from the file!); "
        "a model pickled whole (torch.save(model)) is then the model where --model is not given.",
    ),
    weights_key: str | None = typer.Option(
        None,
        "--weights-key",
        help="Which weights of a file that holds several: its entry (e.g. state_dict_ema), or "
        "the leading name of their keys (e.g. model_ema for model_ema.*).",
    ),
    out_name: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write (or append to) this HDF5 file, named as given (missing directories are made).",
    ),
    save_eigenvectors: bool = typer.Option(
        False, "--save-eigenvectors", help="Store the eigenvectors in the HDF5 file."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print JSON instead of tables: one object, or a list of them for a directory of "
        "checkpoints or several files.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
) -> None:
    """Top Hessian eigenpairs, trace, spectral density and SAM alignment of checkpoints."""
    # The library (torch, h5py) is imported here, not at the top: --help stays instant.
    import_torch()
    from hessian_cli.analysis import (
        CHOICES,
        AnalyzeRequest,
        SeriesStopped,
        analyze_target,
        is_series,
        read_options,
    )
    from hessian_cli.engine.distributed import CollectiveUserError, fail_together, world
    from hessian_cli.presentation.tables import (
        analysis_table,
        idle_ranks_note,
        series_table,
        unconverged_warning,
    )
    from hessian_cli.report import analysis_to_dict
    from hessian_cli.specs.losses import BUILTIN_LOSSES
    from hessian_cli.storage.hdf5 import check_output_name, check_writable, write_analyses

    with fail_together():  # under torchrun, said once (by rank 0) and every rank stops
        targets = [given_path(name, "TARGET", "model.pt") for name in target_names]
        refuse_empty(
            (model, "--model", "mlp"),
            (data, "--data", "digits"),
            (loss, "--loss", "ce"),
            (weights_key, "--weights-key", "state_dict_ema"),
            (data_root, "--data-root", "~/data"),
        )
        # A directory or several files are a series, a list in JSON however many it holds: one
        # shape for scripts to read. A Trainer checkpoint folder is one checkpoint, its weights.
        series = is_series(targets)  # (now: the directory may change while the work runs)
        out = file_path(out_name, "--out", "spectra.h5")
        globs = _param_globs(params)
        kwargs = parse_model_kwargs(model_kwargs)
        asked = AnalyzeRequest(top_k=top_k, trace=trace, density=density, alignment=alignment)
        eigenvectors_kept = (top_k > 0 and out is not None, "eigenpairs and --out")
        refuse_unused(ctx, {**read_options(asked), "save_eigenvectors": eigenvectors_kept})
    drawn = top_k > 0 or trace or density  # what draws random starts and probes
    if world()[0] == 0 and not quiet and (note := _unseeded_note(ctx, seed, drawn)) is not None:
        err_console.print(note, style="yellow", highlight=False, soft_wrap=True)
    # rank 0 writes; the others must not start work it refused ("rank 0 of 2: ..." was said)
    with fail_together(lead_only=True):
        if out is not None and world()[0] == 0:
            check_output_name(out)
            check_writable(out)  # before the work: a refusal after it would lose the results
    request = AnalyzeRequest(
        model=model,
        model_kwargs=kwargs,
        data=data,
        data_root=data_root,
        download=download,
        loss=fixed_word(loss, BUILTIN_LOSSES),
        top_k=top_k,
        which=which,
        tol=tol,
        criterion=criterion,
        max_hvps=max_hvps,
        block_size=block_size,
        guard=guard,
        check_steps=check_steps,
        trace=trace,
        trace_probes=trace_probes,
        trace_method=trace_method,
        density=density,
        density_probes=density_probes,
        density_steps=density_steps,
        density_sigma=density_sigma,
        alignment=alignment,
        rho=rho,
        alpha=alpha,
        minibatches=minibatches,
        params=globs,
        bn=bn,
        batch_size=batch_size,
        num_samples=num_samples,
        num_batches=num_batches,
        device=device,
        dtype=dtype,
        precision=precision,
        seed=seed,
        trust_checkpoint=trust_checkpoint,
        weights_key=weights_key,
    )
    # The words of --which, --bn, --dtype ... in any case, as train's.
    request = dataclasses.replace(
        request,
        **{name: fixed_word(getattr(request, name), words) for name, words in CHOICES.items()},
    )
    console = results_console()
    # Under torchrun every rank computes the same results; only rank 0 reports and writes.
    lead = world()[0] == 0
    show_progress = lead and not (quiet or as_json)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not (show_progress and err_console.is_terminal),  # a log gets no spinner lines
    ) as bar:
        task = bar.add_task("loading", total=None)
        running = ""  # which checkpoint of a series runs

        def progress(phase: str, done: int, total: int) -> None:
            counted = _COUNTED.get(phase)
            bar.update(
                task,
                description=running
                + (f"{phase} ({done}/{total} {counted})" if counted and total > 1 else phase),
                completed=done,
                total=total or None,
            )

        def starting(label: str, place: int, count: int) -> None:
            nonlocal running
            # (escaped: Rich took run[final].pt's brackets for markup and showed run.pt)
            running = f"{escape(label)} ({place}/{count}): " if count > 1 else ""
            progress("loading", 0, 0)

        def notice(line: str) -> None:  # what of a series was left out, notes on a checkpoint
            err_console.print(line, style="yellow", highlight=False, soft_wrap=True)

        try:
            # What user code prints (a factory, a model's forward) would break the JSON on stdout.
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                told = notice if lead and not quiet else None
                results = analyze_target(targets, request, progress, told, starting)
                stopped = None
        except SeriesStopped as exc:  # keep what was done: shown and written, then the error
            results, stopped = exc.results, exc
        except KeyboardInterrupt:  # before the first result (after it: SeriesStopped)
            results = None
        except Terminated:  # the same (said, and status 143, by the entry point), said as it
            raise Terminated(
                "stopped: the process received SIGTERM; nothing was written."
            ) from None
    if results is None:  # after the bar's end, which gives the terminal its cursor back
        if lead:
            err_console.print("interrupted: nothing was written.", style="yellow")
        exit_interrupted()
    reports = [analysis_to_dict(r) for r in results]
    # Shown before the write, so that a failing write (a full disk) still leaves them on screen;
    # written however the showing ends (a pager quit early: printing to its closed pipe ended
    # the command before the write).
    try:
        if lead and as_json:
            print_json(reports if series else reports[0])
        elif lead and not quiet:
            if len(reports) > 1:
                console.print(series_table(reports), crop=False)
            else:
                console.print(analysis_table(reports[0]), crop=False)
        if lead and not quiet and (note := idle_ranks_note(reports)) is not None:
            err_console.print(note, style="yellow", highlight=False, soft_wrap=True)
        # Where --minibatches was given; the default's shortfall only the caption says.
        given = ctx.get_parameter_source("minibatches").name != "DEFAULT"
        if lead and not quiet and given and (note := _few_minibatches(reports, minibatches)):
            err_console.print(note, style="yellow", highlight=False, soft_wrap=True)
    finally:
        # A failing write (a full disk) is the job's where the ranks are in step (the series ended,
        # or stopped on an error all agreed on): every rank stops with rank 0's sentence (the others
        # exited 0 while rank 0 said it as its own, "rank 0: Could not write ..."). After one rank's
        # own error or a Ctrl-C they may not be: rank 0 writes alone.
        in_step = stopped is None or isinstance(stopped.__cause__, CollectiveUserError)
        with fail_together(lead_only=True) if in_step else contextlib.nullcontext():
            if lead and out is not None:
                try:
                    written = write_analyses(
                        out,
                        results,
                        command_line=command_line(),
                        save_eigenvectors=save_eigenvectors,
                        series=len(results) > 1,
                    )
                # Held back until the file was in place, where it ended unsaid; one that ended the
                # wait for another process writing the file says that nothing was written.
                except KeyboardInterrupt as exc:
                    said = str(exc) or f"{out} was written first"
                    err_console.print(f"interrupted: {said}.", style="yellow")
                    exit_interrupted()
                except Terminated as exc:  # the same (said, and status 143, by the entry point)
                    said = str(exc) or f"{out} was written first"
                    raise Terminated(f"stopped: the process received SIGTERM; {said}.") from None
                if not (quiet or as_json):
                    console.print(_wrote_line(out, written), highlight=False, markup=False)
    if stopped is not None:
        if isinstance(stopped.interrupt, Terminated):
            raise Terminated(str(stopped))  # said, and exit status 143, by the entry point
        if stopped.interrupt is not None:  # Ctrl-C: the shell's status for SIGINT
            if lead:
                err_console.print(str(stopped), style="yellow", highlight=False)
            exit_interrupted()
        raise stopped
    accepted = max_hvps is not None  # the budget the user set: exit 0, but still said
    warning = unconverged_warning(
        reports,
        tol=tol,
        precision=request.precision,
        # Where none was given, float64 only if every checkpoint was analysed in it.
        dtype=request.dtype
        or (
            "float64" if all(r["provenance"]["dtype"] == "float64" for r in reports) else "float32"
        ),
        budget_accepted=accepted,
    )
    if warning is not None:
        if lead:
            err_console.print(warning, highlight=False)
        if not accepted:
            raise typer.Exit(EXIT_UNCONVERGED)


def _unseeded_note(ctx: typer.Context, seed: int, drawn: bool) -> str | None:
    """A note where --seed was given but no random start or probe is drawn: it is not refused
    as other unused options are, since scripts pass it every time (and it still seeds what a
    user's model or data code draws), but the results record it as if it had been used."""
    if drawn or ctx.get_parameter_source("seed").name == "DEFAULT":
        return None
    return (
        f"note: --seed {seed} draws nothing here: there are no eigenpairs (--top-k 0), "
        "--trace or --density (it seeds only what the model's or data's own code draws)."
    )


def _wrote_line(out: Path, written: list[str]) -> str:
    """What the write did: a file that held analyses is added to, never replaced (a re-run
    said "wrote" as if it had replaced them), under the group names that ``show -c`` takes."""
    from hessian_cli.presentation import counted
    from hessian_cli.storage.hdf5 import group_names

    earlier = len(group_names(out)) - len(written)
    if earlier <= 0:
        return f"wrote {out}"
    added = (
        ", ".join(written) if len(written) <= 3 else counted(len(written), "analysis", "analyses")
    )
    return (
        f"wrote {out}: added {added} beside the {counted(earlier, 'analysis', 'analyses')} it held"
    )


def _few_minibatches(reports: list[dict], asked: int) -> str | None:
    """A note where the data held fewer than --minibatches batches: the statistics are over
    those it held, which only the alignment table's caption said (--json: nothing)."""
    counts = {len(r["alignment"]["minibatch"]["values"]) for r in reports if r.get("alignment")}
    held = sorted(n for n in counts if n < asked)
    if not held:
        return None
    count = str(held[0]) if len(held) == 1 else f"{held[0]} to {held[-1]}"
    batches = "batch" if held == [1] else "batches"  # "only 1 batches"
    return (
        f"--minibatches {asked}: the data holds only {count} {batches} of this --batch-size, so "
        "the minibatch statistics are over those."
    )


def _param_globs(params: list[str] | None) -> list[str] | None:
    """The globs of --params, repeated or joined by commas; a space beside a comma is no part of
    a name ('3.*, 1.bias' was refused: no parameter matched ' 1.bias')."""
    if params is None:
        return None
    globs = [g.strip() for item in params for g in item.split(",") if g.strip()]
    if not globs:  # the library's word for it named its own argument, "params selects ..."
        raise UserError("--params needs a glob of parameter names, such as 'fc.*'.")
    return globs
