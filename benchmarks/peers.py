"""Side-by-side benchmark: this engine against PyHessian and hessian-eigenthings, in one process.

One model and one device for every case:

1. the cost of one HVP per vector by backend x block x precision, in gradient-equivalents (wall
   time / one gradient's on the same batch), with the relative error of reduced-precision
   products against float32 ones on the same vectors;
2. top-1 and top-k eigenvalues against a tight reference (``--reference float64``: a float64
   copy, every residual <= 1e-8; ``float32``: residuals <= 1e-6; residuals from fresh products,
   from a start no measured run uses), vs PyHessian's ``eigenvalues(top_n)`` and
   hessian-eigenthings' ``lanczos``, each from ``--seeds`` random starts (their mean time is
   what the ratios compare); ours with the engine's defaults (as many starts), and from one
   start as ``analyze`` runs it (:data:`ANALYZE_VARIANTS`: the gradient hints the start, and
   with ``--criterion eigenvalue`` it stops when every eigenvalue is within ``--tol``);
   case ``many`` (run last): ``--many-k`` eigenpairs (default 50), our blocks against
   hessian-eigenthings' Lanczos with 2k and 4k steps;
3. trace (Hutchinson and Hutch++) with as many probes as PyHessian's ``trace(tol=0)``;
4. spectral density (SLQ) with hessian-eigenthings' probes x steps (and PyHessian's ``density``,
   which fails on current torch: its failure goes in the note);
5. top-1 over ``--batches`` batches (dataloader mode), against a float32 reference over all
   batches (residual <= 1e-5, fresh product, its own start);
6. ours in reduced precision (tf32, bf16): eigenvalue errors, float32 residuals, HVP error.

Then one table per kind (HVP costs; tasks with wall time, HVPs, gradient-equivalents and the
largest relative eigenvalue error) and one line per speed target. Each row, cost and ratio is
also printed as soon as it is measured (``# row:``, ``# cost:``), so that a run stopped at a time
limit keeps what it finished. A run that raises prints one line "case X failed: ..." and the rest
goes on.

Defaults: on CPU ResNet-20 with PyHessian's checkpoint (../shared/fixtures) and 4 batches of 128
inputs; on CUDA torchvision's ResNet-18 (10 classes, weights from seed 0; resnet18.py's copy
where torchvision does not import) and 16 batches of 256.
Inputs are CIFAR-shaped Gaussians with random labels (seed 0); the first batch is the data of
every single-batch case. float32 with TF32 off (matmul and cuDNN) for every tool.

    python benchmarks/peers.py                   # CPU defaults: ~30 minutes on 2 cores (RESULTS.md)
    python benchmarks/peers.py --quick           # every case at tiny sizes: a smoke test
    python benchmarks/peers.py --device cuda     # the GPU benchmark
    benchmarks/gpu.sh                            # the same with peers from .whl/, tee'd to a log
    DEVICE=cpu benchmarks/gpu.sh --quick         # smoke test of gpu.sh
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from arguments import (
    at_least,
    device,
    listed,
    run_main,
    tolerance,
)  # the script's directory is on sys.path
from torch import nn

from hessian_cli.engine.density import spectral_density
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.trace import stochastic_trace
from hessian_cli.specs import apply_weights, build_model, load_checkpoint

FIXTURE = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pyhessian_resnet20_cifar10.pkl"
)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Row:
    task: str
    tool: str
    seconds: float
    hvps: int | None
    error: float | None
    note: str = ""
    block: int | None = None  # our solver's block size


@dataclass
class Cost:
    backend: str
    block: int
    precision: str
    seconds: float  # per vector
    error: float | None = None  # relative to float32 products


@dataclass
class Ratio:
    case: str
    ours: Row | None
    peer: Row | None
    peer_name: str
    target: str
    speedup: bool  # report peer/ours ("x faster") instead of ours/peer


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    batches: list[Batch]
    grad_s: float = float("nan")
    ref: torch.Tensor | None = None  # reference top-k on the first batch
    costs: list[Cost] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    @property
    def batch(self) -> Batch:
        return self.batches[0]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def add(self, *rows: Row | None) -> None:
        """Keep ``rows`` for the final table and print each now, so that a run stopped at a time
        limit still leaves the rows it finished in its log."""
        for r in rows:
            if r is not None:
                self.rows.append(r)
                print("# row: " + " | ".join(row_cells(r, self.grad_s)), flush=True)

    def add_cost(self, c: Cost) -> None:
        self.costs.append(c)
        print("# cost: " + " | ".join(cost_cells(c, self.grad_s)), flush=True)

    def operator(self, batches: list[Batch] | None = None, **kw: Any) -> HessianOperator:
        return HessianOperator(self.model, F.cross_entropy, batches or [self.batch], **kw)


@dataclass
class Calls:
    n: int = 0


# --- helpers -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def attempt(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None after one line saying why it failed."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (one failing run must not stop the others)
        message = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"case {name} failed: {message[:300]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


@contextlib.contextmanager
def counting(owner: object, name: str) -> Iterator[Calls]:
    """Count the calls of ``owner.name`` (a module function, class method or bound method)."""
    calls, original = Calls(), getattr(owner, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        calls.n += 1
        return original(*a, **kw)

    setattr(owner, name, wrapper)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def rel_errors(found: list[float], ref: torch.Tensor | None) -> torch.Tensor | None:
    """Relative error of each value against the reference value of the same rank."""
    if ref is None:
        return None
    got = torch.tensor(found, dtype=torch.float64)
    return (got - ref[: len(got)]).abs() / ref[: len(got)].abs()


def within(err: torch.Tensor | None, k: int) -> str:
    return "no reference" if err is None else f"{int((err <= 1e-4).sum())}/{k} within 1e-4"


def max_error(err: torch.Tensor | None) -> float | None:
    return None if err is None else float(err.max())


def seeded(name: str, seeds: int, run: Callable[[int], Row]) -> list[Row | None]:
    """``run`` with seeds ``0 .. seeds-1``. With several, each row names its seed and a first row
    gives their mean time and HVPs and the worst error: the row a ratio uses, since one random
    start can be lucky or not (PyHessian's top-1 of the GPU case's ResNet-18 took 10 to 24 HVPs
    over five seeds, RESULTS.md)."""
    if seeds == 1:
        return [attempt(name, lambda: run(0))]
    rows = [attempt(f"{name} seed {s}", lambda s=s: run(s)) for s in range(seeds)]
    if any(r is None for r in rows):
        return [None, *rows]
    done: list[Row] = [r for r in rows if r is not None]
    errors = [r.error for r in done]
    mean = Row(
        done[0].task,
        f"{done[0].tool}, mean of seeds 0-{seeds - 1}",
        statistics.mean(r.seconds for r in done),
        None if done[0].hvps is None else round(statistics.mean(r.hvps or 0 for r in done)),
        None if None in errors else max(e for e in errors if e is not None),
        "HVPs " + " / ".join(str(r.hvps) for r in done),
        done[0].block,
    )
    for s, r in enumerate(done):
        r.tool += f", seed {s}"
    return [mean, *done]


def ours_blocks(
    name: str,
    blocks: tuple[int, ...],
    run: Callable[[int | None, int], Row],
    seeds: int = 1,
) -> list[Row | None]:
    """``run(block, seed)`` with the solver's default block size (over ``seeds`` seeds, see
    :func:`seeded`), then with each of ``blocks`` that differs from it (seed 0); the default's
    row for ratios (or None if it failed) comes first."""
    rows = seeded(f"{name} hessian-cli default block", seeds, lambda s: run(None, s))
    default = rows[0].block if rows[0] else None
    for block in dict.fromkeys(blocks):
        if block != default:
            rows.append(attempt(f"{name} hessian-cli block {block}", lambda bl=block: run(bl, 0)))
    return rows


def run_pyhessian(
    b: Bench, call: Callable[[Any], Any], *, dataloader: bool = False, seed: int = 0
) -> tuple[Any, float, int]:
    """``call`` on a fresh PyHessian of the benchmark's batch (or of all batches, as its
    dataloader mode), timed with the construction (where it builds its first-order graph):
    (result, seconds, HVPs). Seeds torch with ``seed`` first (PyHessian draws its random starts
    from torch's global stream), clears the graph PyHessian leaves in ``.grad``."""
    import pyhessian.hessian  # noqa: F401
    from pyhessian import hessian as PyHessian  # the package re-exports the class under this name

    if dataloader:  # each dataloader_hv_product call is one HVP over all batches
        owner, name, data = PyHessian, "dataloader_hv_product", {"dataloader": b.batches}
    else:
        owner, name = sys.modules["pyhessian.hessian"], "hessian_vector_product"
        data = {"data": b.batch}
    with counting(owner, name) as calls:
        torch.manual_seed(seed)
        out, secs = timed(
            lambda: call(PyHessian(b.model, F.cross_entropy, cuda=b.cuda, **data)), b.device
        )
    b.model.zero_grad(set_to_none=True)
    return out, secs, calls.n


def eigenthings_operator(b: Bench) -> Any:
    import hessian_eigenthings as he

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    return he.HessianOperator(b.model, [b.batch], loss)


# --- setup ---------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # PyHessian calls backward(create_graph=True); we reset .grad after each of its runs.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.manual_seed(0)
    model = build_model(args.model, input_shape=(3, 32, 32), num_classes=10)
    if args.checkpoint:
        apply_weights(model, load_checkpoint(args.checkpoint).state_dict)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (args.batch,), generator=g).to(device),
        )
        for _ in range(args.batches)
    ]
    return Bench(args, device, model.to(device).eval(), batches)


# The peers' distributions and the modules their rows import.
PEERS: dict[str, str] = {"PyHessian": "pyhessian", "hessian-eigenthings": "hessian_eigenthings"}


def version(distribution: str, module: str) -> str:
    """The peer's version, or, once in the header, why every row of it will fail: one installed
    can still fail to import (a missing dependency, a build for another torch)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (any import error: its rows fail, ours run)
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return f"does not import ({message[:200]}; its rows fail)"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def header(b: Bench) -> None:
    n = sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(b.device) if b.cuda else platform.processor() or "CPU"
    versions = ", ".join(f"{d} {version(d, module)}" for d, module in PEERS.items())
    weights = Path(b.args.checkpoint).name if b.args.checkpoint else "random weights, seed 0"
    print(
        f"# {b.args.model} ({weights}), {n:,} parameters, "
        f"{len(b.batches)} batches of {b.args.batch} inputs"
    )
    print(
        f"# device {b.device} ({name}), {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}, {versions}; float32, TF32 off"
    )


# --- case 1: HVP costs ----------------------------------------------------------------------


COST_CONFIGS: tuple[tuple[str, dict[str, Any], tuple[int, ...]], ...] = (
    ("double-backward loop", {"backend": "double-backward", "batched_backward": False}, (1, 4)),
    (
        "double-backward batched",
        {"backend": "double-backward", "batched_backward": True},
        (4, 8, 16),
    ),
    ("func", {"backend": "func"}, (1, 4, 8, 16)),
)


def low_precisions(b: Bench) -> tuple[str, ...]:
    """The reduced precisions of ``b``'s device: TF32 is a CUDA format (refused elsewhere)."""
    return ("tf32", "bf16") if b.cuda else ("bf16",)


