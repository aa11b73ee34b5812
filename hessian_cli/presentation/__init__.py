"""Turning report dicts and metrics into terminal tables and figures; no computation here."""
