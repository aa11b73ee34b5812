"""Eigenpairs, trace and density against the dense oracle (exact Hessian and eigh)."""

import contextlib
import copy
import itertools
import math
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import cases, count_calls, sqrt_at_zero

from hessian_cli.engine import eigensolver as es
from hessian_cli.engine import memory
from hessian_cli.engine.alignment import alignment_scores
from hessian_cli.engine.convergence import eigenvalue_error_bounds
from hessian_cli.engine.dense import dense_eigh, dense_hessian
from hessian_cli.engine.density import spectral_density
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linalg import (
    all_finite,
    gram,
    norms,
    orthonormalize_against,
    project_out,
)
from hessian_cli.engine.linear_operator import DiagonalOperator, MatrixOperator
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.probes import DENSITY_STREAM, probe_generator, rademacher
from hessian_cli.engine.trace import stochastic_trace, trace_memory_need
from hessian_cli.errors import NotFinite, UserError

CASES = {c.name: c for c in cases()}
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _oracle(case):
    op = HessianOperator(case.model, case.loss, case.batches)
    H = dense_hessian(case.model, case.loss, case.batches, op.space)
    return H, *dense_eigh(H)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_top5_match_dense_eigh(name, dtype):
    case = CASES[name]
    H, values, vectors = _oracle(case)
    low = case.to(dtype)
    op = HessianOperator(low.model, low.loss, low.batches)
    res = eigenpairs(op, 5, tol=TOL[dtype] / 10)
    assert res.all_converged
    scale = values.abs().max()
    assert torch.all((res.eigenvalues - values[:5]).abs() <= TOL[dtype] * scale)
    # Eigenvectors where the gap to the neighbours allows them to be determined.
    above = torch.cat([torch.full((1,), math.inf, dtype=values.dtype), values[:4] - values[1:5]])
    gaps = torch.minimum(values[:5] - values[1:6], above)
    for i in range(5):
        if gaps[i] > 1e-2 * scale:
            cos = torch.dot(res.eigenvectors[i].double(), vectors[i]).abs()
            assert cos >= 0.999, (i, float(cos))
    assert torch.all(res.residuals <= TOL[dtype] / 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reported_residuals_are_the_true_ones_without_extra_products(dtype):
    # Full-precision products are the matrix itself: the residuals from the kept products
    # H Q must equal ||H v - lambda v|| computed from the dense Hessian, at no extra HVP.
    case = CASES["cnn-bn"]
    H, _, _ = _oracle(case)
    low = case.to(dtype)
    op = HessianOperator(low.model, low.loss, low.batches)
    res = eigenpairs(op, 3, tol=1e-3, max_hvps=12)
    assert res.hvps == op.hvp_count <= 12
    V = res.eigenvectors.double()
    true = (V @ H - res.eigenvalues[:, None] * V).norm(dim=1) / res.scale
    torch.testing.assert_close(res.residuals, true, rtol=1e-3, atol=TOL[dtype] / 100)


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn", "tied"])
def test_most_negative_eigenvalues_on_request(name):
    case = CASES[name]
    H, values, _ = _oracle(case)
    res = eigenpairs(MatrixOperator(H), 3, which="smallest", tol=1e-8)
    torch.testing.assert_close(
        res.eigenvalues, values.flip(0)[:3], rtol=0, atol=1e-7 * values.abs().max()
    )
    op = HessianOperator(case.model, case.loss, case.batches)
    both = eigenpairs(op, 2, which="both", tol=1e-8)
    expected = torch.cat([values[:2], values.flip(0)[:2]])
    torch.testing.assert_close(both.eigenvalues, expected, rtol=0, atol=1e-6 * values.abs().max())


def test_warm_start_from_exact_vectors_saves_products():
    case = CASES["mlp-ce"]
    H, values, vectors = _oracle(case)
    op = HessianOperator(case.model, case.loss, case.batches)
    cold = eigenpairs(op, 3, tol=1e-8)
    warm = eigenpairs(op, 3, tol=1e-8, init=vectors[:3])
    assert warm.all_converged and warm.hvps < cold.hvps
    torch.testing.assert_close(warm.eigenvalues, values[:3], rtol=0, atol=1e-8 * values[0])


def test_warm_start_rows_that_are_zero_or_not_finite_are_left_out():
    """E.g. a previous vector that is zero on the parameters now analysed (a frozen layer's)."""
    case = CASES["mlp-ce"]
    H, values, vectors = _oracle(case)
    op = HessianOperator(case.model, case.loss, case.batches)
    nan = torch.full((1, op.n), float("nan"), dtype=torch.float64)
    for init in (torch.zeros(1, op.n, dtype=torch.float64), torch.cat([nan, vectors[:1]])):
        res = eigenpairs(op, 2, tol=1e-8, init=init)
        torch.testing.assert_close(res.eigenvalues, values[:2], rtol=0, atol=1e-8 * values[0])


@pytest.mark.parametrize("k", [1, 3])
def test_a_warm_start_finds_a_direction_that_has_become_one_of_the_largest(k):
    """Between two checkpoints a direction from the bulk became the sharpest. The last top
    vectors are still eigenvectors, with residual 0: the solve must not stop at them."""
    n, g = 100, torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    before = torch.cat([torch.tensor([10.0, 9, 8]), torch.rand(n - 3, generator=g).double()])
    after = before.clone()
    after[50] = 12.0
    last = U[:, :3].T  # the last checkpoint's top vectors
    res = eigenpairs(MatrixOperator((U * after) @ U.T), k, tol=1e-8, init=last[:k])
    expected = torch.tensor([12.0, 10, 9], dtype=torch.float64)[:k]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=0, atol=1e-7)
    assert res.all_converged


