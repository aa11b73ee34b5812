"""Turning report dicts and metrics into terminal tables and figures; no computation here."""

from typing import Any

DASH = "—"  # a number that is missing or not finite, in every table (numpy-free: --help loads it)


def counted(n: Any, noun: str, plural: str | None = None) -> str:
    """``n`` with thousands separators (DASH where missing) and ``noun``, or its plural unless
    ``n`` is 1."""
    number = DASH if n is None else f"{int(n):,}"
    return f"{number} {noun if n == 1 else plural or noun + 's'}"
