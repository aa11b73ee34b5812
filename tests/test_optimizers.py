"""SAM and Eigen-SAM optimizers: formulas, alpha=0 == SAM bit for bit, refresh, state, BatchNorm."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eigensam import (
    SAM,
    EigenSAM,
    disable_running_stats,
    enable_running_stats,
    refresh_top_eigenvector,
)
from eigensam.refresh import COLD_MAX_HVPS, DEFAULT_MAX_HVPS
from hessian_cli.engine.dense import dense_eigh, dense_hessian
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.errors import UserError

DT = torch.float64
# A test that steps before the first refresh on purpose.
BEFORE_REFRESH = pytest.mark.filterwarnings("ignore:EigenSAM has no eigenvector:UserWarning")


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w - b^T w as a model whose output is the loss (the input is ignored)."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w - self.b @ self.w


def identity_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


DUMMY = (torch.zeros(1, dtype=DT), torch.zeros(1, dtype=DT))


def symmetric(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random symmetric matrix with the given spectrum, and its eigenvectors (columns)."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ Q.T, Q


def quadratic(n: int = 12, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T / n + torch.eye(n, dtype=DT)
    return Quadratic(
        A, torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    )


def backward(model: Quadratic) -> None:
    model.zero_grad()
    model(DUMMY[0]).backward()


def mlp(dtype: torch.dtype = DT, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def data(dtype: torch.dtype = DT, steps: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 6, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g))
        for _ in range(steps)
    ]


def sam_step(opt: SAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The first_step / second_step loop with BatchNorm handled, as a user writes it."""
    enable_running_stats(model)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    enable_running_stats(model)
    return loss.item()


# --- 1. alpha = 0 is SAM, bit for bit --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adaptive", [False, True])
def test_alpha_zero_equals_sam_bit_for_bit(dtype: torch.dtype, adaptive: bool) -> None:
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05, adaptive=adaptive)
    m_sam, m_eig = mlp(dtype), mlp(dtype)
    sam = SAM(m_sam.parameters(), torch.optim.SGD, **kw)
    eig = EigenSAM(m_eig.parameters(), torch.optim.SGD, alpha=0.0, **kw)
    for i, (x, y) in enumerate(data(dtype)):
        if i == 2:  # from here on the eigenvector path of EigenSAM is taken
            result = eig.refresh_eigenvector(m_eig, F.cross_entropy, (x, y))
            assert result.hvps <= COLD_MAX_HVPS and eig.eigenvector is not None
        assert sam_step(sam, m_sam, x, y) == sam_step(eig, m_eig, x, y)
        for a, b in zip(m_sam.parameters(), m_eig.parameters(), strict=True):
            assert torch.equal(a, b)
    assert eig.refreshes == 1


def test_alpha_positive_differs_from_sam() -> None:
    """Sanity check of the test above: with alpha > 0 the eigenvector does change the step."""
    m_sam, m_eig = mlp(), mlp()
    sam = SAM(m_sam.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    eig = EigenSAM(m_eig.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, alpha=0.5)
    (x, y), *_ = data()
    eig.refresh_eigenvector(m_eig, F.cross_entropy, (x, y))
    sam_step(sam, m_sam, x, y)
    sam_step(eig, m_eig, x, y)
    assert not torch.equal(m_sam[0].weight, m_eig[0].weight)


# --- 2. the perturbation is the formula ------------------------------------------------------


def perturbation(opt: SAM, model: Quadratic) -> torch.Tensor:
    backward(model)
    w_old = model.w.detach().clone()
    opt.first_step()
    return model.w.detach() - w_old


def test_sam_perturbation_is_rho_g_over_norm() -> None:
    model, rho = quadratic(), 0.05
    g = model.A @ model.w.detach() - model.b
    e = perturbation(SAM([model.w], torch.optim.SGD, lr=0.1, rho=rho), model)
    torch.testing.assert_close(e, rho * g / g.norm(), rtol=1e-14, atol=1e-15)


def test_asam_perturbation() -> None:
    model, rho = quadratic(), 0.5
    w = model.w.detach().clone()
    g = model.A @ w - model.b
    e = perturbation(SAM([model.w], torch.optim.SGD, lr=0.1, rho=rho, adaptive=True), model)
    torch.testing.assert_close(e, rho * w**2 * g / (w.abs() * g).norm(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_eigensam_perturbation_is_the_formula(flip: float) -> None:
    model, rho, alpha = quadratic(), 0.05, 0.3
    lam, V = torch.linalg.eigh(model.A)
    v = flip * V[:, -1]  # d must not depend on the sign of v
    g = model.A @ model.w.detach() - model.b
    g_hat = g / g.norm()
    d = g_hat + alpha * torch.sign(g @ v) * (v - (g_hat @ v) * g_hat)
    assert d.norm() > 1.0  # d is not renormalised
    opt = EigenSAM([model.w], torch.optim.SGD, lr=0.1, rho=rho, alpha=alpha)
    opt.set_eigenvector(v, float(lam[-1]))
    torch.testing.assert_close(perturbation(opt, model), rho * d, rtol=1e-13, atol=1e-15)


def test_eigensam_before_any_eigenvector_is_sam() -> None:
    m1, m2 = quadratic(), quadratic()
    e_sam = perturbation(SAM([m1.w], torch.optim.SGD, lr=0.1), m1)
    with pytest.warns(UserWarning, match="no eigenvector yet") as caught:
        e_eig = perturbation(EigenSAM([m2.w], torch.optim.SGD, lr=0.1, alpha=0.3), m2)
    assert torch.equal(e_sam, e_eig)
    assert caught[0].filename == __file__  # it points at the caller's code
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, alpha=0.3)
    x, y = data()[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="no eigenvector yet") as caught:
        opt.step(closure)
    assert caught[0].filename == __file__  # also through step(closure)


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_zero_gradient_gives_no_perturbation_and_no_nan(cls: type[SAM]) -> None:
    model = quadratic()
    opt = cls([model.w], torch.optim.SGD, lr=0.1)
    if isinstance(opt, EigenSAM):
        opt.set_eigenvector(torch.ones(12, dtype=DT), 1.0)
    model.w.grad = torch.zeros_like(model.w)
    w = model.w.detach().clone()
    opt.first_step()
    assert torch.equal(model.w, w)
    opt.second_step()
    assert torch.equal(model.w, w)


def test_an_eigenvalue_that_is_no_number_leaves_the_eigenvector_as_it_was() -> None:
    """ "1.0" failed in the sign test after v was adopted and the refresh counted: a TypeError
    that left a vector and a count with no eigenvalue to match. A 0-d tensor (a result's
    eigenvalues[0]) is a number."""
    w = nn.Parameter(torch.ones(4, dtype=DT))
    opt = EigenSAM([w], torch.optim.SGD, lr=0.1)
    for bad in ("1.0", None, torch.ones(2)):
        with pytest.raises(UserError, match="^`eigenvalue` must be a number, not "):
            opt.set_eigenvector(torch.ones(4, dtype=DT), bad)
        assert opt.eigenvector is None and opt.refreshes == 0 and opt.last_eigenvalue is None
    opt.set_eigenvector(torch.ones(4, dtype=DT), torch.tensor(-2.0, dtype=DT))
    assert opt.last_eigenvalue == -2.0 and (opt.refreshes, opt.negative_refreshes) == (1, 1)
    torch.testing.assert_close(opt.eigenvector, torch.full((4,), 0.5, dtype=DT))


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_a_gradient_that_is_not_finite_perturbs_nothing(cls: type[SAM]) -> None:
    """As before the direction was formed in place (its NaN norm then made the weights NaN)."""
    w, u = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(3))
    opt = cls([w, u], torch.optim.SGD, lr=0.1)
    if isinstance(opt, EigenSAM):
        opt.set_eigenvector(torch.ones(7), 1.0)
    for bad in (float("nan"), float("inf")):
        w.grad, u.grad = torch.tensor([1.0, bad, 0.0, 2.0]), torch.ones(3)
        opt.first_step()
        assert torch.equal(w.detach(), torch.ones(4)) and torch.equal(u.detach(), torch.ones(3))
        opt.restore()


def test_parameter_without_grad_is_left_alone() -> None:
    model = mlp()
    unused = nn.Parameter(torch.ones(4, dtype=DT))
    opt = EigenSAM(
        [{"params": list(model.parameters())}, {"params": [unused], "rho": 0.1}],
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        alpha=0.2,
    )
    n = sum(p.numel() for p in model.parameters()) + 4
    opt.set_eigenvector(torch.ones(n, dtype=DT), 1.0)
    (x, y), *_ = data()
    sam_step(opt, model, x, y)
    assert torch.equal(unused, torch.ones(4, dtype=DT))


# --- 3. the refresh --------------------------------------------------------------------------


def test_refresh_finds_top_eigenpair_warm_started() -> None:
    spectrum = [5.0, 4.0, 3.5] + torch.linspace(-1.0, 3.0, 37).tolist()
    A, Q = symmetric(spectrum)
    model = Quadratic(A, torch.zeros(40, dtype=DT), torch.ones(40, dtype=DT))
    g = torch.Generator().manual_seed(3)
    v_prev = Q[:, 0] + 0.3 * torch.randn(40, generator=g, dtype=DT) / 40**0.5
    res = refresh_top_eigenvector(
        model, identity_loss, DUMMY, [model.w], v_prev, max_hvps=20, tol=1e-8, seed=0
    )
    assert res.converged and res.hvps <= 20
    assert abs(res.eigenvalue - 5.0) < 1e-6
    assert abs(float(res.vector @ Q[:, 0])) > 0.999
    assert abs(float(res.vector.norm()) - 1.0) < 1e-12
    assert model.w.grad is None  # the refresh does not touch .grad


def test_first_refresh_is_guided_by_the_minibatch_gradient() -> None:
    spectrum = [5.0, 4.0, 3.5] + torch.linspace(-1.0, 3.0, 397).tolist()
    A, Q = symmetric(spectrum, seed=4)
    g = torch.Generator().manual_seed(4)
    rest = Q[:, 1:] @ torch.randn(399, generator=g, dtype=DT)
    gradient = 0.6 * Q[:, 0] + 0.8 * rest / rest.norm()  # leans toward v_1, as networks' do
    found = []
    for with_gradient in (False, True):
        model = Quadratic(A, -gradient, torch.zeros(400, dtype=DT))  # its gradient at w = 0
        opt = EigenSAM([model.w], torch.optim.SGD, lr=0.1)
        if with_gradient:
            backward(model)
            assert torch.allclose(model.w.grad, gradient)
        res = opt.refresh_eigenvector(model, identity_loss, DUMMY, max_hvps=4)
        found.append(abs(float(res.vector @ Q[:, 0])))
    plain, guided = found
    assert guided > 0.99 and guided > plain + 0.05, found


def test_the_first_refresh_has_a_larger_budget_than_the_warm_ones() -> None:
    """The first refresh starts cold and its vector is used for eig_every steps: 6 products do
    not find v_1 here, the first refresh's default budget does; warm ones keep the 6."""
    spectrum = [5.0, 4.7] + torch.linspace(-1.0, 4.4, 198).tolist()
    A, Q = symmetric(spectrum, seed=5)
    found = {}
    for budget in (DEFAULT_MAX_HVPS, None):
        model = Quadratic(A, torch.zeros(200, dtype=DT), torch.ones(200, dtype=DT))
        opt = EigenSAM([model.w], torch.optim.SGD, lr=0.1)
        res = opt.refresh_eigenvector(model, identity_loss, DUMMY, max_hvps=budget)
        found[budget] = (res, abs(float(opt.eigenvector @ Q[:, 0])))
    (six, six_cos), (cold, cold_cos) = found[DEFAULT_MAX_HVPS], found[None]
    assert not six.converged and six_cos < 0.99
    assert cold.converged and DEFAULT_MAX_HVPS < cold.hvps <= COLD_MAX_HVPS and cold_cos > 0.99
    warm = opt.refresh_eigenvector(model, identity_loss, DUMMY)
    assert warm.hvps <= DEFAULT_MAX_HVPS


def test_refresh_ignores_a_larger_negative_eigenvalue() -> None:
    """Power iteration finds the eigenvalue of largest magnitude (-20 here); the refresh asks
    for the largest algebraic one, so it returns the positive top pair."""
    spectrum = [-20.0, 5.0, 2.0] + torch.linspace(-1.0, 1.0, 37).tolist()
    A, Q = symmetric(spectrum, seed=1)
    model = Quadratic(A, torch.zeros(40, dtype=DT), torch.ones(40, dtype=DT))
    start = Q[:, 1] + Q[:, 0]  # the previous vector leans on both ends of the spectrum

    v = start / start.norm()
    for _ in range(30):
        v = A @ v
        v = v / v.norm()
    assert float(v @ A @ v) < -19.9  # what the published power iteration would adopt

    opt = EigenSAM([model.w], torch.optim.SGD, lr=0.1)
    opt.set_eigenvector(start, 1.0)
    res = opt.refresh_eigenvector(model, identity_loss, DUMMY, max_hvps=20, tol=1e-6)
    assert abs(res.eigenvalue - 5.0) < 1e-6
    assert abs(float(opt.eigenvector @ Q[:, 1])) > 0.999
    assert opt.last_eigenvalue == res.eigenvalue and opt.negative_refreshes == 0


def test_a_refresh_residual_is_relative_to_its_own_eigenvalue() -> None:
    """Not to the largest |Ritz value| (30 here): a vector 0.25 * lambda_1 off passed as 8e-3,
    converged (|cos| 0.46 to v_1)."""
    spectrum = [1.0, 0.97, 0.9] + torch.linspace(0.5, -0.5, 40).tolist() + [-30.0]
    A, Q = symmetric(spectrum, seed=0)
    g = torch.Generator().manual_seed(100)
    model = Quadratic(A, torch.zeros(44, dtype=DT), torch.randn(44, generator=g, dtype=DT))
    res = refresh_top_eigenvector(model, identity_loss, DUMMY, [model.w], None, seed=0)
    v = res.vector
    true = float((A @ v - res.eigenvalue * v).norm()) / abs(res.eigenvalue)
    assert res.residual == pytest.approx(true, rel=1e-6)
    assert res.residual > 0.1 and not res.converged


def test_a_refresh_short_of_its_tolerance_has_spent_its_budget() -> None:
    """Under an eigenvalue of -30 a warm refresh stopped "converged" by its residual relative to
    30 after 3 of its 6 products, 0.12 of its own eigenvalue off, which train said had stopped at
    its HVP budget: it now goes on with the rest of the budget."""
    spectrum = [1.0, 0.97, 0.9] + torch.linspace(0.5, -0.5, 40).tolist() + [-30.0]
    A, _ = symmetric(spectrum, seed=0)
    g = torch.Generator().manual_seed(100)
    model = Quadratic(A, torch.zeros(44, dtype=DT), torch.randn(44, generator=g, dtype=DT))
    cold = refresh_top_eigenvector(model, identity_loss, DUMMY, [model.w], None, seed=0)
    res = refresh_top_eigenvector(model, identity_loss, DUMMY, [model.w], cold.vector, seed=0)
    true = float((A @ res.vector - res.eigenvalue * res.vector).norm()) / abs(res.eigenvalue)
    assert res.hvps == DEFAULT_MAX_HVPS and res.residual == pytest.approx(true, rel=1e-6)
    assert res.residual < 0.1


def test_refresh_flags_non_positive_top_eigenvalue() -> None:
    A, Q = symmetric(torch.linspace(-3.0, -0.5, 10).tolist(), seed=2)
    model = Quadratic(A, torch.zeros(10, dtype=DT), torch.ones(10, dtype=DT))
    opt = EigenSAM([model.w], torch.optim.SGD, lr=0.1)
    res = opt.refresh_eigenvector(model, identity_loss, DUMMY, max_hvps=12, tol=1e-8)
    assert abs(res.eigenvalue + 0.5) < 1e-6  # the largest algebraic, not -3
    assert opt.negative_refreshes == 1 and opt.refreshes == 1 and opt.last_eigenvalue < 0
    assert opt.eigenvector is not None  # kept, but flagged


def test_refresh_budget_and_frozen_parameters() -> None:
    model = mlp()
    model[0].bias.requires_grad_(False)
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    (x, y), *_ = data()
    res = opt.refresh_eigenvector(model, F.cross_entropy, (x, y), max_hvps=6)
    assert res.hvps <= 6
    bias = slice(6 * 16, 6 * 16 + 16)
    assert torch.equal(res.vector[bias], torch.zeros(16, dtype=DT))
    warm = opt.refresh_eigenvector(model, F.cross_entropy, (x, y), max_hvps=6)
    assert warm.eigenvalue >= res.eigenvalue - 1e-9  # the warm start's space contains v_prev


@pytest.mark.parametrize(
    ("max_hvps", "said"),
    [
        ("5", "must be a whole number, not '5'"),
        (0, "must be at least 1, not 0"),
        (2.5, "must be a whole number, not 2.5"),
    ],
)
def test_a_refresh_budget_that_is_no_count_is_one_sentence(max_hvps: object, said: str) -> None:
    """ "5" (from a config file) failed in a comparison, a TypeError naming nothing, and 0 said
    "max_hvps must be at least 1" as a bare ValueError; the eigenvector is left as it was."""
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    (x, y), *_ = data()
    with pytest.raises(UserError, match=f"^`max_hvps` {said}"):
        opt.refresh_eigenvector(model, F.cross_entropy, (x, y), max_hvps=max_hvps)
    assert opt.eigenvector is None and opt.refreshes == 0


# --- 4. SAM by hand, step(closure), state_dict -----------------------------------------------


def test_sam_step_matches_hand_computed_update() -> None:
    model, rho, lr = quadratic(), 0.05, 0.1
    A, b, w = model.A, model.b, model.w.detach().clone()
    g = A @ w - b
    w_adv = w + rho * g / g.norm()
    expected = w - lr * (A @ w_adv - b)
    opt = SAM([model.w], torch.optim.SGD, lr=lr, rho=rho)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(DUMMY[0])
        loss.backward()
        return loss

    loss = opt.step(closure)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-14, atol=1e-15)
    assert loss.item() == pytest.approx(float(0.5 * w @ A @ w - b @ w), rel=1e-14)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@BEFORE_REFRESH