def test_a_warm_start_from_a_previous_solve_skips_no_direction_it_left_out():
    """A solve's vectors hold next to nothing of what was the bottom of its spectrum. The next
    checkpoint's top came from there: started from them alone, every seed skipped one of the
    top 5 (all flagged converged); a cold start skipped none."""
    before = torch.linspace(10, 1, 300, dtype=torch.float64)
    after = before[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    for seed in range(6):
        last = eigenpairs(DiagonalOperator(before), 5, seed=seed).eigenvectors
        res = eigenpairs(DiagonalOperator(after), 5, init=last, seed=seed)
        assert res.all_converged
        torch.testing.assert_close(res.eigenvalues, before[:5], rtol=0, atol=1e-3)


@pytest.mark.parametrize("k", [5, 10])
def test_a_warm_start_of_many_rows_costs_less_than_a_cold_one(k):
    """The last checkpoint's top-k, more rows than the block: folded into the start vector they
    save products (taken as a start block of k rows they cost 1.2-1.6 times a cold start)."""
    n, g = 300, torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    before = (U * torch.logspace(1, -3, n, dtype=torch.float64)) @ U.T
    E = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-3
    after = before + E + E.T  # the next checkpoint
    last = torch.linalg.eigh(before).eigenvectors.flip(1).T[:k]
    cold = eigenpairs(MatrixOperator(after), k, tol=1e-6)
    warm = eigenpairs(MatrixOperator(after), k, tol=1e-6, init=last)
    assert warm.all_converged and warm.hvps < cold.hvps
    expected = torch.linalg.eigvalsh(after).flip(0)[:k]
    torch.testing.assert_close(warm.eigenvalues, expected, rtol=0, atol=1e-5)


def test_a_warm_start_of_both_ends_starts_each_from_its_own_rows():
    n, k, g = 300, 5, torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    ends = torch.logspace(1, -3, n // 2, dtype=torch.float64)
    before = (U * torch.cat([ends, -ends])) @ U.T
    E = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-3
    after = before + E + E.T
    vectors = torch.linalg.eigh(before).eigenvectors.T
    last = torch.cat([vectors.flip(0)[:k], vectors[:k]])  # as a "both" result holds them
    cold = eigenpairs(MatrixOperator(after), k, which="both", tol=1e-6)
    warm = eigenpairs(MatrixOperator(after), k, which="both", tol=1e-6, init=last)
    assert warm.all_converged and warm.hvps < cold.hvps
    # Each end takes its own rows (before, the top took all of them and the bottom none).
    top = eigenpairs(MatrixOperator(after), k, tol=1e-6, init=last[:k], seed=0)
    low = eigenpairs(MatrixOperator(after), k, which="smallest", tol=1e-6, init=last[k:], seed=1)
    assert warm.hvps == top.hvps + low.hvps
    values = torch.linalg.eigvalsh(after)
    expected = torch.cat([values.flip(0)[:k], values[:k]])
    torch.testing.assert_close(warm.eigenvalues, expected, rtol=0, atol=1e-5)


def test_a_warm_start_keeps_a_repeated_eigenvalue_given_a_block_as_large():
    """Folded into one vector, three copies of an eigenvalue start a Krylov space that holds
    one (the known limit of a block of 1, warm or cold); a block of 3 gets each its own."""
    n, g = 200, torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    spectrum = torch.linspace(-3, 10, n, dtype=torch.float64)
    spectrum[-3:] = 10.0
    H = (U * spectrum) @ U.T
    last = torch.linalg.eigh(H).eigenvectors.flip(1).T[:6]
    res = eigenpairs(MatrixOperator(H), 4, tol=1e-6, init=last, block_size=3)
    expected = torch.tensor([10.0, 10, 10, spectrum[-4]], dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, expected, rtol=0, atol=1e-6)


def test_warm_start_rows_beyond_the_block_are_folded_into_it():
    rows = torch.eye(5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    folded = es._folded(rows, 2)  # unit rows 0, 2, 4 and 1, 3, summed
    expected = torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(folded, expected)
    torch.testing.assert_close(es._folded(rows[:2], 2), rows[:2])  # a block holds them
    assert es._folded(torch.cat([rows[:1], -rows[:1]]), 1) is None  # they cancel
    unusable = torch.stack([rows[0], torch.zeros(5), torch.full((5,), torch.nan)])
    torch.testing.assert_close(es._usable_rows(unusable, 5), rows[:1])
    assert es._usable_rows(unusable[1:], 5) is None


def test_warm_start_rows_are_folded_into_the_block_the_plan_lowered():
    """--block-size 5 within 8 products for a top-8 is lowered to 4; the 8 warm rows were
    folded into 5 and the start block took 4 of them: one exact eigenvector of the top 8 was
    left out of the start, which then held only noise of it."""
    H = _with_spectrum(torch.linspace(10.0, 1.0, 300, dtype=torch.float64) ** 2 / 10, 0)
    top = torch.linalg.eigh(H).eigenvectors.flip(1).T[:8]
    started = []

    class Recorded(MatrixOperator):
        def matmul(self, V: torch.Tensor) -> torch.Tensor:
            if not started:
                started.append(V.clone())
            return super().matmul(V)

    res = eigenpairs(Recorded(H), 8, block_size=5, max_hvps=8, init=top, check_steps=0)
    assert res.block_size == 4 and started[0].shape[0] == 4
    Q = torch.linalg.qr(started[0].T)[0]  # the start block's span
    reach = (top @ Q).norm(dim=1)  # each warm row's part in it: 1/sqrt(2) where two share a row
    assert float(reach.min()) > 0.6, reach


def test_unconverged_pairs_are_reported_as_such():
    case = CASES["cnn-bn"]
    op = HessianOperator(case.model, case.loss, case.batches)
    res = eigenpairs(op, 5, tol=1e-12, max_hvps=6, block_size=2)
    assert not res.all_converged
    assert res.hvps <= 6
    # A leading run of the pairs that meet the tolerance (see the test below).
    assert torch.all(res.converged == (res.residuals <= 1e-12).long().cumprod(0).bool())
    assert res.stop_reason == "budget"


def _spectrum_matrix(top: list[float], n: int = 400, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with eigenvalues ``top`` above a bulk in [-1, 5] (a network's shape)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.tensor(top), 6 * torch.rand(n - len(top), generator=g) - 1])
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return basis @ torch.diag(values.double()) @ basis.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn", "tied"])
def test_eigenvalue_criterion_matches_dense_eigh(name, dtype):
    case = CASES[name]
    _, values, _ = _oracle(case)
    low = case.to(dtype)
    op = HessianOperator(low.model, low.loss, low.batches)
    res = eigenpairs(op, 5, tol=TOL[dtype], criterion="eigenvalue")
    assert res.all_converged and res.criterion == "eigenvalue"
    assert torch.all(res.converged == (res.errors <= TOL[dtype]))
    error = (res.eigenvalues - values[:5]).abs() / values[:5].abs()
    assert torch.all(error <= TOL[dtype]), error
    # The bound is a bound: the true error is within it (plus float32 rounding of the products).
    assert torch.all(error <= res.errors + (1e-6 if dtype == torch.float32 else 1e-12))


def test_eigenvalue_criterion_needs_fewer_products_for_the_same_eigenvalue_accuracy():
    # The top of ResNet-18's spectrum (benchmarks/RESULTS.md) above a bulk near zero.
    top = [81.53, 70.10, 62.47, 53.71, 50.39]
    H = _spectrum_matrix(top)
    # Top-1 takes as many (16): its check takes a step more to see that lambda_2, where the
    # gap its bound takes ends, lies within it (see _skipped_direction).
    for k, fewer in ((1, 0), (5, 1)):
        by_residual = eigenpairs(MatrixOperator(H), k, tol=1e-4)
        by_value = eigenpairs(MatrixOperator(H), k, tol=1e-4, criterion="eigenvalue")
        assert by_value.all_converged and by_value.hvps <= by_residual.hvps - fewer, k
        assert not torch.all(by_value.residuals <= 1e-4)  # it did stop before the residuals
        exact = torch.tensor(top[:k]).double()
        error = (by_value.eigenvalues - exact).abs() / exact
        assert torch.all(error <= by_value.errors) and torch.all(error <= 1e-4)


def test_eigenvalue_criterion_is_relative_to_each_eigenvalue():
    # A small eigenvalue beside a large one gets its own digits, not tol * lambda_max.
    g = torch.Generator().manual_seed(2)
    values = torch.cat([torch.tensor([1000.0, 1.0]), 0.5 * torch.rand(298, generator=g)])
    basis = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
    H = basis @ torch.diag(values.double()) @ basis.T
    res = eigenpairs(MatrixOperator(H), 2, tol=1e-4, criterion="eigenvalue")
    assert res.all_converged
    error = (res.eigenvalues - values[:2].double()).abs() / values[:2].double()
    assert torch.all(error <= 1e-4), error


def test_eigenvalue_error_bounds_hold_while_the_solve_is_under_way():
    top = [81.53, 70.10, 62.47, 53.71, 50.39]
    H = _spectrum_matrix(top, seed=1)
    values = torch.linalg.eigvalsh(H).flip(0)
    for budget in range(8, 40, 3):
        res = eigenpairs(MatrixOperator(H), 3, tol=1e-12, max_hvps=budget)
        # Once a Ritz value has found its eigenvalue (its residual is below the gap), the bound
        # from the other Ritz values covers the true error.
        found = res.residuals * res.scale < 5.0
        error = (res.eigenvalues - values[:3]).abs() / values[:3]
        assert torch.all(error[found] <= res.errors[found] + 1e-13), budget  # + rounding


def test_eigenvalue_error_bounds_fall_back_to_the_residual():
    theta = torch.tensor([10.0, 9.9995, 5.0, 1.0], dtype=torch.float64)
    rnorm = torch.tensor([1e-3, 1e-3, 1e-1, 1e-2], dtype=torch.float64)
    bounds = eigenvalue_error_bounds(theta, rnorm)
    # Neighbours closer than the residual: no gap is known, the residual (Weyl) is the bound.
    assert bounds[0] == rnorm[0] and bounds[1] == rnorm[1]
    # Separated: the residual squared over the gap to the widened neighbours.
    assert bounds[2] == pytest.approx(1e-2 / (5.0 - 1.01))
    apart = eigenvalue_error_bounds(torch.tensor([10.0, 9.99], dtype=torch.float64), rnorm[:2])
    assert apart[0] == pytest.approx(1e-6 / (0.01 - 1e-3))
    # The innermost value has no known neighbour on its inner side.
    assert bounds[3] == rnorm[3]
    single = eigenvalue_error_bounds(theta[:1], rnorm[:1])
    assert single[0] == rnorm[0]


def test_eigenvalue_criterion_for_both_ends_and_unknown_criteria():
    case = CASES["cnn-bn"]
    H, values, _ = _oracle(case)
    res = eigenpairs(MatrixOperator(H), 2, which="both", tol=1e-8, criterion="eigenvalue")
    expected = torch.cat([values[:2], values.flip(0)[:2]])
    assert res.all_converged and res.criterion == "eigenvalue" and len(res.errors) == 4
    assert torch.all((res.eigenvalues - expected).abs() <= res.errors * expected.abs() + 1e-12)
    with pytest.raises(UserError, match="residual or eigenvalue"):
        eigenpairs(MatrixOperator(H), 2, criterion="values")


class NoisyOperator(MatrixOperator):
    """A matrix whose products carry rounding-like noise of relative size ``noise``."""

    def __init__(self, matrix: torch.Tensor, noise: float) -> None:
        super().__init__(matrix)
        self.noise = noise * float(torch.linalg.matrix_norm(matrix, 2))
        self.gen = torch.Generator().manual_seed(3)

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        out = super().matmul(block)
        return out + self.noise * torch.randn(out.shape, generator=self.gen, dtype=out.dtype)


def test_tolerance_below_the_noise_floor_stops_early_with_every_pair_accurate():
    g = torch.Generator().manual_seed(0)
    # A well separated top pair converges long before the clustered next three.
    top = torch.tensor([100.0, 30.0, 29.0, 28.0])
    values = torch.cat([top, 25 * torch.rand(196, generator=g)])
    basis = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    H = basis @ torch.diag(values.double()) @ basis.T
    res = eigenpairs(NoisyOperator(H, 1e-7), 4, tol=1e-12, max_hvps=2000)
    assert res.stop_reason == "stalled"
    assert res.hvps < 300  # not the whole budget
    assert not res.converged.any()
    # Every pair, not only the first, reached the noise floor: the solver does not spend its
    # products on a pair that can improve no further.
    torch.testing.assert_close(res.eigenvalues, values[:4].double(), rtol=1e-5, atol=0)
    assert torch.all(res.residuals < 1e-5)


def test_a_float32_tolerance_below_the_residuals_floor_stalls_before_the_whole_space():
    """Residuals beneath what the rounding hides of them met no float32 tolerance (1e-8 here),
    but still counted as improving: 2 of these 3 solves went on to the whole space (n = 300,
    580 products) instead of stalling."""
    values = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for seed in range(3):
        H = _with_spectrum(values, seed).float()
        res = eigenpairs(MatrixOperator(H), 5, tol=1e-8, seed=seed)
        assert res.stop_reason == "stalled" and res.hvps < 300 and not res.converged.any()


def _with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    """A symmetric matrix with eigenvalues ``values`` and a random eigenbasis. Drawn apart from
    the solvers' own seeds: from the same stream, a solver's start is an eigenvector of it."""
    g = torch.Generator().manual_seed(10_000 + seed)
    U = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))[0]
    H = (U * values) @ U.T
    return (H + H.T) / 2


def _clustered(seed: int, at: int, gap: float = 3e-4) -> torch.Tensor:
    """n = 200: a bulk in [0, 1] and separated top eigenvalues, one of which is a cluster of
    three distinct values ``gap`` apart (relative), at position ``at``."""
    values = torch.rand(200, generator=torch.Generator().manual_seed(1000 + seed))
    top = [10.0, 9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.2, 3.0, 2.8, 2.6]
    c = top[at]
    top[at : at + 1] = [c, c * (1 - gap), c * (1 - 2 * gap)]
    values = values.double()
    values[: len(top)] = torch.tensor(top, dtype=torch.float64)
    return _with_spectrum(values, seed)


@pytest.mark.parametrize(
    "at, k, criterion, beyond_reach",
    [(9, 12, "residual", 3), (0, 3, "residual", 0), (0, 3, "eigenvalue", 0)],
)
def test_an_eigenvalue_the_iteration_skipped_is_found_by_the_check(at, k, criterion, beyond_reach):
    """Every pair converged and one of the true top k missing (a member of a tight cluster of
    distinct eigenvalues; with k = 3, lambda_max itself): no residual test sees it. The check
    from a fresh start outside the pairs finds it, and the solve converges it with the rest.

    Its 6 steps have a reach: with k = 12 the one skipped (3.4979) lies 17% above the next of
    the rest (3.0), and 2 of these 20 starts (2 of 30) do not rise above the 12th pair found
    (3.2); 8 steps found all 30. (Before 2026-12-01 the matrices' eigenbases were drawn from
    the solver's own seed, so that the start was an eigenvector, and all 10 seeds passed.)"""
    skipped = wrong = 0
    for seed in range(20):
        H = _clustered(seed, at)
        true = torch.linalg.eigvalsh(H).flip(0)[:k]
        kw = {"tol": 1e-4, "criterion": criterion}
        unchecked = eigenpairs(MatrixOperator(H), k, check_steps=0, **kw)
        checked = eigenpairs(MatrixOperator(H), k, **kw)
        missed = float((unchecked.eigenvalues - true).abs().max()) > 1e-3
        skipped += unchecked.all_converged and missed
        assert checked.all_converged and checked.check_hvps >= es.CHECK_STEPS
        right = torch.allclose(checked.eigenvalues, true, rtol=2e-4, atol=0)
        wrong += not right
        assert checked.skipped_found >= missed or not right
    assert skipped >= 6  # the case is real: without the check, many seeds skip one
    assert wrong <= beyond_reach


def test_the_check_finds_the_one_large_eigenvalue_beside_a_near_null_spectrum():
    """The smallest 2 of a spectrum of 59 values in [0, 1e-4] and one of 48: the iteration
    stopped with 48 as the second smallest (any vector of the near-null space meets the
    tolerance relative to 48, and the space held no vector beyond the two pairs)."""
    values = torch.rand(60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    values = 1e-4 * values
    values[0] = 48.0
    H = _with_spectrum(values, 0)  # (35 of 40 eigenbases show the case)
    unchecked = eigenpairs(MatrixOperator(H), 2, which="smallest", check_steps=0)
    assert unchecked.all_converged and float(unchecked.eigenvalues.max()) > 47
    res = eigenpairs(MatrixOperator(H), 2, which="smallest")
    assert res.all_converged and res.skipped_found >= 1
    assert float(res.eigenvalues.abs().max()) < 1e-4 * 48  # within tol * |lambda_max|


@pytest.mark.parametrize("copies", [2, 3])
def test_the_check_finds_the_copies_of_a_repeated_top_eigenvalue(copies):
    """A Krylov space grown from one vector holds one copy of a repeated eigenvalue (rounding
    may add another, late); the check's fresh start holds the others."""
    values = torch.rand(200, generator=torch.Generator().manual_seed(copies), dtype=torch.float64)
    top = [9.0] * copies + [8.0, 7.0, 6.0, 5.0, 4.5, 4.0]
    values[: len(top)] = torch.tensor(top, dtype=torch.float64)
    H = _with_spectrum(values, 1)
    k = len(top) - 1
    unchecked = eigenpairs(MatrixOperator(H), k, check_steps=0)
    assert unchecked.all_converged and int((unchecked.eigenvalues > 8.5).sum()) < copies
    res = eigenpairs(MatrixOperator(H), k)
    assert res.all_converged and res.skipped_found >= 1
    torch.testing.assert_close(res.eigenvalues, torch.tensor(top[:k], dtype=torch.float64))


def test_the_check_finds_nothing_where_nothing_was_skipped_and_needs_room_in_the_budget():
    H = _with_spectrum(torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 4, 0)
    # Its steps, and one more: lambda_4 (0.9410) lies 2% inside the 3rd, within the look's
    # residual after six (see _skipped_direction).
    res = eigenpairs(MatrixOperator(H), 3, tol=1e-6)
    assert res.check_hvps == es.CHECK_STEPS + 1 and res.skipped_found == 0
    unchecked = eigenpairs(MatrixOperator(H), 3, tol=1e-6, check_steps=0)
    assert res.hvps == unchecked.hvps + res.check_hvps
    torch.testing.assert_close(res.eigenvalues, unchecked.eigenvalues)
    tight = eigenpairs(MatrixOperator(H), 3, tol=1e-6, max_hvps=unchecked.hvps + 2)
    assert tight.check_hvps == 0 and tight.hvps == unchecked.hvps  # no room: not looked
    assert tight.unchecked and not res.unchecked and not unchecked.unchecked  # 0 steps: asked
    ends = _with_spectrum(torch.linspace(-1.0, 1.0, 200, dtype=torch.float64) ** 3, 0)
    both = eigenpairs(MatrixOperator(ends), 3, tol=1e-6, which="both")  # each end looks once
    assert both.all_converged and both.skipped_found == 0
    assert 2 * es.CHECK_STEPS <= both.check_hvps <= 2 * es.CHECK_REACH * es.CHECK_STEPS
    # The top looks within its half of 114; the bottom's rest leaves it no room.
    one = eigenpairs(MatrixOperator(ends), 3, tol=1e-6, which="both", max_hvps=114)
    assert one.all_converged and one.check_hvps > 0 and one.unchecked and not both.unchecked
    spent = eigenpairs(MatrixOperator(H), 3, tol=1e-6, max_hvps=6)
    assert not spent.converged.any() and not spent.unchecked  # nothing converged to vouch for


def _bottom_pairs(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A network-like spectrum: pairs of equal eigenvalues at the bottom (-0.45, -0.36,
    -0.315, each twice), a bulk in [-0.1, 0.3] and a top 6.7 times as far from 0 (3, 2, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 9, generator=g, dtype=torch.float64) * 0.4 - 0.1
    ends = [-0.45, -0.45, -0.36, -0.36, -0.315, -0.315, 3.0, 2.0, 1.5]
    values = torch.cat([torch.tensor(ends, dtype=torch.float64), bulk])
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (U * values) @ U.T, values.sort().values


@pytest.mark.parametrize("seed", [5, 8, 19])
def test_the_check_reaches_further_for_an_end_near_the_middle_of_the_spectrum(seed):
    """Six steps reach the top, not a bottom 6.7 times nearer 0 than the top: these seeds
    returned -0.45, -0.36, -0.315 as the 3 smallest, all converged (a twin network's Hessian
    did the same). The check now takes 6 sqrt(scale / |lambda_1|) steps there; the top's
    cost is unchanged."""
    H, values = _bottom_pairs(seed)
    H = (H + H.T) / 2
    res = eigenpairs(MatrixOperator(H), 3, which="smallest", tol=1e-6, seed=seed)
    assert res.all_converged and res.skipped_found >= 1
    torch.testing.assert_close(res.eigenvalues, values[:3], rtol=0, atol=1e-5)
    top = eigenpairs(MatrixOperator(H), 3, tol=1e-6, seed=seed)
    assert top.check_hvps == es.CHECK_STEPS


def test_the_check_goes_on_across_a_loose_tolerances_margin():
    """At tol 0.1 the check's threshold lies the pairs' residuals (up to 0.1 of the scale) past
    the 5th pair's value (0.872): six steps left its Ritz value at 0.961, rising, against a
    threshold of 0.969 that four more pass, and the 5th pair was 1.8 times its bound off the
    5th eigenvalue. Past the 5th pair's value and still rising, the look now goes on."""
    values = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = _with_spectrum(values, 2)
    res = eigenpairs(MatrixOperator(H), 5, tol=0.1, seed=2)
    true = values.sort(descending=True).values[:5]
    off = (res.eigenvalues - true).abs() / true
    assert res.all_converged and bool((off <= res.errors).all())


@pytest.mark.parametrize(
    "which, k, tol, seed, criterion",
    [
        ("largest", 5, 3e-2, 2, "residual"),
        ("smallest", 3, 1e-1, 0, "residual"),
        ("largest", 3, 1e-1, 0, "eigenvalue"),
    ],
)
def test_no_converged_pairs_bound_stops_short_of_an_eigenvalue_the_check_saw_beyond_it(
    which, k, tol, seed, criterion
):
    """Spectra of 150 values i^4 / 149^4. Largest 5 at tol 3e-2: the 5th pair was the 6th
    eigenvalue (0.8723; the 5th, 0.8969, skipped between the 4th and 5th pairs) with a bound of
    0.0199 for a distance of 0.0245. Smallest 3 at tol 0.1: the 2nd pair was 0.0533 with its
    residual's bound (17 times the eigenvalue: at least 0.003 from 0) where the 2nd smallest is
    2e-9. The check had seen an eigenvalue beyond each outside the pairs, which must then be
    one of theirs: the bound now reaches it. Under the eigenvalue criterion a sighting that
    takes the k-th pair's bound past the tolerance is a skipped direction, taken in, and the
    solve goes on (largest 3 at tol 0.1 would stop with the 3rd pair's bound past it, as
    "unverified")."""
    values = torch.linspace(0.0, 1.0, 150, dtype=torch.float64) ** 4
    H = _with_spectrum(values, seed)
    res = eigenpairs(MatrixOperator(H), k, which=which, tol=tol, seed=seed, criterion=criterion)
    true = values.sort(descending=which == "largest").values[:k]
    off = (res.eigenvalues - true).abs() / true.abs()
    assert res.all_converged and bool((off <= res.errors).all())


def test_the_eigenvalue_criterion_holds_possible_zeros_to_the_residual():
    """Exactly zero eigenvalues have no relative error to bound: the eigenvalue criterion used
    to stall on them after 11 n products (values exact to 1e-15, all 'unconverged')."""
    values = torch.cat([torch.zeros(5), torch.linspace(1.0, 10.0, 95)]).double()
    H = _with_spectrum(values, 3)
    res = eigenpairs(MatrixOperator(H), 3, which="smallest", block_size=5, criterion="eigenvalue")
    assert res.all_converged and res.hvps < 300
    assert float(res.eigenvalues.abs().max()) <= 1e-4 * 10
    assert res.errors.isinf().all()  # still no relative error claimed


def test_the_error_bound_of_an_unconverged_pair_needs_no_gap():
    """A budget too small to converge: the gaps read from a space that has not found the other
    eigenvalues made a bound that did not hold even for the nearest eigenvalue (0.0147 for a
    value 0.0179 off); unconverged pairs keep the residual's bound, which needs no gap."""
    for seed, budget in ((50, 5), (135, 4)):
        g = torch.Generator().manual_seed(seed)
        H = _with_spectrum(10 * torch.rand(60, generator=g, dtype=torch.float64), seed)
        true = torch.linalg.eigvalsh(H)
        res = eigenpairs(MatrixOperator(H), 3, max_hvps=budget, tol=1e-8, check_steps=0)
        assert not res.all_converged
        for value, bound in zip(res.eigenvalues.tolist(), res.errors.tolist(), strict=True):
            nearest = float((true - value).abs().min())
            assert nearest <= bound * abs(value) * (1 + 1e-9)


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_a_pair_behind_an_unconverged_one_is_not_called_converged(criterion):
    """The 10 smallest of 10 * 0.8^i, a solve that ends short of them: pair 9 met the
    tolerance at the 40th smallest eigenvalue (85 times the tolerance from the 10th) while
    pairs 1-8 did not, and was called converged. Only a leading run of pairs is, each its own
    eigenvalue's. (A budget ends the solve there. Which eigenbases and budgets end it in that
    case depends on rounding, so on the CPU and its thread count: the first that does is taken,
    of 4 bases, 4 of whose 96 budgets did on one CPU. Each is below 2n, which a solve needs to
    take the whole space once it has spent n.)"""
    spectrum = 10 * 0.8 ** torch.arange(80, dtype=torch.float64)
    for seed, budget in itertools.product(range(4), range(40, 160, 5)):
        H = _with_spectrum(spectrum, seed)
        res = eigenpairs(
            MatrixOperator(H), 10, which="smallest", tol=1e-6, criterion=criterion, max_hvps=budget
        )
        met = res.residuals <= 1e-6
        behind = met & (~met).long().cumsum(0).bool()  # met, after one that is not
        if behind.any():
            break
    assert behind.any(), "no budget ended the solve with a pair met behind an unmet one"
    true = torch.linalg.eigvalsh(H)
    assert not res.converged[behind].any()
    assert torch.equal(res.converged, res.converged.long().cumprod(0).bool())
    for i in res.converged.nonzero().flatten().tolist():
        assert abs(float(res.eigenvalues[i]) - float(true[i])) <= 1e-6 * res.scale


@pytest.mark.parametrize("n", [3, 30])
def test_the_eigenvalue_criterion_does_not_take_a_gap_an_unfound_eigenvalue_lies_in(n):
    """The bound r^2 / gap takes the gap from the other Ritz values, but an eigenvalue the space
    has not found may lie inside it: of 1.7059, 1.6227 and 0.5769, a 2-vector space held 1.6998
    beside 0.578 and called it converged at tol 1e-3, 3.3% off (18 of 40 bases). The check for
    a skipped eigenvalue looks in the claimed gap too."""
    worst = 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        values = torch.tensor([1.7059, 1.6227, 0.5769], dtype=torch.float64)
        if n > 3:
            values = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
        basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
        H = basis @ torch.diag(values) @ basis.T
        res = eigenpairs(MatrixOperator(H), 1, tol=1e-3, criterion="eigenvalue", seed=seed)
        if res.converged[0]:
            worst = max(worst, abs(float(res.eigenvalues[0]) / float(values[0]) - 1))
    assert worst <= 1e-3


def test_no_converged_pairs_error_bound_takes_a_gap_the_check_saw_an_eigenvalue_in():
    """Under the residual criterion the check for a skipped eigenvalue keeps its threshold (the
    k-th pair), but what it sees between the pairs' claimed gaps and that threshold still tells
    which gaps are not free: those pairs keep the residual's bound. Of 8 random eigenvalues,
    top-1 at tol 1e-3: 4 of 40 bases reported bounds up to 32 times below the true error."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        values = torch.rand(8, generator=g, dtype=torch.float64).sort(descending=True).values
        basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
        H = basis @ torch.diag(values) @ basis.T
        res = eigenpairs(MatrixOperator(H), 1, tol=1e-3, seed=seed)
        error = abs(float(res.eigenvalues[0]) / float(values[0]) - 1)
        assert not res.converged[0] or error <= float(res.errors[0]), seed


@pytest.mark.parametrize(
    "tol, bulk, false_before, false_now", [(1e-4, 0.99, 19, 1), (1e-3, 0.9, 8, 0)]
)
def test_no_bound_takes_a_gap_the_check_did_not_search_through(tol, bulk, false_before, false_now):
    """0.999747 and 0.999699 above a bulk below ``bulk``, top-1 over 20 bases: the space held a
    mix of the two (a residual within the tolerance) and took its gap to the bulk, which the
    check's six steps had not searched through (its value 0.94-0.97 plus that value's residual
    reaching past the gap's edge). ``false_before`` bounds were below the true error (at tol
    1e-4 up to 125 times); they now keep the residual's bound where the check did not search
    the gap, for the same products. The check's residual is evidence, not proof: a direction
    its start barely held can still hide inside a gap it vouches for (``false_now``)."""
    n, false = 300, 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        values = torch.cat(
            [torch.tensor([0.999747, 0.999699]), bulk * torch.rand(n - 2, generator=g)]
        )
        values = values.double()[torch.randperm(n, generator=g)]
        res = eigenpairs(MatrixOperator(torch.diag(values)), 1, tol=tol, seed=seed)
        assert res.converged[0]
        false += abs(float(res.eigenvalues[0]) / 0.999747 - 1) > float(res.errors[0])
    assert false <= false_now < false_before


def test_a_bound_reaches_out_to_what_the_check_did_not_search_beyond_its_pair():
    """Top-3 and top-5 of 150 values uniform in [0, 1] at tol 1e-2: in 8 of 24 solves a
    converged pair was an eigenvalue beside a skipped one (0.9765 as the 3rd, of 0.9849), its
    residual's bound true of the eigenvalue it found but not of the i-th, while the check had
    not searched past the pair's value (its value and residual reached 1.0055). Such a pair's
    bound now reaches out to what the check searched, or the pair before, whichever is nearer:
    4 of 24, for the same products."""
    false = 0
    for seed, k in itertools.product(range(12), (3, 5)):
        values = torch.rand(150, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        res = eigenpairs(MatrixOperator(_with_spectrum(values, seed)), k, tol=1e-2, seed=seed)
        true = values.sort(descending=True).values[:k]
        off = (res.eigenvalues - true).abs() / true
        false += bool((res.converged & (off > res.errors)).any())
    assert false <= 4


def test_the_check_takes_more_steps_at_a_loose_tolerance():
    """Top-1, 3 and 5 of 150 values uniform in [0, 1] (and their fourth powers) at tol 1e-2: 6
    of 72 solves had a pair with a bound below its true error, an eigenvalue beside one the
    check's six steps did not reach. From tol 1e-2 on it takes 9 (14% more products here);
    tighter tolerances keep their six (see the test above)."""
    false = 0
    for power, seed, k in itertools.product((1, 4), range(12), (1, 3, 5)):
        g = torch.Generator().manual_seed(seed)
        values = torch.rand(150, generator=g, dtype=torch.float64) ** power
        res = eigenpairs(MatrixOperator(_with_spectrum(values, seed)), k, tol=1e-2, seed=seed)
        true = values.sort(descending=True).values[:k]
        false += bool((res.converged & ((res.eigenvalues - true).abs() / true > res.errors)).any())
    assert false == 0


def _smallest_under_six_fives_off_their_bounds(
    seeds: Iterable[int], ks: Iterable[int], tol: float
) -> int:
    """Of solves for the smallest k of 94 values uniform in [0, 1] below 5.0 six times (a seed
    and k each), how many have a converged pair off its eigenvalue by more than its bound."""
    false = 0
    for seed, k in itertools.product(seeds, ks):
        g = torch.Generator().manual_seed(seed)
        bulk = torch.rand(94, generator=g, dtype=torch.float64)
        values = torch.cat([torch.full((6,), 5.0, dtype=torch.float64), bulk])
        H = _with_spectrum(values, seed)
        res = eigenpairs(MatrixOperator(H), k, which="smallest", tol=tol, seed=seed)
        true = values.sort().values[:k]
        off = (res.eigenvalues - true).abs() / true
        false += bool((res.converged & (off > res.errors)).any())
    return false


def test_a_bound_reaches_out_to_what_the_last_look_sees_after_the_most_looks():
    """The smallest 2 and 3 of 94 values uniform in [0, 1] below 5.0 six times, at tol 0.1:
    every look found a direction past the pairs, and after the most looks a solve takes
    (:func:`_check_for_skipped`) it stopped with bounds from gaps and residuals nothing had
    searched beyond (0.146 "within 0.111" of the 2nd smallest, 0.0118): 8 of 20 solves had a
    converged pair off the i-th eigenvalue by more than its bound. The last look now takes in
    nothing but still looks, and the bounds reach out to what it sees."""
    assert _smallest_under_six_fives_off_their_bounds(range(10), (2, 3), tol=0.1) == 0


def test_a_bound_reaches_out_to_a_later_pair_whose_residual_reaches_past_it():
    """The smallest 3 and 5 of 94 values uniform in [0, 1] below 5.0 six times, at tol 1e-2:
    the 1st pair was 0.0118, the 2nd eigenvalue, "within 0.0028" of the 1st, 0.0045, which the
    space held only in part, in the 2nd pair (0.0127, its residual 0.043, reaching past it),
    where the check, which looks outside the pairs, did not see it (it saw 0.039). A bound
    now reaches out as far as the pairs after it may lie, as to what the check searched."""
    assert _smallest_under_six_fives_off_their_bounds(range(8), (3, 5), tol=1e-2) == 0


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_no_bound_takes_a_gap_where_the_budget_left_the_check_no_room(criterion):
    """1, 0.999 and 0.998 above a bulk in [0, 0.5], top-1 at tol 1e-3 within 8 products: the
    solve stopped converged after 4-5, too few left for the check's 6 steps, and its bound came
    from a gap to the bulk that nothing had looked inside: below the distance to every
    eigenvalue in 8 of 20 bases (eigenvalue criterion; residual: 15 of 15 converged, 0.998004
    +- 3.7e-4 where the residual is 1.4e-2). Without the check the bound is the residual's."""
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        bulk = 0.5 * torch.rand(97, generator=g, dtype=torch.float64)
        values = torch.cat([torch.tensor([1.0, 0.999, 0.998], dtype=torch.float64), bulk])
        H = _with_spectrum(values, seed)
        res = eigenpairs(MatrixOperator(H), 1, tol=1e-3, criterion=criterion, max_hvps=8, seed=seed)
        assert res.check_hvps == 0
        value, bound = float(res.eigenvalues[0]), float(res.errors[0])
        nearest = float((values - value).abs().min())
        assert nearest <= bound * abs(value), seed
        assert not res.converged[0] or float(res.residuals[0]) <= 1e-3 * (1 + bound), seed


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_no_bound_takes_a_gap_where_the_budget_ended_the_solve(criterion):
    """Top-5 of 3, 2, 1, 0.999, 0.998 above a bulk in [0, 0.5], ended by budgets of 8-14
    products: the pairs converged by then took their bounds from gaps no check had looked
    inside (the budget's end leaves none), below the distance to every eigenvalue for 57 of 479
    converged pairs (residual criterion; eigenvalue: 62 of 452) over 40 bases."""
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        bulk = 0.5 * torch.rand(95, generator=g, dtype=torch.float64)
        values = torch.cat([torch.tensor([3.0, 2.0, 1.0, 0.999, 0.998]).double(), bulk])
        H = _with_spectrum(values, seed)
        for budget in (8, 10, 12, 14):
            res = eigenpairs(
                MatrixOperator(H), 5, tol=1e-3, criterion=criterion, max_hvps=budget, seed=seed
            )
            assert res.stop_reason in ("budget", "converged")
            for value, bound in zip(res.eigenvalues.tolist(), res.errors.tolist(), strict=True):
                nearest = float((values - value).abs().min())
                assert nearest <= bound * abs(value), (seed, budget)


def test_warm_start_rows_of_another_length_or_type_are_one_sentence():
    op = MatrixOperator(_with_spectrum(torch.linspace(1.0, 2.0, 20, dtype=torch.float64), 0))
    # Eigenvectors as eigh's columns (20 x 4, read as 4 rows of 20 mixed entries), and rows of
    # another operator that fill whole rows of this one (4 x 10, read as 2 rows).
    for init in (
        torch.ones(2, 19, dtype=torch.float64),
        torch.ones(2, 20, dtype=torch.long),
        torch.linalg.eigh(op.matrix)[1][:, -4:],
        torch.ones(4, 10, dtype=torch.float64),
        torch.ones(1, 2, 20, dtype=torch.float64),
    ):
        with pytest.raises(UserError, match="warm-start vectors must be real rows of 20"):
            eigenpairs(op, 2, init=init)
    with pytest.raises(UserError, match="`check_steps` must be at least 0"):
        eigenpairs(op, 2, check_steps=-1)


def test_a_warm_start_or_hint_that_is_no_tensor_is_one_sentence():
    """A numpy array of previous eigenvectors failed in .is_floating_point(), a list in .ndim,
    a numpy hint in .numel(): AttributeErrors naming neither."""
    op = MatrixOperator(_with_spectrum(torch.linspace(1.0, 2.0, 20, dtype=torch.float64), 0))
    rows = torch.linalg.eigh(op.matrix)[1][:, -2:].T
    for init in (rows.numpy(), rows.tolist()):
        kind = "a numpy.ndarray" if isinstance(init, np.ndarray) else "a list"
        with pytest.raises(UserError, match=f"real rows of 20 entries, .*, not {kind} \\(make"):
            eigenpairs(op, 2, init=init)
    with pytest.raises(UserError, match="^the hint must be a real vector of 20 .* a numpy"):
        eigenpairs(op, 2, hint=rows[0].numpy())
    assert op.hvp_count == 0
    # An earlier solve's result is pointed to its vectors, not to torch.as_tensor (which fails).
    earlier = eigenpairs(op, 2)
    before = op.hvp_count
    with pytest.raises(
        UserError, match=r"not an? [\w.]*EigenResult \(its vectors are its \.eigenv"
    ):
        eigenpairs(op, 2, init=earlier)
    assert op.hvp_count == before
    # As tensors they start the solve at its answer.
    warm = eigenpairs(op, 2, init=torch.as_tensor(rows.numpy()))
    torch.testing.assert_close(warm.eigenvalues, torch.linalg.eigvalsh(op.matrix)[-2:].flip(0))


def test_k_larger_than_parameter_count_is_refused():
    case = CASES["mlp-mse"]
    op = HessianOperator(case.model, case.loss, case.batches)
    with pytest.raises(UserError, match="choose `k` of at most"):  # the caller's names
        eigenpairs(op, op.n + 1)
    # A basis of -3 or 0 vectors ran as the least the solve can hold, or the default, unsaid.
    for kw in ({"block_size": 0}, {"max_hvps": -1}, {"max_basis": -3}, {"max_basis": 0}):
        with pytest.raises(UserError, match=f"`{next(iter(kw))}` must be at least 1"):
            eigenpairs(op, 1, **kw)
    assert op.hvp_count == 0


@pytest.mark.parametrize(
    ("solve", "name"),
    [
        (lambda op: eigenpairs(op, 2.0), "k"),
        (lambda op: eigenpairs(op, 2, block_size=1.0), "block_size"),
        (lambda op: eigenpairs(op, 2, max_basis=2.5), "max_basis"),  # ran as the whole space
        (lambda op: eigenpairs(op, 2, check_steps=2.5), "check_steps"),  # ran
        (lambda op: eigenpairs(op, 2, check_steps=True), "check_steps"),  # ran as 1
        (lambda op: stochastic_trace(op, 30.0), "num_probes"),
        (lambda op: spectral_density(op, 8.0), "num_probes"),
        (lambda op: spectral_density(op, 2, 10.0), "steps"),
    ],
)
def test_counts_that_are_not_whole_numbers_are_refused(solve, name):
    """They failed in torch: "full(): argument 'size' must be tuple of ints", "randint()
    received an invalid combination of arguments", TypeErrors."""
    op = MatrixOperator(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)))
    with pytest.raises(UserError, match=f"`{name}` must be a whole number"):
        solve(op)
    assert op.hvp_count == 0


@pytest.mark.parametrize("verify", ["no", 0, 1.0])
def test_a_verify_that_is_not_a_bool_is_refused(verify):
    """'no' verified (any truthy object did, k more products), and 0 skipped the kept
    products' residuals while verifying nothing."""
    op = MatrixOperator(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)))
    with pytest.raises(UserError, match=f"^`verify` must be True, False or None.*not {verify!r}"):
        eigenpairs(op, 2, verify=verify)
    assert op.hvp_count == 0


