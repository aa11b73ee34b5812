"""Seconds per training step: SAM against Eigen-SAM (refresh every 100 steps), and SGD for scale.

The issue's cost target: with ``--eig-every 100`` Eigen-SAM's time per step is within 10% of
SAM's. That is a steady-state cost, so it is measured without the first refresh of a run, which
starts cold and may spend up to ``COLD_MAX_HVPS`` products (once per run): each measurement is a
real ``train()`` run of the digits CNN (batch 64, the issue's hyper-parameters) that takes step 0
alone (timed separately: for Eigen-SAM it holds the cold refresh), then is resumed for ``--steps``
more steps (steps 1..N, whose refreshes are all warm-started; N = 400 holds 4 of them). Its clock
counts training steps only (refreshes included; evaluation and checkpoints excluded). Rows:

- ``eigensam``: a refresh every ``--eig-every`` steps (what the target is about);
- ``eigensam, no refresh after step 0``: Eigen-SAM's perturbation without refreshes, so the
  difference to the row above is the refreshes' share.

A round measures every row once, in an order that rotates between rounds, so that load from
other work slows the rows of a round alike; each row's ratio to SAM is taken within its round and
the rounds' ratios give a mean with a 95% t interval. A separate in-process measurement times one
gradient (forward + backward on a batch of 64) against a warm refresh of a fixed number of
products and against a cold one, to express the refresh in gradient-equivalents.

    python experiments/step_cost.py                      # CPU, 400 steps, 8 rounds
    python experiments/step_cost.py --results experiments/RESULTS.md   # and its generated block
    python experiments/step_cost.py --device cuda --steps 1000
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import provenance as prov  # noqa: E402  (experiments/provenance.py)
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from eigensam.refresh import DEFAULT_MAX_HVPS, refresh_top_eigenvector  # noqa: E402
from eigensam.training import TrainConfig, load_config, train  # noqa: E402
from hessian_cli.specs.data import load_data  # noqa: E402
from hessian_cli.specs.losses import default_loss, get_loss  # noqa: E402
from hessian_cli.specs.models import build_model  # noqa: E402
from hessian_cli.storage.metrics import read_metrics  # noqa: E402

NEVER = 10**9
# Row name -> (optimizer, refresh interval); None: the --eig-every given.
RUNS: dict[str, tuple[str, int | None]] = {
    "sgd": ("sgd", None),
    "sam": ("sam", None),
    "eigensam": ("eigensam", None),
    "eigensam, no refresh after step 0": ("eigensam", NEVER),
}


@dataclass
class Measured:
    """One run: step 0 alone, then steps 1..N."""

    first: float  # seconds of step 0 (Eigen-SAM: with its cold refresh)
    per_step: float  # seconds per step over steps 1..N (warm refreshes only)
    hvps: list[int]  # each refresh's products, the cold one first


def measure(optimizer: str, steps: int, device: str, eig_every: int, run_dir: Path) -> Measured:
    config = TrainConfig(
        model="cnn",
        data="digits",
        optimizer=optimizer,
        eig_every=eig_every,
        epochs=30,
        max_steps=1,
        checkpoint_every=0,
        device=device,
        out=str(run_dir),
    )
    first = train(config).step_seconds
    config = load_config(run_dir)
    config.max_steps, config.device = 1 + steps, device
    per_step = train(config, resume_dir=run_dir).seconds_per_step
    refresh = read_metrics(run_dir / "metrics.h5").get("refresh", {})
    return Measured(first, per_step, [int(h) for h in refresh.get("hvps", [])])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def refresh_in_gradients(device: str, rounds: int, warm_hvps: int) -> dict[str, float]:
    """Median seconds of a gradient, of a warm refresh forced to ``warm_hvps`` products
    (tolerance 0) and of a cold refresh as training does its first (default budget and
    tolerance, the gradient as hint); digits CNN at its initial weights, first 64 samples."""
    torch.manual_seed(0)
    data = load_data("digits")
    model = build_model("cnn", input_shape=data.input_shape, num_classes=data.num_outputs)
    model = model.to(device).train()
    loss_fn = get_loss(default_loss(data.num_classes), num_classes=data.num_classes)
    x, y = (t[:64].to(device) for t in data.train.tensors)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    gradient()
    g = torch.cat([p.grad.reshape(-1) for p in params]).detach()
    cold = refresh_top_eigenvector(model, loss_fn, (x, y), params, None, seed=0, hint=g)
    v = cold.vector
    times: dict[str, list[float]] = {"gradient": [], "warm": [], "cold": []}
    hvps = {"warm": 0, "cold": 0}
    for _ in range(3):  # warm-up
        gradient()
    for r in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            gradient()
        sync(device)
        times["gradient"].append((time.perf_counter() - start) / 5)
        for name, prev, budget, tol in (("warm", v, warm_hvps, 1e-12), ("cold", None, None, None)):
            extra = {} if tol is None else {"tol": tol}
            start = time.perf_counter()
            res = refresh_top_eigenvector(
                model, loss_fn, (x, y), params, prev, max_hvps=budget, seed=r, hint=g, **extra
            )
            sync(device)
            times[name].append(time.perf_counter() - start)
            hvps[name] = res.hvps
    out = {name: statistics.median(values) for name, values in times.items()}
    return {**out, "warm_hvps": hvps["warm"], "cold_hvps": hvps["cold"]}


def interval(ratios: list[float]) -> tuple[float, float]:
    """Mean of ``ratios`` - 1 and the half-width of its 95% t interval."""
    n = len(ratios)
    mean = statistics.mean(ratios) - 1
    if n < 2:
        return mean, math.nan
    return mean, stats.t.ppf(0.975, n - 1) * statistics.stdev(ratios) / math.sqrt(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="Steps per run after step 0.")
    parser.add_argument("--repeats", type=int, default=8, help="Rounds (each row once a round).")
    parser.add_argument("--eig-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument(
        "--results", default=None, help="Also write the 'step-cost' block of this markdown file."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    here = prov.provenance()
    load_before = os.getloadavg()[0]
    wall = time.perf_counter()

    runs: dict[str, list[Measured]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for optimizer in ("sgd", "sam", "eigensam"):  # warm-up: first calls are not steps
            measure(optimizer, 20, args.device, args.eig_every, folder / f"warm-{optimizer}")
        names = list(RUNS)
        for repeat in range(args.repeats):
            # Rotate the order, so that no run always follows the same one on a busy machine.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                optimizer, every = RUNS[name]
                run_dir = folder / f"{len(list(folder.iterdir()))}-{optimizer}"
                runs[name].append(
                    measure(optimizer, args.steps, args.device, every or args.eig_every, run_dir)
                )
    micro = refresh_in_gradients(args.device, 15, DEFAULT_MAX_HVPS)
    wall = time.perf_counter() - wall
    load_after = os.getloadavg()[0]

    refreshes = args.steps // args.eig_every
    warm = [h for m in runs["eigensam"] for h in m.hvps[1:]]
    cold = [m.hvps[0] for m in runs["eigensam"] if m.hvps]
    lines = [
        f"- Date: {prov.now()}; command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`.",
        f"- Code: {prov.describe_code(here)}.",
        f"- Machine: {prov.describe_machine(here)}; device {args.device}, "
        f"{torch.get_num_threads()} torch thread(s); 1-min load average {load_before:.2f} "
        f"before, {load_after:.2f} after (this script adds 1); {wall / 60:.1f} min in all.",
        f"- Digits CNN, batch 64; each run: step 0 alone, then steps 1..{args.steps} "
        f"({refreshes} warm refreshes at eig_every {args.eig_every}); {args.repeats} rounds.",
        "",
        f"| run | ms/step, steps 1..{args.steps} (median) | min | max | vs SAM, mean of rounds "
        "(95% interval) | step 0 alone, ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    sam = runs["sam"]
    for name, ms in runs.items():
        values = [m.per_step for m in ms]
        mean, half = interval([m.per_step / s.per_step for m, s in zip(ms, sam, strict=True)])
        versus = "" if name == "sam" else f"{mean:+.1%} (± {half:.1%})"
        lines.append(
            f"| {name} | {1e3 * statistics.median(values):.3f} | {1e3 * min(values):.3f} | "
            f"{1e3 * max(values):.3f} | {versus} | "
            f"{1e3 * statistics.median(m.first for m in ms):.1f} |"
        )
    grad = micro["gradient"]
    per_hvp = micro["warm"] / micro["warm_hvps"]
    warm_mean = statistics.mean(warm) if warm else math.nan
    sam_step = statistics.median(m.per_step for m in sam)
    predicted = warm_mean * per_hvp / args.eig_every / sam_step
    lines += [
        "",
        f"- Refresh products in these runs: warm {warm_mean:.1f} on average "
        f"({min(warm, default=0)}-{max(warm, default=0)}), the cold first one "
        f"{min(cold, default=0)}-{max(cold, default=0)}.",
        f"- In gradient-equivalents (one forward + backward on the batch of 64: "
        f"{1e3 * grad:.2f} ms, median of rounds of 5): a refresh of {micro['warm_hvps']} "
        f"products takes {micro['warm'] / grad:.1f} ({per_hvp / grad:.2f} per product, the "
        f"solver's own work included); the cold first refresh ({micro['cold_hvps']} products "
        f"at the initial weights) {micro['cold'] / grad:.1f}; a SAM step "
        f"{sam_step / grad:.1f} (its median above).",
        f"- So a warm refresh of {warm_mean:.1f} products every {args.eig_every} steps should "
        f"add about {predicted:+.1%} to SAM's step; the rows above measure it.",
    ]
    print("\n".join(lines))
    if args.results:
        prov.write_block(Path(args.results), "step-cost", lines)


if __name__ == "__main__":
    main()
