"""SGD vs SAM vs Eigen-SAM on the digits CNN and MLP: final sharpness, alignment, accuracy, cost.

Trains every (model, optimizer, seed) with the library (``eigensam.training.train``), the issue's
hyper-parameters (batch 64, lr 0.1 cosine, momentum 0.9, weight decay 5e-4, rho 0.05, alpha 0.2,
eigenvector refresh every 20 steps) and ``track_every`` tracking, then measures each final
checkpoint with the engine on the FULL training loss (all 1300 training samples, one batch,
BatchNorm-free models, tol 1e-4): lambda_max and the alignment ``|<g_hat, v_1>|`` of the
full-batch gradient. Writes the table into ``experiments/RESULTS.md`` (between the GENERATED
markers, or those of ``--block NAME``; text outside them is kept) and the tracked lambda_max
curves into ``experiments/lambda_max.png``. With two or more seeds of both SAM and Eigen-SAM it
adds their paired comparison (mean and std of the per-seed difference, paired t).

Runs live in ``--out-dir`` (outside the repository); a run whose ``result.json`` exists is reused
and an unfinished one is resumed, so an interrupted experiment continues where it stopped. The
folder name holds the settings but not the code version, so every run records, when its training
starts (and again at each resume), the commit, the uncommitted library files (with a digest of
their changes), the refresh budgets and the CPU it ran with (``provenance.json``, copied into its
``result.json``). The report lists them and refuses runs that differ in any of them unless
``--allow-mixed`` is given: use a fresh ``--out-dir`` after changing the library.

    python experiments/run_experiments.py                                   # the full experiment
    python experiments/run_experiments.py --seeds 0,1,2,3,4,5,6,7 --optimizers sam,eigensam \
        --block 8-seeds --plot ''                  # the paired 8-seed block of RESULTS.md
    python experiments/run_experiments.py --epochs-cnn 2 --epochs-mlp 2 --seeds 0 \
        --out-dir /tmp/x --results /tmp/x/RESULTS.md --plot /tmp/x/lambda_max.png   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, also in workers

import numpy as np  # noqa: E402
import provenance as prov  # noqa: E402  (experiments/provenance.py)
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from eigensam import refresh as eig_refresh  # noqa: E402
from eigensam.events import RunStarted  # noqa: E402
from eigensam.training import TrainConfig, latest_checkpoint, load_config, train  # noqa: E402
from hessian_cli.analysis import AnalyzeRequest, analyze_checkpoint  # noqa: E402
from hessian_cli.specs import load_checkpoint  # noqa: E402
from hessian_cli.storage.metrics import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("sgd", "sam", "eigensam")
LABELS = {"sgd": "SGD", "sam": "SAM", "eigensam": "Eigen-SAM"}
MODELS = ("cnn", "mlp")
# The "MLP 64-128-128-10" lists the layer widths from the 64 input pixels to the 10
# classes, i.e. two hidden layers of 128 (as the repo's own "MLP (64-32-10)" example means
# hidden [32]); the built-in mlp's default, as passed explicitly here.
MLP_HIDDEN = "128,128"
# The orientation numbers (an independent implementation; lambda_max of the full
# training loss, mean +- std over 3 seeds where given).
ORIENTATION: dict[str, dict[str, tuple[float, float | None]]] = {
    "cnn": {"sgd": (7.26, 0.53), "sam": (3.76, 0.19), "eigensam": (3.45, 0.03)},
    "mlp": {"sgd": (1.19, None), "sam": (0.745, None), "eigensam": (0.737, None)},
}
TRAIN_SAMPLES = 1300


@dataclass
class Job:
    """One training run and its final measurement."""

    model: str
    optimizer: str
    seed: int
    epochs: int
    track_every: int
    eig_every: int
    model_kwargs: dict[str, Any] | None
    out: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)  # of the process that starts it

    @property
    def name(self) -> str:
        return f"{self.model}-{self.optimizer}-s{self.seed}"

    @property
    def label(self) -> str:
        """The architecture, as layer widths."""
        if self.model == "cnn":
            return "CNN conv16-conv32-GAP-linear"
        hidden = (self.model_kwargs or {})["hidden"]
        return f"MLP {'-'.join(map(str, [64, *hidden, 10]))} tanh"


@dataclass
class Result:
    """What one run contributes to the table."""

    model: str
    arch: str
    optimizer: str
    seed: int
    epochs: int
    lambda_max: float
    residual: float
    converged: bool
    alignment: float
    eigensam_alignment: float
    train_loss: float  # full training loss at the final weights (eval mode)
    epoch_train_loss: float  # mean minibatch loss over the last epoch (what training saw)
    test_accuracy: float
    seconds_per_epoch: float  # training steps only (refreshes included), mean over epochs
    wall_seconds: float  # training + measurement, this process
    refreshes: int = 0  # Eigen-SAM eigenvector refreshes, with their mean HVPs, the fraction
    refresh_hvps: float = math.nan  # whose residual met the refresh tolerance, and how many
    refresh_converged: float = math.nan  # found no positive eigenvalue
    refresh_negative: int = 0
    refresh_hvps_first: float = math.nan  # the first, cold refresh of the run
    refresh_hvps_warm: float = math.nan  # mean, min and max of the others (warm-started)
    refresh_hvps_warm_min: float = math.nan
    refresh_hvps_warm_max: float = math.nan
    refresh_median_residual: float = math.nan  # relative to lambda
    # One entry per train() call (start, resumes): code, machine, date (provenance.py).
    provenance: list[dict[str, Any]] = field(default_factory=list)


def recorded_elsewhere(run_dir: Path, here: dict[str, Any]) -> str:
    """'' if the run in ``run_dir`` is new or was trained by the code and machine ``here``;
    else what it recorded (or that it recorded nothing)."""
    entries = None
    if (run_dir / "result.json").is_file():
        entries = json.loads((run_dir / "result.json").read_text()).get("provenance", [])
    elif (run_dir / "config.json").is_file():
        record = run_dir / "provenance.json"
        entries = json.loads(record.read_text()) if record.is_file() else []
    if entries is None:
        return ""
    if not entries:
        return "it recorded no code version"
    other = [e for e in entries if prov.identity(e) != prov.identity(here)]
    if not other:
        return ""
    return f"{prov.describe_code(other[0])}; {other[0].get('cpu')}"


def run_job(job: Job) -> Result:
    """Train (or resume, or reuse) one run and measure its final checkpoint."""
    torch.set_num_threads(1)
    run_dir = Path(job.out)
    saved = run_dir / "result.json"
    if saved.is_file():
        return Result(**json.loads(saved.read_text()))
    start = time.perf_counter()
    record = run_dir / "provenance.json"

    def started(event: object) -> None:
        """Record the code and machine this train() call runs with, as it starts."""
        if isinstance(event, RunStarted):
            entries = json.loads(record.read_text()) if record.is_file() else []
            entries.append({**job.provenance, "date": prov.now(), "start_step": event.start_step})
            record.write_text(json.dumps(entries, indent=2) + "\n")

    if (run_dir / "config.json").is_file():
        config = load_config(run_dir)
        config.device = "cpu"
        train(config, resume_dir=run_dir, progress=started)
    else:
        config = TrainConfig(
            model=job.model,
            data="digits",
            out=str(run_dir),
            optimizer=job.optimizer,
            model_kwargs=job.model_kwargs,
            rho=0.05,
            alpha=0.2,
            eig_every=job.eig_every,
            epochs=job.epochs,
            batch_size=64,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            seed=job.seed,
            track_every=job.track_every,
            checkpoint_every=10,
            device="cpu",
        )
        train(config, progress=started)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "final.pt", f"{job.name} did not finish"
    request = AnalyzeRequest(
        top_k=1,
        tol=1e-4,
        alignment=True,
        rho=0.05,
        alpha=0.2,
        minibatches=1,
        batch_size=TRAIN_SAMPLES,
        num_samples=TRAIN_SAMPLES,
        device="cpu",
        seed=0,
    )
    analysis = analyze_checkpoint(load_checkpoint(ckpt), request)
    assert analysis.eigen is not None and analysis.alignment is not None
    assert analysis.provenance["num_samples"] == TRAIN_SAMPLES
    metrics = read_metrics(run_dir / "metrics.h5")
    epochs, refresh = metrics["epochs"], metrics.get("refresh", {})
    result = Result(
        model=job.model,
        arch=job.label,
        optimizer=job.optimizer,
        seed=job.seed,
        epochs=job.epochs,
        lambda_max=float(analysis.eigen.eigenvalues[0]),
        residual=float(analysis.eigen.residuals[0]),
        converged=bool(analysis.eigen.converged[0]),
        alignment=float(analysis.alignment.alignment[0]),
        eigensam_alignment=analysis.alignment.eigensam_alignment,
        train_loss=analysis.loss,
        epoch_train_loss=float(epochs["train_loss"][-1]),
        test_accuracy=float(epochs["test_accuracy"][-1]),
        seconds_per_epoch=float(np.mean(epochs["seconds"])),
        wall_seconds=time.perf_counter() - start,
        provenance=json.loads(record.read_text()) if record.is_file() else [],
    )
    if refresh:
        hvps = np.asarray(refresh["hvps"], dtype=float)
        result.refreshes = len(refresh["step"])
        result.refresh_hvps = float(np.mean(hvps))
        result.refresh_converged = float(np.mean(refresh["residual"] <= eig_refresh.DEFAULT_TOL))
        result.refresh_negative = int(np.sum(refresh["eigenvalue"] <= 0))
        result.refresh_hvps_first = float(hvps[0])
        if len(hvps) > 1:
            result.refresh_hvps_warm = float(np.mean(hvps[1:]))
            result.refresh_hvps_warm_min = float(np.min(hvps[1:]))
            result.refresh_hvps_warm_max = float(np.max(hvps[1:]))
        result.refresh_median_residual = float(np.median(refresh["residual"]))
    saved.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------- report


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_table(results: list[Result]) -> str:
    """Markdown: one row per model x optimizer, mean ± std over seeds."""
    lines = [
        "| model | optimizer | epochs | lambda_max (full train loss) | orientation | "
        "alignment abs(<g_hat, v1>) | train loss (full) | test acc. (%) | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for opt in OPTIMIZERS:
            rs = [r for r in results if r.model == model and r.optimizer == opt]
            if not rs:
                continue
            ref, spread = ORIENTATION[model][opt]
            orient = f"{ref}" + (f" ± {spread}" if spread is not None else "")
            lines.append(
                f"| {rs[0].arch} | {LABELS[opt]} | {rs[0].epochs} "
                f"| {mean_std([r.lambda_max for r in rs])} | {orient} "
                f"| {mean_std([r.alignment for r in rs])} "
                f"| {mean_std([r.train_loss for r in rs], 4)} "
                f"| {mean_std([100 * r.test_accuracy for r in rs], 2)} "
                f"| {mean_std([r.seconds_per_epoch for r in rs], 3)} |"
            )
    return "\n".join(lines)


def seed_table(results: list[Result], seeds: list[int]) -> str:
    """Markdown: per-seed lambda_max, and on how many seeds Eigen-SAM ends below SAM."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| model | optimizer | {head} | all converged (residual <= 1e-4 lambda) |",
        "|---|---|" + "---|" * len(seeds) + "---|",
    ]
    wins: dict[str, str] = {}
    for model in MODELS:
        by = {(r.optimizer, r.seed): r for r in results if r.model == model}
        for opt in OPTIMIZERS:
            cells = [f"{by[(opt, s)].lambda_max:.3f}" if (opt, s) in by else "" for s in seeds]
            conv = all(by[(opt, s)].converged for s in seeds if (opt, s) in by)
            if any(cells):
                lines.append(f"| {model} | {LABELS[opt]} | {' | '.join(cells)} | {conv} |")
        pairs = [s for s in seeds if ("sam", s) in by and ("eigensam", s) in by]
        if pairs:
            lower = sum(by[("eigensam", s)].lambda_max < by[("sam", s)].lambda_max for s in pairs)
            wins[model] = f"{lower}/{len(pairs)}"
    lines.append("")
    lines += [
        f"- {model}: Eigen-SAM ends with a lower lambda_max than SAM on {w} seeds."
        for model, w in wins.items()
    ]
    return "\n".join(lines)