def test_a_trace_block_of_no_probes_is_refused():
    """A block of -1 multiplied no probe and read the products' uninitialised memory: the
    trace of diag(1..40), 820, came out 39 with no error; 0 and 2.5 were all at once and a
    TypeError."""
    op = MatrixOperator(torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64)))
    for block_size in (-1, 0):
        with pytest.raises(UserError, match=f"^`block_size` must be at least 1, not {block_size}"):
            stochastic_trace(op, 12, block_size=block_size)
    with pytest.raises(UserError, match="^`block_size` must be a whole number, not 2.5"):
        stochastic_trace(op, 12, block_size=2.5)
    assert op.hvp_count == 0
    # A block that divides the probes unevenly gives what all at once gives.
    whole = stochastic_trace(op, 12, method="hutchinson")
    assert stochastic_trace(op, 12, method="hutchinson", block_size=5).estimate == whole.estimate
    assert whole.estimate == pytest.approx(820)  # Rademacher probes: v^T D v is trace(D)


@pytest.mark.parametrize(
    "solve",
    [
        lambda op, seed: eigenpairs(op, 2, seed=seed),
        lambda op, seed: eigenpairs(op, 2, which="both", seed=seed),
        lambda op, seed: stochastic_trace(op, 4, seed=seed),
        lambda op, seed: spectral_density(op, 2, 4, seed=seed),
    ],
    ids=["eigenpairs", "both-ends", "trace", "density"],
)
def test_a_seed_torch_cannot_take_is_refused_naming_it(solve):
    """They stopped in torch: "manual_seed expected a long, but got float" (a RuntimeError),
    "Overflow when unpacking long long", "can only concatenate str"."""
    op = MatrixOperator(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)))
    for seed in (1.5, 2**64, "1"):
        with pytest.raises(UserError, match=f"^`seed` must be an integer .*, not {seed!r}"):
            solve(op, seed)
    assert op.hvp_count == 0


@pytest.mark.parametrize(
    ("k", "kw"),
    [
        (1, {"block_size": 8, "max_hvps": 3}),  # a first block larger than the budget
        (1, {"init": "10 rows", "max_hvps": 3}),  # more warm-start rows than the budget
        (2, {"which": "both", "max_hvps": 10}),  # the two ends share it
        (2, {"which": "both", "max_hvps": 4}),
        # Blocks that stop short of k rows in the budget: 5, 50 and 18 pairs were returned.
        (8, {"block_size": 5, "max_hvps": 8}),
        (51, {"max_hvps": 51}),  # the default block, 2
        (10, {"block_size": 4, "which": "both", "max_hvps": 22}),
    ],
)
def test_the_hvp_budget_bounds_every_product(k, kw):
    H = torch.randn(60, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H = H + H.T
    if "init" in kw:
        kw = {**kw, "init": torch.linalg.eigh(H).eigenvectors.T[:10]}
    op = MatrixOperator(H)
    res = eigenpairs(op, k, tol=1e-12, **kw)
    assert op.hvp_count == res.hvps <= kw["max_hvps"]
    assert len(res.eigenvalues) == (2 * k if kw.get("which") == "both" else k)


@pytest.mark.parametrize("tol", ["1e-4", None])
def test_a_tolerance_that_is_not_a_number_is_refused_naming_it(tol):
    """A string (from a config file) or None failed in the comparison: "'<' not supported
    between instances of 'int' and 'str'", a TypeError naming no argument."""
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(UserError, match=f"^`tol` must be a positive number below 1 .*not {tol!r}"):
        eigenpairs(op, 2, tol=tol)


def test_a_budget_below_one_product_per_pair_is_refused():
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(UserError, match="`max_hvps` 3 is too few for 5 eigenpairs"):
        eigenpairs(op, 5, max_hvps=3)
    with pytest.raises(UserError, match="allow at least 4"):
        eigenpairs(op, 2, which="both", max_hvps=3)
    assert op.hvp_count == 0


def test_both_ends_that_would_overlap_are_refused():
    """2k > n pairs of both ends share some: -k 2410 --which both on 2,410 parameters returned
    every pair twice, with exit 0."""
    op = MatrixOperator(torch.diag(torch.arange(1.0, 12.0, dtype=torch.float64)))
    with pytest.raises(UserError, match="at most 5, or `which=largest` with `k` 11"):
        eigenpairs(op, 6, which="both")
    assert op.hvp_count == 0
    res = eigenpairs(op, 5, which="both", tol=1e-10)
    assert sorted(res.eigenvalues.tolist()) == pytest.approx([1, 2, 3, 4, 5, 7, 8, 9, 10, 11])
    with pytest.raises(UserError, match="one parameter has no two ends: use `which=largest`"):
        eigenpairs(MatrixOperator(torch.ones(1, 1, dtype=torch.float64)), 1, which="both")


def test_a_block_of_most_of_the_space_takes_the_whole_space_within_its_default_budget():
    """A block of 2,000 of 2,410 parameters spent the default budget of 2,000 products in one
    pass and returned an unconverged lambda_1 (1.87 for 2.24); the whole space takes n."""
    n = 2_100
    values = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    op = DiagonalOperator(values)
    res = eigenpairs(op, 1, block_size=2_000, tol=1e-8)
    assert res.method == "whole-space" and res.hvps == n and res.all_converged
    assert float(res.eigenvalues[0]) == pytest.approx(1.0, rel=1e-12)


def test_full_spectrum_when_k_equals_n():
    H = torch.randn(12, 12, dtype=torch.float64)
    H = H + H.T
    res = eigenpairs(MatrixOperator(H), 12, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0))
    assert res.all_converged


@pytest.mark.parametrize(
    ("n", "k", "kw"),
    [(100, 95, {}), (203, 190, {}), (5, 5, {"block_size": 2}), (5, 1, {"guard": 5})],
)
def test_pairs_near_the_size_of_the_space_leave_the_basis_no_room_for_a_block(n, k, kw):
    """Where the pairs to keep (k and the guard) and a block do not fit beside each other, the
    basis grows by what fits instead of restarting to more rows than it holds."""
    H = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    H = H + H.T
    values = torch.linalg.eigvalsh(H).flip(0)
    res = eigenpairs(MatrixOperator(H), k, **kw)  # the default tolerance, 1e-4
    torch.testing.assert_close(res.eigenvalues, values[:k], rtol=0, atol=1e-6 * values.abs().max())
    assert res.all_converged


def test_slow_but_exact_convergence_is_not_taken_for_noise():
    """The smallest of a spectrum crowded near zero converge in long plateaus: an exact
    operator's products show no noise, so the solver keeps going (it used to stop after 156
    products, calling it stalled); one that stops improving far above the noise says "slow"
    (of n = 1,100 parameters, whose whole space does not fit in the default budget beside the
    n products after which a solve would take it)."""
    d = torch.linspace(0.01, 1.0, 200, dtype=torch.float64) ** 2
    res = eigenpairs(MatrixOperator(torch.diag(d)), 3, which="smallest", tol=1e-6)
    assert res.stop_reason == "converged" and res.all_converged
    torch.testing.assert_close(res.eigenvalues, d[:3])
    crowded = torch.linspace(0, 1.0, 1_100, dtype=torch.float64) ** 4
    res = eigenpairs(MatrixOperator(torch.diag(crowded)), 1, which="smallest", tol=1e-6)
    assert res.stop_reason == "slow" and not res.all_converged
    assert res.hvps < 2000  # not the whole default budget


def test_a_tolerance_far_above_the_products_noise_is_not_given_up_as_noise():
    """A trained float32 network's smallest eigenvalues (a crowded bottom) converge in plateaus
    near the noise floor: the solve stopped as "stalled" (the warning blamed the products'
    rounding) at residuals 4e-4 after 614 products, though 1e-4 is ten times that floor and was
    met with more patience."""
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x @ torch.randn(8, 4) + 0.5 * torch.randn(200, 4)).argmax(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[:64], y[:64]), (x[64:128], y[64:128]), (x[128:], y[128:])]
    op = HessianOperator(model, F.cross_entropy, batches)
    res = eigenpairs(op, 5, which="smallest", tol=1e-4)
    assert res.stop_reason == "converged" and res.all_converged
    assert (res.residuals <= 1e-4).all()
    H = dense_hessian(model, F.cross_entropy, batches, op.space).double()
    smallest = torch.linalg.eigvalsh((H + H.T) / 2)[:5]
    torch.testing.assert_close(res.eigenvalues, smallest, rtol=0, atol=1e-4 * res.scale)


def test_the_smallest_are_measured_against_the_largest_eigenvalue_seen():
    """Residuals are relative to |lambda_max|; a search for the smallest restarts its basis
    toward them, which drops the largest Ritz values, so the scale keeps the largest seen."""
    d = torch.linspace(0.01, 1.0, 200, dtype=torch.float64) ** 2
    res = eigenpairs(MatrixOperator(torch.diag(d)), 3, which="smallest", tol=1e-6, max_hvps=120)
    assert 0.99 <= res.scale <= 1.0


def _symmetric(n: int) -> torch.Tensor:
    A = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    return (A + A.T) / 2


@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse", "cnn-bn"])
def test_float32_pairs_called_converged_have_true_residuals_within_the_tolerance(name):
    """At tol 1e-7 the float32 networks' residuals from their own products met the tolerance
    while the true ones (the float64 Hessian's) were up to 1.34 times it: 12 of these 18 solves
    called such a pair converged. The products' rounding is now counted (residual_floor)."""
    case = CASES[name]
    H, values, _ = _oracle(case)
    c32 = case.to(torch.float32)
    op = HessianOperator(c32.model, c32.loss, c32.batches)
    for which, seed in itertools.product(["largest", "smallest"], range(3)):
        res = eigenpairs(op, 3, which=which, tol=1e-7, seed=seed)
        V = res.eigenvectors.double()
        true = norms(V @ H - res.eigenvalues[:, None] * V) / float(values.abs().max())
        assert (true[res.converged] <= 1e-7).all(), (which, seed, true / 1e-7)


@pytest.mark.parametrize(
    "hint", [torch.ones(7, dtype=torch.float64), torch.ones(10, dtype=torch.long)]
)
def test_a_hint_that_is_not_a_real_vector_of_the_operators_size_is_one_sentence(hint):
    """A hint of another operator's size failed in the start block's arithmetic (a
    RuntimeError about the tensors' sizes)."""
    op = MatrixOperator(torch.diag(torch.linspace(0.1, 1.0, 10, dtype=torch.float64)))
    with pytest.raises(UserError, match="hint must be a real vector of 10 entries"):
        eigenpairs(op, 2, hint=hint)


def test_float32_eigenvalues_are_within_their_bounds_of_the_products_rounding():
    """A float32 product is that of a matrix its rounding of lambda_max away, which the
    projected matrix's asymmetry may not show: a tanh MLP's third eigenvalue was 1.9e-7 off
    for a bound of 1.7e-7 (3 of 96 converged pairs of such MLPs, up to 1.37 times)."""
    for seed in range(12):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(100 + seed)
        x, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
        model = torch.nn.Sequential(
            torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        ).double()
        op = HessianOperator(model, F.cross_entropy, [(x.double(), y)])
        values = dense_eigh(dense_hessian(model, F.cross_entropy, [(x.double(), y)], op.space))[0]
        op = HessianOperator(copy.deepcopy(model).float(), F.cross_entropy, [(x, y)])
        for which, true in (("largest", values[:4]), ("smallest", values.flip(0)[:4])):
            res = eigenpairs(op, 4, which=which, seed=seed)
            errors = (res.eigenvalues.double() - true).abs() / true.abs()
            assert (errors <= res.errors)[res.converged].all(), (seed, which, errors / res.errors)


def test_float32_whole_space_eigenvalues_are_within_their_bounds():
    """The whole space's eigenvalues come from the float64 eigendecomposition of the products:
    the Rayleigh quotients of the float32 vectors added their rounding (96 of 130 eigenvalues
    off by more than their bounds, up to 21 times, on an exactly symmetric float32 matrix)."""
    g = torch.Generator().manual_seed(6)
    n = 300
    spectrum = torch.cat([10 * 0.8 ** torch.arange(30.0), 0.01 * torch.randn(270, generator=g)])
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    H = ((Q * spectrum.double()) @ Q.T).float()
    H = (H + H.T) / 2  # exactly symmetric: its float32 products are exact
    true = torch.linalg.eigvalsh(H.double()).flip(0)[:130]
    res = eigenpairs(MatrixOperator(H), 130)
    assert res.method == es.WHOLE and res.all_converged
    errors = (res.eigenvalues - true).abs() / true.abs()
    assert (errors <= res.errors).all(), float((errors / res.errors).max())


