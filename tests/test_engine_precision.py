"""Reduced-precision products (opt-in) and the full-precision checks that keep them honest.

On CPU TF32 does not exist and bf16 autocast does: the same code paths as on CUDA, with bf16
rounding standing in for both reduced modes.
"""

import pytest
import torch
from tiny_models import cases

from hessian_cli.engine.density import spectral_density
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linear_operator import MatrixOperator
from hessian_cli.engine.operator import HessianOperator, auto_backend
from hessian_cli.engine.precision import numerics
from hessian_cli.engine.trace import stochastic_trace
from hessian_cli.errors import UserError

CASES = {c.name: c.to(torch.float32) for c in cases()}


NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def _tf32() -> tuple:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if NEW_API:
        return matmul.fp32_precision, cudnn.conv.fp32_precision
    return matmul.allow_tf32, cudnn.allow_tf32


def test_each_precision_sets_tf32_and_restores_the_settings():
    cpu = torch.device("cpu")
    before = _tf32()
    with numerics("full", cpu):
        assert _tf32() == (("ieee", "ieee") if NEW_API else (False, False))
    assert _tf32() == before
    with numerics("tf32", cpu):
        assert _tf32() == (("tf32", "tf32") if NEW_API else (True, True))
    assert _tf32() == before


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy flags")
def test_works_beside_either_tf32_api():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32, matmul.fp32_precision
    try:
        # After the new API is used, torch refuses to read the legacy flags.
        matmul.fp32_precision = "ieee"
        with numerics("tf32", torch.device("cpu")):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
        matmul.allow_tf32 = True  # a legacy user
        with numerics("full", torch.device("cpu")):
            pass
        assert matmul.allow_tf32
    finally:
        # Both APIs put back, the legacy one first: left mixed (legacy "high", new "none"),
        # every later read of the legacy flag in this process raised (torch 2.13).
        matmul.allow_tf32, matmul.fp32_precision = saved
    assert matmul.allow_tf32 == saved[0]  # readable: the two APIs agree again


@pytest.mark.parametrize("backend", ["double-backward", "func"])
@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn"])
def test_bf16_products_are_approximate_and_their_error_is_measured(name, backend):
    case = CASES[name]
    full = HessianOperator(case.model, case.loss, case.batches, backend=backend)
    fast = HessianOperator(case.model, case.loss, case.batches, backend=backend, precision="bf16")
    V = torch.randn(4, full.n, generator=torch.Generator().manual_seed(0))
    exact, approx = full.matmul(V), fast.matmul(V)
    err = float((approx - exact).norm() / exact.norm())
    assert 1e-4 < err < 0.1  # bf16 keeps 8 bits of mantissa
    assert approx.dtype == torch.float32
    assert 1e-4 < fast.precision_error() < 0.1
    assert full.precision_error() == 0.0
    # Losses and gradients stay in full precision whatever the products use (the full
    # operator's gradient comes from its kept graph, whose BatchNorm is its formula: float32's
    # rounding apart, where bfloat16's would be ~1e-3).
    assert fast.loss() == full.loss()
    torch.testing.assert_close(fast.gradient()[1], full.gradient()[1], rtol=1e-5, atol=1e-7)


def test_tf32_off_cuda_is_refused():
    """It changed nothing there, and a result said it was used."""
    case = CASES["cnn-bn"]
    with pytest.raises(UserError, match="`precision=tf32` is a CUDA matrix format: on cpu"):
        HessianOperator(case.model, case.loss, case.batches, precision="tf32")


def test_reduced_precision_of_a_float64_model_is_refused():
    """bf16 autocast does not touch float64 tensors: the products were exact, said to be bf16."""
    case = cases()[0]  # float64
    assert case.model[0].weight.dtype == torch.float64
    with pytest.raises(UserError, match="`precision=bf16` lowers float32 arithmetic only"):
        HessianOperator(case.model, case.loss, case.batches, precision="bf16")


def test_reduced_precision_eigenpairs_report_full_precision_residuals():
    case = CASES["mlp-ce"]
    op = HessianOperator(case.model, case.loss, case.batches, precision="bf16")
    res = eigenpairs(op, 3, tol=1e-2)
    assert op.precision == "bf16"
    # Recompute each residual with a full-precision operator: the reported ones are those.
    full = HessianOperator(case.model, case.loss, case.batches)
    V = res.eigenvectors
    HV = full.matmul(V)
    values = (V * HV).sum(1) / (V * V).sum(1)
    residuals = (HV - values[:, None] * V).norm(dim=1).double() / res.scale
    torch.testing.assert_close(res.residuals, residuals, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.eigenvalues, values.double(), rtol=1e-5, atol=0)