@pytest.mark.parametrize("cls", [SAM, EigenSAM])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_state_dict_roundtrip_gives_identical_steps(cls: type[SAM], base: type) -> None:
    kw = dict(lr=0.05, weight_decay=5e-4)
    if base is torch.optim.SGD:
        kw["momentum"] = 0.9
    steps = data(steps=8)
    model = mlp()
    opt = cls(model.parameters(), base, rho=0.05, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i, (x, y) in enumerate(steps[:4]):
        if isinstance(opt, EigenSAM) and i == 1:
            opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
        sam_step(opt, model, x, y)
        sched.step()
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})

    model2 = mlp(seed=7)
    opt2 = cls(model2.parameters(), base, rho=0.05, **{**kw, "lr": 1.0})
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert opt2.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0125
    if isinstance(opt, EigenSAM):
        assert torch.equal(opt2.eigenvector, opt.eigenvector)
        assert (opt2.refreshes, opt2.last_eigenvalue) == (1, opt.last_eigenvalue)
    for x, y in steps[4:]:
        sam_step(opt, model, x, y)
        sam_step(opt2, model2, x, y)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_scheduler_reaches_base_optimizer() -> None:
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second_step counts as the step the scheduler follows
        sam_step(opt, model, *data()[0])
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_state_dict_between_steps_holds_no_weights_copy() -> None:
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_step(opt, model, *data()[0])
    state = opt.state_dict()
    assert all("old_p" not in s for s in state["state"].values())
    assert all("momentum_buffer" in s for s in state["base_state"].values())


