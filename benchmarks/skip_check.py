"""How often converged pairs skip one of the true top k, with and without the check that looks
for a skipped eigenvalue once they converge (``eigenpairs(check_steps=...)``), and what it costs.

Matrices with known spectra (n = 200): a bulk uniform in [0, 1] below separated eigenvalues
10, 9, 8, ..., one of which is replaced by a cluster of three distinct values ``c, c (1 - gap),
c (1 - 2 gap)``; 10 seeds per row, tolerance 1e-4. A skip: every pair converged, and some
eigenvalue more than half the gap from the true one at its position. Then the bottom end of a
network-like spectrum (n = 300): pairs of equal eigenvalues -0.45, -0.36, -0.315 below a bulk in
[-0.1, 0.3] and a top of 3, 2, 1.5; the 3 smallest, 20 seeds, tolerance 1e-6 (the check takes
``check_steps * sqrt(scale / |lambda_1|)`` steps there, at most 4 times as many).

    python benchmarks/skip_check.py [--steps 0,3,4,5,6,10]
"""

from __future__ import annotations

import torch
from arguments import count, counts, parser_for, run_main  # the script's directory is on sys.path

from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linear_operator import MatrixOperator

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


def bottom_pairs(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 9, generator=g, dtype=torch.float64) * 0.4 - 0.1
    ends = [-0.45, -0.45, -0.36, -0.36, -0.315, -0.315, 3.0, 2.0, 1.5]
    values = torch.cat([torch.tensor(ends, dtype=torch.float64), bulk])
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    H = (U * values) @ U.T
    return (H + H.T) / 2, values.sort().values


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--steps", type=counts(0), default="0,3,4,5,6,10", help="check_steps values to compare"
    )
    parser.add_argument(
        "--seeds", type=count, default=10, help="matrices per row (twice as many at the bottom)"
    )
    args = parser.parse_args()
    steps = args.steps
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
    cells = []
    for s in steps:
        skips = hvps = 0
        for seed in range(2 * args.seeds):
            H, values = bottom_pairs(seed)
            res = eigenpairs(
                MatrixOperator(H), 3, which="smallest", tol=1e-6, check_steps=s, seed=seed
            )
            skips += res.all_converged and float((res.eigenvalues - values[:3]).abs().max()) > 0.01
            hvps += res.hvps
        cells.append(f"{skips}/{2 * args.seeds}, {hvps / (2 * args.seeds):.1f}")
    print("| 3 smallest, pairs at the bottom | - | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    run_main(main)
