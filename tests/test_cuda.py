"""The CUDA paths against float64 CPU references; skipped where there is no CUDA device.

Each path here has a CPU test of the same logic: ``func`` blocks and double backward in
test_engine_operator.py, reduced precision in test_engine_precision.py.
"""

import copy
import time

import pytest
import torch
from tiny_models import cases

from hessian_cli.engine import eigensolver, solver_plan
from hessian_cli.engine.dense import dense_hessian
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linear_operator import DiagonalOperator
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.probes import probe_generator
from hessian_cli.engine.trace import stochastic_trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = {c.name: c for c in cases()}


def _on_cuda(case, dtype):
    low = case.to(dtype)
    model = low.model.cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in low.batches]
    return model, batches


def _dense(case):
    space = HessianOperator(case.model, case.loss, case.batches).space
    return dense_hessian(case.model, case.loss, case.batches, space)


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-bn", "frozen-unused"])
def test_auto_backend_on_cuda_matches_dense_hessian(name):
    case = CASES[name]
    H = _dense(case)
    model, batches = _on_cuda(case, torch.float64)
    op = HessianOperator(model, case.loss, batches)
    V = torch.randn(8, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block = op.matmul(V.cuda()).cpu()  # a block of FUNC_MIN_BLOCK: torch.func on CUDA
    single = torch.stack([op.matmul(v.cuda()).cpu() for v in V])  # single: double backward
    small = op.matmul(V[:4].cuda()).cpu()  # a small block: one batched double backward
    torch.testing.assert_close(block, V @ H, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(small, V[:4] @ H, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(single, V @ H, rtol=1e-9, atol=1e-9)
    assert op.backends_used == {"func", "double-backward"}


def test_float32_eigenpairs_on_cuda_are_full_precision(monkeypatch):
    case = CASES["cnn-bn"]
    H = _dense(case)
    values = torch.linalg.eigvalsh(H).flip(0)
    model, batches = _on_cuda(case, torch.float32)
    # PyTorch's default, set by a legacy user: "full" must switch it off (put back after).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    res = eigenpairs(HessianOperator(model, case.loss, batches), 3, tol=1e-4)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, values[:3], rtol=0, atol=1e-4 * values[0])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_on_cuda_reports_its_error(precision):
    case = CASES["cnn-bn"]
    model, batches = _on_cuda(case, torch.float32)
    op = HessianOperator(model, case.loss, batches, precision=precision)
    err = op.precision_error()
    assert 0 <= err < 0.1
    res = eigenpairs(op, 2, tol=5e-2)
    full = HessianOperator(model, case.loss, batches)
    HV = full.matmul(res.eigenvectors)
    resid = (HV - res.eigenvalues[:, None].float().cuda() * res.eigenvectors).norm(dim=1)
    torch.testing.assert_close(
        res.residuals, resid.double().cpu() / res.scale, rtol=1e-3, atol=1e-6
    )


def test_probes_are_drawn_on_the_gpu_and_reproducible():
    case = CASES["cnn-bn"]
    model, batches = _on_cuda(case, torch.float32)
    op = HessianOperator(model, case.loss, batches)
    gen = probe_generator(op, 3)
    assert gen.device.type == "cuda"
    first = stochastic_trace(op, 12, seed=3).estimate
    assert stochastic_trace(op, 12, seed=3).estimate == first


def test_a_small_copy_to_the_device_does_not_wait_for_its_queued_work():
    """linalg.to_device copies an iteration's few host numbers without waiting for the kernels
    queued before it (a blocking copy synchronises the stream, as a read does): behind a queue
    of matrix products, it returns in a fraction of their time, and the values arrive."""
    from hessian_cli.engine.linalg import to_device

    a = torch.randn(4096, 4096, device="cuda")
    small = torch.randn(20, 20, dtype=torch.float64)
    to_device(small, a)
    torch.cuda.synchronize()

    def queued(copy) -> tuple[float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ a
        end.record()
        t0 = time.perf_counter()
        moved = copy()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        assert torch.equal(moved.cpu(), small.float())
        return host, start.elapsed_time(end) / 1e3

    host, queue = queued(lambda: to_device(small, a))
    assert host < 0.25 * queue, (host, queue)
    blocking, queue = queued(lambda: small.to(a.dtype).to(a.device))
    assert blocking > 0.5 * queue, (blocking, queue)  # the wait it spares, measurable here


def test_the_krylov_basis_is_the_solvers_peak_memory(monkeypatch):
    """Basis and products fill two buffers in place: the peak stays near the amount that
    `eigenpairs` checks against the free memory, where concatenating them held two copies."""
    checked = {}
    check = eigensolver.check_memory

    def spy(op, k, capacity, w, whole, rows=0):
        need = solver_plan._memory_need(op, capacity, w, whole, rows)
        checked.update(capacity=capacity, need=need)
        check(op, k, capacity, w, whole, rows)

    monkeypatch.setattr(eigensolver, "check_memory", spy)
    op = DiagonalOperator(torch.linspace(0, 1, 2_000_000, device="cuda") ** 8)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = eigenpairs(op, 10, tol=1e-9, max_hvps=120)
    assert res.hvps > checked["capacity"]  # the basis was restarted at least once
    assert torch.cuda.max_memory_allocated() - base <= 1.15 * checked["need"]


def test_graph_bytes_agrees_with_the_cuda_allocator():
    """The CPU's measure of a first-order graph (its saved tensors) against CUDA's allocator,
    which is what the budget for kept graphs uses there."""
    from hessian_cli.engine.memory import graph_bytes

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 32 * 32, 10),
    ).cuda()
    model.eval()
    before = torch.cuda.memory_allocated()
    x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.arange(64, device="cuda") % 10
    loss = torch.nn.functional.cross_entropy(model(x), y)
    parts = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    g = torch.cat([p.reshape(-1) for p in parts])
    del parts
    held = torch.cuda.memory_allocated() - before
    # The graph also saves the weights, which were allocated before: graph_bytes sees them too
    # (on the CPU 1.4 of this graph's 26 MiB).
    weights = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()))
    assert 0.75 * (held + weights) <= graph_bytes(loss, g) <= 1.1 * (held + weights)


