"""Eval-mode BatchNorm by its formula in the graphs products differentiate: the same function as
torch's kernel, to second derivatives, and the kernel wherever the formula would not be."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import cases
from torch import nn

from hessian_cli.engine.batchnorm_formula import (
    batchnorm_formula,
    formula_ready,
    running_statistics_formula,
)
from hessian_cli.engine.dense import dense_hessian
from hessian_cli.engine.operator import HessianOperator


def _trained(m: nn.Module) -> nn.Module:
    """``m`` in eval mode with running statistics and affine weights away from their start
    (a running mean large beside its spread, where an uncentred formula loses digits)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.running_mean.copy_(3 + torch.rand(m.running_mean.shape, generator=g, dtype=torch.float64))
        m.running_var.copy_(
            1e-3 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64)
        )
        if m.weight is not None:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return m.eval()


LAYERS = {
    "1d, (N, C)": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "1d, (N, C, L)": (lambda: nn.BatchNorm1d(4), (6, 4, 5)),
    "2d": (lambda: nn.BatchNorm2d(4), (6, 4, 3, 5)),
    "2d, no affine, eps 1e-3": (lambda: nn.BatchNorm2d(4, eps=1e-3, affine=False), (6, 4, 3, 3)),
    "3d": (lambda: nn.BatchNorm3d(4), (3, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_formula_is_the_kernels_function_to_second_derivatives(name):
    make, shape = LAYERS[name]
    m = _trained(make().double())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if name == "2d":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    params = [x, *(p for p in m.parameters())]
    v = torch.randn(shape, dtype=torch.float64)

    def derivatives(forward):
        """The output, the first derivatives of <y, v> and the second ones along random w."""
        y = forward(x)
        first = torch.autograd.grad((y * v).sum(), params, create_graph=True)
        gen = torch.Generator().manual_seed(1)
        w = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in first]
        inner = sum((f * u).sum() for f, u in zip(first, w, strict=True))
        # Without affine weights every second derivative is zero: nothing to differentiate.
        second = (
            torch.autograd.grad(inner, params, allow_unused=True)
            if inner.requires_grad
            else [None] * len(params)
        )
        zeros = (
            torch.zeros_like(p) if s is None else s for s, p in zip(second, params, strict=True)
        )
        return [y, *first, *zeros]

    for ours, kernel in zip(
        derivatives(lambda t: running_statistics_formula(m, t)), derivatives(m), strict=True
    ):
        torch.testing.assert_close(ours, kernel, rtol=1e-12, atol=1e-12)


def test_float32_products_keep_their_precision_where_the_running_mean_dwarfs_the_spread():
    """Running means near 30, spreads near 0.03, inputs near the means (every value exact in
    float32, so that only the products' own arithmetic rounds): the centred formula's products
    are within 2e-7 of float64's. ``x * scale + shift`` was 2.2e-5 off (so is torch's CPU
    kernel, 1.3e-5; on a trained ResNet-20 the uncentred formula was 6 times the kernel's)."""
    g = torch.Generator().manual_seed(0)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.float().double()

    bn, head = nn.BatchNorm1d(6).double().eval(), nn.Linear(6, 3).double()
    with torch.no_grad():
        bn.running_mean.copy_(f32(30 + torch.rand(6, generator=g, dtype=torch.float64)))
        bn.running_var.copy_(f32(1e-3 * (1 + torch.rand(6, generator=g, dtype=torch.float64))))
        for p in (bn.weight, bn.bias):
            p.copy_(f32(torch.randn(6, generator=g, dtype=torch.float64)))
        for p in head.parameters():
            p.copy_(f32(p))
    model = nn.Sequential(bn, nn.Tanh(), head)
    x = f32(bn.running_mean + 0.03 * torch.randn(16, 6, generator=g, dtype=torch.float64))
    y = torch.randint(0, 3, (16,), generator=g)
    exact = dense_hessian(model, F.cross_entropy, [(x, y)])
    op = HessianOperator(copy.deepcopy(model).float(), F.cross_entropy, [(x.float(), y)])
    V = f32(torch.randn(4, op.n, generator=g, dtype=torch.float64))
    truth = V @ exact
    error = float((op.matmul(V.float()).double() - truth).norm() / truth.norm())
    assert error < 2e-7


def _node_kinds(t: torch.Tensor) -> set[str]:
    """The kinds of autograd node in the graph behind ``t``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_kept_graphs_hold_the_formula_and_the_layers_are_left_as_they_were():
    case = next(c for c in cases() if c.name == "cnn-bn")
    op = HessianOperator(case.model, case.loss, case.batches)
    V = torch.randn(3, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H = dense_hessian(case.model, case.loss, case.batches)  # by torch's kernel
    torch.testing.assert_close(op.matmul(V), V @ H, rtol=1e-10, atol=1e-10)
    names = _node_kinds(op._graphs[0][1])
    assert not any("BatchNorm" in name for name in names), names
    assert all("forward" not in m.__dict__ for m in case.model.modules())


def test_a_product_sets_the_formula_past_module_setattr(monkeypatch):
    """The formula's layers are set at every product (a non-reentrant checkpoint runs its
    block's forward inside the double backward): in their ``__dict__``, past
    ``Module.__setattr__``'s look for parameters, buffers and submodules (ResNet-20's 21
    layers: 0.23 ms a product, now 0.03); the products the same, the layers left as they were."""
    case = next(c for c in cases() if c.name == "cnn-bn")
    case.model.eval()  # (one in training mode is set to eval mode and back at each product)
    op = HessianOperator(case.model, case.loss, case.batches)
    V = torch.randn(2, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H = dense_hessian(case.model, case.loss, case.batches)
    calls, setattr_ = [0], nn.Module.__setattr__

    def counted(m: nn.Module, name: str, value: object) -> None:
        calls[0] += 1
        setattr_(m, name, value)

    with op.weights_held():
        op.matmul(V)  # the solve's first product builds the graphs
        monkeypatch.setattr(nn.Module, "__setattr__", counted)
        HV = op.matmul(V)
        monkeypatch.undo()
    assert op._formula_layers and calls[0] == 0, calls
    torch.testing.assert_close(HV, V @ H, rtol=1e-10, atol=1e-10)
    assert all("forward" not in m.__dict__ for m in case.model.modules())


def test_batch_statistics_stay_the_kernels():
    case = next(c for c in cases() if c.name == "cnn-bn")
    op = HessianOperator(case.model, case.loss, case.batches, bn="train")
    V = torch.randn(2, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H = dense_hessian(case.model, case.loss, case.batches, bn="train")
    torch.testing.assert_close(op.matmul(V), V @ H, rtol=1e-10, atol=1e-10)
    assert any("NativeBatchNorm" in name for name in _node_kinds(op._graphs[0][1]))


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_only_torchs_own_layers_with_running_statistics_take_the_formula():
    assert formula_ready(nn.BatchNorm2d(3))
    assert formula_ready(nn.BatchNorm1d(3, affine=False))
    assert not formula_ready(nn.BatchNorm2d(3, track_running_stats=False))  # batch statistics
    assert not formula_ready(_OwnForward(3))
    assert not formula_ready(nn.SyncBatchNorm(3))
    assert not formula_ready(nn.LazyBatchNorm2d())
    assert not formula_ready(nn.LayerNorm(3))
    patched = nn.BatchNorm2d(3)
    patched.forward = lambda x: x  # a forward of the instance's own
    assert not formula_ready(patched)


def test_the_kernel_runs_where_the_formula_would_not_be_the_same():
    """Batch statistics, 16-bit inputs, channels that are not the layer's features, weights of
    another dtype, statistics that require gradients: torch's kernel, which also raises where
    it refuses (a model torch cannot run gets no results)."""
    calls = []
    kernel = torch.nn.functional.batch_norm

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return kernel(*args, **kwargs)

    m = _trained(nn.BatchNorm2d(3).double()).float()
    x = torch.randn(4, 3, 2, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "batch_norm", counted)
        with batchnorm_formula([m]):
            m(x)  # the formula: no kernel
            m(input=x)  # torch's own name for it
            assert calls == []
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(x.bfloat16())  # 16-bit inputs: the kernel, which normalises in float32
            with pytest.raises(RuntimeError, match="running_mean should contain 5 elements"):
                m(torch.randn(4, 5, 2, 2))
            m.train()
            m(x)  # batch statistics
    assert calls == [torch.bfloat16, torch.float32, torch.float32]
    assert "forward" not in m.__dict__

    mixed = _trained(nn.BatchNorm2d(3).double())
    mixed.weight = nn.Parameter(mixed.weight.detach().float())
    with batchnorm_formula([mixed]), pytest.raises(RuntimeError, match="mixed dtype"):
        mixed(x.double())
    learned = _trained(nn.BatchNorm2d(3).double())
    learned.running_mean = nn.Parameter(learned.running_mean.clone())
    with (
        batchnorm_formula([learned]),
        pytest.raises(
            RuntimeError, match="not differentiable with respect to argument .running_mean."
        ),
    ):
        torch.autograd.grad(learned(x.double()).sum(), learned.running_mean)


def test_a_layer_called_by_its_keyword_is_analysed():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = (
                nn.Conv2d(2, 3, 3),
                _trained(nn.BatchNorm2d(3)),
                nn.Linear(3, 3),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.bn(input=self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().double().eval()
    batches = [(torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    op = HessianOperator(model, F.cross_entropy, batches)
    V = torch.randn(2, op.n, dtype=torch.float64)
    torch.testing.assert_close(op.matmul(V), V @ dense_hessian(model, F.cross_entropy, batches))


def test_a_checkpointed_layers_graph_is_sized_as_the_kernels(monkeypatch):
    """On the CPU a graph's size is read from its saved tensors, which a non-reentrant
    checkpoint makes again: outside the formula that run failed (torch's CheckpointError,
    unseen) and the graph was counted 24% short of what it holds, against the memory budget."""
    from torch.utils.checkpoint import checkpoint

    import hessian_cli.engine.operator as operator

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = (
                nn.Conv2d(2, 3, 3, padding=1),
                nn.BatchNorm2d(3),
                nn.Linear(3, 3),
            )

        def block(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.bn(self.conv(x)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(checkpoint(self.block, x, use_reentrant=False).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().double().eval()
    _trained(model.bn)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=g),
        )
        for _ in range(3)
    ]
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    formula = HessianOperator(model, F.cross_entropy, batches)
    formula.matmul(V)
    monkeypatch.setattr(operator, "formula_ready", lambda m: False)
    kernel = HessianOperator(model, F.cross_entropy, batches)
    kernel.matmul(V)
    assert len(formula._graphs) == len(kernel._graphs) == 3
    assert formula._graph_bytes == pytest.approx(kernel._graph_bytes, rel=0.05)