def test_a_tolerance_met_only_in_reduced_precision_is_not_called_converged():
    case = CASES["cnn-bn"]
    op = HessianOperator(case.model, case.loss, case.batches, precision="bf16")
    res = eigenpairs(op, 2, tol=1e-4, max_hvps=4000)
    # bf16 products cannot certify 1e-4: the pairs are reported unconverged, with the reason.
    assert not res.converged.any()
    assert res.stop_reason in ("stalled", "unverified")


def test_unknown_precision_and_backend_are_user_errors():
    case = CASES["mlp-ce"]
    with pytest.raises(UserError, match="precision"):
        HessianOperator(case.model, case.loss, case.batches, precision="fp8")
    with pytest.raises(UserError, match="backend"):
        HessianOperator(case.model, case.loss, case.batches, backend="magic")


def test_auto_backend_uses_vmap_for_blocks_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_backend(1, cpu) == auto_backend(8, cpu) == "double-backward"
    assert auto_backend(1, cuda) == auto_backend(4, cuda) == "double-backward"
    assert auto_backend(8, cuda) == auto_backend(30, cuda) == "func"


def test_solvers_never_use_tf32_for_their_own_linear_algebra():
    seen = []

    class Recording(MatrixOperator):
        def matmul(self, block):
            seen.append(_tf32())
            return super().matmul(block)

    A = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    op = Recording(A + A.T)
    with numerics("tf32", torch.device("cpu")):  # a user who allowed TF32 globally
        eigenpairs(op, 2)
        stochastic_trace(op, 6)
        spectral_density(op, 2, 5)
    assert seen and all(s == (("ieee", "ieee") if NEW_API else (False, False)) for s in seen)


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn"])
def test_full_precision_holds_inside_a_callers_autocast(name):
    """A mixed-precision training step that calls the engine runs it under its autocast: the
    products and the solver's Gram matrices were bfloat16 there (a refresh inside it failed to
    store its vector), though the operator says full precision. Now bit for bit the same."""
    case = CASES[name]
    V = torch.randn(3, HessianOperator(case.model, case.loss, case.batches).n)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            op = HessianOperator(case.model, case.loss, case.batches)
            results.append((op.matmul(V), eigenpairs(op, 2, seed=0), op.gradient()[1]))
    (products, pairs, gradient), (products_in, pairs_in, gradient_in) = results
    assert torch.equal(products_in, products) and torch.equal(gradient_in, gradient)
    assert torch.equal(pairs_in.eigenvalues, pairs.eigenvalues)
    assert torch.equal(pairs_in.eigenvectors, pairs.eigenvectors)


def test_the_model_check_keeps_its_graph_in_the_products_precision():
    """check_model (run by analyze before any product) built the kept graph in full precision:
    every later bf16 product then differentiated a float32 forward pass (a hvp_rel_error of
    3.0e-3 on a digits MLP, 4.0e-3 without the check)."""
    case = CASES["mlp-mse"]
    checked = HessianOperator(case.model, case.loss, case.batches, precision="bf16")
    checked.check_model()
    plain = HessianOperator(case.model, case.loss, case.batches, precision="bf16")
    V = torch.randn(2, plain.n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(checked.matmul(V), plain.matmul(V))


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy flags")
def test_a_solvers_products_set_no_tf32_setting_already_as_wanted(monkeypatch):
    """Inside a solver (without_tf32) each product's numerics find TF32 off already: they set
    and put back nothing (every setting looked up, set and put back: ~0.1 ms of host work a
    product), and still set and restore what differs."""
    from hessian_cli.engine.precision import without_tf32

    writes, write = [], torch._C._set_fp32_precision_setter
    monkeypatch.setattr(
        torch._C, "_set_fp32_precision_setter", lambda *a: writes.append(a) or write(*a)
    )
    c = CASES["mlp-ce"]
    op = HessianOperator(c.model, c.loss, c.batches)

    @without_tf32
    def solve() -> tuple:
        solver_writes = len(writes)
        op.matmul(torch.ones(2, op.n))
        product_writes = len(writes)
        with numerics("tf32", torch.device("cpu")):
            inside = _tf32()
        return solver_writes, product_writes, inside, _tf32()

    before = _tf32()
    solver_writes, after_product, inside, after = solve()
    assert solver_writes > 0 and after_product == solver_writes, writes
    assert inside == ("tf32", "tf32") and after == ("ieee", "ieee") and _tf32() == before