# --- 5. BatchNorm ----------------------------------------------------------------------------


def test_batchnorm_running_stats_update_on_first_pass_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    reference = copy.deepcopy(model)
    bn = model[1]
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, alpha=0.2)
    x, y = data()[0]
    opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
    assert bn.num_batches_tracked == 0  # the refresh never updates buffers

    reference(x)  # one train-mode forward at w: what the buffers should become
    sam_step(opt, model, x, y)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(reference[1], name)), name
    assert bn.track_running_stats


def test_instancenorm_running_stats_update_on_first_pass_only() -> None:
    """InstanceNorm with track_running_stats=True updates its buffers whatever that flag says:
    they moved on the second pass too (running_mean by 0.037 after 0.041 on the first)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        *(nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
    ).to(DT)
    reference = copy.deepcopy(model)
    norm = model[1]
    x, y = torch.randn(8, 2, 6, dtype=DT), torch.randint(0, 3, (8,))
    expected = reference(x)  # one train-mode forward at w: what the buffers should become
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sam_step(opt, model, x, y)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(norm, name), getattr(reference[1], name)), name
    disable_running_stats(model)  # the second pass normalises as the first
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.copy_(q)
    assert torch.equal(model(x), expected)
    enable_running_stats(model)
    assert "_apply_instance_norm" not in vars(norm)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["BatchNorm", "InstanceNorm"])
def test_a_scripted_norm_layer_updates_its_statistics_on_the_first_pass_only(kind: str) -> None:
    """A TorchScript layer's track_running_stats is compiled in: its statistics moved in both
    passes (num_batches_tracked 2 after one step, the running mean moved twice; an InstanceNorm
    layer's too, which was not looked for)."""
    torch.manual_seed(0)
    norm = (
        [nn.BatchNorm1d(8)]
        if kind == "BatchNorm"
        else [nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten()]
    )
    reference = nn.Sequential(nn.Linear(6, 8), *norm, nn.Tanh(), nn.Linear(8, 3)).to(DT)
    model = torch.jit.script(copy.deepcopy(reference))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    reference(x)  # one train-mode forward at w: what the buffers should become
    sam_step(opt, model, x, y)
    state = model.state_dict()
    at = len(norm) // 2 + 1  # the norm layer's index in the Sequential
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(state[f"{at}.{name}"], getattr(reference[at], name)), name


def test_a_refresh_takes_batchnorm_layers_in_eval_mode_by_their_running_statistics() -> None:
    """Fine-tuning with frozen BatchNorm statistics under model.train(): the loss SAM perturbs
    normalises by the running statistics, which the refresh took for batch statistics (lambda_1
    2.94 for 1.90, |cos| 0.28 to v_1, on a smaller model)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()),
        *(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)),
    ).to(DT)
    with torch.no_grad():  # pretrained statistics, far from the batch's own
        for bn in (model[1], model[4]):
            bn.running_mean.fill_(2.0)
            bn.running_var.fill_(4.0)
    model.train()
    model[1].eval()
    model[4].eval()
    x, y = data()[0]
    values, vectors = dense_eigh(dense_hessian(model, F.cross_entropy, [(x, y)], bn="eval"))
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    res = opt.refresh_eigenvector(model, F.cross_entropy, (x, y), max_hvps=150, tol=1e-10)
    assert res.eigenvalue == pytest.approx(float(values[0]), rel=1e-8)
    assert abs(float(res.vector @ vectors[0])) > 1 - 1e-8
    model[4].train()  # one layer of each mode: the operator takes all in one
    with pytest.raises(UserError, match="layers in training mode and others in eval mode"):
        opt.refresh_eigenvector(model, F.cross_entropy, (x, y))


def test_a_refresh_takes_instancenorm_layers_with_running_statistics_as_they_normalise() -> None:
    """In training mode such a layer normalises each sample by its own statistics: the refresh
    took its running ones (lambda_1 3.16 for 6.63, |cos| 0.06 to v_1)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
        *(nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
    ).to(DT)
    norm = model[1]
    with torch.no_grad():  # statistics far from the samples' own
        norm.running_mean.fill_(2.0)
        norm.running_var.fill_(4.0)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x, y = torch.randn(10, 2, 6, dtype=DT), torch.randint(0, 3, (10,))
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def train_mode_loss(flat: torch.Tensor) -> torch.Tensor:  # independent of forward_mode
        parts = flat.split([s.numel() for s in shapes])
        weights = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(
            torch.func.functional_call(copy.deepcopy(model).train(), weights, x), y
        )

    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = {
        "train": dense_eigh(torch.autograd.functional.hessian(train_mode_loss, w)),
        "eval": dense_eigh(dense_hessian(model, F.cross_entropy, [(x, y)], bn="eval")),
    }
    for mode, (values, vectors) in expected.items():
        model.train(mode == "train")
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        res = opt.refresh_eigenvector(model, F.cross_entropy, (x, y), max_hvps=150, tol=1e-10)
        assert res.eigenvalue == pytest.approx(float(values[0]), rel=1e-8), mode
        assert abs(float(res.vector @ vectors[0])) > 1 - 1e-8, mode
        for k, v in norm.state_dict().items():
            assert torch.equal(v, before[k]), k
    model.train()
    model.append(nn.BatchNorm1d(3).to(DT).eval())  # one layer of each mode: refused
    with pytest.raises(UserError, match="in training mode and others in eval mode"):
        opt.refresh_eigenvector(model, F.cross_entropy, (x, y))


def test_disabled_running_stats_still_normalise_by_batch_statistics() -> None:
    bn = nn.BatchNorm1d(4).to(DT)
    x = torch.randn(16, 4, dtype=DT) * 3 + 1
    expected = bn(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    disable_running_stats(bn)
    disable_running_stats(bn)  # idempotent
    assert torch.equal(bn(x), expected)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    enable_running_stats(bn)
    assert bn.track_running_stats


# --- 6. in a user's own loop: interruptions, misuse, other parameter layouts -----------------


def test_a_step_whose_second_pass_fails_leaves_the_weights_at_w() -> None:
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = data()[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # or out of memory at w + e
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, w)
    opt.step(closure)  # and the next step is a whole step from w
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))


