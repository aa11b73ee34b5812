"""Warm starts over a checkpoint series: what `analyze DIR` saves by starting each checkpoint's
solve from the previous one's eigenvectors.

A digits MLP (64-32-10, 2,410 parameters) trained with SGD (lr 0.1, momentum 0.9, minibatches of
64) is saved every `--every` steps; the Hessian is taken over the first 256 training samples.
Each row solves every checkpoint of the series cold (random start and the gradient as hint, as
`analyze` of one checkpoint) and warm (the previous solve's vectors as `init`, as `analyze DIR`),
and sums the HVPs. "off" counts pairs more than 1e-3 (relative to the largest) from the truth:
the dense spectrum in float64, a cold solve held to 1e-7 in float32.

    python benchmarks/warm_start.py --k 1,5,10,20 --tol 1e-4,1e-8 --dtype float64
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from arguments import (  # the script's directory is on sys.path
    count,
    counts,
    parser_for,
    run_main,
    tolerances,
)

from hessian_cli.engine.dense import dense_eigh, dense_hessian
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.specs.data import load_data
from hessian_cli.specs.models import MLP


def series(steps: int, every: int, dtype: torch.dtype) -> tuple[list[dict], list]:
    """The state dicts saved every `every` SGD steps, and the analysed batch."""
    torch.manual_seed(0)
    data = load_data("digits")
    x, y = data.train.tensors[0].to(dtype), data.train.tensors[1]
    model = MLP(64, [32], 10).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.Generator().manual_seed(1)
    saved = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=order)
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if step % every == 0:
            saved.append(copy.deepcopy(model.state_dict()))
    return saved, [(x[:256], y[:256])]


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--k", type=counts(), default="1,5,10,20", help="comma-separated numbers of eigenpairs"
    )
    parser.add_argument("--tol", type=tolerances, default="1e-4", help="comma-separated tolerances")
    parser.add_argument("--steps", type=count, default=600, help="SGD steps of the series")
    parser.add_argument("--every", type=count, default=50, help="SGD steps between checkpoints")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float64",
        help="of the model and its products (float64: the truth is the dense spectrum)",
    )
    parser.add_argument(
        "--which",
        choices=("largest", "smallest", "both"),
        default="largest",
        help="end of the spectrum solved for",
    )
    args = parser.parse_args()
    if args.every > args.steps:  # else the series was trained, then no row divided by zero
        parser.error(f"--every {args.every} leaves no checkpoint in --steps {args.steps}")
    reach = max(args.k) + 10  # the float32 reference's pairs at each end
    dtype = getattr(torch, args.dtype)
    saved, batch = series(args.steps, args.every, dtype)
    ops, truth = [], []
    for state in saved:
        model = MLP(64, [32], 10).to(dtype)
        model.load_state_dict(state)
        op = HessianOperator(model, F.cross_entropy, batch)
        if dtype == torch.float64:
            values = dense_eigh(dense_hessian(model, F.cross_entropy, batch, op.space))[0]
            values = torch.cat([values[:reach], values.flip(0)[:reach]])
        else:
            values = eigenpairs(op, reach, which="both", tol=1e-7, max_hvps=9000).eigenvalues
        model.zero_grad()
        F.cross_entropy(model(batch[0][0]), batch[0][1]).backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ops.append((op, gradient))
        truth.append(values)
    print(
        f"# digits MLP, {len(saved)} checkpoints (every {args.every} SGD steps), "
        f"{args.dtype}, {args.which}, torch {torch.__version__}"
    )
    print("\n| k | tol | cold HVPs | warm HVPs | warm / cold | off (cold, warm) |")
    print("|---|---|---|---|---|---|")
    hint_too = args.which != "smallest"  # as analyze: the gradient leans toward the largest
    for k in args.k:
        for tol in args.tol:
            hvps, off = {}, {}
            for start in ("cold", "warm"):
                hvps[start] = off[start] = 0
                vectors = None
                for i, (op, gradient) in enumerate(ops):
                    hint = gradient if hint_too else None
                    res = eigenpairs(
                        op, k, which=args.which, tol=tol, init=vectors, hint=hint, seed=i
                    )
                    vectors = res.eigenvectors if start == "warm" else None
                    top, low = truth[i][:k], truth[i][reach : reach + k]
                    exact = {"largest": top, "smallest": low, "both": torch.cat([top, low])}
                    exact = exact[args.which].to(res.eigenvalues)
                    error = (res.eigenvalues - exact).abs() / exact.abs().max()
                    hvps[start] += res.hvps
                    off[start] += int((error > 1e-3).sum())
            print(
                f"| {k} | {tol:g} | {hvps['cold']} | {hvps['warm']} | "
                f"{hvps['warm'] / hvps['cold']:.2f} | {off['cold']}, {off['warm']} |",
                flush=True,
            )


if __name__ == "__main__":
    run_main(main)
