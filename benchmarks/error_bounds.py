"""Whether the eigenvalue error bounds hold for float32 products: top-5 of dense symmetric
matrices (n = 100, 300, 1000; four seeds) with a known spectrum, asked for tol 1e-9 under
--criterion eigenvalue, against the exact eigenvalues of the float32 matrix (float64 eigh).
Prints a table, one row per solve: why it stopped and max(actual error / reported bound) (above
1, a bound that does not hold; benchmarks/RESULTS.md, thirteenth session), then the worst.

    python benchmarks/error_bounds.py
"""

import torch
from arguments import parser_for, run_main  # the script's directory is on sys.path

from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linear_operator import MatrixOperator


def main() -> None:
    parser_for(__doc__).parse_args()  # no options: --help describes, anything else is refused
    worst = 0.0
    print("| n | seed | stop | max error / bound | max error | min bound |")
    print("|---|---|---|---|---|---|")
    for n in (100, 300, 1000):
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            lam = torch.cat(
                [
                    torch.tensor([50.0, 31.0, 20.0, 12.0, 7.5]),
                    torch.rand(n - 5, generator=g, dtype=torch.float64) * 5 - 1,
                ]
            )
            A = ((Q * lam) @ Q.T).float()
            op = MatrixOperator(A)
            r = eigenpairs(op, 5, criterion="eigenvalue", tol=1e-9, max_hvps=150, seed=seed)
            true = torch.linalg.eigvalsh(A.double()).flip(0)[:5]
            actual = (r.eigenvalues.double() - true).abs() / true.abs()
            ratio = float((actual / r.errors).max())
            worst = max(worst, ratio)
            print(
                f"| {n} | {seed} | {r.stop_reason} | {ratio:.2f} | {float(actual.max()):.1e} | "
                f"{float(r.errors.min()):.1e} |",
                flush=True,
            )
    print(f"\nworst error / bound: {worst:.2f} (above 1: a bound that does not hold)")


if __name__ == "__main__":
    run_main(main)