def test_train_and_analyze_commands_run_on_cuda(tmp_path, device="cuda"):
    """The commands end to end: the checks before the work run the model on its device (two
    samples on the CPU against a model on CUDA failed as "does not fit"), and the answers
    agree with the CPU's."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    import hessian_cli.cli.commands  # noqa: F401  (registers the commands)
    from hessian_cli.cli.app import app

    runner, run = CliRunner(), tmp_path / "run"
    trained = runner.invoke(
        app,
        ["train", "--model", "mlp", "--data", "digits", "--optimizer", "eigensam"]
        + ["--epochs", "1", "--eig-every", "10", "--device", device, "--out", str(run)],
    )
    assert trained.exit_code == 0, trained.output
    # Its tensors on the CPU, so that a plain torch.load reads it where there is no GPU.
    saved = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    moments = saved["optimizer"]["base_state"][0]["momentum_buffer"]
    tensors = [*saved["model"].values(), saved["optimizer"]["state"][0]["eigenvector"], moments]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    results = {}
    for where in ("cpu", device):
        analysed = runner.invoke(
            app,
            ["analyze", str(run / "checkpoints" / "final.pt"), "--device", where, "--json"]
            + [
                "--top-k",
                "3",
                "--dtype",
                "float64",
                "--tol",
                "1e-8",
                "--alignment",
            ],
        )
        assert analysed.exit_code == 0, analysed.output
        results[where] = json.loads(analysed.stdout)
    np.testing.assert_allclose(
        results[device]["eigen"]["eigenvalues"], results["cpu"]["eigen"]["eigenvalues"], rtol=1e-6
    )


def test_a_sam_step_over_a_model_split_between_cpu_and_cuda():
    """SAM's flat gradient joined every parameter's with one torch.cat, which needs them on one
    device (a model split over devices, or layers offloaded to the CPU, failed)."""
    from eigensam import EigenSAM

    torch.manual_seed(0)
    first, head = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 3).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    v = torch.randn(sum(p.numel() for p in [*first.parameters(), *head.parameters()]))
    weights = []
    for split in (False, True):
        a, b = (m for m in (copy.deepcopy(first), copy.deepcopy(head)))
        if split:
            b.cuda()
        opt = EigenSAM([*a.parameters(), *b.parameters()], torch.optim.SGD, lr=0.1, alpha=0.3)
        opt.set_eigenvector(v, 1.0)

        def loss(a=a, b=b, split=split):
            hidden = torch.tanh(a(x))
            out = b(hidden.cuda() if split else hidden)
            return torch.nn.functional.cross_entropy(out, y.to(out.device))

        loss().backward()
        opt.first_step(zero_grad=True)
        loss().backward()
        opt.second_step()
        weights.append([p.detach().cpu() for p in [*a.parameters(), *b.parameters()]])
    for cpu_only, split in zip(*weights, strict=True):
        torch.testing.assert_close(split, cpu_only, rtol=1e-12, atol=1e-14)
