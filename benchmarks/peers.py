"""Side-by-side benchmark: this engine against PyHessian and hessian-eigenthings, in one process.

One model, one batch, one device. Prints (1) the cost of one HVP per vector for each backend and
block size, in gradient-equivalents, and (2) one table per task with wall time, HVP count and the
largest relative eigenvalue error against a tight float64 reference.

    python benchmarks/peers.py                     # ResNet-20 fixture, 128 CIFAR-shaped inputs, CPU
    python benchmarks/peers.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.trace import hutchinson_trace
from hessian_cli.specs import apply_weights, build_model, load_checkpoint

FIXTURE = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pyhessian_resnet20_cifar10.pkl"
)


@dataclass
class Row:
    task: str
    tool: str
    seconds: float
    hvps: int | None
    error: float | None
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def rel_errors(found: list[float], ref: torch.Tensor) -> torch.Tensor:
    """Relative error of each value against the reference value of the same rank."""
    got = torch.tensor(found, dtype=torch.float64)
    return (got - ref[: len(got)]).abs() / ref[: len(got)].abs()


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    device = torch.device(args.device)
    model = build_model(args.model, input_shape=(3, 32, 32), num_classes=10)
    if args.checkpoint:
        apply_weights(model, load_checkpoint(args.checkpoint).state_dict)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return model.to(device).eval(), x.to(device), y.to(device)


def hvp_costs(model, x, y, device, blocks=(1, 4), reps=2) -> list[tuple[str, int, float]]:
    """Seconds per vector for each backend and block size, and one gradient's seconds."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        model.zero_grad(set_to_none=True)
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    timed(gradient, device)
    grad_s = statistics.median(timed(gradient, device)[1] for _ in range(reps))
    rows = [("gradient", 1, grad_s)]
    for backend in ("double-backward", "func"):
        op = HessianOperator(model, F.cross_entropy, [(x, y)], backend=backend)
        for b in blocks:
            V = torch.randn(b, op.n, device=device)
            op.matmul(V)  # warm-up (and builds the kept graph)
            secs = statistics.median(
                timed(lambda V=V, op=op: op.matmul(V), device)[1] for _ in range(reps)
            )
            rows.append((backend, b, secs / b))
    return rows


