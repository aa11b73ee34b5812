"""The trace's and the density's error with and without the eigenpairs of the same analysis.

`analyze --top-k K --trace --density` hands its converged eigenpairs to both estimators, at no
product. The trace: their vectors begin Hutch++'s sketch (their eigenvalues are their Rayleigh
quotients), so only ``max(probes // 3 - K, 0)`` sketch vectors are drawn and multiplied, and
more of the probes go to the random part. The density: their eigenvalues are nodes of weight
``1/n`` in every rule, and the Lanczos runs stay orthogonal to their vectors. Same products
either way; this measures what it buys.

Trace: for each model, probe count and K, the root mean square error of the estimate over
``--seeds`` seeds against the dense Hessian's trace (the digits models; ResNet-20, too large for
a dense Hessian, gets the estimates' spread instead), the mean reported standard error, and how
often the estimate fell within two of its standard errors of the truth.

Density (digits models): the Wasserstein-1 distance between the averaged quadrature rules and
the dense Hessian's eigenvalues (each 1/n), mean over the seeds, and the RMS error of the first
moment times n as an estimate of the trace.

    python benchmarks/known_eigenpairs.py [--seeds 40] [--probes 12,30,99] [--k 5,20] [--resnet]
        [--density 8x40,4x20] [--parts trace,density]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from arguments import (
    count,
    counts,
    listed,
    parser_for,
    run_main,
)  # the script's directory is on sys.path

from hessian_cli.engine.dense import dense_hessian
from hessian_cli.engine.density import spectral_density
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.trace import stochastic_trace
from hessian_cli.specs import apply_weights, build_model, load_checkpoint, load_data

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "pyhessian_resnet20_cifar10.pkl"


def digits_operator(name: str, inputs: int) -> HessianOperator:
    """An example checkpoint's Hessian on its first ``inputs`` digits training inputs."""
    ckpt = load_checkpoint(ROOT / "checkpoints_example" / f"digits_{name}.pt")
    meta = ckpt.metadata
    data = load_data(meta["data"])
    model = build_model(
        meta["model"],
        input_shape=data.input_shape,
        num_classes=10,
        kwargs=json.loads(meta.get("model_kwargs") or "{}"),  # recorded as JSON
    )
    apply_weights(model, ckpt.state_dict)
    x, y = data.train.tensors[0][:inputs], data.train.tensors[1][:inputs]
    return HessianOperator(model.eval(), F.cross_entropy, [(x, y)])


def resnet_operator(inputs: int) -> HessianOperator:
    """PyHessian's ResNet-20 checkpoint on random CIFAR-shaped inputs (as benchmarks/peers.py)."""
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    apply_weights(model, load_checkpoint(FIXTURE).state_dict)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(inputs, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (inputs,), generator=g)
    return HessianOperator(model.eval(), F.cross_entropy, [(x, y)])


def trace_rows(
    op: HessianOperator, exact: float | None, args: argparse.Namespace, name: str
) -> None:
    solves = {k: eigenpairs(op, k, seed=100) for k in args.k}
    for probes in args.probes:
        for k in [0, *args.k]:
            known = solves.get(k)
            t0 = time.perf_counter()
            runs = [stochastic_trace(op, probes, seed=s, known=known) for s in range(args.seeds)]
            seconds = (time.perf_counter() - t0) / args.seeds
            est = torch.tensor([r.estimate for r in runs], dtype=torch.float64)
            se = torch.tensor([r.stderr for r in runs], dtype=torch.float64)
            if exact is None:
                error, within = float(est.std()), float("nan")
            else:
                error = float(((est - exact) ** 2).mean().sqrt())
                within = float(((est - exact).abs() <= 2 * se).double().mean())
            given = f"{runs[0].known} ({solves[k].hvps} HVPs)" if known else "-"
            print(
                f"| {name} | {probes} | {given} | {len(runs[0].samples)} | {runs[0].hvps} | "
                f"{error:.4g} | {float(se.mean()):.4g} | {within:.2f} | {seconds:.2f} |",
                flush=True,
            )


def wasserstein(nodes: torch.Tensor, weights: torch.Tensor, spectrum: torch.Tensor) -> float:
    """W1 distance between the measure of ``weights`` at ``nodes`` (summing to 1) and the
    eigenvalues ``spectrum`` (1/n each): the integral of the difference of their CDFs."""
    x = torch.cat([nodes, spectrum])
    order = torch.argsort(x)
    mass = torch.cat([weights, -torch.full_like(spectrum, 1 / len(spectrum))])[order]
    return float((torch.cumsum(mass, 0)[:-1].abs() * x[order].diff()).sum())


