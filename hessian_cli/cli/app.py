"""The Typer application, global options and the one place where errors become exit codes."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from hessian_cli.atomic import stdout_written
from hessian_cli.cli.options import flag_given_a_value, in_flags
from hessian_cli.errors import OUT_OF_HOST_MEMORY, Terminated, UserError, out_of_host_memory
from hessian_cli.launch import env_rank, env_world_size, launched_by_torchrun

if TYPE_CHECKING:  # torch is imported under torchrun only
    from hessian_cli.engine.distributed import CollectiveUserError


class _Commands(TyperGroup):
    """The commands, each of whose flags is refused a value in one place (see
    :func:`flag_given_a_value`): as a usage error, said once under torchrun; a value of the
    wrong type named with the kind wanted (:func:`_value_refused`); every usage error said as
    ours are (:func:`_usage_said`); and an option on the wrong side of the command's name, or
    a file in its place, told what to write."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: typer.Context | None = None,
        **extra: Any,
    ) -> typer.Context:
        with _usage_said():  # the program's own options: `hessian-cli --bogus`
            try:
                return super().make_context(info_name, args, parent, **extra)
            except typer.TyperException as exc:
                option = getattr(exc, "option_name", None)  # an unknown one's
                if owners := sorted(n for n, c in self.commands.items() if _takes(c, option)):
                    exc.message = (
                        f"{option} goes after the command's name: it is an option of "
                        f"{_listed(owners, 'and')}"
                    )
                    exc.possibilities = None  # of the program's own options, none meant
                raise

    def resolve_command(
        self, ctx: typer.Context, args: list[str]
    ) -> tuple[str | None, TyperCommand | None, list[str]]:
        try:
            name, command, rest = super().resolve_command(ctx, args)
        except typer.TyperException as exc:
            if args and os.path.exists(args[0]):  # `hessian-cli model.pt`: the command left out
                show = args[0].endswith((".h5", ".hdf5"))
                to, command_name = ("show", "show") if show else ("analyse", "analyze")
                exc.message = (
                    f"no such command {args[0]!r}. To {to} it, name the command first: "
                    f"{ctx.command_path} {command_name} {shlex.quote(args[0])}"
                )
            raise
        if isinstance(command, TyperCommand) and not ctx.resilient_parsing:
            if (message := flag_given_a_value(command, rest)) is not None:
                typer.Context(command, info_name=name, parent=ctx).fail(message)
        return name, command, rest

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_said(ctx):
            try:
                return super().invoke(ctx)
            except typer.BadParameter as exc:
                if (said := _value_refused(exc)) is not None:
                    exc.message = said
                raise
            except typer.TyperException as exc:
                option = getattr(exc, "option_name", None)  # an unknown one's
                if _takes(self, option):  # `analyze --version`: "Did you mean --precision"
                    exc.message = (
                        f"{option} goes before the command's name: it is an option of "
                        f"{ctx.command_path} itself"
                    )
                    exc.possibilities = None
                raise


@contextmanager
def _usage_said(group: typer.Context | None = None) -> Iterator[None]:
    """Click's usage errors (a missing argument, an unknown option or command, a value of the
    wrong kind) said as every other error is, in one line ``error: ...`` and with status 2:
    Typer printed them in a red box under the command's usage, with a capital ("Missing
    argument 'TARGET'."). With --debug, the traceback first. ``group``: the program's context,
    whose command is the one meant where Click's error names none (``-o`` without a value)."""
    try:
        yield
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `hessian-cli` alone: it printed help
            raise
        if state.debug:
            traceback.print_exception(exc)
        _say(escape(_in_one_line(exc, group)))
        raise typer.Exit(exc.exit_code) from exc


def _in_one_line(exc: typer.TyperException, group: typer.Context | None) -> str:
    """``exc``'s words, in lower case, with an unknown option's close names as "Did you mean"
    (as Typer says for a command; Click said "(Possible options: --dtype, --tol, --top-k)" for
    --topk, in alphabetical order) and where to read the command's usage."""
    text = exc.format_message()
    if close := getattr(exc, "possibilities", None):  # best first, as difflib found them
        text = f"{exc.message}. Did you mean {_listed(close, 'or')}?"
    text = re.sub(r"^[A-Z](?=[a-z]+\b)", lambda first: first[0].lower(), text)
    text = text if text.endswith((".", "?")) else f"{text}."
    return f"{text} See '{_command_path(getattr(exc, 'ctx', None), group)} --help'."


def _takes(command: Any, option: str | None) -> bool:
    """Whether ``command`` has the option ``option`` (``-q`` or ``--quiet``)."""
    return any(option in (*p.opts, *p.secondary_opts) for p in command.params)


def _listed(words: Sequence[str], last: str) -> str:
    """``words`` as a sentence lists them: "a, b or c" (``last``: "or")."""
    return ", ".join(words[:-1]) + f" {last} {words[-1]}" if len(words) > 1 else words[0]


def _command_path(ctx: typer.Context | None, group: typer.Context | None) -> str:
    """The command line's words up to the command ``ctx`` (or the group's) is of."""
    if ctx is not None:
        return ctx.command_path
    if group is None:
        return "hessian-cli"
    meant = group.invoked_subcommand
    return group.command_path if meant is None else f"{group.command_path} {meant}"


# What a value Typer could not read as its option's type is not: its own words (pydantic's)
# named neither the value nor the kind plainly ("Input should be a valid integer, unable to
# parse string as an integer" for --top-k 2.5).
_KINDS = {"int_parsing": "a whole number", "float_parsing": "a number"}


def _value_refused(exc: typer.BadParameter) -> str | None:
    """``exc``'s message in our words where Typer's type check refused a value, else None."""
    errors = getattr(exc.__cause__, "errors", None)
    first = errors()[0] if callable(errors) and errors() else {}
    kind = _KINDS.get(first.get("type"))
    return None if kind is None else f"{first.get('input')!r} is not {kind}."