def test_restore_goes_back_to_w_without_a_step() -> None:
    model = quadratic()
    opt = SAM([model.w], torch.optim.SGD, lr=0.1)
    w = model.w.detach().clone()
    backward(model)
    opt.first_step()
    assert not torch.equal(model.w, w)
    opt.restore()
    assert torch.equal(model.w, w)
    opt.first_step()  # not "called twice": the perturbation is undone


def test_steps_out_of_order_are_errors_not_plain_steps() -> None:
    model = quadratic()
    opt = SAM([model.w], torch.optim.SGD, lr=0.1)
    w = model.w.detach().clone()
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.first_step()
    backward(model)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    assert torch.equal(model.w, w)


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_an_adaptive_that_is_no_bool_is_refused(cls: type[SAM]) -> None:
    """adaptive="no" (or 1) took ASAM's rescaled steps, another optimizer, unsaid; in a group
    too. False takes SAM's hand-computed step."""
    model = quadratic()
    with pytest.raises(ValueError, match="^`adaptive` must be True \\(ASAM\\) or False .*'no'"):
        cls([model.w], torch.optim.SGD, lr=0.1, adaptive="no")
    opt = cls([{"params": [model.w], "adaptive": 1}], torch.optim.SGD, lr=0.1)
    backward(model)
    with pytest.raises(UserError, match="^`adaptive` must be True \\(ASAM\\) or False .*not 1"):
        opt.first_step()
    w = model.w.detach().clone()
    no_v = {"alpha": 0.0} if cls is EigenSAM else {}  # (no eigenvector yet: SAM's step)
    opt = cls([model.w], torch.optim.SGD, lr=0.1, rho=0.05, adaptive=False, **no_v)
    g = model.w.grad.clone()
    opt.first_step()
    torch.testing.assert_close(model.w.detach(), w + 0.05 * g / g.norm())


