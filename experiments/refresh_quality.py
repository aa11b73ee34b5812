"""How close Eigen-SAM's warm refreshes come to the minibatch Hessian's top eigenvector, against
the paper's 5 power steps from the same previous vector, for a given number of products.

A real ``train()`` run (digits, Eigen-SAM, a refresh every ``--eig-every`` steps) whose refresh
is wrapped: at every warm refresh the dense Hessian of that minibatch (the model as the refresh
sees it) gives ``v1``, and ``|cos|`` to it is taken for the engine's vector and for 5 power steps
on the dense matrix from the vector the refresh started from. Models small enough for a dense
Hessian: the digits MLP (hidden 8) and CNN (widths 4, BatchNorm).

    python experiments/refresh_quality.py --model mlp --products 5
    python experiments/refresh_quality.py --model cnn --products 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call  # noqa: E402

import eigensam.eigen_sam as eigen_sam_module  # noqa: E402
import eigensam.refresh as refresh_module  # noqa: E402
from eigensam.config import TrainConfig  # noqa: E402
from eigensam.training import train  # noqa: E402

MODELS = {"mlp": {"hidden": [8]}, "cnn": {"widths": [4], "batchnorm": True}}
POWER_STEPS = 5  # the paper's


def dense_top_vector(model: torch.nn.Module, params: list, x: torch.Tensor, y: torch.Tensor):
    """The dense float64 Hessian of the minibatch loss (buffers as they are) and its top vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(w: torch.Tensor) -> torch.Tensor:
        weights = {
            n: t.reshape(s).float() for n, t, s in zip(names, w.split(sizes), shapes, strict=True)
        }
        buffered = {k: v.clone() for k, v in buffers.items()}
        return F.cross_entropy(functional_call(model, {**weights, **buffered}, (x,)), y)

    w0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
    H = torch.autograd.functional.hessian(loss, w0)
    return H, torch.linalg.eigh(H)[1][:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--products", type=int, default=refresh_module.DEFAULT_MAX_HVPS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eig-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    refresh_module.DEFAULT_MAX_HVPS = args.products  # read when a warm refresh starts
    real, rows = refresh_module.refresh_top_eigenvector, []

    def measured(model, loss_fn, batch, params, v_prev, **kwargs):
        result = real(model, loss_fn, batch, params, v_prev, **kwargs)
        if v_prev is not None:  # warm refreshes only: the cold first one has its own budget
            H, v1 = dense_top_vector(model, params, *batch)
            u = v_prev.double() / v_prev.double().norm()
            for _ in range(POWER_STEPS):
                u = H @ u
                u /= u.norm()
            ours = result.vector.double() / result.vector.double().norm()
            rows.append((float((u @ v1).abs()), float((ours @ v1).abs()), result.hvps))
        return result

    eigen_sam_module.refresh_top_eigenvector = measured
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            model=args.model,
            model_kwargs=MODELS[args.model],
            data="digits",
            optimizer="eigensam",
            epochs=1000,
            eig_every=args.eig_every,
            seed=args.seed,
            max_steps=args.steps,
            device="cpu",
            out=str(Path(out) / "run"),
        )
        train(config)
    power, ours, hvps = zip(*rows, strict=True)
    worse = sum(o < p - 1e-3 for p, o in zip(power, ours, strict=True))
    print(
        f"| {args.model} | {args.products} | {len(rows)} | {statistics.mean(power):.3f} | "
        f"{statistics.mean(ours):.3f} | {min(power):.3f} | {min(ours):.3f} | {worse} | "
        f"{statistics.mean(hvps):.2f} |"
    )


if __name__ == "__main__":
    main()