def gradient_seconds(b: Bench) -> float:
    params = [p for p in b.model.parameters() if p.requires_grad]
    x, y = b.batch

    def gradient() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(b.model(x), y), params)

    timed(gradient, b.device)  # warm-up
    return statistics.median(timed(gradient, b.device)[1] for _ in range(b.args.reps))


def seconds_per_vector(b: Bench, op: HessianOperator, V: torch.Tensor) -> float:
    op.matmul(V)  # warm-up (and builds the kept first-order graph)
    secs = statistics.median(timed(lambda: op.matmul(V), b.device)[1] for _ in range(b.args.reps))
    return secs / V.shape[0]


def backend_label(name: str, op: HessianOperator, block: int) -> str:
    """The configured backend, and the one that ran where they differ (auto, or a fallback)."""
    used = op.backend_for(block)
    return name if used in name and name != "auto" else f"{name} -> {used}"


def hvp_costs(b: Bench) -> None:
    n = sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    # auto: at 16 and at the trace's block (all of a stage's probes: --probes for Hutchinson)
    auto = ("auto", {}, tuple(dict.fromkeys((16, b.args.probes))))
    V = torch.randn(max(16, b.args.probes), n, generator=torch.Generator().manual_seed(0))
    V = V.to(b.device)
    for name, kw, blocks in (*COST_CONFIGS, auto):
        op = b.operator(**kw)
        for block in blocks:

            def cost(op=op, name=name, block=block) -> Cost:
                secs = seconds_per_vector(b, op, V[:block])
                return Cost(backend_label(name, op, block), block, "float32", secs)

            if (c := attempt(f"HVP {name} block {block}", cost)) is not None:
                b.add_cost(c)
    exact = b.operator().matmul(V[:8])
    for precision in low_precisions(b):
        op = b.operator(precision=precision)
        for block in (1, 8):

            def cost(op=op, precision=precision, block=block) -> Cost:
                secs = seconds_per_vector(b, op, V[:block])
                err = (op.matmul(V[:block]) - exact[:block]).norm() / exact[:block].norm()
                return Cost(backend_label("auto", op, block), block, precision, secs, float(err))

            if (c := attempt(f"HVP auto {precision} block {block}", cost)) is not None:
                b.add_cost(c)


# --- case 2: top-k against a tight reference ------------------------------------------------


# The references' random start: no measured run uses it (those take seeds 0 .. --seeds - 1), so
# a reference never repeats the solve it judges.
REFERENCE_SEED = 12345


