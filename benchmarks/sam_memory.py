"""Peak memory of one SAM / Eigen-SAM first step, in units of the model's size (Linux only).

The step's floor is the weights' copy it restores ``w`` from (1.0 model); whatever it holds
beyond that is its vectors and temporaries. Each row is a fresh process whose peak resident
memory (VmHWM, reset through /proc/self/clear_refs) is read around the second ``first_step``;
large allocations are mapped directly (MALLOC_MMAP_THRESHOLD_) so that freed ones leave the
count at once.

    python benchmarks/sam_memory.py                    # 25M float32 parameters
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from arguments import at_least, parser_for, run_main  # the script's directory is on sys.path

if TYPE_CHECKING:  # for the annotations: each row imports torch where it runs
    import torch


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def parameters(n: int) -> list[torch.nn.Parameter]:
    """``n`` parameters in 10 tensors (n // 10 each dropped the rest: the Eigen-SAM row's
    eigenvector of n then fitted none, and the model's size was not n)."""
    import torch

    return [torch.nn.Parameter(torch.randn(n // 10 + (i < n % 10))) for i in range(10)]


def measure(which: str, n: int) -> None:
    """One row, in this process: prints the first step's peak growth in MB."""
    import torch

    from eigensam import SAM, EigenSAM

    torch.manual_seed(0)
    params = parameters(n)
    for p in params:
        p.grad = torch.randn_like(p)
    if which == "sam":
        opt = SAM(params, torch.optim.SGD, lr=0.1)
    else:
        opt = EigenSAM(params, torch.optim.SGD, lr=0.1, alpha=0.2)
        opt.set_eigenvector(torch.randn(n), 1.0)
    for _ in range(2):  # the second step: nothing left to set up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        opt.first_step()
        peak = _status("VmHWM")
        opt.second_step()
    print(peak - base)


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--params", type=at_least(10), default=25_000_000, help="float32 parameters (in 10 tensors)"
    )
    parser.add_argument("--row", choices=["sam", "eigensam"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        measure(args.row, args.params)
        return
    model_mb = args.params * 4 / 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    print(f"| optimizer | first step's peak growth (MB) | in models ({model_mb:.0f} MB) |")
    print("|---|---|---|")
    for row in ("sam", "eigensam"):
        out = subprocess.run(
            [sys.executable, __file__, "--row", row, "--params", str(args.params)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:  # its traceback was captured: CalledProcessError said no cause
            lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
            sys.exit(f"sam_memory.py: the {row} row failed: {lines[-1]}")
        grown = float(out.stdout)
        print(f"| {row} | {grown:.0f} | {grown / model_mb:.2f} |")


if __name__ == "__main__":
    run_main(main)