def test_a_negative_rho_in_a_group_is_refused() -> None:
    model = quadratic()
    opt = SAM([{"params": [model.w], "rho": -0.1}], torch.optim.SGD, lr=0.1)
    backward(model)
    with pytest.raises(ValueError, match="`rho` must be a finite non-negative number, not -0.1"):
        opt.first_step()


@pytest.mark.parametrize("through_base", [False, True])
def test_parameters_added_after_a_refresh(through_base: bool) -> None:
    model = mlp()
    extra = nn.Parameter(torch.zeros(3, dtype=DT))  # a bias added to the logits
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, alpha=0.2)
    x, y = data()[0]
    opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
    v = opt.eigenvector.clone()
    (opt.base_optimizer if through_base else opt).add_param_group({"params": [extra]})
    model.zero_grad()
    F.cross_entropy(model(x) + extra, y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x) + extra, y).backward()
    opt.second_step()
    assert torch.equal(opt.eigenvector, torch.cat([v, torch.zeros(3, dtype=DT)]))
    assert opt.param_groups[-1]["rho"] == 0.05
    assert not torch.equal(extra, torch.zeros(3, dtype=DT))  # it was trained


def test_sparse_gradients_take_the_same_step_as_dense_ones() -> None:
    tokens, y = torch.tensor([[1, 4, 4], [0, 2, 7]]), torch.tensor([1, 0])
    weights = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=sparse).to(DT)
        head = nn.Linear(4, 2).to(DT)
        opt = SAM([*emb.parameters(), *head.parameters()], torch.optim.SGD, lr=0.1)

        def closure(emb: nn.Module = emb, head: nn.Module = head, opt: SAM = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(head(emb(tokens).mean(1)), y)
            loss.backward()
            return loss

        opt.step(closure)
        assert emb.weight.grad.is_sparse == sparse
        weights.append(emb.weight.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("rho", float("nan"), "nan"),
        ("rho", float("inf"), "inf"),
        ("alpha", float("nan"), "nan"),
        ("rho", "0.05", "'0.05'"),
        ("alpha", "0.2", "'0.2'"),
        ("alpha", None, "None"),
        ("rho", True, "True"),
    ],
)
def test_a_factor_that_is_not_a_finite_number_is_refused(name: str, value: object, shown: str):
    """NaN passed the ``< 0`` checks, and one step made every weight NaN; a string ("0.05"
    from a config file) or None failed as a bare TypeError naming neither. The refusal is one
    sentence (a UserError, as the engine's) and still the ValueError torch's optimizers raise."""
    model = mlp()
    expected = f"^`{name}` must be a finite non-negative number, not {re.escape(shown)}\\.$"
    for kind in (UserError, ValueError):
        with pytest.raises(kind, match=expected):
            EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, **{name: value})
    if name == "rho":
        with pytest.raises(UserError, match=expected):
            SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=value)


def test_the_state_holds_slices_of_the_one_copy_of_v_a_step_uses() -> None:
    """v was held twice (the state's per-parameter copies and a flat copy for the steps), and
    the flat copy outlived a cleared state: steps leaned along a v no state_dict saved."""
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
    flat = opt.eigenvector
    storage = flat.untyped_storage().data_ptr()
    for p in model.parameters():
        assert opt.state[p]["eigenvector"].untyped_storage().data_ptr() == storage
    restored = EigenSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(restored.eigenvector, flat)
    storage = restored.eigenvector.untyped_storage().data_ptr()
    assert all(
        s["eigenvector"].untyped_storage().data_ptr() == storage for s in restored.state.values()
    )
    opt.state.clear()
    assert opt.eigenvector is None


def test_alpha_is_saved_and_loaded_like_rho() -> None:
    """rho travels in the param groups; alpha was not saved, so a resume into an optimizer built
    with another alpha went on with that one, silently."""
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, alpha=0.3)
    other = EigenSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, rho=0.05, alpha=0.2)
    other.load_state_dict(opt.state_dict())
    assert (other.alpha, other.param_groups[0]["rho"]) == (0.3, 0.1)
    older = opt.state_dict()
    del older["eigensam"]["alpha"]  # a checkpoint from before: the constructor's stays
    other = EigenSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, alpha=0.2)
    other.load_state_dict(older)
    assert other.alpha == 0.2


def test_a_parameter_whose_shape_changed_under_its_eigenvector_is_one_sentence() -> None:
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
    model[2].bias.data = torch.zeros(4, dtype=DT)  # network surgery (the engine said "mat1")
    with pytest.raises(ValueError, match=r"shape \(3,\) does not fit its shape \(4,\) now"):
        _ = opt.eigenvector


def test_a_refresh_inside_no_grad_is_the_same_refresh() -> None:
    """An optimizer's code runs under no_grad: the refresh's products need autograd anyway."""
    x, y = data()[0]
    found = []
    for no_grad in (False, True):
        model = mlp()
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            found.append(opt.refresh_eigenvector(model, F.cross_entropy, (x, y), seed=0))
    assert found[0].eigenvalue == found[1].eigenvalue
    assert torch.equal(found[0].vector, found[1].vector)


