"""Where a solve's time goes beside its products: the engine's own work in a product beside
autograd's (a product as the operator takes it, with the weights held as in a solve, and
autograd's double backward alone on the same kept graph), eval BatchNorm by the engine's formula
beside torch's kernel (:func:`batchnorm_rows`), cuDNN's
heuristic algorithms beside its timed search in products and solves (:func:`cudnn_rows`), a
candidate for trace probes without a product (:func:`quadratic_candidate`), the eigensolver's own
linear algebra,
the kept graphs of several batches, what launching kernels and cuDNN's choice of algorithms cost
a gradient and a product, a kept graph's product replayed from a CUDA graph (CUDA), and the
profile of one top-5 solve. TF32 off, as in the engine.

    python benchmarks/overhead.py --device cuda      # ResNet-18, batches of 256 inputs
    python benchmarks/overhead.py --device cpu       # ResNet-20 (random weights)

Prints one table of timings (median of --reps, synchronised) and the profiler's top operators.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from arguments import device, parser_for, run_main
from peers import attempt, default_model, timed  # the script's directory is on sys.path
from torch.func import functional_call, grad, jvp, vmap

from hessian_cli.engine.batchnorm_formula import batchnorm_formula, formula_ready
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.linalg import gram, orthonormalize_against
from hessian_cli.engine.memory import graph_bytes
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.specs.models import build_model


def captured(fn: Callable[[], Any], stream: torch.cuda.Stream | None = None) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (its inputs fixed): replaying it launches no kernels
    from the host, so its time less the eager one is what launching costs.

    Warmed up and captured on one side stream (``stream``: the one a kept graph that ``fn``
    differentiates was built on). Autograd runs each backward node on the stream its forward
    op ran on, and an input's gradient waits on the stream its accumulator was made on: a node
    of the default stream inside the capture invalidates it, which CUDA reports only at its
    end ("operation failed due to a previous error during capture", the H200's runs of the
    third and twenty-third sessions, whose kept graph was the default stream's). Where torch
    can redirect such stale streams (``set_override_stale_capture_stream``, newer than 2.11),
    it does so for the capture."""
    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    redirect = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if redirect is not None:
        redirect(True)
    try:
        with torch.cuda.graph(graph, stream=side):
            fn()
    finally:
        if redirect is not None:
            redirect(False)
    return graph.replay


