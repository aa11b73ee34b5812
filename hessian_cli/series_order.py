"""Where its name places a checkpoint in its training series, for the loader that orders a
series and the HDF5 file that keeps it in order (torch- and h5py-free: both import it)."""

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