def test_a_refresh_with_a_sparse_embedding_is_that_of_the_dense_one() -> None:
    """nn.Embedding(sparse=True) gives sparse first and second derivatives: the refresh raised
    "reshape is not implemented for sparse tensors" (plain SAM steps worked)."""
    tokens, y = torch.randint(0, 10, (16, 3), generator=torch.Generator().manual_seed(0)), None
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    found = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 3))
        model = model.to(DT)
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        found.append(opt.refresh_eigenvector(model, F.cross_entropy, (tokens, y), seed=0))
    assert found[1].eigenvalue == pytest.approx(found[0].eigenvalue, rel=1e-12)
    assert float((found[0].vector @ found[1].vector).abs()) == pytest.approx(1.0, abs=1e-10)


def test_a_refresh_over_parameters_of_mixed_dtypes() -> None:
    """A float64 layer after a float32 one: the refresh's product raised "dot : expected both
    vectors to have same dtype"; its eigenvalue is the all-float64 model's to float32 rounding."""
    x, y = data(torch.float32)[0]
    torch.manual_seed(0)
    first, head = nn.Linear(6, 16), nn.Linear(16, 3).to(DT)
    mixed = nn.Sequential(first, nn.Tanh(), _Cast(DT), head)
    wide = nn.Sequential(copy.deepcopy(first).to(DT), nn.Tanh(), copy.deepcopy(head))
    values = []
    for model, inputs in ((mixed, x), (wide, x.to(DT))):
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        result = opt.refresh_eigenvector(
            model, F.cross_entropy, (inputs, y), seed=0, max_hvps=40, tol=1e-6
        )
        values.append(result.eigenvalue)
    assert values[0] == pytest.approx(values[1], rel=1e-5)


