"""Random state that a resumed run must restore to repeat an uninterrupted run bit for bit.

Two sources of randomness matter in training: the global torch generators (weight init, dropout)
and the data order. The data order has its own CPU ``torch.Generator``, so nothing else that
draws random numbers (a user's model, the eigen-solver) can shift it. Every state is a uint8
tensor, which ``torch.load(weights_only=True)`` reads back.
"""

from __future__ import annotations

from typing import Any

import torch


def capture_rng() -> dict[str, Any]:
    """The global torch CPU generator's state, and every CUDA device's where CUDA is in use."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` saved (CUDA states only where there is CUDA)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A run saved on more GPUs than are visible now: the ones there are (set_rng_state_all
        # raised IndexError past the last, and the resume stopped unexplained).
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


class DataOrder:
    """A fresh permutation of the training set each epoch, from a generator seeded once.

    ``epoch_state`` is the generator's state *before* the current epoch's permutation was drawn:
    saving it (with the number of batches already taken) is enough to redraw the same
    permutation on resume and skip the batches already seen.
    """

    def __init__(self, num_samples: int, seed: int, state: torch.Tensor | None = None) -> None:
        self.num_samples = num_samples
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        if state is not None:
            self.generator.set_state(state)
        self.epoch_state = self.generator.get_state()

    def next_epoch(self) -> torch.Tensor:
        """The permutation of the next epoch (the one :attr:`epoch_state` now points at)."""
        self.epoch_state = self.generator.get_state()
        return torch.randperm(self.num_samples, generator=self.generator)