@pytest.mark.parametrize(("n", "k", "block"), [(101, 60, None), (100, 30, 3), (150, 100, None)])
def test_a_basis_that_may_hold_the_whole_space_is_not_restarted_a_block_short_of_it(n, k, block):
    """With blocks of 2-4 the last block did not fit beside the basis, which was restarted a
    block short of the whole space: 120, 144 and 190 products (and the check's 6) where n span
    it. It takes what is left of the space instead."""
    H = _symmetric(n)
    res = eigenpairs(MatrixOperator(H), k, tol=1e-10, block_size=block)
    assert res.all_converged and res.hvps - res.check_hvps <= n
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:k])


def test_float32_eigenvalues_of_a_basis_grown_to_the_whole_space_are_within_their_bounds():
    """All 88 pairs of a float32 network: a Krylov basis that grows to the whole space, whose
    Ritz values were corrected to their vectors' float32 Rayleigh quotients, which added their
    rounding: lambda_1 was 1.63e-7 off, 1.4 times its bound, lambda_2 too."""
    low = CASES["frozen-unused"].to(torch.float32)
    exact = low.to(torch.float64)  # the same rounded weights and data
    _, values, _ = _oracle(exact)
    op = HessianOperator(low.model, low.loss, low.batches)
    res = eigenpairs(op, op.n, tol=1e-4)
    assert res.method != es.WHOLE and res.all_converged
    errors = (res.eigenvalues - values).abs() / values.abs()
    nonzero = values.abs() > 1e-12  # the unused parameters' exact zeros: no relative error
    assert (errors[nonzero] <= res.errors[nonzero]).all()


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_a_basis_of_half_the_space_takes_the_whole_space_at_once(which):
    """k = 100 of n = 300: the Krylov basis would hold 303 >= n / 2 vectors, so the solve takes
    all n columns and the dense eigendecomposition (one step) instead of growing the basis;
    both ends come from the same columns (they used to be taken twice)."""
    H = _symmetric(300)
    k = 100
    res = eigenpairs(MatrixOperator(H), k, which=which, tol=1e-10)
    ref = torch.linalg.eigvalsh(H)
    expected = {
        "largest": ref.flip(0)[:k],
        "smallest": ref[:k],
        "both": torch.cat([ref.flip(0)[:k], ref[:k]]),
    }[which]
    torch.testing.assert_close(res.eigenvalues, expected)
    V = res.eigenvectors
    assert float((V @ H - res.eigenvalues[:, None] * V).norm(dim=1).max()) < 1e-10
    assert res.method == "whole-space" and res.all_converged
    assert res.hvps == 300


@pytest.mark.parametrize(
    ("n", "ratio", "tol"), [(80, 0.8, 1e-4), (80, 0.8, 1e-6), (200, 0.95, 1e-4)]
)
def test_a_krylov_solve_that_has_spent_n_products_takes_the_whole_space(n, ratio, tol):
    """The smallest 10 of 10 * ratio^i: the restarted basis took 285-2,200 products, ending
    unconverged ("slow", "budget"), or converged with the 10th pair 1.14 times the tolerance
    from the 10th eigenvalue (n = 80, tol 1e-4). Once it has spent n products, what every
    column costs, it takes them instead; the largest, which converge sooner, stay Krylov."""
    H = _with_spectrum(10 * ratio ** torch.arange(n, dtype=torch.float64), 2)
    true = torch.linalg.eigvalsh(H)
    res = eigenpairs(MatrixOperator(H), 10, which="smallest", tol=tol, seed=102)
    assert res.method == es.WHOLE and res.all_converged and res.hvps <= 2 * n + res.check_hvps
    torch.testing.assert_close(res.eigenvalues, true[:10], rtol=0, atol=tol * res.scale)
    top = eigenpairs(MatrixOperator(H), 10, tol=tol, seed=102)
    assert top.method != es.WHOLE and top.all_converged and top.hvps < n


def test_the_whole_space_step_reports_the_pairs_converged_so_far(monkeypatch):
    """The smallest 10 of 10 * 0.8^i: the Krylov solve had reported 5 pairs converged when it
    took the whole space after n = 80 products, whose products then reported 0 (a progress
    bar that went back) until the eigendecomposition converged all 10."""
    seen = []
    whole_basis = es._whole_basis

    def marked(*args, **kwargs):
        seen.append("whole")
        return whole_basis(*args, **kwargs)

    monkeypatch.setattr(es, "_whole_basis", marked)
    H = _with_spectrum(10 * 0.8 ** torch.arange(80, dtype=torch.float64), 2)
    res = eigenpairs(
        MatrixOperator(H),
        10,
        which="smallest",
        tol=1e-4,
        seed=102,
        progress=lambda *a: seen.append(a),
    )
    assert res.method == es.WHOLE and res.all_converged
    at = seen.index("whole")
    before, during, after = seen[at - 1], seen[at + 1 : -1], seen[-1]
    assert before[1] > 0 and during  # the case is real: pairs converged before
    assert all(done == before[1] for _, done, _ in during)
    assert after[1:] == (10, 10)


def test_the_progress_counts_the_pairs_the_result_calls_converged():
    """The smallest 10 of 10 * 0.8^i, stopped by budgets: the progress counted every pair within
    tolerance, 1 or 2 where the result, of which only a leading run counts, said 0 or 1 (7 of
    21 budgets; 2 or 3 went back to 1 on the way)."""
    H = _with_spectrum(10 * 0.8 ** torch.arange(200, dtype=torch.float64), 0)
    seen = []
    for budget in range(20, 310, 14):
        res = eigenpairs(
            MatrixOperator(H),
            10,
            which="smallest",
            tol=1e-6,
            max_hvps=budget,
            progress=lambda *a: seen.append(a[1]),
        )
        assert seen[-1] == int(res.converged.sum())  # the last report, of this solve


@pytest.mark.parametrize(("n", "k"), [(260, 45), (300, 3)])
def test_both_ends_report_the_pairs_of_both(n, k):
    """--which both: the top's solve reported k pairs wanted, then the bottom's k again from 0
    (a bar that went back), and one solve of the whole space reported all n pairs wanted."""
    seen = []
    H = _with_spectrum(torch.linspace(-1.0, 2.0, n, dtype=torch.float64), 0)
    res = eigenpairs(
        MatrixOperator(H), k, which="both", seed=1, progress=lambda *a, seen=seen: seen.append(a)
    )
    assert res.all_converged and (res.method == es.WHOLE) == (k == 45)
    assert {wanted for _, _, wanted in seen} == {2 * k}
    spent, done = [a[0] for a in seen], [a[1] for a in seen]
    assert spent == sorted(spent) and spent[-1] <= res.hvps and done[-1] == 2 * k
    if k == 3:  # a Krylov solve's pairs may come and go, but not the other end's
        assert done[[i for i, d in enumerate(done) if d >= k][0] :].count(0) == 0


def test_a_basis_grown_to_the_whole_space_is_freed_before_the_verifying_products(monkeypatch):
    """The Krylov solve of the smallest 10 of 10 * 0.8^i that takes the whole space: its n x n
    basis, products and projected matrix were still held by a second name while the k fresh
    products verified the pairs (and until the solve returned)."""
    import weakref

    held, alive = [], []
    whole_basis = es._whole_basis

    def tracked(*args, **kwargs):
        basis = whole_basis(*args, **kwargs)
        held.append(weakref.ref(basis))
        return basis

    class Watched(MatrixOperator):
        def matmul(self, block):
            alive.append(bool(held) and held[0]() is not None)
            return super().matmul(block)

    monkeypatch.setattr(es, "_whole_basis", tracked)
    H = _with_spectrum(10 * 0.8 ** torch.arange(80, dtype=torch.float64), 2)
    res = eigenpairs(Watched(H), 10, which="smallest", tol=1e-4, seed=102, verify=True)
    assert res.method == es.WHOLE and res.all_converged
    assert not alive[-1]  # the verifying products (one block of 10)


def test_both_ends_say_which_end_took_the_whole_space():
    """The smallest of 10 * 0.8^i take the whole space after n products, the largest converge
    in a Krylov space: the result named the largest end's method alone."""
    H = _with_spectrum(10 * 0.8 ** torch.arange(80, dtype=torch.float64), 2)
    res = eigenpairs(MatrixOperator(H), 5, which="both", tol=1e-6, seed=102)
    assert res.method == f"block-krylov-thick-restart (largest), {es.WHOLE} (smallest)"
    assert res.all_converged


def test_a_krylov_solve_without_room_for_the_whole_space_goes_on(monkeypatch):
    """Every column of n = 80 needs 0.37 MB, the basis of the smallest 10 0.08 MB: where only
    that is free, the solve stays Krylov (to its budget) instead of refusing."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200_000)
    H = _with_spectrum(10 * 0.8 ** torch.arange(80, dtype=torch.float64), 2)
    res = eigenpairs(MatrixOperator(H), 10, which="smallest", tol=1e-6, seed=102, max_hvps=200)
    assert res.method != es.WHOLE and res.stop_reason == "budget"


def test_a_small_k_or_budget_keeps_the_krylov_basis():
    H = _symmetric(300)
    few = eigenpairs(MatrixOperator(H), 3, tol=1e-8)
    assert few.method == "block-krylov-thick-restart" and few.hvps < 300
    torch.testing.assert_close(few.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3])
    capped = eigenpairs(MatrixOperator(H), 100, tol=1e-10, max_hvps=150)
    assert capped.method == "block-krylov-thick-restart" and capped.hvps <= 150


def test_many_pairs_take_a_larger_default_block_and_match_eigh():
    """k = 60 of n = 700: a block of 2 by default (k // 25), still the Krylov path."""
    H = _symmetric(700)
    res = eigenpairs(MatrixOperator(H), 60, tol=1e-8)
    assert res.block_size == 2 and res.method == "block-krylov-thick-restart"
    assert res.all_converged and res.hvps < 700
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:60])
    V = res.eigenvectors
    true = (V @ H - res.eigenvalues[:, None] * V).norm(dim=1) / res.scale
    torch.testing.assert_close(res.residuals, true, rtol=1e-4, atol=1e-12)


def test_the_projected_matrix_grows_by_its_new_rows_only():
    from hessian_cli.engine.eigensolver import _extended, _new_rows

    H = _symmetric(50)
    gen = torch.Generator().manual_seed(1)
    B = orthonormalize_against(torch.randn(12, 50, dtype=torch.float64, generator=gen), None)
    Q, W = B[:9], B[9:]
    T0 = Q @ H @ Q.T
    T, asymmetry = _extended((T0 + T0.T) / 2, _new_rows(Q, Q @ H, W, W @ H))
    torch.testing.assert_close(T, B @ H @ B.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(T, T.T) and asymmetry < 1e-12
    # Errors in the products show as a difference between the two estimates of an entry.
    noise = 1e-3 * torch.randn(W.shape, dtype=torch.float64, generator=gen)
    _, asymmetry = _extended((T0 + T0.T) / 2, _new_rows(Q, Q @ H, W, W @ H + noise))
    assert 1e-4 < asymmetry < 1e-2


def test_a_whole_space_that_does_not_fit_in_memory_is_one_sentence(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1_000_000)  # needs 5.6 MB
    with pytest.raises(UserError, match="need every column of the Hessian, .* ask for fewer"):
        eigenpairs(MatrixOperator(_symmetric(300)), 100)


def test_a_whole_space_counts_what_its_eigendecomposition_holds(monkeypatch):
    """Top-100 of n = 300: every column and its product, 114 Ritz vectors and their residuals,
    and 5 n x n float64 matrices for the dense eigendecomposition (the projected matrix, eigh's
    signed copy of it, its eigenvectors and workspace). It counted 3 of them, where the peak
    resident memory held 5 (n = 2,100)."""
    op = MatrixOperator(_symmetric(300))
    need = ((2 * 300 + 2 * 114) * 300 + 5 * 300 * 300) * 8
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match="need every column of the Hessian"):
        eigenpairs(op, 100)
    assert op.hvp_count == 0  # refused before any product
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)
    assert eigenpairs(op, 100).method == es.WHOLE


def test_a_cuda_whole_space_checks_the_machines_memory_for_its_eigendecomposition(monkeypatch):
    """On a GPU the columns stay on the device but the dense eigendecomposition (5 n x n
    float64) runs on the CPU: that memory was not checked, so a solve with room on the card
    could be killed by the kernel's out-of-memory killer after n products."""
    from hessian_cli.engine.solver_plan import check_memory

    n = 300
    op = SimpleNamespace(n=n, dtype=torch.float32, device=torch.device("cuda"))
    host = 5 * n * n * 8
    free = {"cuda": 2**40, "cpu": host - 1}
    monkeypatch.setattr(memory, "free_bytes", lambda device: free[device.type])
    with pytest.raises(UserError, match="every column of the Hessian in this machine's memory"):
        check_memory(op, 100, n, 114, whole=True)
    check_memory(op, 100, 200, 114, whole=False)  # a Krylov basis needs nothing of the CPU
    free["cpu"] = host
    check_memory(op, 100, n, 114, whole=True)


def test_a_krylov_basis_that_does_not_fit_in_memory_is_one_sentence(monkeypatch):
    op = MatrixOperator(_symmetric(700))
    # top-60 and a guard of 6, block 2: 204 basis vectors, their products, 68 Ritz vectors and
    # residuals, and a restart's copy of the basis (vectors this short are restarted in one
    # piece), of 700 doubles
    need = (3 * 204 + 2 * 68) * 700 * 8
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match=r"60 eigenpairs of 700 parameters need a basis of 204 "):
        eigenpairs(op, 60)
    assert op.hvp_count == 0  # refused before any product
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)
    assert eigenpairs(op, 60, tol=1e-6).all_converged


def test_kept_graphs_make_room_for_a_basis(monkeypatch):
    """Several batches' graphs, kept by the gradient pass within half the free memory, are
    released when the basis would not fit beside them; the products keep what then fits."""
    case = CASES["cnn-bn"]
    x, y = case.batches[0]
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    op = HessianOperator(case.model, case.loss, batches)
    op.gradient()
    assert len(op._graphs) == 3
    H = dense_hessian(case.model, case.loss, batches, op.space)
    # top-1: a basis of 20, its products, 2 Ritz vectors and residuals, and the check for a
    # skipped eigenvalue's 24 vectors, their products and the pair's copy
    need = (2 * 20 + 2 * 2 + 2 * 24 + 1) * op.n * 8
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1 if op._graphs else need)
    res = eigenpairs(op, 1, tol=1e-8)
    assert res.all_converged
    top = torch.linalg.eigvalsh(H)[-1]
    torch.testing.assert_close(res.eigenvalues[0], top, rtol=1e-7, atol=0)


def test_ranks_on_one_machine_need_room_for_a_basis_each(monkeypatch):
    import hessian_cli.engine.eigensolver as solver

    op = MatrixOperator(_symmetric(700))
    op.distributed = True  # as a HessianOperator under torchrun: the check is collective
    need = (3 * 204 + 2 * 68) * 700 * 8  # as above
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 * need - 1)
    monkeypatch.setattr(memory, "local_world_size", lambda: 2)
    monkeypatch.setattr(solver, "fail_together", contextlib.nullcontext)
    with pytest.raises(UserError, match=r"GiB on each of the 2 ranks on this machine, more than"):
        eigenpairs(op, 60)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 * need)
    assert eigenpairs(op, 60, tol=1e-6).all_converged


def test_a_small_budget_holds_no_more_basis_than_it_can_fill(monkeypatch):
    """Eigen-SAM's refresh (top-1, 6 products) needs 6 rows, not the default basis of 20."""
    op = MatrixOperator(_symmetric(700))
    six_rows = (3 * 6 + 2 * 2) * 700 * 8  # 6 basis rows (and their restart), products, 2 Ritz
    monkeypatch.setattr(memory, "free_bytes", lambda device: six_rows)
    assert eigenpairs(op, 1, max_hvps=6).hvps == 6
    with pytest.raises(UserError, match="a basis of 20 vectors"):
        eigenpairs(op, 1)


def test_the_memory_a_solve_asks_for_holds_the_check_for_a_skipped_eigenvalue(monkeypatch):
    """The smallest 1 of 300 values in [0, 1]: the check takes 24 steps toward the bottom (near
    the middle of the spectrum: CHECK_REACH times 6), and holds their vectors and products and
    a copy of the pair's beside the basis of 20, its products and 2 Ritz vectors and
    residuals: 93 rows of 300 doubles, where 64 were asked for (a loose tolerance's look went
    on to up to 4 times that)."""
    from hessian_cli.engine import solver_plan

    asked = []
    monkeypatch.setattr(solver_plan, "require_room", lambda op, need, *a, **kw: asked.append(need))
    values = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = _with_spectrum(values, 2)
    res = eigenpairs(MatrixOperator(H), 1, which="smallest", tol=0.1, seed=2)
    assert res.check_hvps == 24
    assert asked == [(2 * 20 + 2 * 2 + 2 * 24 + 1) * 300 * 8]


def test_a_check_whose_look_ends_at_its_steps_holds_room_for_them_alone():
    """A check that ends at its 6 steps (a tight tolerance's) held room for the 24 a loose
    tolerance's look may take, and their products, beside the pair's copy: at its peak 56 rows
    of n allocated (ResNet-18's 11.2 M float32 parameters: 2.2 GB more than it used); now 20
    (13 and the steps' passing vectors), and the rest only where the look goes on."""
    n = 100_000
    op = DiagonalOperator(torch.linspace(0, 1, n, dtype=torch.float64))
    V = torch.zeros(1, n, dtype=torch.float64)
    V[0, -1] = 1  # the top eigenvector: the complement's top is 1 - 1e-5
    gen = torch.Generator().manual_seed(0)
    found = []
    look = lambda: found.append(  # noqa: E731
        es._skipped_direction(op, V, 2.0, 1.0, 6, gen, kth=1.0, most=24)
    )
    peak = _peak_allocated(look)
    assert found[0][0] is None and op.hvp_count == 6
    assert peak < 24 * n * 8


