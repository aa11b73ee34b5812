"""The Typer application, global options and the one place where errors become exit codes."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from hessian_cli import __version__
from hessian_cli.errors import UserError

app = typer.Typer(
    name="hessian-cli",
    help="Hessian spectra of neural networks (eigenvalues, trace, density, SAM alignment) "
    "and Eigen-SAM training, from the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True)


class _State:
    debug = False


state = _State()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hessian-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state.debug = debug


def _register_commands() -> None:
    from hessian_cli.cli import commands  # noqa: F401  (registers commands on `app`)


def main() -> None:
    """Console entry point: user errors become one red sentence and exit status 2.

    Typer runs in standalone mode, so usage errors, ``--help`` and ``typer.Exit`` codes are
    handled by it; everything else that escapes a command is caught here.
    """
    _register_commands()
    try:
        app()
    except UserError as exc:
        if state.debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        if state.debug:
            raise
        err_console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
