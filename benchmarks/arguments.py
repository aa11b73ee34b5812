"""The benchmark scripts' command lines: their docstring as the help, what they take checked
as argparse types, the engine's refusals of what they were given as one line, and a closed
pipe (``| head``) as a quiet end."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hessian_cli.engine.devices import resolve_device
from hessian_cli.errors import UserError


def parser_for(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's whole docstring, laid out as written: what it
    measures and how to run it (a first line alone cut some mid-sentence)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def count(text: str, least: int = 1) -> int:
    """A whole number of at least ``least``, as an argparse type: a count of 0 or a word
    reached the measurement and ended it in a traceback, often after minutes of work (a
    division by zero over no seeds, a solve for no eigenpair)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
    return value


def listed(text: str) -> list[str]:
    """The comma-separated parts of an option's value, an empty one (``12,30,``: a trailing
    comma) none, where it was refused as "'' is not a whole number"; no part at all is
    refused."""
    parts = [part for part in text.split(",") if part]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return parts


def counts(least: int = 1) -> Callable[[str], list[int]]:
    """The argparse type of comma-separated whole numbers of at least ``least`` each."""
    return lambda text: [count(part, least) for part in listed(text)]


def at_least(least: int) -> Callable[[str], int]:
    """The argparse type of one whole number of at least ``least``."""
    return lambda text: count(text, least)


def tolerance(text: str) -> float:
    """A relative tolerance, as the engine takes one: above 0, below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number below 1, not {text}")
    return value


def tolerances(text: str) -> list[float]:
    """Comma-separated relative tolerances."""
    return [tolerance(part) for part in listed(text)]


def device(text: str) -> str:
    """A device torch here can compute on, as the commands' --device takes it: `--device cuda`
    on a machine without CUDA, or `--device gpu`, was a traceback from torch at the first
    tensor moved, after the model was built."""
    try:
        return str(resolve_device(text))
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# The shell's statuses for a process ended by SIGPIPE (`seq 1 100000 | head -1`) and by SIGINT
# (Ctrl-C), as the CLI's.
PIPE_CLOSED_STATUS = 128 + signal.SIGPIPE
INTERRUPTED_STATUS = 128 + signal.SIGINT


def run_main(main: Callable[[], None]) -> None:
    """A script's ``main``, where the engine's refusal of what it was given (a checkpoint that
    does not exist, a model it does not know) is one line and exit status 2, as a bad option's
    is, not a traceback; and where standard output's reader went away (``peers.py | head``),
    the script stops quietly, as a shell tool does, where it ended in a BrokenPipeError's; a
    Ctrl-C is one line too (the rows printed so far are what the run measured), where it was a
    traceback from wherever the benchmark was."""
    try:
        try:
            main()
        finally:
            if sys.stdout is not None:  # None: started with standard output closed (>&-)
                sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except UserError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted by Ctrl-C.", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except BrokenPipeError:
        # nothing more to print: what is still buffered goes nowhere, not to a second error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(PIPE_CLOSED_STATUS) from None


if __name__ == "__main__":  # `python benchmarks/arguments.py --help` printed nothing, exit 0
    sys.exit(
        "arguments.py holds the benchmark scripts' command-line helpers and measures nothing: "
        "run a script, e.g. python benchmarks/peers.py --help"
    )