def tight_top(b: Bench, k: int, max_hvps: int) -> tuple[torch.Tensor, str]:
    """The first batch's top-k to ``--reference``'s tolerance: (values, a line about them).
    Its residuals are checked with fresh products (``verify``), not read from the kept ones."""
    if b.args.reference == "float64":
        model, tol = copy.deepcopy(b.model).double(), 1e-8
        batch = (b.batch[0].double(), b.batch[1])
    else:
        model, tol, batch = b.model, 1e-6, b.batch
    op = HessianOperator(model, F.cross_entropy, [batch])
    # A block grows with k: a single-vector Krylov space can miss one of many clustered
    # eigenvalues (RESULTS.md, ninth session: block 1 from k = 80 on the digits MLP).
    block = max(1, k // 10)
    res, secs = timed(
        lambda: eigenpairs(
            op, k, tol=tol, block_size=block, max_hvps=max_hvps, seed=REFERENCE_SEED, verify=True
        ),
        b.device,
    )
    values = [round(float(v), 5) for v in res.eigenvalues]
    shown = values if k <= 8 else [*values[:4], "...", *values[-2:]]
    line = (
        f"top-{k} ({b.args.reference}, residual <= {tol:g} with fresh products, block {block}, "
        f"guard {res.guard}, seed {REFERENCE_SEED}): "
        f"{shown}; "
        f"{res.hvps} HVPs, "
        f"{secs:.1f} s, {int(res.converged.sum())}/{k} converged"
        + ("" if res.all_converged else f" ({res.stop_reason})")
    )
    return res.eigenvalues.double(), line


def reference(b: Bench) -> None:
    b.ref, line = tight_top(b, b.args.k, max_hvps=600)
    print(f"# reference {line}", flush=True)


def pyhessian_top(b: Bench, k: int, seed: int = 0) -> Row:
    (vals, _), secs, hvps = run_pyhessian(b, lambda h: h.eigenvalues(top_n=k), seed=seed)
    err = rel_errors(vals, b.ref)
    return Row(
        f"top-{k}",
        "PyHessian 0.1 eigenvalues(top_n)",
        secs,
        hvps,
        max_error(err),
        within(err, k),
    )


def ours_top(
    b: Bench,
    task: str,
    k: int,
    block: int | None,
    *,
    batches: list[Batch] | None = None,
    ref: torch.Tensor | None = None,
    precision: str | None = None,
    tol: float | None = None,
    seed: int = 0,
    criterion: str = "residual",
    gradient_hint: bool = False,
    cudnn_search: bool = False,
) -> Row:
    """Our top-k with a fresh operator (its first-order graph is built inside the timing); with
    ``gradient_hint``, as ``analyze`` does, the loss gradient (timed too) hints the start; with
    ``cudnn_search``, inside :func:`searched_algorithms`."""
    kw = {} if precision is None else {"precision": precision}
    op = b.operator(batches, **kw)
    tol = tol or b.args.tol

    def solve() -> Any:
        with searched_algorithms(cudnn_search):
            hint = op.gradient()[1] if gradient_hint else None
            return eigenpairs(
                op, k, tol=tol, criterion=criterion, block_size=block, seed=seed, hint=hint
            )

    res, secs = timed(solve, b.device)
    err = rel_errors(res.eigenvalues.tolist(), b.ref if ref is None else ref)
    default = "default " if block is None else ""
    note = f"{within(err, k)}, {int(res.converged.sum())}/{k} converged"
    if gradient_hint:
        note += ", HVPs + 1 gradient"
    if not res.all_converged:
        note += f" ({res.stop_reason})"
    if precision is not None:
        note += (
            f", max float32 residual {float(res.residuals.max()):.1e}"
            f", HVP error {op.precision_error():.1e}"
        )
    settings = f"{default}block {res.block_size}, tol {tol:g}" + (
        f", {precision}" if precision else ""
    )
    if res.guard:
        settings += f", guard {res.guard}"
    if res.check_hvps:  # the look for a skipped eigenvalue, counted in the HVPs
        settings += f", skip check {res.check_hvps}"
    if criterion != "residual":
        settings += f", {criterion} criterion"
    if gradient_hint:
        settings += ", gradient hint"
    if cudnn_search:
        settings += ", cudnn.benchmark"
    tool = f"hessian-cli ({settings})"
    return Row(task, tool, secs, res.hvps, max_error(err), note, res.block_size)


def eigenthings_top(
    b: Bench, k: int, seed: int = 0, *, steps: int = 40, ref: torch.Tensor | None = None
) -> Row:
    """hessian-eigenthings' Lanczos: ``steps`` products, fully reorthogonalised, no restarts."""
    import hessian_eigenthings as he

    he_op = eigenthings_operator(b)
    with counting(he_op, "matvec") as calls:
        out, secs = timed(
            lambda: he.lanczos(
                he_op, k=k, max_iter=steps, which="LA", seed=seed, reorthogonalize=True
            ),
            b.device,
        )
    err = rel_errors(sorted(out.eigenvalues.tolist(), reverse=True), b.ref if ref is None else ref)
    return Row(
        f"top-{k}",
        f"hessian-eigenthings lanczos(max_iter={steps})",
        secs,
        calls.n,
        max_error(err),
        within(err, k),
    )


# What `analyze` does beside the engine's defaults: the gradient it computes anyway hints the
# start; --criterion eigenvalue stops when every eigenvalue is within the tolerance, which is
# what the top-k tasks ask for. They run from one start (seed 0), for gpu.sh's time: our
# products did not vary with the seed in any multi-seed run recorded (RESULTS.md, fifth
# session: 5 / 5 / 5, 22 / 22 / 22), the peers' did (PyHessian's 62 to 75).
ANALYZE_VARIANTS: dict[str, dict[str, Any]] = {
    "gradient hint": {"gradient_hint": True},
    "eigenvalue criterion, gradient hint": {"criterion": "eigenvalue", "gradient_hint": True},
}


# A candidate for the engine, not what it does: cuDNN's algorithms timed once per shape. On the
# H200's top-5 profile (RESULTS.md, twenty-third session) half the GPU's time went to cuDNN's
# dgrad_engine, implicit_convolve_sgemm and dgrad2d_alg1_1, chosen by its heuristics. The first
# solve with it (top-1) pays the search for every shape; the peers run without it.
CANDIDATES: dict[str, dict[str, Any]] = {"cudnn.benchmark": {"cudnn_search": True}}


@contextlib.contextmanager
def searched_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on inside (where ``enabled``), restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def top_k(b: Bench) -> None:
    for k in sorted({1, b.args.k}):
        seeds = b.args.seeds
        peer = seeded(f"top-{k} PyHessian", seeds, lambda s, k=k: pyhessian_top(b, k, s))
        # Blocks beside the default: the measurement that chooses the default block per device.
        blocks = (1, 2, 4, 8) if b.cuda else (1, k)

        def ours_run(block: int | None, seed: int, k: int = k) -> Row:
            return ours_top(b, f"top-{k}", k, block, seed=seed)

        ours = ours_blocks(f"top-{k}", blocks, ours_run, seeds)
        mean_rows = {f"top-{k}": ours[0]}
        b.add(*peer, *ours)
        variants = ANALYZE_VARIANTS | (CANDIDATES if b.cuda else {})
        for variant, kw in variants.items():
            rows = seeded(
                f"top-{k} hessian-cli {variant}",
                1,
                lambda s, k=k, kw=kw: ours_top(b, f"top-{k}", k, None, seed=s, **kw),
            )
            b.add(*rows)
            mean_rows[f"top-{k}, {variant}"] = rows[0]
        target = "<= 0.5x on GPU" if k == 1 else "<= 0.25x on GPU"
        for case, mine in mean_rows.items():
            b.ratios.append(Ratio(case, mine, peer[0], "PyHessian", target, False))
        if k == b.args.k:
            he_rows = seeded(
                f"top-{k} hessian-eigenthings", seeds, lambda s, k=k: eigenthings_top(b, k, s)
            )
            b.add(*he_rows)
            for case, mine in mean_rows.items():
                b.ratios.append(
                    Ratio(case, mine, he_rows[0], "hessian-eigenthings", "<= 0.5x on GPU", False)
                )


def many(b: Bench) -> None:
    """Many eigenpairs (``--many-k``, one start each): our default block beside blocks 1 and 4
    (the default grows with k, :func:`default_block_size`), and hessian-eigenthings' Lanczos with
    2k and 4k steps; against their own tight reference."""
    k = b.args.many_k
    ref, line = tight_top(b, k, max_hvps=20 * k)
    print(f"# reference {line}", flush=True)
    task = f"top-{k}"
    ours = ours_blocks(
        task, (1, 4), lambda block, seed: ours_top(b, task, k, block, ref=ref, seed=seed)
    )
    peers = [
        attempt(
            f"{task} hessian-eigenthings {steps} steps",
            lambda steps=steps: eigenthings_top(b, k, steps=steps, ref=ref),
        )
        for steps in (2 * k, 4 * k)
    ]
    b.add(*ours, *peers)
    # The peer's cheapest run with every eigenvalue within 1e-4, else its most accurate.
    done = [r for r in peers if r is not None and r.error is not None]
    exact = [r for r in done if r.error is not None and r.error <= 1e-4]
    peer = exact[0] if exact else min(done, key=lambda r: r.error or 0.0, default=None)
    b.ratios.append(Ratio(task, ours[0], peer, "hessian-eigenthings", "none set", False))


# --- case 3: trace --------------------------------------------------------------------------


def pyhessian_trace(b: Bench) -> Row:
    probes = b.args.probes
    tr, secs, hvps = run_pyhessian(b, lambda h: h.trace(maxIter=probes, tol=0))
    stderr = statistics.stdev(tr) / len(tr) ** 0.5
    note = f"{statistics.mean(tr):.2f} +- {stderr:.2f} (Hutchinson)"
    return Row("trace", f"PyHessian trace(maxIter={probes}, tol=0)", secs, hvps, None, note)


def ours_trace(b: Bench, method: str) -> Row:
    op = b.operator()
    res, secs = timed(lambda: stochastic_trace(op, b.args.probes, method=method), b.device)
    note = f"{res.estimate:.2f} +- {res.stderr:.2f} (passes: {op.passes})"
    tool = f"hessian-cli {method} ({b.args.probes} probes, default blocks)"
    return Row("trace", tool, secs, res.hvps, None, note)


def trace(b: Bench) -> None:
    peer = attempt("trace PyHessian", lambda: pyhessian_trace(b))
    b.add(peer)
    for method in ("hutchinson", "hutch++"):
        ours = attempt(f"trace hessian-cli {method}", lambda m=method: ours_trace(b, m))
        b.add(ours)
        b.ratios.append(Ratio(f"trace {method}", ours, peer, "PyHessian", ">= 4x on GPU", True))


# --- case 4: spectral density ---------------------------------------------------------------


def density_note(nodes: torch.Tensor, weights: torch.Tensor, n: int) -> str:
    """Top quadrature node (~ lambda_1) and the trace the rules imply (n * mean first moment)."""
    nodes, weights = nodes.double().cpu().nan_to_num(0.0), weights.double().cpu()
    top = float(nodes[weights > 0].max())
    return f"top node {top:.5g}, trace {n * float((weights * nodes).sum(1).mean()):.2f}"


def eigenthings_density(b: Bench) -> Row:
    import hessian_eigenthings as he

    p, s = b.args.density_probes, b.args.density_steps
    he_op = eigenthings_operator(b)
    with counting(he_op, "matvec") as calls:
        out, secs = timed(
            lambda: he.spectral_density(he_op, num_runs=p, lanczos_steps=s, seed=0), b.device
        )
    note = density_note(out.raw_eigenvalues, out.raw_weights, he_op.size)
    tool = f"hessian-eigenthings spectral_density({p} runs x {s} steps)"
    return Row("density", tool, secs, calls.n, None, note)


def pyhessian_density(b: Bench) -> Row:
    p, s = b.args.density_probes, b.args.density_steps

    def density(hess: Any) -> tuple[Any, Exception | None]:
        try:
            return hess.density(iter=s, n_v=p), None
        except Exception as e:  # noqa: BLE001  (expected on current torch: torch.eig is gone)
            return None, e

    (out, error), secs, hvps = run_pyhessian(b, density)
    if error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        line = [f.line for f in frames if "pyhessian" in f.filename][-1]
        message = f"{type(error).__name__}: {str(error).split('. ')[0]}"
        note = f"failed after {hvps} HVPs in `{line}`: {message}"
    else:
        nodes, weights = (torch.tensor(v, dtype=torch.float64) for v in out)
        note = density_note(nodes, weights, sum(p.numel() for p in b.model.parameters()))
    return Row("density", f"PyHessian density(iter={s}, n_v={p})", secs, hvps, None, note)


def ours_density(b: Bench) -> Row:
    op = b.operator()
    p, s = b.args.density_probes, b.args.density_steps
    res, secs = timed(lambda: spectral_density(op, num_probes=p, steps=s), b.device)
    note = f"{density_note(res.nodes, res.weights, op.n)} (passes: {op.passes})"
    return Row(
        "density",
        f"hessian-cli spectral_density({p} probes x {s} steps)",
        secs,
        res.hvps,
        None,
        note,
    )


def density(b: Bench) -> None:
    peer = attempt("density hessian-eigenthings", lambda: eigenthings_density(b))
    pyh = attempt("density PyHessian", lambda: pyhessian_density(b))
    ours = attempt("density hessian-cli", lambda: ours_density(b))
    b.add(peer, pyh, ours)
    b.ratios.append(Ratio("density", ours, peer, "hessian-eigenthings", ">= 4x on GPU", True))


# --- case 5: several batches (dataloader mode) ----------------------------------------------


def pyhessian_dataloader(b: Bench, task: str, ref: torch.Tensor, seed: int = 0) -> Row:
    (vals, _), secs, hvps = run_pyhessian(
        b, lambda h: h.eigenvalues(top_n=1), dataloader=True, seed=seed
    )
    err = rel_errors(vals, ref)
    return Row(
        task,
        "PyHessian 0.1 eigenvalues(top_n=1), dataloader",
        secs,
        hvps,
        max_error(err),
        within(err, 1),
    )


def dataloader(b: Bench) -> None:
    task = f"top-1, {len(b.batches)}x{b.args.batch} inputs"
    op = b.operator(b.batches)
    # float32 (a float64 copy of 16 graphs would cost about as much as the rest of the case),
    # from a start no measured run uses, its residual from a fresh product
    res = eigenpairs(op, 1, tol=1e-5, max_hvps=200, seed=REFERENCE_SEED, verify=True)
    ref = res.eigenvalues.double()
    print(
        f"# {task}: errors against our float32 top-1 over all batches (residual <= 1e-5 with a "
        f"fresh product, block {res.block_size}, seed {REFERENCE_SEED}): {float(ref[0]):.5f}, "
        f"{res.hvps} HVPs, "
        f"{'converged' if res.all_converged else res.stop_reason}",
        flush=True,
    )
    seeds = b.args.dataloader_seeds
    peer = seeded(f"{task} PyHessian", seeds, lambda s: pyhessian_dataloader(b, task, ref, s))
    # No other block on CUDA, for gpu.sh's time: three H200 runs (RESULTS.md, third session) had
    # blocks 2 and 4 at 22 and 32 full-data products to block 1's 13, 1.6x and 2.2x its time.
    blocks = () if b.cuda else (1, 4)

    def ours_run(block: int | None, seed: int, **kw: Any) -> Row:
        return ours_top(b, task, 1, block, batches=b.batches, ref=ref, seed=seed, **kw)

    ours = ours_blocks(task, blocks, ours_run, seeds)
    b.add(*peer, *ours)
    b.ratios.append(Ratio(task, ours[0], peer[0], "PyHessian", ">= 3x on GPU", True))
    for variant, kw in ANALYZE_VARIANTS.items():  # one start, as in top_k
        rows = seeded(f"{task} hessian-cli {variant}", 1, lambda s, kw=kw: ours_run(None, s, **kw))
        b.add(*rows)
        b.ratios.append(
            Ratio(f"{task}, {variant}", rows[0], peer[0], "PyHessian", ">= 3x on GPU", True)
        )


# --- case 6: reduced precision --------------------------------------------------------------


def reduced_precision(b: Bench) -> None:
    """Reduced precision at the default tolerance (which its noise may not allow) and, beside
    full precision, at ``--low-tol``, a tolerance it can reach."""
    tol = b.args.low_tol
    for k in sorted({1, b.args.k}):
        for precision, t in (
            *((p, None) for p in low_precisions(b)),
            (None, tol),
            *((p, tol) for p in low_precisions(b)),
        ):

            def run(k: int = k, p: str | None = precision, t: float | None = t) -> Row:
                return ours_top(b, f"top-{k}", k, None, precision=p, tol=t)

            b.add(
                attempt(f"top-{k} hessian-cli {precision or 'full'} tol {t or b.args.tol:g}", run)
            )


# --- output ---------------------------------------------------------------------------------


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def error_text(error: float | None) -> str:
    return "" if error is None else f"{error:.1e}"


def cost_cells(c: Cost, grad_s: float) -> list[str]:
    return [
        c.backend,
        str(c.block),
        c.precision,
        f"{c.seconds * 1e3:.2f}",
        f"{c.seconds / grad_s:.2f}",
        error_text(c.error),
    ]


def print_costs(b: Bench) -> None:
    header = ["HVP backend", "block", "precision", "ms per vector", "gradient-equivalents"]
    rows = [["gradient", "1", "float32", f"{b.grad_s * 1e3:.2f}", "1.00", ""]]
    rows += [cost_cells(c, b.grad_s) for c in b.costs]
    print_table([*header, "rel. error vs float32"], rows)


def row_cells(r: Row, grad_s: float) -> list[str]:
    return [
        r.task,
        r.tool,
        f"{r.seconds:.2f}",
        str(r.hvps),
        f"{r.seconds / grad_s:.0f}",
        error_text(r.error),
        r.note,
    ]


def print_rows(b: Bench) -> None:
    header = ["task", "tool", "wall s", "HVPs", "gradient-equivalents", "max rel. error", "note"]
    print_table(header, [row_cells(r, b.grad_s) for r in b.rows])


def ratio_line(r: Ratio) -> str:
    if r.ours is None or r.peer is None:
        return f"# {r.case}: no ratio, a run failed (target {r.target})"
    if r.speedup:
        value = f"{r.peer.seconds / r.ours.seconds:.2f}x faster"
    else:
        value = f"{r.ours.seconds / r.peer.seconds:.2f}x {r.peer_name}'s time"
    return (
        f"# {r.case}: ours {r.ours.seconds:.2f}s vs {r.peer_name} {r.peer.seconds:.2f}s "
        f"-> {value} (target {r.target})"
    )


def print_ratios(b: Bench) -> None:
    print()
    for r in b.ratios:
        print(ratio_line(r))


CASES: dict[str, Callable[[Bench], None]] = {
    "costs": hvp_costs,
    "reference": reference,  # the errors of top-k and reduced precision are against it
    "top-k": top_k,
    "trace": trace,
    "density": density,
    "dataloader": dataloader,
    "precision": reduced_precision,
    "many": many,  # last: the cases come first should a run meet a time limit
}


def case_names(text: str) -> list[str]:
    """Comma-separated names of cases, as an argparse type: each once, in the order given but
    ``reference`` first, which the errors of top-k and reduced precision are measured against
    (given after them, their rows had no error). An empty name (``top-k,``, a trailing comma)
    is none: it was refused as "unknown case(s) :", naming nothing."""
    names = list(dict.fromkeys(listed(text)))
    if unknown := set(names) - set(CASES):
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(sorted(unknown))}: choose from {', '.join(CASES)}"
        )
    return sorted(names, key=lambda name: name != "reference")  # a stable sort