class _Cast(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def test_a_refresh_on_a_batch_that_is_not_inputs_and_targets_is_one_sentence() -> None:
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    with pytest.raises(UserError, match=r"must be \(inputs, targets\).* not \(list, Tensor\)"):
        opt.refresh_eigenvector(model, F.cross_entropy, ([x.tolist()], y))
    with pytest.raises(UserError, match=r"must be \(inputs, targets\).* not a torch.Tensor"):
        HessianOperator(model, F.cross_entropy, x)  # a tensor, not a list of batches
    with pytest.raises(
        UserError, match=r"not a torch.Tensor: pass a list of batches, \[\(x, y\)\]"
    ):
        HessianOperator(model, F.cross_entropy, (x, y))  # the pair itself


def scaled_sam_step(opt: SAM, model: nn.Module, x, y, scaler: torch.amp.GradScaler) -> None:
    """One SAM step as the README's recipe takes it with a GradScaler."""
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@BEFORE_REFRESH
@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_a_grad_scaler_steps_with_unscaled_gradients(cls: type[SAM]) -> None:
    """``scaler.step(opt)`` after the second scaled backward is the step of an unscaled loop
    (a power-of-two scale is exact), an overflow goes back to ``w`` without a step, and a
    closure, whose gradients GradScaler cannot unscale, is refused."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05)
    plain, scaled = mlp(torch.float32), mlp(torch.float32)
    opt = cls(plain.parameters(), torch.optim.SGD, **kw)
    opt_s = cls(scaled.parameters(), torch.optim.SGD, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(data(torch.float32, steps=4)):
        if cls is EigenSAM and i == 1:
            opt.refresh_eigenvector(plain, F.cross_entropy, (x, y), seed=0)
            opt_s.refresh_eigenvector(scaled, F.cross_entropy, (x, y), seed=0)
        sam_step(opt, plain, x, y)
        scaled_sam_step(opt_s, scaled, x, y, scaler)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)

    before = [p.detach().clone() for p in scaled.parameters()]
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    opt_s.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    next(scaled.parameters()).grad[0, 0] = float("inf")  # an overflow in the second pass
    scaler.step(opt_s)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for p, w in zip(scaled.parameters(), before, strict=True):
        assert torch.equal(p, w)

    def closure() -> torch.Tensor:
        opt_s.zero_grad()
        loss = F.cross_entropy(scaled(x), y)
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(RuntimeError, match="GradScaler.*without a closure"):
        scaler.step(opt_s, closure)
    for p, w in zip(scaled.parameters(), before, strict=True):
        assert torch.equal(p, w)
    assert opt_s.step(closure) is not None  # without the scaler, a plain step again


def test_a_refresh_inside_autocast_is_the_full_precision_refresh() -> None:
    """A mixed-precision loop that calls the refresh inside its autocast block gets the Hessian
    of the model in its own dtype (it failed to store a bfloat16 vector)."""
    model = mlp(torch.float32)
    x, y = data(torch.float32)[0]
    results = []
    for autocast in (False, True):
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            result = opt.refresh_eigenvector(model, F.cross_entropy, (x, y), seed=0)
        assert opt.eigenvector.dtype == torch.float32
        results.append(result)
    assert results[0].eigenvalue == results[1].eigenvalue
    assert torch.equal(results[0].vector, results[1].vector)


def test_a_parameter_frozen_after_a_refresh_is_not_perturbed() -> None:
    """A layer frozen mid-training whose gradient was zeroed, not set to None, stays put at
    ``w + e`` as it does for SAM, though the eigenvector of an earlier refresh leans on it."""
    model = mlp()
    opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, alpha=0.5)
    x, y = data()[0]
    F.cross_entropy(model(x), y).backward()
    opt.refresh_eigenvector(model, F.cross_entropy, (x, y))
    assert all(bool(opt.state[p]["eigenvector"].any()) for p in model[0].parameters())
    model[0].requires_grad_(False)
    opt.zero_grad(set_to_none=False)  # the frozen layer keeps a zero gradient
    F.cross_entropy(model(x), y).backward()
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt.first_step()
    for p, w in zip(model[0].parameters(), frozen, strict=True):
        assert torch.equal(p, w)
    assert not torch.equal(model[2].weight, opt.state[model[2].weight]["old_p"])


def test_an_alpha_in_a_parameter_group_is_refused_not_ignored() -> None:
    model = mlp()
    first, *rest = model.parameters()
    with pytest.raises(ValueError, match="alpha is one for all parameter groups"):
        EigenSAM([{"params": [first], "alpha": 0.0}, {"params": rest}], torch.optim.SGD, lr=0.1)
    opt = EigenSAM([first], torch.optim.SGD, lr=0.1, alpha=0.2)
    with pytest.raises(ValueError, match="alpha is one for all parameter groups"):
        opt.add_param_group({"params": rest, "alpha": 0.5})


@BEFORE_REFRESH
@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_a_disabled_grad_scaler_steps_as_an_unscaled_loop(cls: type[SAM]) -> None:
    """``GradScaler(enabled=False)`` (a loop with mixed precision switched off) calls
    ``opt.step()`` itself: after ``first_step`` that is the second step (it was refused as
    'SAM needs a closure')."""
    kw = dict(lr=0.1, momentum=0.9, rho=0.05)
    plain, scaled = mlp(torch.float32), mlp(torch.float32)
    opt = cls(plain.parameters(), torch.optim.SGD, **kw)
    opt_s = cls(scaled.parameters(), torch.optim.SGD, **kw)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in data(torch.float32, steps=2):
        sam_step(opt, plain, x, y)
        scaled_sam_step(opt_s, scaled, x, y, scaler)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="SAM needs a closure"):
        opt_s.step()  # not perturbed: still a closure's step


def test_an_alpha_in_a_parameter_group_of_a_base_that_takes_one_is_the_base_s() -> None:
    """RMSprop's alpha (its smoothing constant) given per group is RMSprop's, which honours it:
    it was refused as Eigen-SAM's."""
    model = mlp()
    first, *rest = model.parameters()
    opt = EigenSAM(
        [{"params": [first], "alpha": 0.9}, {"params": rest}], torch.optim.RMSprop, lr=0.01
    )
    assert [g["alpha"] for g in opt.base_optimizer.param_groups] == [0.9, 0.99]
    assert opt.alpha == 0.2
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "alpha": 0.5})
    assert opt.base_optimizer.param_groups[-1]["alpha"] == 0.5


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_a_base_optimizer_built_already_is_refused_in_one_sentence(cls: type[SAM]) -> None:
    """Some SAM implementations take the base optimizer built; this one builds it (davda54's
    way), and an SGD instance failed with "'SGD' object is not callable"."""
    model = nn.Linear(3, 1)
    built = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError,
        match=r"^base_optimizer must be an optimizer class, such as "
        r"torch\.optim\.SGD, .* not an instance of SGD\.$",
    ):
        cls(model.parameters(), built, lr=0.1)


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_a_closure_without_backward_is_said_to_be_the_closure_s_fault(cls: type[SAM]) -> None:
    """step(closure) said "first_step found no gradients: run backward before it", of a
    first_step the user never called, for a closure that only computed the loss."""
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="^the closure left no gradients: it must call backward"):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_parameter_groups_of_their_own_lr_and_rho_take_the_hand_computed_step(
    cls: type[SAM],
) -> None:
    """davda54's SAM takes per-group lr and rho: one global ||g||, each group's e its rho, each
    group's step its lr; Eigen-SAM's d (given v) over all groups alike."""
    model, (x, y) = mlp(), data()[0]
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    groups = [
        {"params": params[:2], "lr": 0.1, "rho": 0.05},
        {"params": params[2:], "lr": 0.3, "rho": 0.2},
    ]
    opt = cls(groups, torch.optim.SGD, lr=1.0, rho=1.0)
    w = [p.detach().clone() for p in params]
    v = torch.randn(sum(p.numel() for p in params), dtype=DT, generator=torch.Generator())
    v = v / v.norm()
    alpha = 0.0
    if isinstance(opt, EigenSAM):
        opt.set_eigenvector(v, 1.0)
        alpha = opt.alpha

    def grads(at: list[torch.Tensor]) -> list[torch.Tensor]:
        at = [t.clone().requires_grad_() for t in at]
        out = torch.func.functional_call(model, dict(zip(names, at, strict=True)), (x,))
        return list(torch.autograd.grad(F.cross_entropy(out, y), at))

    g = torch.cat([t.reshape(-1) for t in grads(w)])
    g_hat = g / g.norm()
    d = g_hat + alpha * torch.sign(g @ v) * (v - (g_hat @ v) * g_hat)
    rhos = [0.05, 0.05, 0.2, 0.2]
    lrs = [0.1, 0.1, 0.3, 0.3]
    d_parts = d.split([t.numel() for t in w])
    perturbed = [t + r * dp.view_as(t) for t, r, dp in zip(w, rhos, d_parts, strict=True)]
    expected = [t - lr * g2 for t, lr, g2 in zip(w, lrs, grads(perturbed), strict=True)]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
