"""What a seed may be: the integers torch's generators take. Torch-free, so that the CLI's
options are checked without loading the numerical stack."""

from __future__ import annotations

from hessian_cli.errors import UserError

SEED_RANGE = (-(2**63), 2**64)  # [first, last + 1)


def check_seed(seed: int) -> None:
    """Refuse, in one sentence, a seed torch's generators would not take."""
    first, end = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not first <= seed < end:
        raise UserError(f"`seed` must be an integer between -2**63 and 2**64 - 1, not {seed!r}.")


def next_seed(seed: int) -> int:
    """A seed other than ``seed`` in :data:`SEED_RANGE`: the next, wrapping at the end."""
    first, end = SEED_RANGE
    seed = int(seed)  # a numpy integer (see probe_generator) overflows at its width
    return seed + 1 if seed + 1 < end else first