def plot(jobs: list[Job], path: Path) -> None:
    """lambda_max of the tracked held-out batch over steps: seed mean (band: min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(j.model == m for j in jobs)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for opt in OPTIMIZERS:
            curves = []
            for job in jobs:
                if job.model == model and job.optimizer == opt:
                    track = read_metrics(Path(job.out) / "metrics.h5").get("track")
                    if track:
                        curves.append((track["step"], track["lambda_max"]))
            if not curves:
                continue
            n = min(len(s) for s, _ in curves)
            steps = curves[0][0][:n]
            values = np.stack([v[:n] for _, v in curves])
            (line,) = ax.plot(steps, values.mean(0), label=f"{LABELS[opt]} (n={len(curves)})")
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        epochs = next(j.epochs for j in jobs if j.model == model)
        label = next(j.label for j in jobs if j.model == model)
        ax.set_title(f"digits {label}, {epochs} epochs")
        ax.set_xlabel("step")
        ax.set_ylabel("lambda_max (held-out batch of 64)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refresh_summary(results: list[Result]) -> list[str]:
    """One line per model on the quality and cost of Eigen-SAM's eigenvector refreshes."""
    lines = []
    for model in MODELS:
        rs = [r for r in results if r.model == model and r.optimizer == "eigensam"]
        if not rs:
            continue
        first = [r.refresh_hvps_first for r in rs]
        lines.append(
            f"- {model} Eigen-SAM refreshes: {rs[0].refreshes} per run, "
            f"{statistics.mean(r.refresh_hvps for r in rs):.1f} HVPs each on average (the "
            f"first, cold one {min(first):.0f}-{max(first):.0f}; the warm-started ones "
            f"{statistics.mean(r.refresh_hvps_warm for r in rs):.1f} on average, "
            f"{min(r.refresh_hvps_warm_min for r in rs):.0f}-"
            f"{max(r.refresh_hvps_warm_max for r in rs):.0f}), "
            f"{100 * statistics.mean(r.refresh_converged for r in rs):.0f}% met the "
            f"refresh tolerance (residual <= {eig_refresh.DEFAULT_TOL:g} lambda), median "
            f"residual per run {100 * min(r.refresh_median_residual for r in rs):.1f}-"
            f"{100 * max(r.refresh_median_residual for r in rs):.1f}% of lambda, "
            f"{sum(r.refresh_negative for r in rs)} found no positive eigenvalue."
        )
    return lines


