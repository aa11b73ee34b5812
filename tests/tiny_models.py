"""Tiny models whose dense Hessians the tests compute exactly (shared by the engine tests)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class FrozenUnused(nn.Module):
    """An MLP with a frozen layer and a parameter the forward pass never touches."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.fc1 = nn.Linear(6, 8)
        self.unused = nn.Parameter(torch.randn(5))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.frozen(x)))))


class Tied(nn.Module):
    """An autoencoder-like model whose decoder reuses the encoder's weight (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.enc.weight  # shapes differ, so tie through a transpose below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(x @ self.enc.weight.T)))
        return h @ self.dec.weight


@dataclass
class Case:
    name: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    def to(self, dtype: torch.dtype) -> Case:
        model = copy.deepcopy(self.model).to(dtype)
        batches = [
            (x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for x, y in self.batches
        ]
        return Case(self.name, model, self.loss, batches)


def cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def xs(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def labels(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, k, (n,), generator=g)

    mlp = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    mlp_mse = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics, as in a trained model
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return [
        Case(
            "mlp-ce", mlp, F.cross_entropy, [(xs(16, 5), labels(16, 4)), (xs(9, 5), labels(9, 4))]
        ),
        Case("mlp-mse", mlp_mse, F.mse_loss, [(xs(20, 4), xs(20, 3))]),
        Case("cnn-bn", cnn, F.cross_entropy, [(xs(12, 1, 5, 5), labels(12, 3))]),
        Case(
            "frozen-unused", FrozenUnused().double(), F.cross_entropy, [(xs(14, 6), labels(14, 3))]
        ),
        Case("tied", Tied().double(), F.mse_loss, [(xs(15, 6), xs(15, 6))]),
    ]


class SqrtAtZero(nn.Module):
    """A finite loss whose second derivatives are infinite: sqrt(|w|) at w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.w.abs().sqrt())


def sqrt_at_zero() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """:class:`SqrtAtZero` and a batch of 8 samples: its loss is finite, its Hessian-vector
    products are not."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2
    return SqrtAtZero(), [(x, y)]


def count_calls(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> list[int]:
    """Count the calls of ``module.name`` (a one-entry list, updated as they happen)."""
    calls, function = [0], getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
