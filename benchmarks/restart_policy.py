"""Products a solve takes under the thick restart's policy (``RESTART_DIVISOR``: a full basis
restarts to that fraction of itself), on known spectra where the basis fills.

Dense symmetric matrices (n = 400) with four kinds of spectrum: a power law 10 / i, a cluster of
8 values 1e-3 apart above a uniform bulk, five outliers above a bulk in [-0.5, 1], a dense cubic
spread in [-1, 1]; the largest and the smallest 1, 5 and 20 of each, float64, tolerance 1e-6,
4 seeds (the matrix's eigenvectors and the start). A pair certified more than 1e-5 (relative)
from its true eigenvalue is counted as wrong.

    python benchmarks/restart_policy.py [--divisors 2,3,4]
"""

from __future__ import annotations

import argparse

import torch

import hessian_cli.engine.eigensolver as solver
from hessian_cli.engine.linear_operator import MatrixOperator

N = 400
SPECTRA = {
    "power law": lambda: 10.0 / torch.arange(1, N + 1, dtype=torch.float64),
    "cluster": lambda: torch.cat(
        [
            10 - 1e-3 * torch.arange(8, dtype=torch.float64),
            torch.linspace(-1, 8, N - 8, dtype=torch.float64),
        ]
    ),
    "outliers": lambda: torch.cat(
        [
            torch.tensor([50.0, 30, 20, 15, 12], dtype=torch.float64),
            torch.linspace(-0.5, 1, N - 5, dtype=torch.float64),
        ]
    ),
    "dense": lambda: torch.linspace(-1, 1, N, dtype=torch.float64) ** 3,
}


def with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=values.dtype))[0]
    return (Q * values) @ Q.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--divisors", default="2,3", help="RESTART_DIVISOR values to compare")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    divisors = [int(d) for d in args.divisors.split(",")]
    rows, totals, wrong = [], dict.fromkeys(divisors, 0.0), dict.fromkeys(divisors, 0)
    for name, spectrum in SPECTRA.items():
        values = spectrum()
        for which in ("largest", "smallest"):
            true = torch.sort(values, descending=which == "largest").values
            for k in (1, 5, 20):
                cells = []
                for d in divisors:
                    solver.RESTART_DIVISOR = d
                    hvps = []
                    for seed in range(args.seeds):
                        res = solver.eigenpairs(
                            MatrixOperator(with_spectrum(values, seed)),
                            k,
                            which=which,
                            seed=seed,
                            tol=1e-6,
                        )
                        error = (res.eigenvalues - true[:k]).abs() / values.abs().max()
                        wrong[d] += int(bool((error[res.converged] > 1e-5).any()))
                        hvps.append(res.hvps)
                    mean = sum(hvps) / len(hvps)
                    totals[d] += mean
                    cells.append(f"{mean:.1f}")
                rows.append([name, which, str(k), *cells])
    header = ["spectrum", "end", "k", *(f"mean HVPs, 1/{d}" for d in divisors)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "| all | | | " + " | ".join(f"{totals[d]:.0f} ({wrong[d]} wrong)" for d in divisors) + " |"
    )


if __name__ == "__main__":
    main()
