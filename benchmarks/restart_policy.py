"""Products a solve takes under three thick-restart policies (how many Ritz vectors a full basis
keeps): all but one block (the policy before 2026-11-30: a restart at every iteration once
full), half of the basis, and the engine's own (:func:`restart_size`: half, or all but one block
where the basis is too small to grow by two blocks after keeping half).

1. Known spectra (dense symmetric, n = 400): a power law 10 / i, a cluster of 8 values 1e-3
   apart above a uniform bulk, five outliers above a bulk in [-0.5, 1], a dense cubic spread in
   [-1, 1]; the largest and the smallest 1, 5 and 20, float64, tolerance 1e-6, 4 seeds.
2. Random solves (``--random`` of them): size 30-400, one of five spectra, k up to n / 3 (20 at
   each end for both), blocks 1-8, guards, warm starts, and a small ``max_basis`` in a quarter
   of them; the default tolerance. Totals of products and of pairs left unconverged.

A pair certified more than 1e-5 (1e-3 for the random solves) from its eigenvalue, relative to
the largest in size, is counted as wrong.

    python benchmarks/restart_policy.py [--seeds 4] [--random 100]
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from arguments import at_least, count, parser_for, run_main  # the script's directory is on sys.path

import hessian_cli.engine.eigensolver as solver
import hessian_cli.engine.solver_plan as solver_plan
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
POLICIES: dict[str, Callable[[int, int, int], int]] = {
    "all but one block (before)": lambda capacity, kg, b: max(kg, capacity - b),
    "half": lambda capacity, kg, b: max(kg + b, capacity // 2),
    "engine (now)": solver_plan.restart_size,
}


def with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=values.dtype))[0]
    return (Q * values) @ Q.T


def random_spectrum(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    f64 = torch.float64
    if kind == "power":
        return 1.0 / torch.arange(1, n + 1, dtype=f64) ** 1.5
    if kind == "cluster":
        return torch.cat(
            [
                1 + 1e-3 * torch.rand(8, generator=g, dtype=f64),
                0.1 * torch.rand(n - 8, generator=g, dtype=f64),
            ]
        )
    if kind == "outliers":
        top = torch.tensor([50.0, 30, 20, 10, 5], dtype=f64)
        return torch.cat([top, 0.3 * torch.randn(n - 5, generator=g, dtype=f64)])
    if kind == "repeated":
        return torch.cat(
            [
                torch.full((4,), 3.0, dtype=f64),
                torch.full((4,), -2.0, dtype=f64),
                torch.linspace(-1, 1, n - 8, dtype=f64),
            ]
        )
    return torch.randn(n, generator=g, dtype=f64)


def known_spectra(seeds: int) -> None:
    rows, totals = [], {p: [0.0, 0] for p in POLICIES}
    for name, spectrum in SPECTRA.items():
        values = spectrum()
        for which in ("largest", "smallest"):
            true = torch.sort(values, descending=which == "largest").values
            for k in (1, 5, 20):
                cells = []
                for policy, rule in POLICIES.items():
                    solver.restart_size = rule  # eigensolver's name: the one its restarts call
                    hvps = []
                    for seed in range(seeds):
                        op = MatrixOperator(with_spectrum(values, seed))
                        res = solver.eigenpairs(op, k, which=which, seed=seed, tol=1e-6)
                        error = (res.eigenvalues - true[:k]).abs() / values.abs().max()
                        totals[policy][1] += int((error[res.converged] > 1e-5).sum())
                        hvps.append(res.hvps)
                    totals[policy][0] += sum(hvps) / len(hvps)
                    cells.append(f"{sum(hvps) / len(hvps):.1f}")
                rows.append([name, which, str(k), *cells])
    header = ["spectrum", "end", "k", *(f"mean HVPs, {p}" for p in POLICIES)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    cells = [f"{total:.0f} ({wrong} wrong)" for total, wrong in totals.values()]
    print("| all | | | " + " | ".join(cells) + " |")


def random_solves(count: int, seed: int) -> None:
    print(f"\n{count} random solves (seed {seed}):\n")
    print("| policy | HVPs | pairs unconverged | wrong |")
    print("|---|---|---|---|")
    for policy, rule in POLICIES.items():
        solver.restart_size = rule  # eigensolver's name: the one its restarts call
        rng = random.Random(seed)
        hvps = unconverged = wrong = 0
        for case in range(count):
            n = rng.choice([30, 60, 120, 250, 400])
            kind = rng.choice(["power", "cluster", "outliers", "repeated", "dense"])
            k, which = rng.randint(1, max(1, n // 3)), rng.choice(["largest", "smallest", "both"])
            if which == "both":
                k = max(1, min(k, n // 2 - 1, 20))
            b, guard, warm = rng.randint(1, 8), rng.choice([None, 0, 2]), rng.random() < 0.3
            max_basis = rng.choice([None, None, None, k + 2 * b + rng.randint(0, 5)])
            g = torch.Generator().manual_seed(case)
            values = random_spectrum(kind, n, g)
            Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
            A = (Q * values) @ Q.T
            true = torch.linalg.eigvalsh((A + A.T) / 2).flip(0)
            top = Q[:, torch.argsort(values, descending=True)[:k]].T
            init = (
                top + 0.05 * torch.randn(k, n, generator=g, dtype=torch.float64) if warm else None
            )
            res = solver.eigenpairs(
                MatrixOperator((A + A.T) / 2), k, which=which, block_size=b, guard=guard,
                max_basis=max_basis, init=init, seed=case,
            )  # fmt: skip
            ends = {"largest": true[:k], "smallest": true.flip(0)[:k]}
            ref = ends.get(which, torch.cat([true[:k], true.flip(0)[:k]]))
            error = (res.eigenvalues.double() - ref).abs() / float(true.abs().max())
            hvps += res.hvps
            unconverged += int((~res.converged).sum())
            wrong += int((error[res.converged] > 1e-3).sum())
        print(f"| {policy} | {hvps} | {unconverged} | {wrong} |")


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--seeds", type=count, default=4, help="random matrices per known spectrum")
    parser.add_argument("--random", type=at_least(0), default=100, help="random solves (0: none)")
    parser.add_argument("--random-seed", type=int, default=1, help="seed of the random solves")
    args = parser.parse_args()
    known_spectra(args.seeds)
    if args.random:  # none: no table of zeros, which read as solves that took no product
        random_solves(args.random, args.random_seed)


if __name__ == "__main__":
    run_main(main)