def run(args: argparse.Namespace) -> None:
    import pyhessian.hessian  # noqa: F401  (the package re-exports the class under this name)
    from pyhessian import hessian as PyHessian

    pyh_module = sys.modules["pyhessian.hessian"]

    device = torch.device(args.device)
    model, x, y = setup(args)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"# {args.model}, {n:,} parameters, {len(y)} inputs, device {device}, torch {torch.__version__}"
    )
    print(
        f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )

    costs = hvp_costs(model, x, y, device)
    grad_s = costs[0][2]
    print("\n| HVP backend | block | ms per vector | gradient-equivalents |\n|---|---|---|---|")
    for name, b, secs in costs:
        print(f"| {name} | {b} | {secs * 1e3:.1f} | {secs / grad_s:.2f} |")

    # Tight reference: a float64 copy, every residual <= 1e-8 (recomputed with fresh HVPs).
    m64 = copy.deepcopy(model).double()
    ref_op = HessianOperator(m64, F.cross_entropy, [(x.double(), y)])
    ref = eigenpairs(ref_op, args.k, tol=1e-8, block_size=1, max_hvps=600)
    assert ref.all_converged, "reference did not converge"
    ref_vals = ref.eigenvalues
    shown = [round(float(v), 5) for v in ref_vals]
    print(f"\n# reference top-{args.k} (float64, residual <= 1e-8, {ref.hvps} HVPs): {shown}")

    counter = {"hvps": 0}
    original_hvp = pyh_module.hessian_vector_product

    def counting_hvp(*a, **kw):
        counter["hvps"] += 1
        return original_hvp(*a, **kw)

    pyh_module.hessian_vector_product = counting_hvp
    rows: list[Row] = []
    for k in (1, args.k):
        counter["hvps"] = 0
        torch.manual_seed(0)
        (vals, _), secs = timed(
            lambda k=k: PyHessian(
                model, F.cross_entropy, data=(x, y), cuda=device.type == "cuda"
            ).eigenvalues(top_n=k),
            device,
        )
        err = rel_errors(vals, ref_vals)
        rows.append(
            Row(
                f"top-{k}",
                "PyHessian 0.1 eigenvalues(top_n)",
                secs,
                counter["hvps"],
                float(err.max()),
                f"{int((err <= 1e-4).sum())}/{k} within 1e-4",
            )
        )
        for block in (None, 1, k):  # the default, then single-vector and block-k Krylov
            if block == 1 and k == 1:
                continue
            op = HessianOperator(model, F.cross_entropy, [(x, y)])
            res, secs = timed(
                lambda op=op, k=k, b=block: eigenpairs(op, k, tol=args.tol, block_size=b), device
            )
            err = rel_errors(res.eigenvalues.tolist(), ref_vals)
            label = "default " if block is None else ""
            rows.append(
                Row(
                    f"top-{k}",
                    f"hessian-cli ({label}block {res.block_size}, tol {args.tol:g})",
                    secs,
                    res.hvps,
                    float(err.max()),
                    f"{int((err <= 1e-4).sum())}/{k} within 1e-4, "
                    f"{int(res.converged.sum())}/{k} converged",
                )
            )
    try:
        import hessian_eigenthings as he

        def loss_fn(m, batch):
            return F.cross_entropy(m(batch[0]), batch[1])

        he_op = he.HessianOperator(model, [(x, y)], loss_fn)
        counted = {"hvps": 0}
        he_matvec = he_op.matvec

        def he_count(v):
            counted["hvps"] += 1
            return he_matvec(v)

        he_op.matvec = he_count
        out, secs = timed(
            lambda: he.lanczos(he_op, k=args.k, max_iter=40, which="LA", seed=0), device
        )
        vals = sorted(out.eigenvalues.tolist(), reverse=True)
        err = rel_errors(vals, ref_vals)
        rows.append(
            Row(
                f"top-{args.k}",
                "hessian-eigenthings lanczos(max_iter=40)",
                secs,
                counted["hvps"],
                float(err.max()),
                f"{int((err <= 1e-4).sum())}/{args.k} within 1e-4",
            )
        )
    except ImportError:
        print("# hessian-eigenthings not installed: skipped")

    counter["hvps"] = 0
    torch.manual_seed(0)
    tr, secs = timed(
        lambda: PyHessian(model, F.cross_entropy, data=(x, y), cuda=device.type == "cuda").trace(
            maxIter=args.probes, tol=0
        ),
        device,
    )
    rows.append(
        Row(
            "trace",
            f"PyHessian trace(maxIter={args.probes}, tol=0)",
            secs,
            counter["hvps"],
            None,
            f"{statistics.mean(tr):.2f} +- {statistics.stdev(tr) / len(tr) ** 0.5:.2f} (Hutchinson)",
        )
    )
    for method in ("hutchinson", "hutch++"):
        op = HessianOperator(model, F.cross_entropy, [(x, y)])
        res, secs = timed(
            lambda op=op, method=method: hutchinson_trace(op, args.probes, method=method), device
        )
        rows.append(
            Row(
                "trace",
                f"hessian-cli {method} ({args.probes} probes)",
                secs,
                res.hvps,
                None,
                f"{res.estimate:.2f} +- {res.stderr:.2f}",
            )
        )
    pyh_module.hessian_vector_product = original_hvp

    print("\n| task | tool | wall s | HVPs | gradient-equivalents | max rel. error | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = "" if r.error is None else f"{r.error:.1e}"
        print(
            f"| {r.task} | {r.tool} | {r.seconds:.2f} | {r.hvps} | {r.seconds / grad_s:.0f} | {err} | {r.note} |"
        )
    for k in (1, args.k):
        ours = next(r for r in rows if r.task == f"top-{k}" and "default" in r.tool)
        theirs = next(r for r in rows if r.task == f"top-{k}" and r.tool.startswith("PyHessian"))
        print(
            f"# top-{k}: hessian-cli takes {ours.seconds / theirs.seconds:.2f}x PyHessian's wall time"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--checkpoint", default=str(FIXTURE) if FIXTURE.exists() else "")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
