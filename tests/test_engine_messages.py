"""The engine's refusals as their readers see them: after the CLI's "error: " (and a series'
"file.pt: ") a sentence goes on in lower case, as the CLI's own do ("--top-k must be ...")."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import one_sentence, run
from torch import nn

from hessian_cli.engine import (
    HessianOperator,
    MatrixOperator,
    alignment_scores,
    dense_hessian,
    eigenpairs,
    spectral_density,
)
from hessian_cli.engine.trace import stochastic_trace
from hessian_cli.errors import UserError
from hessian_cli.specs import build_model, load_data, save_checkpoint


def _first_word(message: str) -> str:
    return message.removeprefix("error: ").split()[0]


def _checkpoint(path: Path, *, broken: bool = False) -> Path:
    """A self-describing checkpoint of a small digits MLP (its weights NaN where ``broken``)."""
    data = load_data("digits")
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs={"hidden": [4]})
    state = {
        k: torch.full_like(v, float("nan")) if broken else v for k, v in model.state_dict().items()
    }
    meta = {
        "model": "mlp",
        "model_kwargs": json.dumps({"hidden": [4]}),
        "data": "digits",
        "loss": "ce",
    }
    save_checkpoint(path, state_dict=state, metadata=meta)
    return path


def test_engine_refusals_through_analyze_go_on_in_lower_case(capsys, tmp_path):
    """They read "error: The model has no trainable parameters ...", "error: Cannot compute
    ...", "error: Unknown device ...", "error: The loss is not finite ..."."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    nan = _checkpoint(tmp_path / "nan.pt", broken=True)
    for args in (
        (ckpt, "--params", "nomatch*"),
        (ckpt, "--params", "3.bias", "--top-k", "12"),
        (ckpt, "--params", "3.bias", "--which", "both", "--top-k", "6"),
        (ckpt, "--device", "tpu"),
        (nan,),
    ):
        code, _, err = run(capsys, "analyze", *args, "--num-samples", "16")
        first = _first_word(one_sentence(err))
        assert code == 2 and first[0].islower(), (args, err)


def _library_refusals() -> list[Callable[[], object]]:
    """Library calls the CLI's own checks never let through, one per kind of refusal."""
    mat = MatrixOperator(torch.diag(torch.arange(1.0, 7.0)))
    model, loss = nn.Linear(3, 1), nn.MSELoss()
    batches = [(torch.randn(4, 3), torch.randn(4, 1))]
    return [
        lambda: eigenpairs(mat, 2, which="middle"),  # type: ignore[arg-type]
        lambda: eigenpairs(mat, 2, criterion="bound"),  # type: ignore[arg-type]
        lambda: eigenpairs(mat, 2, init=torch.ones(5)),
        lambda: eigenpairs(mat, 2, hint=torch.ones(5)),
        lambda: eigenpairs(mat, 7),
        lambda: eigenpairs(MatrixOperator(torch.eye(1)), 1, which="both"),
        lambda: stochastic_trace(mat, num_probes=1),
        lambda: stochastic_trace(mat, method="exact"),  # type: ignore[arg-type]
        lambda: spectral_density(mat, sigma=-1.0),
        lambda: spectral_density(mat, num_probes=0),
        lambda: HessianOperator(model, loss, batches, bn="batch"),
        lambda: HessianOperator(model, loss, batches, backend="jax"),
        lambda: HessianOperator(model, loss, [(torch.randn(4, 3), torch.tensor(1.0))]),
        lambda: HessianOperator(model, lambda out, y: (out - y) ** 2, batches).matmul(
            torch.ones(4)
        ),
        lambda: HessianOperator(model, loss, batches, params=["nomatch*"]),
    ]


@pytest.mark.parametrize("call", range(len(_library_refusals())))
def test_engine_refusals_in_the_library_go_on_in_lower_case(call):
    """A library caller meets the same sentence the CLI prints after "error: "."""
    with pytest.raises(UserError) as info:
        _library_refusals()[call]()
    first = _first_word(str(info.value))
    assert first[0].islower() or first.startswith("`"), str(info.value)


def test_a_missing_cuda_device_is_named_as_each_reader_gave_it(monkeypatch):
    """The library said "--device cuda asks for CUDA", a flag its caller never typed; the
    command line still reads its flag."""
    from hessian_cli.cli.options import in_flags
    from hessian_cli.engine import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        devices.resolve_device("CUDA:1")
    said = "asks for CUDA, but no CUDA device is available."
    assert str(info.value) == f"`device=CUDA:1` {said}"
    assert in_flags(str(info.value)) == f"--device CUDA:1 {said}"
    # A torchrun rank without a GPU of its own: use --device cpu, or device="cpu".
    monkeypatch.setattr(devices, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError) as info:
        devices.resolve_device("cuda")
    assert str(info.value).endswith("or use `device=cpu`.")
    assert in_flags(str(info.value)).endswith("or use --device cpu.")