def paired_summary(results: list[Result]) -> list[str]:
    """Per model, Eigen-SAM against SAM seed by seed: the mean and sample std of the per-seed
    difference of final lambda_max, its paired t (two-sided p), and on how many seeds it is lower.
    """
    lines = []
    for model in MODELS:
        by = {(r.optimizer, r.seed): r.lambda_max for r in results if r.model == model}
        seeds = sorted(s for o, s in by if o == "sam" and ("eigensam", s) in by)
        if len(seeds) < 2:
            continue
        sam = np.array([by[("sam", s)] for s in seeds])
        eig = np.array([by[("eigensam", s)] for s in seeds])
        diff = eig - sam
        n, mean, std = len(seeds), float(diff.mean()), float(diff.std(ddof=1))
        t = mean / (std / math.sqrt(n)) if std > 0 else math.nan
        p = 2 * stats.t.sf(abs(t), n - 1) if math.isfinite(t) else math.nan
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
        lines.append(
            f"- {model}, {n} seeds: SAM {sam.mean():.3f} ± {sam.std(ddof=1):.3f}, Eigen-SAM "
            f"{eig.mean():.3f} ± {eig.std(ddof=1):.3f}; paired difference Eigen-SAM - SAM "
            f"{mean:+.3f} ± {std:.3f} ({100 * mean / sam.mean():+.1f}% of SAM; 95% interval of "
            f"the mean {mean - half:+.3f} to {mean + half:+.3f}), paired t = {t:.1f} "
            f"({n - 1} degree{'s' if n > 2 else ''} of freedom, two-sided p = {p:.2g}); lower on "
            f"{int((diff < 0).sum())}/{n} seeds."
        )
    return lines


