"""Random probes and starting vectors, drawn the same way by every solver."""

from __future__ import annotations

from numbers import Integral

import torch

from hessian_cli.engine.linear_operator import LinearOperator
from hessian_cli.engine.seeds import check_seed

# Streams of one seed: a solver of its own draws its probes apart from the others' (the
# density's first probes were the trace's, so its first moment repeated the trace's estimate).
DENSITY_STREAM = 1
# The trace's probes beside known eigenvectors: the eigensolver draws from the seed's first
# stream, and the estimate is unbiased only for probes independent of those vectors.
KNOWN_TRACE_STREAM = 2
_STREAM_STEP = 0x9E3779B97F4A7C15  # an odd 64-bit constant: streams of nearby seeds do not meet


def probe_generator(op: LinearOperator, seed: int, stream: int = 0) -> torch.Generator:
    """The generator random probes and starts are drawn from, seeded with ``seed`` (and, for
    ``stream`` > 0, a stream of that seed that no other solver draws).

    On the operator's GPU when it has one: drawing the signs of 30 probes of 11M parameters takes
    6 s on a 2-core CPU. On the CPU otherwise, and under torch.distributed, where every rank must
    draw the same numbers and CUDA's streams may differ between GPU models. A seed therefore gives
    the same probes on every run on the same kind of device (on CPU: the stream PyHessian draws).
    A seed torch would not take (1.5, 2**64) is refused here, where every solver's draws start:
    it was torch's RuntimeError "manual_seed expected a long, but got float".
    """
    # A numpy integer (rng.integers(100)) as the int it is: it was refused as no integer ("not
    # np.int64(7)"). Only here: a run's settings stay ints, which its JSON records hold.
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        seed = int(seed)
    check_seed(seed)
    on_gpu = op.device.type == "cuda" and not getattr(op, "distributed", False)
    mixed = (seed + stream * _STREAM_STEP) % 2**64 if stream else seed
    return torch.Generator(device=op.device if on_gpu else "cpu").manual_seed(mixed)


def rademacher(
    shape: tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Random signs from ``generator``, on its device, moved to ``device``. Drawn straight in
    ``dtype``: on the CPU the same stream as int64 draws (PyHessian's), without their copy 8
    bytes an entry wide (30 probes of 1M entries: 0.50 s instead of 0.82 s on 2 cores)."""
    signs = torch.randint(0, 2, shape, generator=generator, device=generator.device, dtype=dtype)
    return signs.mul_(2).sub_(1).to(device)


def gaussian(
    shape: tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard normal draws from ``generator`` (in float64 on the CPU), moved to ``device``."""
    if generator.device.type == "cpu":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(
            dtype=dtype, device=device
        )
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