def launch_probes(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], row: Callable
) -> None:
    """A gradient and a whole product (forward, backward with graph, double backward) eager,
    with ``cudnn.benchmark`` (cuDNN times its algorithms once per shape and keeps the fastest),
    and replayed from a CUDA graph: whether the engine is bound by the GPU's arithmetic, by
    cuDNN's default algorithms or by the host's launches."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    vs = [torch.randn_like(p) for p in params]

    def gradient() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def product() -> tuple[torch.Tensor, ...]:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=vs)

    # Each row in attempt(): none of them has run on a GPU yet, and one that fails (cuDNN's
    # search running out of memory, a capture refused) must leave the rest of the script.
    for name, fn in (("gradient", gradient), ("HVP, forward + double backward", product)):
        attempt(f"{name}, eager", lambda fn=fn, name=name: row(f"{name}, eager", fn))
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            attempt(
                f"{name}, eager, cudnn.benchmark",
                lambda fn=fn, name=name: row(f"{name}, eager, cudnn.benchmark", fn),
            )
            attempt(
                f"{name} in a CUDA graph",
                lambda fn=fn, name=name: row(f"{name}, CUDA graph, cudnn.benchmark", captured(fn)),
            )
        finally:
            torch.backends.cudnn.benchmark = previous


def replayed_product(op: HessianOperator, v: torch.Tensor, row: Callable) -> None:
    """A kept graph's double backward alone, eager and replayed from a CUDA graph: what a
    block-1 product costs where the host launches nothing (on the H200's top-5 profile the host
    took 1.15 s to the GPU's 0.74), and whether the replay gives the eager product."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the graph's nodes run where they were made (captured)
        _, g, _ = op._first_order_graph(0)
    torch.cuda.current_stream().wait_stream(side)
    params, static = op.space.tensors, v[0].clone()
    outputs: list[torch.Tensor] = []

    def product() -> None:
        outputs[:] = torch.autograd.grad(torch.dot(g, static), params, retain_graph=True)

    product()
    eager = torch.cat([t.reshape(-1) for t in outputs])
    replay = captured(product, side)  # the captured call leaves its outputs, which replays refill
    replay()
    torch.cuda.synchronize()
    error = float((torch.cat([t.reshape(-1) for t in outputs]) - eager).norm() / eager.norm())
    row("HVP, block 1, kept graph's double backward, eager", product)
    row("HVP, block 1, kept graph's double backward, CUDA graph", replay)
    print(f"#   replayed against eager: relative difference {error:.1e}", flush=True)


def functional_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor], Callable[..., tuple]]:
    """The trainable parameters' values, the loss as a function of them (for torch.func), and
    a flat vector as a tuple of tangents shaped like them."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    sizes = [p.numel() for p in primals]
    x, y = batch

    def loss_of(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

    def tangents(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(p) for t, p in zip(v.split(sizes), primals, strict=True))

    return primals, loss_of, tangents


def operator_count(fn: Callable[[], Any]) -> int:
    """The torch operators one call of ``fn`` runs (each a kernel launch or more on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def batchnorm_rows(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    reps: int,
) -> None:
    """Autograd's product on a kept graph, and a vmapped block of 8, with eval BatchNorm by
    torch's kernel and by the engine's formula (:mod:`batchnorm_formula`, which the engine
    uses for kept graphs only), interleaved, medians; each first-order graph's memory and a
    product's operators."""
    layers = [m for m in model.modules() if formula_ready(m)]
    if not layers:  # (an MLP, or BatchNorm with a forward of its own)
        print("#   no BatchNorm layer the formula takes: no rows to compare", flush=True)
        return
    assert not any(m.training for m in layers)
    params = [p for p in model.parameters() if p.requires_grad]
    primals, loss_of, tangents = functional_loss(model, batch)
    x, y = batch
    V = torch.randn(8, sum(p.numel() for p in params), device=device)
    kept, blocks, times = {}, {}, {}
    for name, layer_set in (("kernel", []), ("formula", layers)):
        with batchnorm_formula(layer_set):
            loss = F.cross_entropy(model(x), y)
            g = torch.cat(
                [t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)]
            )
        print(
            f"#   first-order graph, eval BatchNorm {name}: {graph_bytes(loss, g) / 2**20:.0f} MiB"
        )

        def product(g=g, layer_set=layer_set) -> torch.Tensor:
            with batchnorm_formula(layer_set):  # (a checkpointed block runs again in there)
                parts = torch.autograd.grad(torch.dot(g, V[0]), params, retain_graph=True)
            return torch.cat([t.reshape(-1) for t in parts])

        def block(layer_set=layer_set) -> torch.Tensor:
            def one(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return jvp(grad(loss_of), (primals,), (tangents(v),))[1]

            with batchnorm_formula(layer_set):
                parts = vmap(one)(V)
            return torch.cat([t.reshape(8, -1) for t in parts], dim=1)

        kept[name], blocks[name] = product, block
        times[name] = {"kept": [], "block": []}
        print(
            f"#   a kept graph's product, eval BatchNorm {name}: {operator_count(product)} operators"
        )
    for _ in range(reps):
        for name in kept:
            times[name]["kept"].append(timed(kept[name], device)[1])
            times[name]["block"].append(timed(blocks[name], device)[1] / 8)
    exact = kept["kernel"]()
    error = float((kept["formula"]() - exact).norm() / exact.norm())
    for name in kept:
        for what, label in (("kept", "kept graph, block 1"), ("block", "func block 8, per vector")):
            ms = 1e3 * statistics.median(times[name][what])
            print(f"{f'HVP, {label}, eval BatchNorm {name}':60s} {ms:9.2f} ms", flush=True)
    print(f"#   formula against the kernel: relative difference {error:.1e}", flush=True)


def quadratic_candidate(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    reps: int,
) -> None:
    """A trace probe needs ``v^T H v``, not ``H v``: forward-over-forward (``jvp`` of ``jvp``,
    no backward pass) beside torch.func's product (``jvp`` of ``grad``), vmapped over a block of
    8, per vector in gradients. On the CPU (ResNet-20, 16 inputs, 2 threads) each took 2.4 to 3.0
    gradients in two runs, neither ahead in both; a trace 4x PyHessian's needs about 0.7."""
    primals, loss_of, tangents = functional_loss(model, batch)
    x, y = batch
    V = torch.randn(8, sum(p.numel() for p in primals), device=device)

    def product(v: torch.Tensor) -> torch.Tensor:
        parts = jvp(grad(loss_of), (primals,), (tangents(v),))[1]
        return torch.dot(torch.cat([t.reshape(-1) for t in parts]), v)

    def quadratic(v: torch.Tensor) -> torch.Tensor:
        t = tangents(v)
        return jvp(lambda ps: jvp(loss_of, (ps,), (t,))[1], (primals,), (t,))[1]

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    ways = {"gradient": gradient, "jvp of grad": lambda: vmap(product)(V)}
    ways["jvp of jvp"] = lambda: vmap(quadratic)(V)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in ways.items():
            times[name].append(timed(fn, device)[1])
    unit = statistics.median(times["gradient"])
    for name in ("jvp of grad", "jvp of jvp"):
        per = statistics.median(times[name]) / 8
        label = f"v^T H v, block 8, {name}, per vector"
        print(f"{label:60s} {1e3 * per:9.2f} ms   {per / unit:.2f} gradients", flush=True)
    exact, fast = ways["jvp of grad"](), ways["jvp of jvp"]()
    error = float(((fast - exact).abs() / exact.abs()).max())
    print(f"#   jvp of jvp against v . Hv: largest relative difference {error:.1e}", flush=True)


def engine_share(op: HessianOperator, v: torch.Tensor, device: torch.device, reps: int) -> None:
    """One product of the kept graph as a call alone takes it, as a solve takes it (weights
    held: looked at once), and autograd's double backward alone on that graph: the engine's own
    share beside autograd's, in time and in torch operators (each a dispatch on the host, a
    launch or more on a GPU). Interleaved, medians of ``reps``: a few ms apart on a busy CPU."""
    _, g, _ = op._first_order_graph(0)
    tensors = op.space.tensors
    times: dict[str, list[float]] = {"alone": [], "held": [], "autograd": []}
    for _ in range(reps):
        times["alone"].append(timed(lambda: op.matmul(v), device)[1])
        with op.weights_held():
            op.matmul(v)  # the solve's first product looks at the weights
            times["held"].append(timed(lambda: op.matmul(v), device)[1])
        times["autograd"].append(
            timed(
                lambda: torch.autograd.grad(torch.dot(g, v[0]), tensors, retain_graph=True),
                device,
            )[1]
        )
    with op.weights_held():
        op.matmul(v)
        ours = operator_count(lambda: op.matmul(v))
    alone = operator_count(
        lambda: torch.autograd.grad(torch.dot(g, v[0]), tensors, retain_graph=True)
    )
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    for name, label in (
        ("alone", "HVP, block 1 (kept graph), a call alone"),
        ("held", "HVP, block 1 (kept graph), in a solve (weights held)"),
        ("autograd", "HVP, block 1, autograd alone on the kept graph"),
    ):
        print(f"{label:60s} {ms[name]:9.2f} ms", flush=True)
    print(
        f"#   the engine's own share: {ms['alone'] - ms['autograd']:.2f} ms a call alone, "
        f"{ms['held'] - ms['autograd']:.2f} ms in a solve; torch operators in a solve "
        f"{ours:,}, autograd's alone {alone:,}",
        flush=True,
    )


def cudnn_rows(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    reps: int,
) -> None:
    """A kept graph's product through the engine, and a top-5 solve, with cuDNN's heuristic
    algorithms (PyTorch's default, the engine's) and with ``cudnn.benchmark`` (each shape's
    algorithms timed once, the fastest kept), TF32 off in both. On the H200's top-5 profile
    (twenty-third session) the double backward's transposed convolutions ran cuDNN's
    ``dgrad_engine`` (386 us a call, 32% of the GPU's time) and ``implicit_convolve_sgemm``
    and ``dgrad2d_alg1_1`` another 20%, where forward convolutions of the same layers took
    ``xmma`` kernels of 58-185 us. The first product with the search is timed alone: what a
    process would pay once per shape."""
    previous = torch.backends.cudnn.benchmark
    op = HessianOperator(model, F.cross_entropy, [batch])
    v = torch.randn(1, op.n, device=device)
    try:
        torch.backends.cudnn.benchmark = False
        heuristic = op.matmul(v)
        torch.backends.cudnn.benchmark = True
        searched, first = timed(lambda: op.matmul(v), device)
        error = float((searched - heuristic).norm() / heuristic.norm())
        print(f"#   first product with cudnn.benchmark (its search included): {1e3 * first:.0f} ms")
        print(f"#   cudnn.benchmark against heuristics: relative difference {error:.1e}")
        times: dict[bool, list[float]] = {False: [], True: []}
        with op.weights_held():
            for _ in range(reps):
                for flag in times:
                    torch.backends.cudnn.benchmark = flag
                    times[flag].append(timed(lambda: op.matmul(v), device)[1])
        for flag, label in ((False, "heuristics"), (True, "cudnn.benchmark")):
            name = f"HVP, block 1 (kept graph), in a solve, {label}"
            print(f"{name:60s} {1e3 * statistics.median(times[flag]):9.2f} ms", flush=True)
        op.release()
        for flag, label in ((False, "heuristics"), (True, "cudnn.benchmark")):
            torch.backends.cudnn.benchmark = flag
            fresh = HessianOperator(model, F.cross_entropy, [batch])
            r, secs = timed(lambda fresh=fresh: eigenpairs(fresh, 5, seed=0), device)
            name = f"top-5 eigenpairs, fresh operator, {label}"
            print(f"{name:60s} {1e3 * secs:9.2f} ms   {r.hvps} HVPs", flush=True)
    finally:
        torch.backends.cudnn.benchmark = previous


def parse_args() -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--device",
        type=device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda where there is one",
    )
    parser.add_argument("--model", help="default: peers.py's for the device")
    parser.add_argument("--batch", type=int, default=256, help="inputs per batch")
    parser.add_argument("--batches", type=int, default=4, help="batches of the kept-graph rows")
    parser.add_argument("--reps", type=int, default=5, help="timed repeats per row (median)")
    args = parser.parse_args()
    for name in ("batch", "batches", "reps"):  # none: no input, or the median of no timings
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.model = args.model or default_model(torch.device(args.device).type == "cuda")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    # As peers.py and the engine's float32 products: cuDNN's TF32, on by default in PyTorch,
    # made the eager rows below (the third to twenty-third sessions') faster than any product
    # the engine takes (a gradient 7.3 instead of 12.2 ms on an H200).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model(args.model, input_shape=(3, 32, 32), num_classes=10).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (args.batch,), generator=g).to(device),
        )
        for _ in range(args.batches)
    ]
    op = HessianOperator(model, F.cross_entropy, batches[:1])
    n = op.n
    print(f"# {args.model}, {n:,} parameters, device {device}, torch {torch.__version__}")

    def row(name: str, fn: Callable[[], Any]) -> None:
        fn()  # warm-up
        secs = statistics.median(timed(fn, device)[1] for _ in range(args.reps))
        print(f"{name:60s} {1e3 * secs:9.2f} ms", flush=True)

    v = torch.randn(1, n, device=device)
    attempt("the engine's share", lambda: engine_share(op, v, device, 10 * args.reps))
    attempt("cuDNN's algorithms", lambda: cudnn_rows(model, batches[0], device, 2 * args.reps))
    attempt(
        "eval BatchNorm by formula",
        lambda: batchnorm_rows(model, batches[0], device, 2 * args.reps),
    )
    attempt(
        "trace probes by forward-over-forward",
        lambda: quadratic_candidate(model, batches[0], device, 2 * args.reps),
    )
    row("values digest (weights changed through .data?)", op._values_digest)
    for m in (6, 20):
        Q = orthonormalize_against(torch.randn(m, n, device=device), None)
        HQ = torch.randn(m, n, device=device)
        W = torch.randn(1, n, device=device)
        row(f"gram(Q, HQ), m={m}", lambda Q=Q, HQ=HQ: gram(Q, HQ))
        row(f"gram(W, Q), m={m}", lambda Q=Q, W=W: gram(W, Q))
        row(f"Q @ HQ.T float32, m={m}", lambda Q=Q, HQ=HQ: Q @ HQ.T)
        row(f"orthonormalize_against(W, Q), m={m}", lambda Q=Q, W=W: orthonormalize_against(W, Q))
        S = torch.randn(m, 6, device=device)
        row(f"S.T @ Q (6 x {m})", lambda Q=Q, S=S: S.T @ Q)

    if device.type == "cuda":
        # The kept graph was built on the default stream, and so were the accumulators of the
        # parameters' gradients that it holds: a capture would wait on that stream (captured).
        op.release()
        launch_probes(model, batches[0], row)
        attempt("replayed product", lambda: replayed_product(op, v, row))
        op.release()  # its graph holds the parameters' accumulators on the capture's stream

    for k in (1, 5):
        fresh = HessianOperator(model, F.cross_entropy, batches[:1])
        r, secs = timed(lambda fresh=fresh, k=k: eigenpairs(fresh, k), device)  # one cold solve
        name = f"top-{k} eigenpairs, fresh operator"
        print(
            f"{name:60s} {1e3 * secs:9.2f} ms   {r.hvps} HVPs, "
            f"{fresh.hvp_seconds:.3f} s host time in products",
            flush=True,
        )

    for keep in (False, None):  # None: the operator's choice (kept while memory allows)
        multi = HessianOperator(model, F.cross_entropy, batches, keep_graph=keep)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row(
            f"HVP over {len(batches)} batches, keep_graph={keep}",
            lambda multi=multi: multi.matmul(v),
        )
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"#   peak memory {peak:.1f} GiB", flush=True)
        print(f"#   graphs kept: {len(multi._graphs)} of {len(batches)}", flush=True)
        multi.release()
    # The same data as one batch, one kept graph (an idea, not the engine's: where BatchNorm
    # uses running statistics and the loss is a mean over samples, the function is the same,
    # and a product is one double backward instead of one per batch).
    merged = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    attempt(
        "merged batches",
        lambda: row(
            f"HVP over the {len(batches)} batches merged into one, its graph kept",
            lambda op=HessianOperator(model, F.cross_entropy, merged): op.matmul(v),
        ),
    )

    fresh = HessianOperator(model, F.cross_entropy, batches[:1])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        eigenpairs(fresh, 5)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=50))
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50
        )
    )


if __name__ == "__main__":
    run_main(main)