def run(args: argparse.Namespace) -> None:
    b = setup(args)
    header(b)
    b.grad_s = gradient_seconds(b)
    for name in args.cases:
        case = CASES[name]
        start, done = time.perf_counter(), len(b.ratios)
        attempt(name, lambda case=case: case(b))
        for r in b.ratios[done:]:
            print(ratio_line(r), flush=True)
        print(f"# {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print_costs(b)
    print_rows(b)
    print_ratios(b)


def default_model(cuda: bool) -> str:
    """ResNet-20 on the CPU; on CUDA torchvision's ResNet-18, or where torchvision does not
    import (not installed, or built for another torch), resnet18.py's copy of it: the same
    weights, where ``torchvision:resnet18`` would stop the run before its first case."""
    if not cuda:
        return "resnet20"
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # noqa: BLE001  (a torchvision built for another torch raises RuntimeError)
        return f"{Path(__file__).with_name('resnet18.py')}:resnet18"
    return "torchvision:resnet18"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--model",
        help="default: resnet20 on CPU, torchvision:resnet18 on CUDA (resnet18.py's copy of it "
        "where torchvision does not import); cnn with --quick",
    )
    parser.add_argument("--checkpoint", help="default: PyHessian's checkpoint for resnet20")
    parser.add_argument(
        "--batch", type=int, help="inputs per batch (default 128 CPU, 256 CUDA, --quick 4)"
    )
    parser.add_argument(
        "--batches", type=int, help="batches of the dataloader case (4 CPU, 16 CUDA)"
    )
    parser.add_argument("--k", type=int, help="eigenpairs of the top-k case (default 5, --quick 2)")
    parser.add_argument(
        "--many-k", type=int, help="eigenpairs of the many case (default 50, --quick 4)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="random starts per top-k run and tool (mean reported; analyze's variants: one)",
    )
    parser.add_argument(
        "--dataloader-seeds", type=int, default=1, help="random starts per run of case 5"
    )
    parser.add_argument(
        "--tol",
        type=tolerance,
        default=1e-4,
        help="our solves' tolerance (the peers run at their defaults)",
    )
    parser.add_argument(
        "--reference",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of the top-k reference (default float64)",
    )
    parser.add_argument("--low-tol", type=tolerance, default=1e-2, help="tolerance of case 6")
    parser.add_argument("--probes", type=int, help="trace probes (default 30, --quick 6)")
    parser.add_argument("--density-probes", type=int, help="SLQ probes (default 8, --quick 4)")
    parser.add_argument("--density-steps", type=int, help="SLQ steps (default 40, --quick 10)")
    parser.add_argument(
        "--reps", type=int, help="timed repeats per HVP cost (2 CPU, 5 CUDA, --quick 1)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes where not given (the model cnn, 5,418 parameters): a smoke test",
    )
    parser.add_argument(
        "--cases",
        type=case_names,
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)}, run in the order given, reference "
        "first (default: all)",
    )
    parser.add_argument(
        "--threads", type=at_least(0), default=0, help="torch CPU threads (0: default)"
    )
    args = parser.parse_args()
    # Counts below 1, refused before the defaults below take a 0 for "not given" (--reps 0 ran
    # with 2, --reps -1 crashed on the median of no timings, --seeds 0 left no row to compare).
    counts = ("seeds", "dataloader_seeds", "reps", "k", "many_k", "batch", "batches")
    for name in (*counts, "probes", "density_probes", "density_steps"):
        if (value := getattr(args, name)) is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    cuda = args.device.startswith("cuda")
    if args.quick:  # sizes given on the command line stay as given
        # Every case's code on a model whose products cost little: on ResNet-20 the HVP costs
        # alone took 137 s of a loaded 2-core machine.
        args.model, args.reps, args.k = args.model or "cnn", args.reps or 1, args.k or 2
        args.batch, args.batches = args.batch or 4, args.batches or 2
        args.many_k, args.probes = args.many_k or 4, args.probes or 6
        args.density_probes, args.density_steps = args.density_probes or 4, args.density_steps or 10
    args.k, args.many_k, args.probes = args.k or 5, args.many_k or 50, args.probes or 30
    args.density_probes, args.density_steps = args.density_probes or 8, args.density_steps or 40
    args.model = args.model or default_model(cuda)
    if args.checkpoint is None:
        args.checkpoint = str(FIXTURE) if args.model == "resnet20" and FIXTURE.exists() else ""
    args.batch = args.batch or (256 if cuda else 128)
    args.batches = args.batches or (16 if cuda else 4)
    args.reps = args.reps or (5 if cuda else 2)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    run_main(main)