def test_a_thick_restart_combines_the_basis_in_place_a_chunk_at_a_time():
    from hessian_cli.engine.eigensolver import _combine_rows

    gen = torch.Generator().manual_seed(2)
    buffer = torch.randn(10, 1000, dtype=torch.float64, generator=gen)
    S = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    expected = S.T @ buffer[:7]
    rest = buffer[7:].clone()
    _combine_rows(buffer, S, chunk=300)  # 1000 columns: three whole chunks and a partial one
    torch.testing.assert_close(buffer[:4], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(buffer[7:], rest)


def test_free_memory_is_known_on_this_platform():
    from hessian_cli.engine.memory import free_bytes

    free = free_bytes(torch.device("cpu"))
    assert free is None or free > 0
    if sys.platform.startswith("linux"):
        assert free is not None and free > 2**20


def test_whole_space_eigenpairs_of_a_network_match_the_dense_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)
    ).double()
    batches = [(torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 3, (32,)))]
    op = HessianOperator(model, torch.nn.functional.cross_entropy, batches)
    assert op.n == 283
    res = eigenpairs(op, 150, tol=1e-8)
    values, _ = dense_eigh(
        dense_hessian(model, torch.nn.functional.cross_entropy, batches, op.space)
    )
    assert res.method == "whole-space" and res.hvps == op.n
    torch.testing.assert_close(res.eigenvalues, values[:150], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn", "frozen-unused"])
def test_trace_within_three_standard_errors(name, method):
    case = CASES[name]
    H, *_ = _oracle(case)
    exact = float(torch.trace(H))
    op = HessianOperator(case.model, case.loss, case.batches)
    est = stochastic_trace(op, 60, method=method, seed=3)
    assert est.hvps == 60 and est.stderr > 0
    # Hutch++: the sketch, then its basis and the deflated probes in one pass.
    assert op.passes == (2 if method == "hutch++" else 1)
    assert abs(est.estimate - exact) <= 3 * est.stderr + 1e-9 * abs(exact)
    # The estimate is the exact part plus the random samples' mean, whose spread is the SE.
    assert len(est.samples) == (20 if method == "hutch++" else 60)
    assert est.estimate == pytest.approx(est.sketch_trace + float(est.samples.mean()), rel=1e-12)
    assert est.stderr == pytest.approx(float(est.samples.std()) / len(est.samples) ** 0.5)
    assert (est.sketch_trace == 0) == (method == "hutchinson")


@pytest.mark.parametrize("block_size", [None, 4])
def test_the_trace_of_parameters_without_curvature_is_zero(block_size):
    """Hutch++'s sketch of a zero Hessian spans nothing: an exact part of 0, no products for it;
    and parameters the loss does not use have a zero trace, from one product a direction."""
    est = stochastic_trace(MatrixOperator(torch.zeros(20, 20)), 12, block_size=block_size)
    assert est.estimate == 0.0 and est.stderr == 0.0 and est.method == "hutch++"
    assert est.hvps == 8  # the sketch's 4 and Hutchinson's 4; none for the empty Q
    case = CASES["frozen-unused"]
    op = HessianOperator(case.model, case.loss, case.batches, params=["unused"])
    est = stochastic_trace(op, 12, block_size=block_size)  # 12 probes reach its 5 directions
    assert (est.estimate, est.stderr, est.hvps, len(est.samples)) == (0.0, 0.0, 5, 0)


@pytest.mark.parametrize(("known", "num_probes"), [(0, 99), (3, 99), (0, 20), (3, 17), (15, 5)])
def test_probes_as_many_as_the_space_left_take_its_trace_exactly(known, num_probes):
    """A third of 99 probes reaches the 20 dimensions: Hutch++ multiplied a sketch of 33 (30
    beside 3 known eigenvectors), its basis, and 33 (39) probes that the basis left nothing
    but rounding, 86 products for a standard error of 1e-16. Where the probes are as many as
    the dimensions beside the known vectors, but a third of them is not, Hutch++ spent them all
    on a random estimate (20 probes: 20 products, ± 0.23). The basis of that space gives the
    trace exactly, from one product per dimension."""
    H = _dominated(n=20)
    op = MatrixOperator(H)
    res = eigenpairs(op, known, tol=1e-10, seed=0) if known else None
    before = op.hvp_count
    est = stochastic_trace(op, num_probes, known=res)
    assert est.hvps == op.hvp_count - before == 20 - known
    assert est.estimate == pytest.approx(float(torch.trace(H)), rel=1e-12)
    assert est.stderr == 0 and len(est.samples) == 0 and est.method == "hutch++"
    # One probe fewer than the dimensions is an estimate; Hutchinson is always one.
    fewer = stochastic_trace(op, 19 - known, known=res) if 19 - known >= 2 else None
    assert fewer is None or (fewer.stderr > 0 and len(fewer.samples) > 0)
    assert stochastic_trace(op, 99, method="hutchinson").stderr > 0


@pytest.mark.parametrize(
    ("method", "block_size", "reports"),
    [
        ("hutchinson", None, [18]),
        ("hutchinson", 4, [4, 8, 12, 16, 18]),
        ("hutch++", None, [6, 18]),  # the sketch's 6, then its basis with the 6 probes
        ("hutch++", 5, [5, 6, 11, 16, 18]),
    ],
)
def test_the_trace_reports_each_block_of_products_and_its_end(method, block_size, reports):
    """analyze's bar stood at 0% through a trace, minutes on a large network: each block of
    products is reported, of the products planned, and the last report is the whole made, also
    where H maps the sketch into fewer dimensions (fewer products than planned)."""
    H = torch.diag(torch.linspace(1.0, 3.0, 40, dtype=torch.float64))
    seen: list[tuple[int, int]] = []
    told = lambda *a: seen.append(a)  # noqa: E731
    args = dict(method=method, block_size=block_size, seed=3)
    result = stochastic_trace(MatrixOperator(H), 18, **args, progress=told)
    assert seen == [(done, 18) for done in reports] and result.hvps == 18
    assert result.estimate == stochastic_trace(MatrixOperator(H), 18, **args).estimate
    if method == "hutch++":  # rank 3: the sketch's 6 products span 3 dimensions
        seen.clear()
        result = stochastic_trace(MatrixOperator(H[:, :3] @ H[:3]), 18, **args, progress=told)
        assert result.hvps == 15 and seen[0][1] == 18 and seen[-1] == (15, 15)
    with pytest.raises(UserError, match="`progress` must be None or a function .* not a bool"):
        stochastic_trace(MatrixOperator(H), 18, progress=True)


def test_hutchpp_has_smaller_error_when_few_eigenvalues_dominate():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    spectrum = torch.cat(
        [torch.tensor([100.0, 60, 40, 30, 20]), torch.rand(195, generator=g, dtype=torch.float64)]
    )
    H = (U * spectrum) @ U.T
    plain = stochastic_trace(MatrixOperator(H), 60, method="hutchinson")
    plus = stochastic_trace(MatrixOperator(H), 60, method="hutch++")
    assert plus.stderr < plain.stderr / 5
    assert abs(plus.estimate - float(spectrum.sum())) <= 3 * plus.stderr


def _dominated(n: int = 120, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix whose few large eigenvalues dominate its trace's spread (the others small,
    some negative: a trained network's Hessian)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top = torch.tensor([50.0, 30, 20, 12, 8])
    spectrum = torch.cat([top, torch.rand(n - len(top), generator=g, dtype=torch.float64) - 0.3])
    return (U * spectrum) @ U.T


# Spread with the top 4 eigenpairs known against without, at most: with 4 probes plain Hutch++
# is Hutchinson (46 against 6 measured), with 12 its sketch of 4 misses large eigenvalues (11.5
# against 3.4); with 30 its sketch of 10 holds all five, and the known pairs' gain is more
# samples, 18 instead of 10 (sqrt(10 / 18) = 0.75; 1.26 against 0.98).
@pytest.mark.parametrize(("num_probes", "ratio"), [(4, 1 / 3), (12, 1 / 3), (30, 0.85)])
def test_known_eigenpairs_begin_hutchpps_sketch_unbiased_with_less_spread(num_probes, ratio):
    """The eigenpairs of a solve join Hutch++'s sketch at no product: the estimate stays unbiased
    (also from vectors far from eigenvectors) and spreads less than without them, at equal cost."""
    H = _dominated()
    exact = float(torch.trace(H))
    op = MatrixOperator(H)
    good = eigenpairs(op, 4, tol=1e-8, seed=5)
    # Orthonormal vectors far from eigenvectors, with their Rayleigh quotients as values (and
    # said to be converged, as no solve would: the estimate's algebra does not need it).
    noise = torch.randn(4, op.n, generator=torch.Generator().manual_seed(1), dtype=H.dtype)
    V = torch.linalg.qr((good.eigenvectors + 0.1 * noise).T).Q.T
    rough = replace(good, eigenvectors=V, eigenvalues=((V @ H) * V).sum(1))
    assert float((V @ H - rough.eigenvalues[:, None] * V).norm(dim=1).min()) > 1
    runs = {}
    for name, known in (("plain", None), ("rough", rough), ("good", good)):
        runs[name] = [stochastic_trace(op, num_probes, seed=s, known=known) for s in range(300)]
    sketch = max(num_probes // 3 - 4, 0) if num_probes >= 6 else 0
    for name in ("rough", "good"):
        first = runs[name][0]
        assert first.known == 4 and first.method == "hutch++"
        assert first.hvps == num_probes and len(first.samples) == num_probes - 2 * sketch
        estimates = torch.tensor([r.estimate for r in runs[name]])
        # Unbiased: the mean of 300 estimates is within 4 of its standard errors of the trace.
        assert abs(float(estimates.mean()) - exact) <= 4 * float(estimates.std()) / 300**0.5
    spread = {k: float(torch.tensor([r.estimate for r in v]).std()) for k, v in runs.items()}
    assert spread["good"] < spread["plain"] * ratio


def test_known_eigenpairs_spanning_the_space_give_the_trace_itself():
    H = _dominated(n=30)
    op = MatrixOperator(H)
    every = eigenpairs(op, 30, seed=1)
    est = stochastic_trace(op, 12, known=every)
    assert est.known == 30 and est.estimate == pytest.approx(float(torch.trace(H)), rel=1e-10)
    # No probe is drawn or multiplied: each would be projected to rounding (99 products were).
    assert est.hvps == 0 and len(est.samples) == 0 and est.stderr == 0


def test_known_vectors_join_the_sketch_while_they_are_orthonormal():
    """Vectors of two solves (`which="both"`) are orthogonal only to their residuals: the rows
    from the first that is not orthonormal to the ones before it on stay out of the sketch,
    whose exact part would otherwise be biased."""
    H = _dominated(n=60)
    op = MatrixOperator(H)
    res = eigenpairs(op, 3, which="both", tol=1e-10, seed=0)
    assert stochastic_trace(op, 12, known=res).known == 6
    V = res.eigenvectors.clone()
    V[4] = (V[4] + 1e-3 * V[0]) / (1 + 1e-6) ** 0.5  # unit length, 1e-3 along row 0
    est = stochastic_trace(op, 12, known=replace(res, eigenvectors=V))
    assert est.known == 4
    assert est.sketch_trace != pytest.approx(float(res.eigenvalues.sum()))


@pytest.mark.parametrize(
    ("which", "known", "samples"), [("largest", 3, 10), ("smallest", 3, 4), ("both", 6, 10)]
)
def test_only_the_largest_known_pairs_take_drawn_sketch_vectors_places(which, known, samples):
    """The largest eigenvalues dominate a trained network's spectrum, the smallest do not: these
    join a sketch of the usual size (12 probes: 4 drawn, 4 samples), those take places in it
    (12 probes, 3 known: 1 drawn, 10 samples)."""
    op = MatrixOperator(_dominated(n=60))
    res = eigenpairs(op, 3, which=which, tol=1e-8, seed=0)
    est = stochastic_trace(op, 12, known=res)
    assert est.known == known and len(est.samples) == samples and est.hvps == 12


def test_unconverged_pairs_stay_out_of_the_sketch():
    """A pair short of its tolerance (a spent budget) may be far from any eigenvector: in the
    sketch it would take the place of a drawn sketch vector without its worth."""
    op = MatrixOperator(_dominated(n=60))
    res = eigenpairs(op, 3, tol=1e-8, seed=0)
    converged = torch.tensor([True, False, True])
    est = stochastic_trace(op, 4, known=replace(res, converged=converged))  # nothing drawn
    assert est.known == 2
    assert est.sketch_trace == pytest.approx(float(res.eigenvalues[converged].sum()), rel=1e-6)


def test_known_eigenpairs_are_refused_where_they_cannot_serve():
    op = MatrixOperator(_dominated(n=20))
    res = eigenpairs(op, 2, seed=0)
    with pytest.raises(UserError, match="Hutch\\+\\+'s sketch: use `method=hutch\\+\\+`"):
        stochastic_trace(op, 12, method="hutchinson", known=res)
    other = MatrixOperator(_dominated(n=21))
    with pytest.raises(
        UserError, match=r"must be eigenpairs of this operator, \[k\] and \[k, 21\]"
    ):
        stochastic_trace(other, 12, known=res)
    assert op.hvp_count == res.hvps and other.hvp_count == 0


@pytest.mark.parametrize(
    "solve",
    [
        lambda op: eigenpairs(op, 1),
        lambda op: stochastic_trace(op, 4),
        lambda op: spectral_density(op, 2, 4),
    ],
)
def test_a_matrix_given_for_an_operator_is_one_sentence(solve):
    """A matrix failed in op.n or op.hvp_count, an AttributeError naming neither the solver nor
    MatrixOperator, which takes it."""
    H = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    with pytest.raises(UserError, match=r"^\w+ takes a linear operator \(a HessianOperator, or "):
        solve(H)
    with pytest.raises(UserError, match="MatrixOperator\\(matrix\\) for a matrix\\), not a torch"):
        solve(H)
    assert solve(MatrixOperator(H)) is not None


def test_known_eigenpairs_that_are_no_eigenresult_are_one_sentence():
    """eigh's (values, vectors) failed in .eigenvectors, an AttributeError, after the memory
    check; the result of eigenpairs() is what serves."""
    op = MatrixOperator(_dominated(n=20))
    for known in (torch.linalg.eigh(op.matrix), op.matrix):
        for estimate in (stochastic_trace, spectral_density):
            with pytest.raises(UserError, match="^`known` must be the EigenResult of eigenpairs"):
                estimate(op, 8, known=known)
    assert op.hvp_count == 0


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn"])
def test_density_moments_match_trace(name):
    case = CASES[name]
    H, values, _ = _oracle(case)
    op = HessianOperator(case.model, case.loss, case.batches)
    n = op.n
    dens = spectral_density(op, num_probes=40, steps=30, seed=1)
    assert dens.hvps == 40 * 30
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(40, dtype=torch.float64))
    m1, m2 = float(values.sum()) / n, float((values**2).sum()) / n
    # Each probe's rule reproduces v^T H v and v^T H^2 v exactly; the average is within
    # sampling error.
    assert dens.moment(1) == pytest.approx(m1, rel=0.15)
    assert dens.moment(2) == pytest.approx(m2, rel=0.25)
    area = torch.trapezoid(dens.values, dens.grid)
    assert float(area) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), float("inf"), "0.1"])
def test_a_smoothing_width_that_is_not_positive_is_refused(sigma):
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(UserError, match="smoothing width must be a positive number"):
        spectral_density(op, 2, 3, sigma=sigma)
    assert op.hvp_count == 0


def test_the_densitys_probes_are_not_the_traces():
    """With one seed the density drew the trace's probes: its first moment repeated the trace's
    estimate instead of checking it."""
    A = torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = A + A.T  # not diagonal: a sign probe's quadratic form is not the trace itself
    op = MatrixOperator(H)
    dens = spectral_density(op, num_probes=6, steps=8, seed=0)
    trace = stochastic_trace(op, 6, method="hutchinson", seed=0)
    assert abs(dens.moment(1) * op.n - trace.estimate) > 1e-6
    trace_probes = rademacher(
        (6, 40), generator=probe_generator(op, 0), dtype=H.dtype, device=H.device
    )
    density_probes = rademacher(
        (6, 40), generator=probe_generator(op, 0, DENSITY_STREAM), dtype=H.dtype, device=H.device
    )
    assert not torch.equal(trace_probes, density_probes)


def test_density_rules_are_exact_per_probe():
    """With the same probes, each rule's moments equal the quadratic forms of the dense matrix."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    H = A + A.T
    op = MatrixOperator(H)
    dens = spectral_density(op, num_probes=4, steps=10, seed=7)
    gen = probe_generator(op, 7, DENSITY_STREAM)
    V = rademacher((4, 50), generator=gen, dtype=torch.float64, device=torch.device("cpu"))
    V = V / V.norm(dim=1, keepdim=True)
    for power in (1, 2, 3):
        expected = (V * (V @ torch.linalg.matrix_power(H, power))).sum(1)
        got = (dens.weights * dens.nodes**power).sum(1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_the_density_reports_each_lanczos_step_and_its_end():
    """analyze's bar stood at 0% through a density, minutes on a large network: each step (all
    probes' product) is reported, and the last report is the whole. Where every probe's space
    ran out before the steps asked for, it said them done ('12/12 Lanczos steps' after 3): it
    says the steps taken."""
    H = torch.diag(torch.linspace(1.0, 3.0, 40, dtype=torch.float64))
    for n_values, steps in ((40, 12), (3, 12)):  # 3 distinct eigenvalues: spaces of 3 dimensions
        values = torch.linspace(1.0, 3.0, n_values, dtype=torch.float64)
        op = MatrixOperator(torch.diag(values.repeat_interleave(40 // n_values + 1)[:40]))
        seen: list[tuple[int, int]] = []
        dens = spectral_density(op, 2, steps, seed=0, progress=lambda *a, seen=seen: seen.append(a))
        taken = op.hvp_count // 2  # each step 2 products
        assert [d for d, _ in seen] == list(range(1, taken + 1))  # one report a step
        assert seen[-1] == (taken, taken) and all(t == steps for _, t in seen[:-1])
        assert dens.hvps == op.hvp_count
    assert taken < steps  # the second stopped early, and said what it did
    with pytest.raises(UserError, match="`progress` must be None or a function .* not a bool"):
        spectral_density(MatrixOperator(H), 2, 12, progress=True)


@pytest.mark.parametrize(
    ("order", "refusal"),
    [
        (2.5, "must be a whole number, not 2.5"),
        (-1, "must be at least 0, not -1"),
        (True, "must be a whole number, not True"),
    ],
)
def test_density_moments_of_orders_without_an_estimate_are_refused(order, refusal):
    """A spectrum with negative eigenvalues gave NaN for 2.5; -1 an estimate of trace(H^-1)
    dominated by whatever Lanczos nodes fell near 0. Whole orders match the dense matrix."""
    H = torch.diag(torch.linspace(-1.0, 3.0, 30, dtype=torch.float64))
    dens = spectral_density(MatrixOperator(H), num_probes=4, steps=10)
    with pytest.raises(UserError, match=f"^`order` {refusal}"):
        dens.moment(order)
    assert dens.moment(0) == pytest.approx(1.0, rel=1e-12)
    # Ten steps integrate exactly up to degree 19: the probes' mean is the estimate's only error.
    assert dens.moment(2) == pytest.approx(float(torch.trace(H @ H)) / 30, rel=0.3)


def _wasserstein(nodes: torch.Tensor, weights: torch.Tensor, spectrum: torch.Tensor) -> float:
    """W1 distance between weights at nodes (summing to 1) and eigenvalues of 1/n each."""
    x = torch.cat([nodes, spectrum])
    order = torch.argsort(x)
    mass = torch.cat([weights, -torch.full_like(spectrum, 1 / len(spectrum))])[order]
    return float((torch.cumsum(mass, 0)[:-1].abs() * x[order].diff()).sum())


def test_known_eigenpairs_are_exact_nodes_of_every_density_rule():
    """The density takes the analysis's eigenpairs out: their eigenvalues are nodes of weight
    1/n in each rule, the Lanczos runs see the rest (weighted (n - k)/n), and the rules come
    closer to the spectrum, at the same products; their moments stay those of the spectrum."""
    H = _dominated(n=150)
    spectrum = torch.linalg.eigvalsh(H)
    op = MatrixOperator(H)
    known = eigenpairs(op, 5, tol=1e-10, seed=2)
    dens = spectral_density(op, num_probes=4, steps=12, seed=0, known=known)
    assert dens.known == 5 and dens.nodes.shape == (4, 12 + 5) and dens.hvps == 4 * 12
    torch.testing.assert_close(dens.nodes[:, 12:], known.eigenvalues.expand(4, 5))
    torch.testing.assert_close(dens.weights[:, 12:], torch.full((4, 5), 1 / 150, dtype=H.dtype))
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(4, dtype=H.dtype))
    # The Lanczos runs never see the known eigenvalues (all above 7; the rest below 0.7).
    assert float(dens.nodes[:, :12][dens.weights[:, :12] > 0].max()) < 1
    distance = {}
    for name, given in (("plain", None), ("known", known)):
        runs = [spectral_density(op, 4, 12, seed=s, known=given) for s in range(40)]
        distance[name] = sum(
            _wasserstein(r.nodes.ravel(), r.weights.ravel() / 4, spectrum) for r in runs
        )
        first = torch.tensor([r.moment(1) for r in runs])
        # The first moment estimates trace / n either way, within 4 standard errors of 40 runs.
        assert abs(float(first.mean()) - float(spectrum.mean())) <= 4 * float(first.std()) / 40**0.5
    assert distance["known"] < distance["plain"] / 2


def test_known_eigenpairs_spanning_the_space_are_the_density():
    H = _dominated(n=30)
    op = MatrixOperator(H)
    every = eigenpairs(op, 30, seed=1)
    dens = spectral_density(op, num_probes=3, steps=10, known=every)
    assert dens.known == 30 and dens.steps == 0 and dens.hvps == 0
    torch.testing.assert_close(dens.nodes, every.eigenvalues.expand(3, 30))
    assert float(torch.trapezoid(dens.values, dens.grid)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sigma", [None, 0.1, 0.02, 1e-5])  # the spectrum spans 78
def test_the_density_integrates_to_one_for_any_smoothing_width(sigma):
    """A grid of 1000 points let Gaussians narrower than its spacing fall between points (the
    integral was 4e-6 at sigma 1e-4); the grid now holds 4 points per sigma near every node
    (sigma 1e-5 was refused: a uniform grid would have needed 3e7 points)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 200, generator=g, dtype=torch.float64)
    dens = spectral_density(MatrixOperator(A + A.T), num_probes=4, steps=40, sigma=sigma)
    assert float(torch.trapezoid(dens.values, dens.grid)) == pytest.approx(1.0, abs=1e-6)
    assert len(dens.grid) <= 1000 + 65 * 4 * 40 and bool((dens.grid.diff() > 0).all())


