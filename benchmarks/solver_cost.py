"""The eigensolver's own cost, apart from the products: top-k of a diagonal operator.

A diagonal matrix with a network-like spectrum (200 outliers decaying like 1000 / i above a
Gaussian bulk) costs next to nothing per product, so the wall time is what the solver spends on
its basis: orthogonalisation, the projected problem, residuals, restarts. One row per k and
block: HVPs, iterations, wall time, the products' share, the rest per iteration, and the worst
relative eigenvalue error against the sorted diagonal.

    python benchmarks/solver_cost.py --n 272474 --k 5,50 --blocks default,1,4
"""

from __future__ import annotations

import argparse
import time

import torch
from arguments import device, listed, parser_for, run_main  # the script's directory is on sys.path

from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linear_operator import DiagonalOperator
from hessian_cli.engine.solver_defaults import default_block_size


class Timed(DiagonalOperator):
    """The diagonal operator, timing its own products."""

    seconds = 0.0

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        # CUDA runs asynchronously: without synchronising, this would time the launch only (and
        # the product's own work would land in the solver's share)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = super().matmul(block)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def spectrum(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` eigenvalues: ``1000 / i`` for the first 200 (all ``n`` where fewer), then the bulk."""
    g = torch.Generator().manual_seed(seed)
    top = 1000.0 / torch.arange(1, min(n, 200) + 1, dtype=torch.float64)
    return torch.cat([top, 2 * torch.randn(n - len(top), generator=g, dtype=torch.float64)]).float()


def counts(text: str) -> list[int | None]:
    """Comma-separated integers (``default``: None, the default block size). A word is named,
    where argparse said "invalid counts value: '5,x'" of the whole list."""
    try:
        return [None if x == "default" else int(x) for x in listed(text)]
    except ValueError as error:
        word = str(error).rpartition(": ")[2]  # int()'s "invalid literal ...: 'x'"
        raise argparse.ArgumentTypeError(f"{word} is not a whole number (or default)") from None


def parse_args() -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--n", type=int, default=272_474, help="size (ResNet-20's by default)")
    parser.add_argument("--k", type=counts, default="5,50", help="comma-separated eigenpairs")
    parser.add_argument("--blocks", type=counts, default="default,1,4", help="and block sizes")
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    # Refused before the first row, in one sentence: the engine's own refusal of a solve was
    # a traceback, after the rows before it (--n 10 --k 20: "Cannot compute 20 eigenpairs ...").
    if args.n < 1 or any(k is None or k < 1 for k in args.k):
        parser.error("--n and each --k must be at least 1")
    if max(args.k) > args.n:
        parser.error(f"--k {max(args.k)} is more eigenpairs than --n {args.n} has")
    if any(b is not None and b < 1 for b in args.blocks):
        parser.error("each --blocks must be at least 1 (or default)")
    return args


def main() -> None:
    args = parse_args()
    diagonal = spectrum(args.n).to(args.device)
    exact = diagonal.double().sort(descending=True).values.cpu()
    print(f"# diagonal operator, n = {args.n:,}, {args.device}, torch {torch.__version__}")
    print(
        "\n| k | block | HVPs | iterations | wall s | products s | rest per iteration ms | "
        "max rel. error | stop |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k in args.k:
        done: set[int] = set()
        for block in args.blocks:
            size = default_block_size(k) if block is None else block
            if size in done:  # the default is one of the listed blocks (block 1 up to k = 49)
                continue
            done.add(size)
            op = Timed(diagonal)
            start = time.perf_counter()
            res = eigenpairs(op, k, block_size=block)
            if op.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            error = float(((res.eigenvalues.double() - exact[:k]).abs() / exact[:k].abs()).max())
            rest = (wall - op.seconds) / res.iterations * 1e3
            print(
                f"| {k} | {res.block_size} | {res.hvps} | {res.iterations} | {wall:.2f} | "
                f"{op.seconds:.2f} | {rest:.1f} | {error:.1e} | {res.stop_reason} |",
                flush=True,
            )


if __name__ == "__main__":
    run_main(main)