def provenance_lines(results: list[Result], allow_mixed: bool) -> list[str]:
    """Which code and machine trained the runs, from what each run recorded when it started.

    Runs that differ (or did not record it) are refused unless ``allow_mixed``; then each group
    is listed with its runs."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        key = tuple(prov.identity(e) for e in r.provenance)
        groups.setdefault(key, []).append(r)
    dates = sorted(e["date"] for r in results for e in r.provenance)
    lines = []
    if len(groups) > 1 or () in groups:
        where = "; ".join(
            f"{', '.join(f'{r.model}-{r.optimizer}-s{r.seed}' for r in rs)}: "
            + (
                " then ".join(
                    f"{prov.describe_code(e)}, on {e.get('cpu')}" for e in rs[0].provenance
                )
                or "not recorded"
            )
            for rs in groups.values()
        )
        if not allow_mixed:
            sys.exit(
                "The runs were not all trained by the same code on the same machine (or did not "
                f"record it): {where}. Use a fresh --out-dir, or --allow-mixed to report them "
                "anyway."
            )
        first = next(iter(groups.values()))[0].provenance
        differ = sorted(
            {
                k
                for rs in groups.values()
                for a in rs[0].provenance
                for b in first
                for k in prov.differences(a, b)
            }
        )
        lines.append(
            f"- **Mixed code or machines** (differing in: {', '.join(differ) or 'unknown'}): "
            f"{where}."
        )
    else:
        entries = results[0].provenance
        lines += [
            f"- Code (recorded by each run as its training started): "
            f"{prov.describe_code(entries[0])}.",
            f"- Machine: {prov.describe_machine(entries[0])}.",
        ]
    if dates:
        lines.append(f"- Runs trained: started {dates[0]} to {dates[-1]}.")
    return lines


def write_report(
    path: Path,
    results: list[Result],
    jobs: list[Job],
    args: argparse.Namespace,
    wall: float,
    load: tuple[float, float],
) -> None:
    """Replace the generated block of RESULTS.md (create the file if needed)."""
    seeds = sorted({j.seed for j in jobs})
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    paired = paired_summary(results)
    lines = [
        f"- Report written: {prov.now()}, {torch.get_num_threads()} torch thread(s) per run, "
        f"{args.jobs} run(s) in parallel.",
        f"- Command: `{command}`",
        *provenance_lines(results, args.allow_mixed),
        f"- Wall time of this invocation: {wall / 60:.1f} min "
        f"(runs reused from {args.out_dir} count as 0); 1-min load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (the runs themselves add {args.jobs}).",
        f"- Seeds: {', '.join(map(str, seeds))}; batch 64, lr 0.1 cosine to 0, momentum 0.9, "
        f"weight decay 5e-4, rho 0.05, alpha 0.2, eigenvector refresh every "
        f"{args.eig_every} steps, tracking every {args.track_every} steps.",
        "",
    ]
    if paired:
        lines += ["Final lambda_max, Eigen-SAM against SAM on the same seeds:", "", *paired, ""]
    lines += [
        "lambda_max and alignment: top eigenpair (engine, tol 1e-4) of the Hessian of the mean "
        "cross-entropy over all 1300 training samples at the final weights; alignment is "
        "abs(<g_hat, v1>) of the full-batch gradient. Train loss: that same full loss. "
        "Test accuracy: the 497-sample test split after the last epoch. s / epoch: time in "
        "training steps (refreshes included; evaluation, tracking, checkpoints excluded), "
        "single-threaded, on a machine shared with other work. Mean ± sample std over seeds.",
        "",
        results_table(results),
        "",
        "Per-seed final lambda_max (single seeds move with the CPU model and library "
        "changes; compare the paired statistics):",
        "",
        seed_table(results, seeds),
        *refresh_summary(results),
    ]
    if args.plot:
        image = os.path.relpath(Path(args.plot).resolve(), Path(path).resolve().parent)
        lines += [
            "",
            f"![lambda_max over steps]({image})",
            "",
            f"`{image}`: lambda_max of the fixed held-out batch (first 64 test samples) tracked "
            "during training, mean over seeds, band min..max.",
        ]
    prov.write_block(path, args.block, lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-cnn", type=int, default=100)
    parser.add_argument("--epochs-mlp", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--models", default="cnn,mlp", help="Comma-separated: cnn, mlp.")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument(
        "--mlp-hidden", default=MLP_HIDDEN, help="MLP hidden widths (input 64, output 10)."
    )
    parser.add_argument("--eig-every", type=int, default=20)
    parser.add_argument("--track-every", type=int, default=100)
    parser.add_argument("--out-dir", default="/tmp/eigensam-experiments", help="Run folders.")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel (processes).")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument(
        "--block", default="", help="Name of the generated block to write ('': the main one)."
    )
    parser.add_argument("--plot", default=str(HERE / "lambda_max.png"), help="'' for none.")
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="Report runs trained by different code or machines (each listed) instead of refusing.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every job (longest first), then write the table and the plot."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    here = prov.provenance()  # the library is imported: this is the code the runs use
    epochs = {"cnn": args.epochs_cnn, "mlp": args.epochs_mlp}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hidden = [int(h) for h in args.mlp_hidden.split(",")]
    kwargs = {"cnn": None, "mlp": {"hidden": hidden, "activation": "tanh"}}
    jobs = [
        Job(
            model,
            opt,
            int(seed),
            epochs[model],
            args.track_every,
            args.eig_every,
            kwargs[model],
            provenance=here,
        )
        for model in args.models.split(",")
        for opt in args.optimizers.split(",")
        for seed in args.seeds.split(",")
    ]
    for job in jobs:
        arch = "" if job.model == "cnn" else "-h" + "x".join(map(str, hidden))
        every = f"-r{job.eig_every}-t{job.track_every}"
        job.out = str(out / f"{job.name}{arch}-e{job.epochs}{every}")
    if not args.allow_mixed:  # refuse before training, not after
        for job in jobs:
            stale = recorded_elsewhere(Path(job.out), here)
            if stale:
                sys.exit(
                    f"{job.out} was trained by other code or on another machine ({stale}) than "
                    f"this one ({prov.describe_code(here)}; {here['cpu']}): use a fresh "
                    "--out-dir, or --allow-mixed to reuse it anyway (the report lists both)."
                )
    # Longest first, so the pool does not end on one long run: CNN, then (Eigen-)SAM.
    cost = {"sgd": 1.0, "sam": 2.0, "eigensam": 2.2}
    order = sorted(
        jobs,
        key=lambda j: -j.epochs * cost[j.optimizer] * (1.6 if j.model == "cnn" else 1.0),
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results: list[Result] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for job, result in zip(order, pool.map(run_job, order), strict=True):
            results.append(result)
            print(
                f"{job.name:22s} lambda_max {result.lambda_max:8.4f}  align "
                f"{result.alignment:.3f}  test {100 * result.test_accuracy:5.2f}%  "
                f"{result.seconds_per_epoch:.3f} s/epoch  ({result.wall_seconds:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - start
    results.sort(key=lambda r: (r.model, OPTIMIZERS.index(r.optimizer), r.seed))
    if args.plot:
        plot(jobs, Path(args.plot))
    load = (load_before, os.getloadavg()[0])
    write_report(Path(args.results), results, jobs, args, wall, load)
    print(f"done in {wall / 60:.1f} min: {args.results}, {args.plot}")
    if not all(math.isfinite(r.lambda_max) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