@pytest.mark.parametrize("sigma", [1e-15, 1e-300, 5e-324])
def test_a_width_below_float64s_resolution_is_drawn_at_that_resolution(sigma):
    """The lattice near the nodes collapsed: the density integrated to 1.2 at 1e-15, 1e298 at
    1e-300 and was NaN at 5e-324. It is drawn at 1e-10 of the largest node, which sigma says."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 60, generator=g, dtype=torch.float64)
    dens = spectral_density(MatrixOperator(A + A.T), num_probes=2, steps=10, sigma=sigma)
    top = float(dens.nodes[dens.weights > 0].abs().max())
    assert dens.sigma == pytest.approx(1e-10 * top)
    assert float(torch.trapezoid(dens.values, dens.grid)) == pytest.approx(1.0, abs=1e-6)


def test_a_narrow_width_shows_the_bulk_beside_outliers_without_mass_below_it():
    """A trained network's shape: a positive bulk in [0, 0.05] and outliers up to 100. The
    default width (1% of the spread, 1.0) puts half the mass below 0, where no eigenvalue lies,
    and no grid point inside the bulk; a width the bulk needs could not be given (the grid
    refused it)."""
    values = torch.cat([torch.tensor([100.0, 40.0, 20.0]), torch.linspace(0.0, 0.05, 497)]).double()
    H = _with_spectrum(values, 3)
    default = spectral_density(MatrixOperator(H), num_probes=4, steps=40, seed=0)
    below = default.grid < -0.02
    assert float(torch.trapezoid(default.values[below], default.grid[below])) > 0.3
    narrow = spectral_density(MatrixOperator(H), num_probes=4, steps=40, seed=0, sigma=0.005)
    assert float(torch.trapezoid(narrow.values, narrow.grid)) == pytest.approx(1.0, abs=1e-6)
    below = narrow.grid < -0.02  # four widths below the smallest eigenvalue
    assert float(torch.trapezoid(narrow.values[below], narrow.grid[below])) < 1e-3
    bulk = (narrow.grid >= 0) & (narrow.grid <= 0.05)
    assert int(bulk.sum()) >= 40  # drawn, not stepped over
    assert float(torch.trapezoid(narrow.values[bulk], narrow.grid[bulk])) > 0.5


def test_an_exhausted_krylov_space_stops_and_runs_on_harmlessly_in_float32():
    """Two distinct eigenvalues: a probe's space is exhausted after 2 steps. Float64 stops
    there; float32 runs on (its rounding is not told from a narrow bulk's small entries, see
    the next test), and its further nodes carry no weight that changes the rule."""
    H = _with_spectrum(torch.tensor([3.0] * 20 + [1.0] * 30, dtype=torch.float64), 1)
    exact = spectral_density(MatrixOperator(H), num_probes=4, steps=40, seed=0)
    assert exact.hvps <= 4 * 3
    rounded = spectral_density(MatrixOperator(H.float()), num_probes=4, steps=40, seed=0)
    for power in (1, 2, 3):
        assert rounded.moment(power) == pytest.approx(exact.moment(power), rel=1e-5)
    beside = (rounded.nodes - 2.0).abs() < 0.9  # between the two eigenvalues
    assert float(rounded.weights[beside].sum()) < 1e-6


def test_a_float32_bulk_far_below_an_outlier_is_drawn_from_every_step():
    """A bulk in [0.001, 0.1] beside an outlier of 1e4: its Lanczos entries are 1e-5 of the
    scale. A stop test at 100 float32 epsilons of it ended every probe after 3 steps, and the
    bulk was drawn from 2 nodes per probe (L1 error 1.1 of at most 2)."""
    bulk = torch.linspace(1e-3, 0.1, 2000, dtype=torch.float64)
    d = torch.cat([torch.tensor([1e4], dtype=torch.float64), bulk])
    exact = spectral_density(DiagonalOperator(d), 8, 40, seed=0, sigma=0.005)
    rounded = spectral_density(DiagonalOperator(d.float()), 8, 40, seed=0, sigma=0.005)
    assert (rounded.weights > 0).sum(1).min() == 40
    on = (exact.grid > -0.02) & (exact.grid < 0.12)
    grid = exact.grid[on]
    other = torch.from_numpy(np.interp(grid.numpy(), rounded.grid.numpy(), rounded.values.numpy()))
    assert float(torch.trapezoid((other - exact.values[on]).abs(), grid)) < 1e-3


def test_one_lanczos_step_is_refused():
    with pytest.raises(UserError, match="at least one probe and two Lanczos steps"):
        spectral_density(MatrixOperator(torch.eye(4, dtype=torch.float64)), 2, 1)


def test_trace_and_density_refuse_products_that_are_not_finite():
    H = torch.eye(6, dtype=torch.float64)
    H[2, 3] = H[3, 2] = float("nan")
    with pytest.raises(NotFinite, match="density's Hessian-vector products are not finite"):
        spectral_density(MatrixOperator(H), 2, 4)
    with pytest.raises(NotFinite, match="trace's Hessian-vector products are not finite"):
        stochastic_trace(MatrixOperator(H), 6)


def test_a_density_that_does_not_fit_in_memory_is_refused_before_any_product(monkeypatch):
    op = MatrixOperator(_symmetric(300))
    need = 8 * (40 + 5) * 300 * 8  # 8 probes x 40 steps (and 5 block vectors) of 300 doubles
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match="8 probes x 40 Lanczos steps on 300 parameters need"):
        spectral_density(op, 8, 40)
    assert op.hvp_count == 0
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)
    assert spectral_density(op, 8, 40).hvps > 0


@pytest.mark.parametrize(("method", "vectors"), [("hutchinson", 2 * 99), ("hutch++", 2 * 66)])
def test_a_trace_that_does_not_fit_in_memory_is_refused_before_any_product(
    monkeypatch, method, vectors
):
    """The trace allocated its probes and products unchecked (99 Hutchinson probes of 1M float32
    parameters held 765 MB, 200 vectors' worth): one that could not fit was killed, or on CUDA
    told to use a smaller batch, after the eigenpairs computed before it. Hutch++ multiplies
    its sketch's basis and its 33 probes in the last pass: 66 vectors and their products."""
    op = MatrixOperator(_symmetric(300))
    need = vectors * 300 * 8
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match="trace's 99 probes on 300 parameters need their vectors"):
        stochastic_trace(op, 99, method=method)
    assert op.hvp_count == 0
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)
    assert stochastic_trace(op, 99, method=method).hvps > 0


