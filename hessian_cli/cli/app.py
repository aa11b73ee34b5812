"""The Typer application, global options and the one place where errors become exit codes."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

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


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank_prefix(exc: Exception) -> str | None:
    """``"rank R: "`` for an error of one rank under torchrun, ``""`` otherwise; None: stay quiet.

    Errors all ranks agreed on are printed by rank 0 alone (the message names the failing rank).
    """
    if not _under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return ""
    from hessian_cli.engine.distributed import CollectiveUserError

    rank = int(os.environ["RANK"])
    if isinstance(exc, CollectiveUserError):
        return "" if rank == 0 else None
    return f"rank {rank}: "


def main() -> None:
    """Console entry point: user errors become one red sentence and exit status 2.

    Typer runs in standalone mode, so usage errors, ``--help`` and ``typer.Exit`` codes are
    handled by it; everything else that escapes a command is caught here. Under torchrun the
    process first joins the process group (torch is imported only then, to keep startup fast).
    """
    _register_commands()
    try:
        if _under_torchrun():
            from hessian_cli.engine import distributed

            distributed.init_from_env()
        app()
    except UserError as exc:
        if state.debug:
            raise
        prefix = _rank_prefix(exc)
        if prefix is not None:
            # escape: messages hold brackets that are not markup, e.g. 'hessian-cli[vision]'
            err_console.print(
                f"[bold red]error:[/] {escape(prefix + str(exc))}", highlight=False, soft_wrap=True
            )
        sys.exit(2)
    except Exception as exc:
        if state.debug:
            raise
        prefix = _rank_prefix(exc) or ""
        err_console.print(
            f"[bold red]error:[/] {escape(f'{prefix}unexpected {type(exc).__name__}: {exc}')} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    finally:
        if _under_torchrun():
            from hessian_cli.engine import distributed

            distributed.shutdown()