def density_rows(
    op: HessianOperator, spectrum: torch.Tensor, args: argparse.Namespace, name: str
) -> None:
    solves = {k: eigenpairs(op, k, seed=100) for k in args.k}
    for probes, steps in args.density:
        for k in [0, *args.k]:
            known = solves.get(k)
            t0 = time.perf_counter()
            runs = [
                spectral_density(op, probes, steps, seed=s, known=known) for s in range(args.seeds)
            ]
            seconds = (time.perf_counter() - t0) / args.seeds
            w1 = [wasserstein(r.nodes.ravel(), r.weights.ravel() / probes, spectrum) for r in runs]
            traces = torch.tensor([r.moment(1) * op.n for r in runs], dtype=torch.float64)
            error = float(((traces - spectrum.sum()) ** 2).mean().sqrt())
            given = f"{runs[0].known} ({solves[k].hvps} HVPs)" if known else "-"
            print(
                f"| {name} | {probes} x {steps} | {given} | {sum(w1) / len(w1):.3g} | "
                f"{error:.4g} | {runs[0].hvps} | {seconds:.2f} |",
                flush=True,
            )


def rules(text: str) -> list[tuple[int, int]]:
    """``--density``'s comma-separated ``PROBESxSTEPS``: a probe at least, two steps at least
    (the fewest a quadrature rule is made of)."""
    pairs = []
    for part in text.split(","):
        probes, x, steps = part.partition("x")
        if not x:
            raise argparse.ArgumentTypeError(f"{part!r} is not PROBESxSTEPS (8x40)")
        pairs.append((count(probes), count(steps, 2)))
    return pairs


PARTS = ("trace", "density")


def parts(text: str) -> list[str]:
    """``--parts``: comma-separated parts, an empty one (``trace,``, a trailing comma) none; it
    was refused as "unknown --parts ", naming nothing."""
    names = listed(text)
    if unknown := set(names) - set(PARTS):  # else the run measured nothing
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(sorted(unknown))}: choose {', '.join(PARTS)}"
        )
    return names


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--seeds", type=count, default=40, help="estimates per row (seeds 0, 1, ...)"
    )
    parser.add_argument(
        "--probes", type=counts(2), default="12,30,99", help="comma-separated probe counts"
    )
    parser.add_argument(
        "--k", type=counts(), default="5,20", help="comma-separated eigenpair counts"
    )
    parser.add_argument("--inputs", type=count, default=256, help="digits inputs (ResNet: 32)")
    parser.add_argument("--resnet", action="store_true", help="also ResNet-20 (spread only)")
    parser.add_argument(
        "--density", type=rules, default="8x40,4x20", help="probes x steps, comma-separated"
    )
    parser.add_argument(
        "--parts", type=parts, default="trace,density", help="trace, density or both"
    )
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.seeds} seeds"
    )
    digits = {}
    for name in ("mlp", "cnn"):
        op = digits_operator(name, args.inputs)
        H = dense_hessian(op.model, op.loss_fn, op.batches, op.space)
        digits[f"digits {name}"] = op, torch.linalg.eigvalsh(H.double())
    if "trace" in args.parts:
        print(
            "\n| model | probes | eigenpairs in the sketch | random samples | HVPs | "
            "RMS error (ResNet: spread) | mean SE | within 2 SE | s per trace |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (op, spectrum) in digits.items():
            exact = float(spectrum.sum())
            trace_rows(op, exact, args, f"{name} (n = {op.n:,}, trace {exact:.4g})")
        if args.resnet and FIXTURE.exists():
            op = resnet_operator(32)
            trace_rows(op, None, args, f"ResNet-20 (n = {op.n:,}, 32 inputs)")
        elif args.resnet:
            print(f"ResNet-20 skipped: {FIXTURE} not found")
    if "density" in args.parts:
        print(
            "\n| model | probes x steps | eigenpairs taken out | W1 to the spectrum | "
            "RMS error of n x first moment | HVPs | s per density |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, (op, spectrum) in digits.items():
            density_rows(op, spectrum, args, f"{name} (n = {op.n:,})")


if __name__ == "__main__":
    run_main(main)
