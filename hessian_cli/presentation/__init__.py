"""Turning report dicts and metrics into terminal tables and figures; no computation here."""

DASH = "—"  # a number that is missing or not finite, in every table (numpy-free: --help loads it)
