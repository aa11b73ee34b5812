"""The command-line interface: parse, call the library, render. No numerical code lives here."""

from hessian_cli.cli.app import app, main

__all__ = ["app", "main"]