app = typer.Typer(
    name="hessian-cli",
    cls=_Commands,
    help="Hessian spectra of neural networks (eigenvalues, trace, density, SAM alignment) "
    "and Eigen-SAM training, from the terminal.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},  # -h as most tools take it
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _plain_types() -> None:
    """Types in --help as a shell user reads them, one place for every command's parameters
    (--help's own included). Flags without one, as Click's plain help shows them: Typer 0.29's
    rich help showed every flag as ``--trace <bool>``, as if it took a value, and ``--trace
    true`` then made ``true`` a checkpoint name (``train --quiet true`` an unexpected argument).
    Parameters of several values by the type of one: ``--params <list[str]>`` and ``TARGET
    <list[str]>`` read as if a Python list were wanted; now ``--params <str>`` (given again for
    another) and ``TARGET <str>...`` (several words)."""
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:  # a Typer that shows no type beside a flag anyway
        return
    shown_argument = TyperArgument.display_type_rich

    def option_type(self: TyperOption, ctx: Any) -> str | None:
        if self.is_flag:
            return None
        return _one_value(shown(self, ctx)) if self.multiple else shown(self, ctx)

    def argument_type(self: TyperArgument, ctx: Any) -> str | None:
        text = shown_argument(self, ctx)
        return f"{_one_value(text)}..." if self.nargs == -1 and text else text

    TyperOption.display_type_rich = option_type
    TyperArgument.display_type_rich = argument_type


def _one_value(text: str | None) -> str | None:
    """``<str>`` for Typer's ``<list[str]>``: the type of one of a parameter's values."""
    return re.sub(r"^<list\[(.*)\]>$", r"<\1>", text) if text else text


_plain_types()


# The narrowest terminal whose help Rich's table of options shows whole: below it (58 columns
# for analyze) the table cut option names, "--model-…" and "--data-r…" at 40.
_TABLE_WIDTH = 60
# And the narrowest it is laid out for; narrower, at Click's own width: its text wrapping
# refused $COLUMNS=1 ("invalid width"), and Rich showed no help at all for $COLUMNS=0.
_NARROWEST = 20


def _folded_help() -> None:
    """Help text whose words are longer than its column (narrow terminals) folded onto the
    next line, as the types beside it are: Rich cut them with an ellipsis, and at 70 columns
    analyze --help read ``synthetic-regression:D[:k[:…`` for the data's syntax. Typer's help
    module is patched as a command's help is shown: importing it costs every start 30 ms.
    Narrower than a table fits, the plain layout (:func:`_listed_help`)."""
    format_help = TyperCommand.format_help

    def folded_help(self: TyperCommand, ctx: Any, formatter: Any) -> Any:
        from typer import rich_utils

        columns = Console(width=rich_utils.MAX_WIDTH).width
        if columns < _TABLE_WIDTH:
            return _listed_help(format_help, self, ctx, formatter, columns)
        build = getattr(rich_utils, "_get_parameter_help", None)
        if build is not None and not getattr(build, "folds", False):
            rich_utils._get_parameter_help = _folding(build)
        return format_help(self, ctx, formatter)

    TyperCommand.format_help = folded_help


def _listed_help(
    format_help: Callable[..., Any], command: TyperCommand, ctx: Any, formatter: Any, columns: int
) -> Any:
    """``command``'s help in Click's plain layout, ``columns`` wide, each option's text on the
    lines under its name: a terminal too narrow for Rich's table (see :data:`_TABLE_WIDTH`).
    Click's own layout was 50 columns at least, and put text beside names up to 30 wide."""
    write_dl = formatter.write_dl
    if columns >= _NARROWEST:
        formatter.width = columns - 1
    formatter.write_dl = lambda rows, **_: write_dl(rows, col_max=0, col_spacing=4)
    mode, command.rich_markup_mode = command.rich_markup_mode, None  # Typer's switch to it
    try:
        return format_help(command, ctx, formatter)
    finally:
        command.rich_markup_mode = mode


def _folding(build: Callable[..., Any]) -> Callable[..., Any]:
    """``build`` (a parameter's help cell) with its lines of text folded, not cut."""

    def folded(**kwargs: Any) -> Any:
        shown = build(**kwargs)
        for item in getattr(shown, "renderables", ()):
            if isinstance(item, Text):
                item.overflow = "fold"
        return shown

    folded.folds = True  # type: ignore[attr-defined]
    return folded


_folded_help()


def _zero_width_unknown() -> None:
    """Read $COLUMNS=0 as Python's shutil does, as no width known (fish sets it while its
    config runs, a container's terminal before it is sized): Rich took it for 0 columns and
    printed nothing, neither results nor help nor errors (exit 2 without a word). Unset before
    any console reads it: the terminal's own width, or 80, then."""
    if os.environ.get("COLUMNS") == "0":
        del os.environ["COLUMNS"]


_zero_width_unknown()

# A pipe or a file has no width: results written there are not cut to fit 80 columns.
_UNBOUNDED = 100_000


class OutputConsole(Console):
    """A console on stdout whose reader may go (a pager quit early): what it prints then goes
    nowhere and the command goes on to write its files. Rich's default ended the command,
    silently with status 1: before a training run's first checkpoint, or an analysis' --out."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _stdout_to_devnull()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        with stdout_written():  # where the outermost print writes what it rendered
            super().__exit__(exc_type, exc_value, traceback)


def _stdout_to_devnull() -> None:
    """Send what is still to be printed on stdout nowhere: its reader has gone."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _unbounded_off_terminal(console: Console, **kwargs: Any) -> Console:
    """``console``, or where it writes to a pipe or a file (and $COLUMNS says nothing) one as
    wide as its lines need: a log holds each message on one line, for grep."""
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return type(console)(width=_UNBOUNDED, **kwargs)


err_console = _unbounded_off_terminal(Console(stderr=True), stderr=True)


def print_json(data: Any) -> None:
    """Strict JSON on stdout (no NaN: the reports hold None there), unwrapped, for piping into
    other tools."""
    try:
        with stdout_written():
            typer.echo(json.dumps(data, indent=2, allow_nan=False))
    except BrokenPipeError:  # as OutputConsole: Click ended the command, silently, status 1
        _stdout_to_devnull()


def results_console() -> Console:
    """The console for a command's results on stdout: a terminal's width, or as wide as they
    need into a pipe or a file unless $COLUMNS says. Print tables with ``crop=False``: where
    folding their cells does not make them fit, the terminal wraps them; nothing is cut off."""
    return _unbounded_off_terminal(OutputConsole())


class _State:
    debug = False


state = _State()


def _version(value: bool) -> None:
    if value:
        # Asked for here, not imported with the app: reading the package's metadata took every
        # command 5-20 ms to start (``hessian_cli`` reads it when first asked).
        from hessian_cli import __version__

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


def load_commands() -> None:
    """Import the commands (typer, rich), which registers them on ``app``."""
    from hessian_cli.cli import commands  # noqa: F401  (registers commands on `app`)


def _agreed(exc: Exception) -> CollectiveUserError | None:
    """The error all ranks agreed on that ``exc`` is, or that stopped its series (as collective
    as that error); None for a rank's own. Under torchrun only."""
    from hessian_cli.engine.distributed import CollectiveUserError

    return next((e for e in (exc, exc.__cause__) if isinstance(e, CollectiveUserError)), None)


def _rank_prefix(exc: Exception) -> str | None:
    """``"rank R: "`` for an error of one rank under torchrun, ``""`` otherwise; None: stay quiet.

    Errors all ranks agreed on are printed by rank 0 alone (the message names the failing rank).
    """
    if env_world_size() == 1:
        return ""
    rank = env_rank()
    if _agreed(exc) is not None:
        return "" if rank == 0 else None
    return f"rank {rank}: "


def _fails_alone(exc: Exception) -> bool:
    """Whether this rank failed without the others knowing (e.g. out of memory in a product).

    Its peers may be waiting inside a collective it will never join, so it must not wait for them
    on the way out either: it leaves at once, and torchrun stops the other ranks when it sees one
    exit with an error. Exactly the errors :func:`_rank_prefix` names a rank for.
    """
    return bool(_rank_prefix(exc))


def _report(exc: Exception) -> int:
    """Print ``exc`` as one red sentence (a traceback with --debug); the exit status it earns,
    also where standard error cannot be written (``train ... &> /dev/full``: its run went on,
    and the failed print made the status 1)."""
    try:
        _print_error(exc)
    except OSError:  # what Python's exit flushes goes nowhere too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    if isinstance(exc, UserError):
        return exc.exit_status
    return UserError.exit_status if _name_too_long(exc) else 1


def _name_too_long(exc: Exception) -> bool:
    """Whether ``exc`` is the system refusing a path given as too long, bad input that every
    look at a path raises (``plot -o`` of a 300-letter name was "unexpected OSError: [Errno
    36]", status 1): a UserError's status."""
    return isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG


def _print_error(exc: Exception) -> None:
    """``exc`` on standard error, as :func:`_report` says."""
    if state.debug:
        # An agreed error's traceback once, from the rank where it arose (every rank printed
        # one, and rank 0's showed only where the ranks agreed).
        agreed = _agreed(exc) if env_world_size() > 1 else None
        if agreed is None or agreed.origin == env_rank():
            traceback.print_exception(exc)
        return
    if env_world_size() > 1:
        from hessian_cli.engine.distributed import PeerLost

        if isinstance(exc, PeerLost):  # not this rank's error: the rank that left says why
            err_console.print(
                f"rank {env_rank()} stopped: another rank left or stopped answering; "
                "its message or torchrun's report says why.",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
            return
    prefix = _rank_prefix(exc)
    if prefix is None:
        return
    if isinstance(exc, UserError):
        # escape: messages hold brackets that are not markup, e.g. 'hessian-cli[vision]'
        message = escape(prefix + in_flags(str(exc)))
    elif out_of_host_memory(exc):
        message = escape(f"{prefix}{OUT_OF_HOST_MEMORY}.")
    elif _name_too_long(exc):
        named = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        message = escape(f"{prefix}the name{named} is too long for the file system.")
    else:
        message = (
            f"{escape(f'{prefix}unexpected {type(exc).__name__}: {exc}')} "
            "(run with --debug for the traceback)"
        )
    _say(message)


def _say(message: str) -> None:
    """``message`` (markup) as an error: one line, whatever the width, for grep in a log."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


# The shell's statuses for a process ended by SIGINT (Ctrl-C, 128 + 2) and SIGTERM (128 + 15).
INTERRUPTED_STATUS = 130
# Said for a Ctrl-C that no command caught (it ended with status 130 and no word).
INTERRUPTED = "interrupted by Ctrl-C."
TERMINATED_STATUS = 143
# And for one ended by SIGPIPE (128 + 13), as `seq 1 100000 | head -1` ends.
PIPE_CLOSED_STATUS = 141


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def signal_handled(signum: int, handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for ``signum`` inside the block (where the previous one is restored); nothing
    outside the main thread, where signals cannot be handled, nor for a signal the process was
    started to ignore (a script's background job ignores SIGINT, so that Ctrl-C at the terminal
    stops the script, not the job: ``analyze`` left it ignored, ``train`` stopped)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signum) is signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def import_torch() -> None:
    """Import torch, numpy first. torch's C initialisation imports numpy itself and swallows any
    error there, a Ctrl-C included: the command then ran on as if never interrupted (exit 0), or
    failed later on numpy's half-made module. Imported first, numpy's Ctrl-C stops the command."""
    import numpy  # noqa: F401
    import torch  # noqa: F401


def exit_interrupted() -> NoReturn:
    """End the command as a Ctrl-C does, with the shell's status for SIGINT. Under torchrun at
    once, without leaving together: a Ctrl-C that reached this rank alone (one node's terminal)
    left its peers inside a collective, and the barrier on the way out waited for them until
    the collective timeout (900 s); torchrun stops them when this rank exits."""
    if env_world_size() > 1:
        _leave_now(INTERRUPTED_STATUS)
    raise typer.Exit(INTERRUPTED_STATUS)


def _leave_now(code: int) -> NoReturn:
    """Exit without Python's teardown (the command's own clean-up ran while its exception
    unwound): under torchrun that teardown waits for peers that may be gone or stuck."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def _said_by_rank_zero() -> Iterator[None]:
    """Under torchrun, the other ranks' output silenced inside the block: Click's usage errors,
    --help and --version were printed once per rank (a typo, 8 boxes on a node of 8 GPUs); the
    commands print on rank 0 alone anyway, and a rank's own error is reported after the block."""
    if env_rank() == 0:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        yield


def _unsaid_interrupt(exc: SystemExit) -> bool:
    """Whether ``exc`` is Typer's exit for a Ctrl-C that escaped a command (status 130, and
    nothing said: importing torch or loading data, the first seconds of a command); a command
    that catches its Ctrl-C says what it kept before its own exit."""
    typer_exit = exc.__context__
    return exc.code == INTERRUPTED_STATUS and isinstance(
        getattr(typer_exit, "__cause__", None), KeyboardInterrupt
    )


def _pipe_closed(exc: SystemExit) -> bool:
    """Whether ``exc`` is the exit that Click and rich make where standard output's reader
    went away (``show FILE | head``): status 1 and nothing said, as an error's."""
    cause = exc.__context__
    while cause is not None and not isinstance(cause, BrokenPipeError):
        cause = cause.__context__
    return exc.code == 1 and cause is not None


def _debug_first(args: list[str]) -> list[str]:
    """``args`` with ``--debug`` before the command, where the program takes it: given after
    the command (where users add it), it was "No such option: --debug"."""
    cut = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[1:cut]:
        return args
    return ["--debug", *(a for a in args[:cut] if a != "--debug"), *args[cut:]]


def _hold_standard_descriptors() -> None:
    """Open /dev/null on standard input, output or error where the caller closed them
    (``>&-``): the next file the command opened took the closed one's number, so `plot -o -`
    replaced that file (a font of matplotlib's) with the figure, as /dev/stdout leads to it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: os.open takes the lowest free number, this one
            os.open(os.devnull, os.O_RDWR)


def main() -> None:
    """Console entry point: user errors become one red sentence and exit status 2.

    Typer runs in standalone mode, so usage errors, ``--help`` and ``typer.Exit`` codes are
    handled by it; everything else that escapes a command is caught here (status 1 when it is not
    a user error). Under torchrun the process first joins the process group (torch is imported
    only then, to keep startup fast) and leaves it with the other ranks, unless it failed alone;
    having left it, the rank ends without Python's teardown (see :func:`_end_rank`).
    """
    _hold_standard_descriptors()
    load_commands()
    torchrun = launched_by_torchrun()
    if not torchrun:
        _run_command(torchrun=False)
        return
    status: object = 0
    try:
        _run_command(torchrun=True)
    except SystemExit as exc:
        status = exc.code
    finally:
        from hessian_cli.engine import distributed

        left = distributed.shutdown()
    if left:
        _end_rank(status)
    sys.exit(status)


def _end_rank(status: object) -> NoReturn:
    """End a rank that has left its process group, with the command's exit status, without
    Python's teardown. A rank 0 that had done and written all its work still aborted at exit
    now and then ("terminate called without an active exception", SIGABRT; twice in CI runs
    of the test suite), and torchrun then called the whole job failed: that is C++ ending a
    thread it must not (torch's Gloo threads meeting a finalising interpreter abort so, as
    upstream reports where a group outlives it). Nothing is lost: every file the commands
    write is closed where it is written, and standard output and error are flushed."""
    if status is None:
        _leave_now(0)
    if isinstance(status, int):
        _leave_now(status)
    print(status, file=sys.stderr)  # as sys.exit prints a message given as the status
    _leave_now(1)


def _run_command(*, torchrun: bool) -> None:
    """The command line's command, its errors said; ends in SystemExit with its status."""
    try:
        if torchrun:
            import_torch()
            from hessian_cli.engine import distributed

            distributed.init_from_env()
        # SIGTERM unwinds instead of killing at once, so that what is in hand is written.
        with signal_handled(signal.SIGTERM, _raise_terminated), _said_by_rank_zero():
            args = _debug_first(sys.argv[1:])
            state.debug = args[:1] == ["--debug"]  # known before Click parses: its usage errors
            try:
                app(args=args)
            except SystemExit as exc:
                if _unsaid_interrupt(exc):
                    err_console.print(INTERRUPTED, style="yellow", highlight=False)
                if _pipe_closed(exc):  # both left standard output quiet (devnull)
                    raise SystemExit(PIPE_CLOSED_STATUS) from None
                raise
    except Terminated as exc:
        rank = f"rank {env_rank()} " if torchrun else ""
        said = str(exc) or "stopped: the process received SIGTERM."
        err_console.print(f"{rank}{said}", style="dim", highlight=False, soft_wrap=True)
        _leave_now(TERMINATED_STATUS)  # the job is being stopped: its barrier would wait
    except KeyboardInterrupt:  # while Typer builds the commands, before it takes Ctrl-C as 130
        if env_rank() == 0:
            err_console.print(INTERRUPTED, style="yellow", highlight=False)
        sys.exit(INTERRUPTED_STATUS)
    except Exception as exc:
        code = _report(exc)  # with --debug, the traceback; the exit status is the same
        if _fails_alone(exc):
            # No barrier and no teardown: both wait for peers that may be stuck in a collective
            # (a Gloo barrier ignored its timeout there; NCCL's abort can hang).
            _leave_now(code)
        sys.exit(code)
