"""Imports every command module so that each registers itself on the app."""

from hessian_cli.cli import analyze, plot, show, train  # noqa: F401
