"""How this process was launched: alone, or as one rank of a torchrun job (from the environment
torchrun sets). Torch-free, so that the CLI can ask before importing torch."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process' rank in the job: torchrun's RANK, else 0."""
    return _job()[0]


def env_world_size() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, else 1."""
    return _job()[1]


def launch_error() -> str | None:
    """Why RANK and WORLD_SIZE are not torchrun's, which are whole numbers (None where they may
    be): read as such, RANK=x (from a job's shell) was a traceback, ValueError, in the very
    report of errors. Until this is said, the process is taken for one alone."""
    if not launched_by_torchrun():
        return None
    for name in ("RANK", "WORLD_SIZE"):
        if _whole(name) is None:
            return (
                f"{name} is {os.environ[name]!r}, not the whole number torchrun sets: start the "
                "job with torchrun, or unset RANK and WORLD_SIZE to run one process."
            )
    return None


def _job() -> tuple[int, int]:
    """(rank, world size): torchrun's, else (0, 1), also where either is no whole number."""
    if not launched_by_torchrun():
        return 0, 1
    rank, size = _whole("RANK"), _whole("WORLD_SIZE")
    return (0, 1) if rank is None or size is None else (rank, size)


def _whole(name: str) -> int | None:
    """The environment variable ``name`` as a whole number, None where it is not one."""
    try:
        return int(os.environ[name])
    except ValueError:
        return None
