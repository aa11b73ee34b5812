"""How this process was launched: alone, or as one rank of a torchrun job (from the environment
torchrun sets). Torch-free, so that the CLI can ask before importing torch."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process' rank in the job: torchrun's RANK, else 0."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def env_world_size() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