def _peak_allocated(f: Callable[[], object]) -> int:
    """The most bytes that torch's allocator held at once, beyond what it held before, while
    ``f`` ran (the profiler's record of each operator's allocations, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("known", [0, 5])
def test_a_trace_from_the_whole_space_holds_what_its_check_counts(known):
    """Probes as many as the dimensions take the trace from an orthonormal basis of them: the
    identity orthonormalised against the known vectors (float64 Gram matrices of n x n and
    their eigendecomposition), projected against itself for no probes, and its dots with the
    products in float64 copies of both held 4.5 times what the check counts (n = 1,024), 5.6
    times in resident memory (n = 3,000: 385 MiB for 69 MiB checked)."""
    n = 1024
    op = DiagonalOperator(torch.linspace(-1, 3, n) ** 3)
    res = eigenpairs(op, known, seed=0) if known else None
    need = trace_memory_need(op, n, "hutch++", known, known)
    results = []
    assert _peak_allocated(lambda: results.append(stochastic_trace(op, n, known=res))) <= 2 * need
    (est,) = results
    assert est.hvps == n - known and est.stderr == 0
    assert est.estimate == pytest.approx(float(op.diagonal.double().sum()), rel=1e-6)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_a_trace_in_blocks_holds_no_more_than_in_one_pass(method):
    """A trace given a block size concatenated its blocks' products after the last: they were
    held twice (99 Hutchinson probes: 297 vectors' worth at the peak, 276 in one pass); each
    block's go into their rows now, and the estimate is the one of a single pass."""
    n = 20_000
    op = DiagonalOperator(torch.linspace(-1, 3, n) ** 3)
    results = []
    whole = _peak_allocated(lambda: results.append(stochastic_trace(op, 99, method=method)))
    blocks = _peak_allocated(
        lambda: results.append(stochastic_trace(op, 99, method=method, block_size=10))
    )
    assert blocks <= whole + 10 * n * 4, (whole / (n * 4), blocks / (n * 4))  # a block's worth
    assert results[0].estimate == results[1].estimate and results[0].stderr == results[1].stderr


def test_probes_projected_beside_known_vectors_hold_what_the_check_counts():
    """99 probes beside 20 known eigenvectors: 13 drawn sketch vectors and 73 probes,
    multiplied in one pass (86 vectors and their products), while the probes are projected B
    and the projection's product and result (232 vectors' worth). The signs were projected as
    drawn, beside B: 305 held."""
    n = 50_000
    op = DiagonalOperator(torch.linspace(-1, 3, n) ** 3)
    # Their accuracy is no part of the count: to 1e-2 in 258 products, not 850 (2 s, not 9).
    res = eigenpairs(op, 20, seed=0, tol=1e-2)
    assert res.all_converged  # all 20 serve
    need = trace_memory_need(op, 99, "hutch++", 20, 20)
    assert need == 232 * n * 4
    peak = _peak_allocated(lambda: stochastic_trace(op, 99, known=res))
    assert peak <= need + 4 * n * 8  # a few vectors of small temporaries


def test_density_stops_cleanly_on_invariant_subspace():
    H = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    dens = spectral_density(MatrixOperator(H), num_probes=2, steps=4, seed=0)
    assert torch.isfinite(dens.values).all()
    assert dens.moment(1) == pytest.approx(2.0, rel=1e-12)


def test_float32_density_rules_match_float64_without_spurious_copies():
    """One reorthogonalisation pass keeps a float32 basis orthogonal: each probe's rule matches
    the float64 one and holds the top eigenvalue once. Without it, 6-7 copies of the top
    eigenvalue shared its weight and the rules' weights were 0.04 off. 20,001 entries: rows
    padded to whole pieces for the batched inner products."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor([100.0, 60.0, 30.0]), torch.rand(19_998, generator=g) / 10])
    f64 = spectral_density(DiagonalOperator(values.double()), num_probes=4, steps=60, seed=0)
    f32 = spectral_density(DiagonalOperator(values.float()), num_probes=4, steps=60, seed=0)
    assert f32.hvps == f64.hvps == 4 * 60
    torch.testing.assert_close(f32.nodes, f64.nodes, rtol=0, atol=1e-3)
    torch.testing.assert_close(f32.weights, f64.weights, rtol=0, atol=1e-4)
    near_top = ((f32.nodes - 100).abs() < 1e-3) & (f32.weights > 0)
    assert near_top.sum(1).tolist() == [1] * 4


def test_float32_density_of_a_low_rank_hessian_runs_past_its_exhausted_space():
    """A linear model's MSE Hessian has rank 6 (5 samples and the bias): each probe's Krylov
    space is exhausted after 6 or 7 steps, where float64 stops; float32's w is then rounding
    above the stop test, and the probe runs on. One Gram-Schmidt pass left the basis less
    orthogonal at every step, until it grew without bound and the density was refused as "not
    finite"."""
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(300, 1), torch.randn(5, 300), torch.randn(5, 1)
    densities = {}
    for dtype in (torch.float64, torch.float32):
        op = HessianOperator(
            copy.deepcopy(model).to(dtype), F.mse_loss, [(x.to(dtype), y.to(dtype))]
        )
        densities[dtype] = spectral_density(op, num_probes=8, steps=64, seed=0)
    f64, f32 = densities[torch.float64], densities[torch.float32]
    for order in (1, 2, 3):
        assert f32.moment(order) == pytest.approx(f64.moment(order), rel=1e-5)
    # The nodes past the exhaustion carry no weight: the rest sit on float64's nodes.
    top = float(f64.nodes.abs().max())
    near = (f32.nodes[:, :, None] - f64.nodes[:, None, :]).abs().amin(2) <= 1e-5 * top
    assert float(f32.weights[~near].sum()) < 1e-6 * len(f32.weights)


@pytest.mark.parametrize("sigma", [1.0, 0.005, 1e-4])
def test_the_smoothed_density_is_the_sum_of_every_gaussian(monkeypatch, sigma):
    """Each Gaussian is evaluated only near its node, a few nodes at a time: the values are
    those of the full table to rounding."""
    from hessian_cli.engine import density

    g = torch.Generator().manual_seed(0)
    at = torch.cat([torch.tensor([100.0, 40.0]), torch.rand(300, generator=g) / 20]).double()
    mass = torch.rand(302, generator=g, dtype=torch.float64)
    mass /= mass.sum()
    grid = density._grid(at, float(at.min()), float(at.max()), sigma)
    monkeypatch.setattr(density, "_KERNEL_CHUNK", 7 * len(grid))  # groups of 7 nodes
    values = density._smoothed(grid, at, mass, sigma)
    table = torch.exp(-0.5 * ((grid[:, None] - at[None, :]) / sigma) ** 2) @ mass
    expected = table / (sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-14 * float(expected.max()))


class ReducedPrecision(MatrixOperator):
    """Products of a slightly wrong matrix, except inside ``full_precision()``."""

    def __init__(self, matrix: torch.Tensor, error: torch.Tensor) -> None:
        super().__init__(matrix)
        self.error, self.exact = error, False
        self.precision = "bf16"  # asks the solver to verify with exact products

    @contextlib.contextmanager
    def full_precision(self):
        self.exact = True
        try:
            yield
        finally:
            self.exact = False

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        return super().matmul(block) + (0 if self.exact else block @ self.error)


def test_residuals_are_verified_in_full_precision():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    H = A + A.T
    E = torch.randn(40, 40, generator=g, dtype=torch.float64)
    op = ReducedPrecision(H, 1e-4 * (E + E.T))
    res = eigenpairs(op, 2, tol=1e-9)
    # The iteration converged on the wrong matrix; the full-precision check says so.
    assert res.stop_reason == "unverified" and not res.converged.any()
    true = (res.eigenvectors @ H - res.eigenvalues[:, None] * res.eigenvectors).norm(dim=1)
    torch.testing.assert_close(res.residuals, true / res.scale)
    assert torch.all(res.residuals > 1e-7)
    # The eigenvalue criterion's bounds come from the same full-precision residuals.
    res = eigenpairs(op, 2, tol=1e-12, criterion="eigenvalue")
    assert res.stop_reason != "converged" and not res.converged.any()
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.all((res.eigenvalues - exact).abs() / exact.abs() <= res.errors)


@pytest.mark.parametrize("which, sign", [("largest", 1.0), ("smallest", -1.0)])
def test_verified_pairs_are_ordered_by_their_full_precision_eigenvalues(which, sign):
    """Products whose rounding swaps two close eigenvalues found them in the swapped order; the
    verified values were reported in it ([0.9995, 1.0] as the largest: bf16 did so to 4 of 10
    tops 5e-4 apart, and alignment then refused them as not largest first)."""
    spectrum = torch.cat([torch.tensor([1.0, 0.9995]), torch.linspace(0.5, 0.1, 28)]).double()
    swap = torch.zeros(30, dtype=torch.float64)
    swap[:2] = torch.tensor([-1e-3, 1e-3])  # the rounded matrix's top two: 0.999, 1.0005
    res = eigenpairs(
        ReducedPrecision(torch.diag(sign * spectrum), torch.diag(sign * swap)), 2, which=which
    )
    assert res.converged.all()
    torch.testing.assert_close(res.eigenvalues, sign * spectrum[:2], rtol=0, atol=1e-7)
    assert res.eigenvectors[:, :2].abs().allclose(torch.eye(2, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_sees_any_nan_or_infinity(dtype):
    t = torch.randn(2, 1000, dtype=dtype) * 1e30 if dtype != torch.bfloat16 else torch.randn(9)
    assert all_finite(t) and all_finite(t[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 7, t.numel() - 1):
            u = t.clone()
            u.view(-1)[where] = bad
            assert not all_finite(u), (bad, where)


def test_gram_in_float64_from_float32_chunks():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 1000, generator=g), torch.randn(4, 1000, generator=g)
    exact = A.double() @ B.double().T
    for chunk in (7, 1000, 1 << 18):  # ragged last chunk, one chunk, larger than n
        got = gram(A, B, chunk=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-4)


def test_gram_is_accurate_where_float32_dot_products_are_not():
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    A = torch.randn(2, n, generator=g) + 1.0  # long sums of same-sign terms round the most
    A /= A.norm(dim=1, keepdim=True)
    B = torch.randn(3, n, generator=g) + 1.0
    B /= B.norm(dim=1, keepdim=True)
    exact = A.double() @ B.double().T
    plain = ((A @ B.T).double() - exact).abs().max()
    ours = (gram(A, B) - exact).abs().max()
    assert ours < 1e-7 < plain, (float(ours), float(plain))


def test_float32_bases_stay_orthonormal_at_network_sizes():
    # A float32 QR of 300k-long vectors is only ~1e-5 orthogonal: enough to push Ritz values
    # above the largest eigenvalue and stall the solver. The float64-accumulated one is not.
    g = torch.Generator().manual_seed(0)
    n = 300_000
    Q = orthonormalize_against(torch.randn(8, n, generator=g), None)
    W = orthonormalize_against(torch.randn(4, n, generator=g) + Q[:4], Q)
    basis = torch.cat([Q, W])
    error = (gram(basis, basis) - torch.eye(12, dtype=torch.float64)).abs().max()
    assert error < 1e-6, float(error)


def test_orthonormalising_in_place_leaves_the_callers_rows_as_they_were():
    # orthonormalize_against works on one copy of its rows, in place (each fresh n-long array
    # costs its page faults), and project_out writes into `out`, which may be its rows: the
    # caller's rows stay as they were, a dropped row's included, and the rows come out as a
    # fresh projection makes them.
    g = torch.Generator().manual_seed(0)
    Q = orthonormalize_against(torch.randn(3, 500, generator=g, dtype=torch.float64), None)
    W = torch.cat([torch.randn(2, 500, generator=g, dtype=torch.float64), 2 * Q[:1]])
    before = W.clone()
    for against, rows in ((None, 3), (Q, 2)):  # against Q the last row is dropped
        V = orthonormalize_against(W, against)
        assert torch.equal(W, before)
        assert V.shape == (rows, 500)
        basis = V if against is None else torch.cat([Q, V])
        eye = torch.eye(len(basis), dtype=torch.float64)
        torch.testing.assert_close(gram(basis, basis), eye, rtol=0, atol=1e-14)
    fresh = project_out(W, Q)
    assert torch.equal(W, before)
    into = W.clone()
    assert project_out(into, Q, out=into) is into
    torch.testing.assert_close(into, fresh, rtol=0, atol=1e-15)
    torch.testing.assert_close(fresh, W - (W @ Q.T) @ Q, rtol=0, atol=1e-14)


def test_a_hint_toward_the_top_eigenvector_saves_products_and_a_poor_one_costs_little():
    # A diagonal operator: its eigenvectors are the coordinate axes, the largest is e_0.
    g = torch.Generator().manual_seed(0)
    n = 200_000
    top = torch.tensor([81.53, 70.10, 62.47, 53.71, 50.39], dtype=torch.float64)
    diagonal = torch.cat([top, 2 * torch.randn(n - 5, generator=g, dtype=torch.float64)])
    # Like a network's gradient: |cos| 0.6 with v_1, the rest spread over the other directions.
    hint = torch.randn(n, generator=g, dtype=torch.float64)
    hint[0] = 0
    hint = 0.8 * hint / hint.norm()
    hint[0] = 0.6
    poor = torch.zeros(n, dtype=torch.float64)
    poor[-1] = 1.0  # an eigenvector of the bulk: orthogonal to every wanted one
    for k in (1, 5):
        plain, hinted, misled = (
            [eigenpairs(DiagonalOperator(diagonal), k, hint=h, seed=s) for s in range(3)]
            for h in (None, hint, poor)
        )
        for res in (*plain, *hinted, *misled):
            assert res.all_converged
            torch.testing.assert_close(res.eigenvalues, top[:k], rtol=1e-7, atol=0)
        # The iteration's products: the check for a skipped eigenvalue costs all alike.
        hvps = [[r.hvps - r.check_hvps for r in runs] for runs in (plain, hinted, misled)]
        assert sum(hvps[2]) <= sum(hvps[0]) + 3, (k, hvps)
        if k == 1:
            assert sum(hvps[1]) < 0.7 * sum(hvps[0]), hvps
    zero = eigenpairs(DiagonalOperator(diagonal), 1, hint=torch.zeros(n, dtype=torch.float64))
    assert zero.hvps == eigenpairs(DiagonalOperator(diagonal), 1).hvps


def test_norms_are_accurate_at_network_sizes():
    # torch's CPU norm drifts low on long float32 rows (8e-5 at 4M entries, pytorch#169237).
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 4_000_000, generator=g)
    exact = W.double().norm(dim=1)
    assert ((norms(W).double() - exact).abs() / exact).max() < 1e-7
    assert norms(W[0]).shape == () and norms(W.reshape(2, 2, -1)).shape == (2, 2)
    short = torch.randn(3, 5000, generator=g)  # one piece and a ragged rest
    torch.testing.assert_close(
        norms(short.bfloat16()), short.bfloat16().float().norm(dim=1).bfloat16()
    )
    torch.testing.assert_close(
        norms(short.double()), short.double().norm(dim=1), rtol=1e-14, atol=0
    )


def test_a_single_new_krylov_vector_is_unit_at_network_sizes():
    # The block-of-one path normalises by a norm alone (no Gram matrix to correct it).
    g = torch.Generator().manual_seed(0)
    Q = orthonormalize_against(torch.randn(3, 4_000_000, generator=g), None)
    w = orthonormalize_against(torch.randn(1, 4_000_000, generator=g), Q)
    basis = torch.cat([Q, w])
    assert (gram(basis, basis) - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-6


def test_float32_top_eigenpair_of_a_network_sized_operator():
    # On CPU with torch's norms, this solve stalled at a residual near 1e-4 with an eigenvalue
    # 2e-4 too high (Krylov vectors 1e-4 off unit length); ResNet-18 on CPU did the same.
    g = torch.Generator().manual_seed(0)
    diagonal = torch.rand(4_000_000, generator=g)
    diagonal[:3] = torch.tensor([10.0, 6.0, 5.0])
    op = DiagonalOperator(diagonal)
    # 1e-5, not 1e-6: at 8 float32 epsilons the residual met 1e-6 on one CPU (AMD EPYC) and
    # stalled at 1.4e-6 on another (Intel Xeon), where the products round differently.
    res = eigenpairs(op, 1, tol=1e-5)
    assert res.stop_reason == "converged", (res.stop_reason, res.hvps, res.residuals)
    # The Ritz value of a vector 1 + 6e-7 long was 1.3e-6 (relative) off, its bound 6.4e-7.
    assert abs(float(res.eigenvalues[0]) - 10.0) / 10.0 <= float(res.errors[0])
    assert abs(float(res.eigenvectors[0].double().norm()) - 1.0) < 1e-6
    assert res.hvps < 40


@pytest.mark.parametrize(("seed", "which"), [(0, "largest"), (2, "both"), (3, "both")])
def test_float32_eigenvalues_are_their_vectors_rayleigh_quotients_within_their_bounds(seed, which):
    """The projected matrix drifts from a float32 basis: these returned values 6e-7 and 4.6e-6
    (relative) off, beyond their certified bounds, while their vectors' quotients were 1e-11
    off. A value is now its vector's quotient, from the kept products."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(300_000, generator=g, dtype=torch.float64)
    d[:5] = torch.tensor([10.0, 9.0, 7.0, 6.5, 6.4])
    if which == "both":
        d[5:8] = torch.tensor([-0.5, -0.4, -0.3], dtype=torch.float64)
    d = d.float().double()  # the operator's own values
    res = eigenpairs(DiagonalOperator(d.float()), 3, tol=1e-5, which=which, seed=seed)
    s = d.sort().values
    truth = s.flip(0)[:3] if which == "largest" else torch.cat([s.flip(0)[:3], s[:3]])
    assert res.all_converged
    errors = (res.eigenvalues.double() - truth).abs() / truth.abs()
    assert bool((errors <= res.errors).all()), (errors, res.errors)
    V = res.eigenvectors.double()
    quotients = (V * V * d).sum(1) / (V * V).sum(1)
    torch.testing.assert_close(res.eigenvalues.double(), quotients, rtol=0, atol=2e-7 * res.scale)


def test_slq_nodes_of_a_network_sized_operator_stay_in_its_spectrum():
    # With torch's norms the top node came out 1.9e-4 above the largest eigenvalue.
    g = torch.Generator().manual_seed(0)
    diagonal = torch.rand(4_000_000, generator=g)
    diagonal[:3] = torch.tensor([10.0, 6.0, 5.0])
    res = spectral_density(DiagonalOperator(diagonal), num_probes=2, steps=12)
    # Below the top from inside (1.4e-5 after 12 steps on one CPU, within 1e-5 on another).
    assert 10.0 - 1e-4 < float(res.nodes[res.weights > 0].max()) <= 10.0 + 1e-5


def test_dependent_rows_are_dropped():
    g = torch.Generator().manual_seed(0)
    Q = orthonormalize_against(torch.randn(3, 50, generator=g, dtype=torch.float64), None)
    W = torch.cat([Q[:2] * 5, torch.randn(2, 50, generator=g, dtype=torch.float64)])
    W = torch.cat([W, W[2:3] + W[3:4]])  # in the span of Q, then two new rows and their sum
    out = orthonormalize_against(W, Q)
    assert out.shape[0] == 2
    torch.testing.assert_close(out @ out.T, torch.eye(2, dtype=torch.float64))
    assert (out @ Q.T).abs().max() < 1e-12


def test_a_small_but_independent_row_is_kept():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 40, generator=g, dtype=torch.float64)
    W[1] *= 1e-9  # a nearly converged residual beside a large one: still a new direction
    out = orthonormalize_against(W, None)
    assert out.shape[0] == 2
    torch.testing.assert_close(out @ out.T, torch.eye(2, dtype=torch.float64))


def test_probes_are_drawn_where_they_are_used_except_under_torch_distributed():
    cpu_op = MatrixOperator(torch.eye(3))
    assert probe_generator(cpu_op, 0).device.type == "cpu"
    # Every rank must draw the same numbers: on the CPU, whatever GPUs the ranks have.
    ranked = SimpleNamespace(device=torch.device("cuda"), distributed=True)
    assert probe_generator(ranked, 0).device.type == "cpu"
    a = rademacher((2, 5), generator=probe_generator(cpu_op, 7), dtype=torch.float32, device="cpu")
    b = rademacher((2, 5), generator=probe_generator(cpu_op, 7), dtype=torch.float32, device="cpu")
    assert torch.equal(a, b) and set(a.unique().tolist()) == {-1.0, 1.0}
    # The CPU stream of int64 draws (PyHessian's probes), drawn in the working dtype.
    ints = torch.randint(0, 2, (2, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, ints.float() * 2 - 1)


def test_gram_takes_half_and_mixed_precision_inputs():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 10_000, generator=g), torch.randn(3, 10_000, generator=g)
    exact = A.double() @ B.double().T
    half = gram(A.bfloat16(), B.bfloat16())
    size = 10_000  # |a| |b| of these rows: the scale of a dot product's rounding
    want = A.bfloat16().double() @ B.bfloat16().double().T
    torch.testing.assert_close(half, want, rtol=0, atol=1e-8 * size)
    torch.testing.assert_close(gram(A, B.double()), exact, rtol=0, atol=1e-12 * size)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"memory.max": "1000000\n", "memory.current": "250000\n"}, 750000),
        ({"memory.max": "max\n", "memory.current": "250000\n"}, None),
        # The usage counts the page cache of files read; its inactive part is given back.
        (
            {
                "memory.max": "1000000\n",
                "memory.current": "900000\n",
                "memory.stat": "anon 300000\nfile 600000\ninactive_file 500000\n",
            },
            600000,
        ),
        (
            {
                "memory/memory.limit_in_bytes": "2000000\n",
                "memory/memory.usage_in_bytes": "1800000\n",
                "memory/memory.stat": "cache 1500000\ntotal_inactive_file 1200000\n",
            },
            1400000,
        ),
        (
            {
                "memory/memory.limit_in_bytes": "2000000\n",
                "memory/memory.usage_in_bytes": "500000\n",
            },
            1500000,
        ),
        (
            {
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/memory.usage_in_bytes": "500000\n",
            },
            None,
        ),
        ({}, None),
    ],
)
def test_a_containers_memory_limit_is_what_is_free(tmp_path, files, expected):
    from hessian_cli.engine.memory import cgroup_available

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_available(tmp_path) == expected


def test_the_leak_gives_the_ritz_residuals_without_the_ritz_vectors():
    """`_Leak` against residuals formed from the Ritz vectors and their products, on a basis that
    is no Krylov space (every row leaks, as after a warm start), grown by blocks of 3, 1 and 2
    rows, restarted to 4 Ritz vectors and grown again."""
    g = torch.Generator().manual_seed(0)
    n = 300
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T

    def of_new_rows(Q: torch.Tensor, HQ: torch.Tensor, first: int, older: es._Leak | None):
        T = es._symmetric(gram(Q, HQ))
        F = es._Leak.rows(T[first:], Q, HQ, first, older)
        return es._Leak.of_rows(F, gram(F, F), len(Q), first, older)

    def check(Q: torch.Tensor, HQ: torch.Tensor, leak: es._Leak) -> torch.Tensor:
        T = es._symmetric(gram(Q, HQ))
        theta, S = torch.linalg.eigh(T)
        exact = S.T @ HQ - theta[:, None] * (S.T @ Q)
        torch.testing.assert_close(leak.residuals(S), exact, rtol=0, atol=1e-9)
        torch.testing.assert_close(leak.norms(S), exact.norm(dim=1), rtol=1e-9, atol=1e-9)
        return S

    Q = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=torch.float64)).Q.T
    HQ = Q @ A
    leak, first = None, 0
    for rows in (3, 1, 2):
        m = first + rows
        leak = of_new_rows(Q[:m], HQ[:m], first, leak)
        S = check(Q[:m], HQ[:m], leak)
        first = m
    Sk = S[:, -4:]
    leak.restart(Sk)
    Q, HQ = Sk.T @ Q, Sk.T @ HQ
    new = orthonormalize_against(torch.randn(1, n, generator=g, dtype=torch.float64), Q)
    Q, HQ = torch.cat([Q, new]), torch.cat([HQ, new @ A])
    leak = of_new_rows(Q, HQ, 4, leak)
    check(Q, HQ, leak)


def test_a_solve_forms_its_ritz_vectors_once(monkeypatch):
    """Between stops the residuals come from the leak: the Ritz vectors, `4 w m n` flops, are
    formed only to confirm the stop (the cost that dominated a top-50 solve of 272k params)."""
    calls = []
    ritz = es._ritz
    monkeypatch.setattr(es, "_ritz", lambda *a: calls.append(1) or ritz(*a))
    g = torch.Generator().manual_seed(0)
    diagonal = torch.cat(
        [torch.linspace(100, 50, 20, dtype=torch.float64), torch.randn(5000, generator=g).double()]
    )
    res = eigenpairs(DiagonalOperator(diagonal), 10, tol=1e-8)
    assert res.all_converged and res.iterations > 10
    torch.testing.assert_close(res.eigenvalues, diagonal[:10], rtol=1e-10, atol=0)
    assert len(calls) == 1


def test_a_basis_that_cannot_grow_right_after_a_restart_reports_its_own_ritz_pairs(monkeypatch):
    """If no new direction survives orthogonalisation (a guard: rounding could do it), the solve
    stops as "exhausted" with the Ritz pairs of the basis it has, which a thick restart has just
    replaced: the reported residuals are those of the returned vectors."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    A = A + A.T
    calls = []
    orthonormalize = es.orthonormalize_against

    def failing_after_the_restart(W, Q, **kw):
        calls.append(1)  # the start, three expansions filling 4 rows, then the restart's
        return W[:0] if len(calls) >= 5 else orthonormalize(W, Q, **kw)

    monkeypatch.setattr(es, "orthonormalize_against", failing_after_the_restart)
    res = eigenpairs(MatrixOperator(A), 2, block_size=1, max_basis=4, tol=1e-12)
    assert res.stop_reason == "exhausted" and not res.all_converged
    X = res.eigenvectors
    torch.testing.assert_close(X.norm(dim=1), torch.ones(2, dtype=torch.float64))
    exact = (X @ A - res.eigenvalues[:, None] * X).norm(dim=1) / res.scale
    torch.testing.assert_close(res.residuals, exact, rtol=1e-8, atol=1e-12)


def test_the_guard_keeps_a_single_vector_search_from_skipping_crowded_eigenvalues():
    """The digits MLP's top-150 by single vectors (block 1, seed 1): with no guard 6 eigenvalues
    were skipped, the pairs after them certified and off by more than 1e-3 (RESULTS.md, tenth
    session); with the default guard none is."""
    from hessian_cli.specs.checkpoints import apply_weights, load_checkpoint
    from hessian_cli.specs.data import analysis_batches, load_data
    from hessian_cli.specs.models import build_model

    root = Path(__file__).resolve().parents[1]
    ckpt = load_checkpoint(root / "checkpoints_example" / "digits_mlp.pt")
    data = load_data("digits")
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, kwargs={"hidden": [32]})
    apply_weights(model, ckpt.state_dict)
    batches = analysis_batches(data.train, batch_size=128, num_samples=128, dtype=torch.float32)
    op = HessianOperator(model, F.cross_entropy, batches)
    res = eigenpairs(op, 150, block_size=1, seed=1)
    assert res.guard == 15 and res.all_converged
    double = copy.deepcopy(model).double()
    batches = [(x.double(), y) for x, y in batches]
    space = HessianOperator(double, F.cross_entropy, batches).space
    H = dense_hessian(double, F.cross_entropy, batches, space)
    exact = torch.linalg.eigvalsh(H).flip(0)[:150]
    errors = (res.eigenvalues.double() - exact).abs() / exact.abs()
    assert int((errors > 1e-3).sum()) == 0


def test_alignment_where_the_top_eigenvalue_is_zero():
    """A loss linear in the parameters (a linear model under L1) has H = 0: the curvature ratio
    is undefined (NaN), the other scores are not."""
    model = torch.nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(16, n, generator=g, dtype=torch.float64) for n in (4, 2))
    op = HessianOperator(model, F.l1_loss, [(x, y)])
    res = eigenpairs(op, 2)
    assert res.eigenvalues.abs().max() == 0
    scores = alignment_scores(op, res.eigenvalues, res.eigenvectors)
    assert math.isnan(scores.curvature_ratio)
    assert math.isfinite(scores.subspace_alignment) and math.isfinite(scores.eigensam_alignment)


def test_alignment_where_the_top_eigenvalue_is_negative():
    """With lambda_1 < 0 the ratio g_hat^T H g_hat / lambda_1 is at least 1, which would read as
    better than perfectly aligned: it is undefined (NaN) there too."""
    model = torch.nn.Linear(3, 1).double()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(16, n, generator=g, dtype=torch.float64) for n in (3, 1))
    op = HessianOperator(model, lambda out, t: -F.mse_loss(out, t), [(x, y)])
    res = eigenpairs(op, 2)
    assert res.eigenvalues.max() < 0
    scores = alignment_scores(op, res.eigenvalues, res.eigenvectors)
    assert math.isnan(scores.curvature_ratio) and math.isfinite(scores.subspace_alignment)


def test_alignment_of_pairs_other_than_the_largest_is_refused():
    """The smallest pairs gave an Eigen-SAM alignment against v_n, both ends a mix."""
    case = CASES["mlp-ce"]
    op = HessianOperator(case.model, case.loss, case.batches)
    for which in ("smallest", "both"):
        res = eigenpairs(op, 2, which=which)
        with pytest.raises(UserError, match="takes the largest eigenpairs, largest first"):
            alignment_scores(op, res.eigenvalues, res.eigenvectors)
    res = eigenpairs(op, 2)
    with pytest.raises(UserError, match="one eigenvector per eigenvalue"):
        alignment_scores(op, res.eigenvalues, res.eigenvectors[:1])
    # Near-tied top values a float32 solve gives out of order by rounding were refused.
    tied = res.eigenvalues.clone()
    tied[1] = tied[0] * (1 + 3e-7)
    assert alignment_scores(op, tied, res.eigenvectors).alignment.shape == (2,)
    # Both ends of a spectrum whose bottom is near 0: its rise is small beside the top's size.
    vectors = torch.linalg.qr(torch.randn(op.n, 4, dtype=op.dtype))[0].T
    both = torch.tensor([100.0, 90.0, -0.049, -0.0484], dtype=torch.float64)
    with pytest.raises(UserError, match="takes the largest eigenpairs, largest first"):
        alignment_scores(op, both, vectors)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"rho": -0.05}, "rho of at least 0, not -0.05"),
        ({"rho": math.nan}, "rho of at least 0, not nan"),
        ({"alpha": -0.2}, "alpha of at least 0, not -0.2"),
        ({"rho": "0.05"}, "rho of at least 0, not '0.05'"),  # a TypeError in math.isfinite
        ({"alpha": None}, "alpha of at least 0, not None"),
        ({"minibatches": -3}, "minibatches of at least 0, not -3"),
        ({"minibatches": 2.5}, "a whole number of minibatches, not 2.5"),
        ({"minibatches": True}, "a whole number of minibatches, not True"),
    ],
)
def test_alignment_settings_the_cli_refuses_are_refused(given, said):
    """A negative rho gave sam_sharpness -0.022 (a descent step; +0.023 at rho 0.05), a
    negative alpha tilted Eigen-SAM's direction away from v_1 (alignment 0.57 for 0.78), and
    minibatches=-3 took no batch: all silently, where the CLI's options refuse them."""
    case = CASES["mlp-ce"]
    op = HessianOperator(case.model, case.loss, case.batches)
    res = eigenpairs(op, 2)
    hvps = op.hvp_count
    with pytest.raises(UserError, match=f"alignment_scores takes {said}"):
        alignment_scores(op, res.eigenvalues, res.eigenvectors, **given)
    assert op.hvp_count == hvps  # before any work


def test_alignment_of_another_operators_eigenvectors_is_refused():
    """Vectors over other parameters (`params="fc.*"`) failed in a matrix product, a traceback,
    where the trace and the density refuse such pairs in one sentence."""
    case = CASES["mlp-ce"]
    op = HessianOperator(case.model, case.loss, case.batches)
    res = eigenpairs(op, 2)
    with pytest.raises(UserError, match=rf"eigenvectors of this operator, \[k, {op.n}\]"):
        alignment_scores(op, res.eigenvalues, res.eigenvectors[:, 1:])