@pytest.mark.parametrize("name", ["cudax", "cuda:", "cuda:-1", "cuda:1.5"])
def test_a_cuda_device_torch_cannot_read_is_unknown(monkeypatch, name):
    """With a GPU they failed in torch.device ("Invalid device string", a RuntimeError);
    without one they were said to ask for CUDA."""
    from hessian_cli.engine import devices

    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        with pytest.raises(UserError, match=f"^unknown device '{name}': use auto, cpu, cuda or"):
            devices.resolve_device(name)


def test_a_gpu_the_machine_lacks_is_refused_by_its_index(monkeypatch):
    """cuda:1 on a machine of one GPU was taken, and the first tensor moved failed in torch's
    words ("invalid device ordinal"); cuda:0 and cuda are that GPU."""
    from hessian_cli.engine import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"^`device=CUDA:1` names GPU 1, but this machine has 1 "):
        devices.resolve_device("CUDA:1")
    assert devices.resolve_device("cuda:0") == torch.device("cuda:0")
    assert devices.resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("which", ["largest", "both"])
@pytest.mark.parametrize(("value", "said"), [(True, "a bool"), ("yes", "a str")])
def test_a_progress_that_is_no_function_is_refused_before_any_product(which, value, said):
    """progress=True failed after the first block's products ("'bool' object is not
    callable"); a function is told of the solve, whose eigenvalues are eigh's."""
    H = torch.diag(torch.arange(1.0, 13.0, dtype=torch.float64))
    mat = MatrixOperator(H)
    with pytest.raises(UserError, match=f"^`progress` must be None or a function .*not {said}"):
        eigenpairs(mat, 2, which=which, progress=value)
    assert mat.hvp_count == 0
    told: list[tuple[int, int, int]] = []
    result = eigenpairs(mat, 2, which=which, progress=lambda *report: told.append(report))
    ends = torch.linalg.eigvalsh(H)
    expected = ends[-2:] if which == "largest" else torch.cat([ends[-2:], ends[:2]])
    torch.testing.assert_close(result.eigenvalues.sort().values, expected.sort().values)
    assert told and told[-1][2] == len(expected)


def _mlp_operator() -> HessianOperator:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    return HessianOperator(model, nn.functional.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"op": MatrixOperator(torch.eye(26))}, "a HessianOperator .* not a hessian_cli.Matrix"),
        ({"eigenvectors": "numpy"}, r"the eigenvectors as a tensor, \[k, 26\], not a numpy.ndarr"),
        ({"eigenvalues": "0-d"}, "one eigenvector per eigenvalue, at least one"),
        ({"gradient": "tensor"}, r"the gradient .* entries\), not a float64 tensor of shape"),
        ({"gradient": "short"}, r"the gradient .* not \(a float, a float64 tensor of shape \(5,"),
        (
            {"minibatch_op": "layer"},
            "a minibatch_op of the same 26 parameters as op, not one of 16",
        ),
    ],
    ids=["matrix", "numpy", "0-d", "bare-gradient", "short-gradient", "other-minibatch-op"],
)
def test_alignment_scores_refuse_what_they_cannot_be_taken_with_before_any_work(change, said):
    """A MatrixOperator failed in an AttributeError ('gradient'), numpy eigenvectors in torch's
    promote_types, a 0-d eigenvalue in len(), a bare gradient in unpacking, a short one and a
    minibatch_op of other parameters in a matrix product; the scores are |<g_hat, v_i>| of the
    dense Hessian's eigenvectors and the autograd gradient."""
    op = _mlp_operator()
    top = eigenpairs(op, 2, tol=1e-10)
    args = {
        "op": op,
        "eigenvalues": top.eigenvalues,
        "eigenvectors": top.eigenvectors,
        "gradient": None,
        "minibatch_op": None,
    }
    stand_ins = {
        "numpy": top.eigenvectors.numpy(),
        "0-d": top.eigenvalues[0],
        "tensor": torch.zeros(26, dtype=torch.float64),
        "short": (1.0, torch.ones(5, dtype=torch.float64)),
        "layer": HessianOperator(op.model, op.loss_fn, op.batches, params="0.*"),
    }
    given = args | {k: stand_ins.get(v, v) for k, v in change.items()}
    op.hvp_count = 0
    with pytest.raises(UserError, match=f"^alignment_scores takes {said}"):
        alignment_scores(**given)
    assert op.hvp_count == 0
    scores = alignment_scores(op, top.eigenvalues, top.eigenvectors)
    flat = op.space.values().requires_grad_()
    params = dict(zip(op.space.names, op.space.unflatten(flat), strict=True))
    loss = sum(
        w * nn.functional.cross_entropy(torch.func.functional_call(op.model, params, (x,)), y)
        for w, (x, y) in zip(op.weights, op.batches, strict=True)
    )
    (g,) = torch.autograd.grad(loss, flat)
    vectors = torch.linalg.eigh(dense_hessian(op.model, op.loss_fn, op.batches))[1][:, -2:].flip(1)
    expected = (vectors.T @ (g / g.norm())).abs()
    torch.testing.assert_close(scores.alignment, expected, rtol=1e-6, atol=1e-8)


