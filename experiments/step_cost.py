"""Seconds per training step: SAM against Eigen-SAM (refresh every 100 steps), and SGD for scale.

The issue's cost target: with ``--eig-every 100`` Eigen-SAM's time per step is within 10% of
SAM's. Each measurement is a real ``train()`` run of the digits CNN (batch 64, the issue's
hyper-parameters) stopped by ``max_steps``; its clock counts training steps only (refreshes
included; evaluation and checkpoints excluded). Runs alternate between optimizers in a rotating
order and repeat, so a busy machine slows all of them alike; the median is reported.

    python experiments/step_cost.py                      # CPU, 400 steps (4 refreshes), 4 repeats
    python experiments/step_cost.py --device cuda --steps 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from eigensam.training import TrainConfig, train

# Row name -> (optimizer, refresh interval); None: the --eig-every given. The last row refreshes
# only at step 0, which separates Eigen-SAM's per-step cost from the cost of its refreshes.
RUNS: dict[str, tuple[str, int | None]] = {
    "sgd": ("sgd", None),
    "sam": ("sam", None),
    "eigensam": ("eigensam", None),
    "eigensam, refresh at step 0 only": ("eigensam", 10**9),
}


def seconds_per_step(
    optimizer: str, steps: int, device: str, eig_every: int, folder: Path
) -> float:
    config = TrainConfig(
        model="cnn",
        data="digits",
        optimizer=optimizer,
        eig_every=eig_every,
        epochs=30,
        max_steps=steps,
        checkpoint_every=0,
        device=device,
        out=str(folder / f"{optimizer}-{len(list(folder.iterdir()))}"),
    )
    return train(config).seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="Steps per run (from step 0).")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--eig-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    times: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for optimizer in ("sgd", "sam", "eigensam"):  # warm-up: first calls are not steps
            seconds_per_step(optimizer, 20, args.device, args.eig_every, folder)
        names = list(RUNS)
        for repeat in range(args.repeats):
            # Rotate the order, so that no run always follows the same one on a busy machine.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                optimizer, every = RUNS[name]
                times[name].append(
                    seconds_per_step(
                        optimizer, args.steps, args.device, every or args.eig_every, folder
                    )
                )

    refreshes = -(-args.steps // args.eig_every)
    print(
        f"digits CNN, batch 64, {args.steps} steps per run ({refreshes} Eigen-SAM refreshes, "
        f"eig_every {args.eig_every}), {args.repeats} repeats; device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs"
    )
    sam = statistics.median(times["sam"])
    width = max(map(len, RUNS))
    print(f"{'run':<{width}} {'ms/step (median)':>17} {'min':>8} {'max':>8} {'vs SAM':>8}")
    for name in RUNS:
        values = times[name]
        median = statistics.median(values)
        print(
            f"{name:<{width}} {1e3 * median:>17.3f} {1e3 * min(values):>8.3f} "
            f"{1e3 * max(values):>8.3f} {median / sam - 1:>+8.1%}"
        )


if __name__ == "__main__":
    main()