def test_a_sharpness_whose_perturbed_loss_overflows_is_undefined_not_an_error():
    """rho = 1e37 overflowed the loss at w + rho g_hat: the whole analysis ended, blaming the
    weights and the data, though the loss at w and the other scores are finite."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    op = HessianOperator(model, F.mse_loss, [(x, y)])  # float32: (1e37)^2 overflows
    res = eigenpairs(op, 2)
    scores = alignment_scores(op, res.eigenvalues, res.eigenvectors, rho=1e37)
    assert math.isnan(scores.sam_sharpness)
    assert math.isfinite(scores.loss) and math.isfinite(scores.eigensam_alignment)
    finite = alignment_scores(op, res.eigenvalues, res.eigenvectors, rho=0.05)
    assert math.isfinite(finite.sam_sharpness)


def test_a_minibatch_with_a_zero_gradient_is_left_out_of_the_statistics():
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    # Small integers: x @ w and x.sum(1) agree exactly on any CPU (with random floats the
    # matrix product rounded otherwise on an Intel Xeon, and the gradient was 1e-17, not 0).
    fitted = torch.randint(-3, 4, (8, 3), generator=g).double()
    other = torch.randn(8, 3, generator=g, dtype=torch.float64)
    batches = [
        (fitted, fitted.sum(1, keepdim=True)),  # fitted exactly: a zero gradient
        (other, torch.randn(8, 1, generator=g, dtype=torch.float64)),
        (other, torch.randn(8, 1, generator=g, dtype=torch.float64)),
    ]
    op = HessianOperator(model, F.mse_loss, batches)
    res = eigenpairs(op, 2)
    scores = alignment_scores(op, res.eigenvalues, res.eigenvectors, minibatches=3)
    values = scores.minibatch_alignment
    assert values[0].isnan().all() and not values[1:].isnan().any()
    torch.testing.assert_close(scores.minibatch_mean, values[1:].mean(0))
    torch.testing.assert_close(scores.minibatch_std, values[1:].std(0))
    one = alignment_scores(op, res.eigenvalues, res.eigenvectors, minibatches=2)
    assert one.minibatch_std.isnan().all()  # a sample std of one value is undefined, not 0


@pytest.mark.parametrize("seed", [0, 2])
def test_eigenvalue_error_bounds_hold_for_float32_products(seed):
    """The bounds count the products' rounding: float32 cannot certify 1e-9 (it claimed 1e-13
    for values 1e-7 off), and what it certifies at a tolerance it can meet holds."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top = torch.tensor([50.0, 31.0, 20.0, 12.0, 7.5], dtype=torch.float64)
    lam = torch.cat([top, torch.rand(n - 5, generator=g, dtype=torch.float64) * 5 - 1])
    A = ((Q * lam) @ Q.T).float()
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:5]  # of the matrix the products use
    for tol, certified in ((1e-9, False), (1e-5, True)):
        r = eigenpairs(MatrixOperator(A), 5, criterion="eigenvalue", tol=tol, seed=seed)
        actual = (r.eigenvalues.double() - exact).abs() / exact.abs()
        assert bool((actual <= r.errors).all()), (actual, r.errors)
        assert bool(r.converged.all()) == certified


def test_a_hint_against_the_random_start_of_one_parameter_does_not_cancel_it():
    # One parameter: the hinted start row, a unit random part plus the unit hint, was 0 where
    # they had opposite signs (half the seeds), and the solve failed in a RuntimeError.
    op = DiagonalOperator(torch.tensor([2.5], dtype=torch.float64))
    for seed in range(4):
        for sign in (1.0, -1.0):
            hint = torch.tensor([sign], dtype=torch.float64)
            res = eigenpairs(op, 1, hint=hint, seed=seed)
            assert res.all_converged and float(res.eigenvalues[0]) == 2.5, (seed, sign)


def test_a_bound_reaches_out_no_further_than_the_pair_before_may_lie():
    """The 5 smallest of 150 values u^4 (u uniform in [0, 1]) at tol 1e-2 to 1e-1: the bottom
    is crowded within the tolerance (seed 2: 42 values below 0.005), and the pairs are
    eigenvalues further in than the i-th (the 4th 0.00326, its residual 0.0088). A bound that
    reached out to theta[i - 1] took the (i-1)-th to be there, not within that pair's own
    bound: the 5th, 0.00491, was "within 0.0043" of an eigenvalue 3.8e-7 (3 of 18 solves). It
    now reaches as far as the pair before may lie."""
    false = 0
    for seed, tol in itertools.product(range(6), (1e-2, 3e-2, 1e-1)):
        values = torch.rand(150, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        values = values**4
        H = _with_spectrum(values, seed)
        res = eigenpairs(MatrixOperator(H), 5, which="smallest", tol=tol, seed=seed)
        true = values.sort().values[:5]
        false += bool((res.converged & ((res.eigenvalues - true).abs() / true > res.errors)).any())
    assert false == 0


@pytest.mark.parametrize(
    "criterion, tol, top, bulk, k",
    [
        ("residual", 1e-3, (0.999747, 0.999699), 0.99, 2),
        ("eigenvalue", 1e-4, (0.9997, 0.998), 0.9, 1),
    ],
)
def test_the_check_goes_on_while_its_residual_reaches_past_its_threshold(
    criterion, tol, top, bulk, k
):
    """Two eigenvalues a little above a bulk, 300 in all, 20 bases: a space grown from one
    vector holds a mix of the two, and the check's six steps from a random start had not
    reached the other mix (its Ritz value 0.87-0.96, below its threshold) while its Ritz
    vector's residual (0.04-0.1) still reached past it. Top-2 at tol 1e-3 then gave the bulk's
    top as the 2nd pair in 3 of 20 (14 times tol off, 2 bounds below the error); the
    eigenvalue criterion, whose threshold is the gap its bound takes, called top-1 converged
    up to 11 times tol off in 10 of 20. The check now goes on while that residual reaches
    past its threshold."""
    n = 300
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        values = torch.cat([torch.tensor(top), bulk * torch.rand(n - 2, generator=g)]).double()
        H = torch.diag(values[torch.randperm(n, generator=g)])
        res = eigenpairs(MatrixOperator(H), k, tol=tol, criterion=criterion, seed=seed)
        off = (res.eigenvalues - values.sort(descending=True).values[:k]).abs() / res.eigenvalues
        assert res.converged.all()
        assert (off <= tol).all() and (off <= res.errors).all(), seed


def test_orthonormalising_into_out_gives_its_first_rows_as_without_it():
    # The solve's next block is orthonormalised straight into the basis's buffer (out), with
    # no copy of the rows (each fresh n-long array costs its page faults: 0.16 s at 11.2M
    # parameters on CPU): the rows are out's first ones, as orthonormalize_against makes them
    # without out, for one row, a dropped row and several rows.
    g = torch.Generator().manual_seed(0)
    Q = orthonormalize_against(torch.randn(3, 500, generator=g, dtype=torch.float64), None)
    one = torch.randn(1, 500, generator=g, dtype=torch.float64)
    dropped = torch.cat([one, 2 * Q[:1]])
    several = torch.randn(3, 500, generator=g, dtype=torch.float64)
    for W, rows in ((one, 1), (dropped, 1), (several, 3)):
        expected = orthonormalize_against(W, Q)
        out = torch.empty_like(W)
        V = orthonormalize_against(W, Q, out=out)
        assert V.shape == (rows, 500) and V.data_ptr() == out.data_ptr()
        torch.testing.assert_close(V, expected, rtol=0, atol=1e-15)
        own = W.clone()  # the rows themselves as out
        torch.testing.assert_close(
            orthonormalize_against(own, Q, out=own), expected, rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("which", ["largest", "both"])
@pytest.mark.parametrize("n", [6, 200])
def test_an_eigensolve_refuses_products_that_are_not_finite_in_one_sentence(n, which):
    """Every product enters the projected matrix the solve reads on the host, which it looks at
    (the operator no longer looks at each product on the device): an operator without its own
    look failed in eigh's words, "failed to converge because the input matrix is
    ill-conditioned", whole space (n = 6) and Krylov basis alike."""
    H = torch.diag(torch.arange(n, dtype=torch.float64))
    H[2, 3] = H[3, 2] = float("inf")
    with pytest.raises(NotFinite, match="eigensolver's Hessian-vector products are not finite"):
        eigenpairs(MatrixOperator(H), 2, which=which)


class _FirstProductsNotFinite(MatrixOperator):
    """A matrix whose first products (a trace's sketch) are NaN, the later ones not."""

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        first = self.hvp_count == 0
        out = super().matmul(block)
        return torch.full_like(out, math.nan) if first else out


def test_trace_and_density_leave_the_products_finiteness_to_their_own_reads(monkeypatch):
    """The trace reads its probes' dots on the host, the density its Lanczos coefficients, both
    of which every product enters: they look there, not the operator at each product (a read
    that a GPU waits for, and an aminmax over the block); a product that is not finite still
    fails in the operator's words."""
    from hessian_cli.engine import operator as operator_module

    looks = count_calls(monkeypatch, operator_module, "all_finite")
    case = cases()[0]
    op = HessianOperator(case.model, case.loss, case.batches)
    stochastic_trace(op, 12, block_size=2)
    stochastic_trace(op, 9, method="hutchinson")
    spectral_density(op, 2, 6)
    assert op.hvp_count == 12 + 9 + 12 and looks[0] == 0, (op.hvp_count, looks)
    model, batches = sqrt_at_zero()
    op = HessianOperator(model, F.cross_entropy, batches)
    said = "Hessian-vector products are not finite .* second derivatives"
    for solve in (
        lambda: stochastic_trace(op, 6),  # the sketch's products
        lambda: stochastic_trace(op, 4, method="hutchinson"),
        lambda: spectral_density(op, 2, 4),
    ):
        with pytest.raises(NotFinite, match=said):
            solve()
    # The sketch's products are looked at as they come: the rows that are not finite would be
    # left out of its basis, unsaid, where the later products are finite.
    with pytest.raises(NotFinite, match="trace's Hessian-vector products are not finite"):
        stochastic_trace(_FirstProductsNotFinite(torch.eye(20, dtype=torch.float64)), 9)


def test_a_density_step_reads_the_device_once():
    """A step read on the host whether a second orthogonalisation pass was needed, then whether
    its coefficients were finite and a probe went on: two waits for the GPU a step. Both are
    one read (a second only after a second pass), so the reads do not grow with the steps (on
    the CPU a read of a scalar is aten::_local_scalar_dense)."""

    def reads(steps: int) -> int:
        op = DiagonalOperator(torch.linspace(-1, 3, 5000, dtype=torch.float64))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            res = spectral_density(op, 2, steps)
        assert res.hvps == 2 * steps and (res.weights > 0).all()
        return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())

    assert reads(30) == reads(10)


def test_a_densitys_coefficients_come_to_the_host_in_one_copy(monkeypatch):
    """The Lanczos coefficients and each probe's length came to the host in three copies (on a
    GPU three waits); one now, and the rules are those of the operator's spectrum."""
    copies = count_calls(monkeypatch, torch.Tensor, "cpu")
    eigenvalues = torch.linspace(-1, 3, 50, dtype=torch.float64)
    res = spectral_density(DiagonalOperator(eigenvalues), 3, 60)
    assert copies[0] == 1
    used = res.nodes[res.weights > 1e-12]  # (the full space: every node an eigenvalue)
    assert (eigenvalues[None] - used[:, None]).abs().min(1).values.max() < 1e-10
    torch.testing.assert_close(res.weights.sum(1), torch.ones(3, dtype=torch.float64))


def test_a_trace_looks_at_its_sketchs_products_only_where_rows_were_dropped(monkeypatch):
    """A row of the sketch's products that is not finite is dropped from its basis (its norm is
    NaN or inf): the trace looked at all of them for it, a read of the device beside the one
    inside the basis's making; it now looks only where rows were dropped, and still refuses the
    products that are not finite (test_trace_and_density_leave_the_products_finiteness...)."""
    from hessian_cli.engine import trace as trace_module

    looks = count_calls(monkeypatch, trace_module, "all_finite")
    stochastic_trace(MatrixOperator(torch.diag(torch.arange(20.0, dtype=torch.float64))), 9)
    assert looks[0] == 0
    low_rank = torch.zeros(20, 20, dtype=torch.float64)
    low_rank[0, 0] = 1.0  # H maps the sketch of 3 into one dimension: 2 rows dropped
    result = stochastic_trace(MatrixOperator(low_rank), 9)
    assert looks[0] == 1 and result.estimate == pytest.approx(1.0)


class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Counts the eigensolver's waits for the operator's device (on a GPU each lets the queue run
    dry), on the CPU: the operator's matrix and what is made from it or on its device are
    tagged. A read is ``item``, ``bool``, ``float``, ``tolist``, a copy to the host (``cpu``,
    ``to`` a host tensor) or an index by a boolean mask (its count) of a tagged tensor; a copy
    is a host tensor moved to the device (``to`` a tagged one, or ``to`` a device) without
    ``non_blocking``, which torch makes synchronise the stream. Moved there, it is tagged."""

    SCALAR = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__"})
    MADE = frozenset({"empty", "zeros", "ones", "full", "randn", "rand", "eye", "arange"})

    def __init__(self, *tagged: torch.Tensor) -> None:
        super().__init__()
        self.reads = self.copies = 0
        self._ids: dict[int, Callable[[], torch.Tensor | None]] = {}
        for t in tagged:
            self._tag(t)

    def _tag(self, out: object) -> None:
        if isinstance(out, torch.Tensor):
            i = id(out)
            self._ids[i] = weakref.ref(out, lambda _, i=i: self._ids.pop(i, None))
        elif isinstance(out, tuple | list):
            for t in out:
                self._tag(t)

    def _tagged(self, x: object) -> bool:
        if isinstance(x, torch.Tensor):
            ref = self._ids.get(id(x))
            return ref is not None and ref() is x
        if isinstance(x, tuple | list):
            return any(self._tagged(t) for t in x)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        source = self._tagged(args[0]) if args else False
        targets = [*args[1:], *kwargs.values()]
        to_device = name == "to" and (
            kwargs.get("non_blocking", False) or any(self._tagged(a) for a in targets)
        )
        to_host = name == "cpu" or (
            name == "to"
            and not to_device
            and any(
                (isinstance(a, torch.Tensor) and not self._tagged(a)) or str(a) == "cpu"
                for a in targets
            )
        )
        if to_device and not source:
            self.copies += not kwargs.get("non_blocking", False)
            out = out.clone() if out is args[0] else out  # a copy on the device
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            self.reads += any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool and self._tagged(i)
                for i in index
            )
        if name in self.SCALAR or (to_host and source):
            self.reads += source
            return out.clone() if to_host and out is args[0] else out  # a host copy, untagged
        made = name in self.MADE and "device" in kwargs
        if to_device or made or self._tagged(list(args)) or self._tagged(list(kwargs.values())):
            self._tag(out)
        return out


def _reads_inside(
    monkeypatch, reads: _DeviceReads, owner: object, name: str
) -> list[tuple[int, int]]:
    """The device reads and blocking copies to the device made inside each call of
    ``owner.name``."""
    inside, function = [], getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        before = reads.reads, reads.copies
        result = function(*args, **kwargs)
        inside.append((reads.reads - before[0], reads.copies - before[1]))
        return result

    monkeypatch.setattr(owner, name, counted)
    return inside


def _dense_operator(n: int, dtype: torch.dtype, seed: int = 0) -> MatrixOperator:
    """A symmetric matrix of random eigenvectors and a spread spectrum of both signs."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    values = 2 * torch.linspace(-1, 1, n, dtype=torch.float64) ** 3
    return MatrixOperator(((Q * values) @ Q.T).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_thick_restart_reads_nothing_from_the_device(monkeypatch, dtype):
    """A restart copied its combination of the Ritz vectors back from the basis's device to
    update the projected matrix (on a GPU a wait for the restart); the host rounds its own copy
    to the same values."""
    op = _dense_operator(200, dtype)
    reads = _DeviceReads(op.matrix)
    inside = _reads_inside(monkeypatch, reads, es._Basis, "restart")
    with reads:
        res = eigenpairs(op, 3, block_size=2, max_basis=12, tol=1e-6)
    assert len(inside) >= 3 and inside == [(0, 0)] * len(inside)
    assert res.all_converged
    values = torch.linalg.eigvalsh(op.matrix.double()).flip(0)
    assert torch.allclose(res.eigenvalues, values[:3], atol=1e-5)


def _reads_and_iterations(op: MatrixOperator, **options: object) -> tuple[int, int, int]:
    """The device reads of a solve of ``op`` and its blocking copies to the device
    (:class:`_DeviceReads`), and its iterations."""
    with _DeviceReads(op.matrix) as reads:
        res = eigenpairs(op, 1, **options)
    return reads.reads, reads.copies, res.iterations


@pytest.mark.parametrize("block, per_iteration", [(1, 2), (3, 3)])
def test_an_iteration_reads_the_device_a_fixed_few_times(block, per_iteration):
    """A Krylov iteration reads the device (on a GPU a wait for it each time) to know whether
    its new directions survive orthogonalisation (at block 1, their lengths; for more, with
    their first Gram matrix, then their second, which took a read each beside the lengths'),
    and then once for the projected matrix's new rows with the leak's Gram matrix (which the
    leak took apart, a read of its own). Budgets that stop before convergence, no restart: the
    reads of the iterations between them."""
    op = _dense_operator(300, torch.float64)
    options = dict(block_size=block, max_basis=120, tol=1e-12)
    short, long = (_reads_and_iterations(op, max_hvps=hvps, **options) for hvps in (30, 60))
    iterations = long[2] - short[2]
    assert iterations >= 10 and long[0] - short[0] == per_iteration * iterations
    # The small matrices an iteration moves to the device (the leak's, the next block's) go
    # without a wait: torch's blocking copy to a GPU waits for the queue as a read does.
    assert long[1] == short[1]


def test_a_solves_end_reads_the_device_once_for_its_values_and_once_for_verified_ones(
    monkeypatch,
):
    """The Ritz vectors' Rayleigh quotients came back in two reads (their lengths, then their
    dots with the residuals), and verified pairs in two more (their values, then their fresh
    residuals): on a GPU a wait each. The pairs stay those of ``eigh``."""
    op = _dense_operator(300, torch.float32)
    reads = _DeviceReads(op.matrix)
    quotients = _reads_inside(monkeypatch, reads, es, "_rayleigh_quotients")
    verified = _reads_inside(monkeypatch, reads, es, "_final_pairs")
    with reads:
        res = eigenpairs(op, 3, verify=True)
    assert quotients == [(1, 0)] and verified[0][0] == 1
    values = torch.linalg.eigvalsh(op.matrix.double()).flip(0)[:3]
    assert res.all_converged and torch.allclose(res.eigenvalues, values, atol=1e-3)


def test_a_check_for_a_skipped_eigenvalue_reads_its_residual_only_where_it_decides(monkeypatch):
    """Each step of the check read the size of its Ritz vector's residual from the device (on a
    GPU a wait), which decides nothing during its first ``steps`` steps: it stays there until
    the check asks. Its start, then per step the projected matrix and whether its new direction
    survives, then one read where it stops."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    values = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.rand(197, generator=g)]).double()
    op = MatrixOperator((Q * values) @ Q.T)
    reads = _DeviceReads(op.matrix)
    inside = _reads_inside(monkeypatch, reads, es, "_skipped_direction")
    with reads:
        res = eigenpairs(op, 2, check_steps=6)
    assert res.check_hvps == 6 and inside == [(1 + 2 * 6 + 1, 0)]
    torch.testing.assert_close(res.eigenvalues, values[:2], rtol=1e-6, atol=0)
    assert res.all_converged and res.skipped_found == 0
