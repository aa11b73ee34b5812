"""How often converged pairs skip one of the true top k, with and without the check that looks
for a skipped eigenvalue once they converge (``eigenpairs(check_steps=...)``), and what it costs.

Matrices with known spectra (n = 200): a bulk uniform in [0, 1] below separated eigenvalues
10, 9, 8, ..., one of which is replaced by a cluster of three distinct values ``c, c (1 - gap),
c (1 - 2 gap)``; 10 seeds per row, tolerance 1e-4. A skip: every pair converged, and some
eigenvalue more than half the gap from the true one at its position.

    python benchmarks/skip_check.py [--steps 0,3,4,5,6,10]
"""

from __future__ import annotations

import argparse

import torch

from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import MatrixOperator

TOP = [10.0, 9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.2, 3.0, 2.8, 2.6]
CASES = (  # (name, cluster position, k, criterion)
    ("k = 12, cluster at 3.5 (positions 10-12), residual", 9, 12, "residual"),
    ("k = 3, cluster at the top (10), residual", 0, 3, "residual"),
    ("k = 3, cluster at the top, eigenvalue criterion", 0, 3, "eigenvalue"),
)


def clustered(seed: int, at: int, gap: float, n: int = 200) -> torch.Tensor:
    values = torch.rand(n, generator=torch.Generator().manual_seed(1000 + seed)).double()
    top = list(TOP)
    c = top[at]
    top[at : at + 1] = [c, c * (1 - gap), c * (1 - 2 * gap)]
    values[: len(top)] = torch.tensor(top, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    H = (U * values) @ U.T
    return (H + H.T) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,3,4,5,6,10", help="check_steps values to compare")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    print("| case | gap | " + " | ".join(f"check {s}: skips, mean HVPs" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for name, at, k, criterion in CASES:
        for gap in (1e-2, 3e-3, 1e-3, 3e-4):
            cells = []
            for s in steps:
                skips = hvps = 0
                for seed in range(args.seeds):
                    H = clustered(seed, at, gap)
                    true = torch.linalg.eigvalsh(H).flip(0)[:k]
                    res = eigenpairs(
                        MatrixOperator(H), k, tol=1e-4, criterion=criterion, check_steps=s
                    )
                    off = float((res.eigenvalues - true).abs().max()) > 0.5 * gap * TOP[at]
                    skips += res.all_converged and off
                    hvps += res.hvps
                cells.append(f"{skips}/{args.seeds}, {hvps / args.seeds:.1f}")
            print(f"| {name} | {gap:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