def test_alignment_scores_take_an_eigen_result_as_the_trace_takes_known():
    """alignment_scores(op, top) failed in a TypeError (a missing argument); it scores top's
    pairs, as given apart, and the eigenvalues alone or both forms at once are one sentence."""
    op = _mlp_operator()
    top = eigenpairs(op, 2, tol=1e-10)
    whole = alignment_scores(op, top)
    apart = alignment_scores(op, top.eigenvalues, top.eigenvectors)
    torch.testing.assert_close(whole.alignment, apart.alignment, rtol=0, atol=0)
    assert whole.curvature_ratio == apart.curvature_ratio
    with pytest.raises(UserError, match="^alignment_scores takes an EigenResult or .* not both"):
        alignment_scores(op, top, top.eigenvectors)
    with pytest.raises(UserError, match="^alignment_scores takes the eigenvectors beside"):
        alignment_scores(op, top.eigenvalues)
    with pytest.raises(UserError, match="these are in another order"):
        alignment_scores(op, eigenpairs(op, 2, which="both"))


@pytest.mark.parametrize("seed", [np.int64(3), np.int32(7), np.uint64(2**63 + 5)])
def test_a_numpy_integer_seed_is_the_int_it_holds(seed):
    """rng.integers(100) was refused as no integer ("not np.int64(3)"): each solver draws what
    the int draws, and the eigenvalues are eigh's."""
    H = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    same = int(seed)
    trace = stochastic_trace(MatrixOperator(H), num_probes=9, seed=seed)
    assert trace.estimate == stochastic_trace(MatrixOperator(H), num_probes=9, seed=same).estimate
    density = spectral_density(MatrixOperator(H), seed=seed)
    assert torch.equal(density.values, spectral_density(MatrixOperator(H), seed=same).values)
    ends = eigenpairs(MatrixOperator(H), 2, which="both", seed=seed)
    assert ends.hvps == eigenpairs(MatrixOperator(H), 2, which="both", seed=same).hvps
    values = torch.linalg.eigvalsh(H)
    expected = torch.cat([values[-2:].flip(0), values[:2]])
    torch.testing.assert_close(ends.eigenvalues, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("spoil", ["zero-vector", "nan-vector", "inf-value"])
def test_alignment_scores_of_a_zero_or_nan_pair_are_refused_not_nan(spoil):
    """A zero eigenvector (or a NaN one, or an infinite eigenvalue) gave scores of NaN, said of
    no input, and with v_1 every score; vectors of any length score as unit ones."""
    op = _mlp_operator()
    top = eigenpairs(op, 2, tol=1e-10)
    values, vectors = top.eigenvalues.clone(), top.eigenvectors.clone()
    if spoil == "inf-value":
        values[0] = math.inf
    else:
        vectors[1] = 0.0 if spoil == "zero-vector" else math.nan
    op.hvp_count = 0
    with pytest.raises(UserError, match="^alignment_scores takes finite eigenvalues and eigenv"):
        alignment_scores(op, values, vectors)
    assert op.hvp_count == 0
    longer = alignment_scores(op, top.eigenvalues, 3.0 * top.eigenvectors)
    torch.testing.assert_close(longer.alignment, alignment_scores(op, top).alignment)


def test_a_density_smoothing_width_of_true_is_refused_not_taken_for_1():
    """sigma=True drew the density at a width of 1, unsaid (bool is a numbers.Real). A width
    given is the one drawn: of a diagonal, every Rademacher probe weighs each eigenvalue 1/n,
    so the density is the mean of Gaussians of that width at eigh's eigenvalues."""
    H = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    with pytest.raises(UserError, match="^the density's smoothing width must be a positive .*True"):
        spectral_density(MatrixOperator(H), sigma=True)
    density = spectral_density(MatrixOperator(H), sigma=0.5, steps=20)
    assert density.sigma == 0.5
    values = torch.linalg.eigvalsh(H)
    gauss = torch.exp(-0.5 * ((density.grid[:, None] - values) / 0.5) ** 2) / (
        0.5 * math.sqrt(2 * math.pi)
    )
    torch.testing.assert_close(density.values, gauss.mean(1), rtol=1e-6, atol=1e-9)
