"""Where a checkpoint goes in its training series, for the loader that orders a series and the
HDF5 file that keeps it in order (torch- and h5py-free: both import it)."""

from __future__ import annotations

import re

# Words that place a checkpoint that records no step or epoch at the start or the end of its
# run: by name alone, init.pt came after final.pt and step_100.pt.
_FIRST_WORDS = frozenset({"init", "initial", "start"})
_LAST_WORDS = frozenset({"final", "last"})


def name_place(name: str) -> int:
    """Where its name places a checkpoint that records no step or epoch in its series: -1
    before all others (``init``, ``initial``, ``start``), 1 after all (``final``, ``last``),
    else 0."""
    words = set(re.findall(r"[a-z]+", name.lower()))
    return -1 if words & _FIRST_WORDS else 1 if words & _LAST_WORDS else 0


def series_key(step: float | None, epoch: float | None, name: str) -> tuple:
    """A checkpoint's place in its series, ties aside: by epoch, then step, as Lightning's
    ``epoch=E-step=S`` names sort (right also where a script counts steps within each epoch);
    one that records no epoch after those that do, and of one epoch, one without a step after
    those with one (saved at the epoch's end); one that records neither by :func:`name_place`,
    before all or after all (the loader and the file agree: they disagreed on a step left out)."""
    if step is None and epoch is None:
        place = name_place(name)
        return (place if place < 0 else place + 1, False, 0.0, False, 0.0)
    return (0, epoch is None, epoch or 0.0, step is None, step or 0.0)


def natural_key(name: str) -> tuple:
    """A name's tie-break in its series: ``ckpt2`` before ``ckpt10``. isdecimal, not isdigit,
    which "²" passes and int() refuses."""
    return tuple(
        (1, int(part), "") if part.isdecimal() else (0, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )
