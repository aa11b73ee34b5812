"""Option parsing shared by several commands."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperOption

from hessian_cli.errors import UserError

# The --model and --data help of analyze and train, in words Rich can wrap at 80 columns (a
# run of names joined by slashes was cut off there).
MODEL_HELP = (
    "mlp, cnn, resnet20, resnet32, resnet44, resnet56, resnet110, torchvision:NAME, "
    "file.py:factory or package.module:factory."
)
DATA_HELP = (
    "digits, synthetic:CxHxW[:k[:n]], synthetic-regression:D[:k[:n]] (k classes, default 10, "
    "or outputs, default 1; n training samples, default 256, and n/4 test ones), "
    "cifar10 (cifar10-imagenet-norm: normalised as akamaster's ResNets), cifar100, mnist, "
    "fashion-mnist, svhn (from --data-root), an x/y file (.npz, .pt, "
    ".h5) or module:factory."
)


# The library's parameters that its messages name (in backticks, see UserError) and the flag
# of each: `k` is --top-k, `which=both` is --which both.
_FLAGS = {
    "k": "--top-k",
    "tol": "--tol",
    "which": "--which",
    "block_size": "--block-size",
    "max_hvps": "--max-hvps",
    "guard": "--guard",
    "check_steps": "--check-steps",
    "bn": "--bn",
    "precision": "--precision",
    "dtype": "--dtype",
    "seed": "--seed",
    "device": "--device",
}
_NAMED = re.compile(r"`(\w+)(?:=([^`\s]+))?`")


def in_flags(message: str) -> str:
    """``message`` with the library parameters it names written as the command line's flags."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        if name not in _FLAGS:
            return match[0]
        return _FLAGS[name] + (f" {value}" if value else "")

    return _NAMED.sub(flag, message)


def command_line() -> str:
    """This invocation as a shell command, recorded in the files it writes."""
    return shlex.join(["hessian-cli", *sys.argv[1:]])


def parse_model_kwargs(text: str | None) -> dict[str, Any] | None:
    """The ``--model-kwargs`` JSON object, or ``None`` when the option was not given."""
    if text is None:
        return None
    if not text.strip():  # ("$KWARGS" unset) refused as other empty options, not "Expecting value"
        raise UserError("--model-kwargs needs a JSON object, such as '{\"hidden\": [32]}'.")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--model-kwargs is not valid JSON: {exc.msg} at position {exc.pos}."
        ) from exc
    except RecursionError as exc:
        raise UserError("--model-kwargs is nested too deeply to read.") from exc
    if not isinstance(value, dict):
        raise UserError("--model-kwargs must be a JSON object, e.g. '{\"hidden\": [32]}'.")
    return value


def fixed_word(text: str | None, words: Iterable[str], *, ignoring: str = "") -> str | None:
    """The one of ``words`` that ``text`` is in any case, less the characters ``ignoring``
    (--optimizer Eigen-SAM, as papers write it, is eigensam): options of fixed words take them
    so (--schedule Cosine, --loss CE, --which Largest were refused); other text as given, for a
    refusal to quote or as a user's code (--loss mod:CE)."""
    if text is None:
        return None
    word = text.lower().translate({ord(c): None for c in ignoring})
    return word if word in words else text


def _no_constant(name: str) -> NoReturn:
    """Refuse NaN and Infinity, which Python's JSON reads but JSON has not: config.json
    recorded them as given, which JSON.parse refuses and jq reads as null."""
    raise UserError(f"--model-kwargs is not valid JSON: {name} is no JSON number.")


def named_path(text: str | None, option: str, example: str) -> Path | None:
    """The path an option names, if given (see :func:`given_path`). ``-``, standard output's
    usual name, is refused: `analyze --out -` wrote an HDF5 file named ``-``."""
    if text == "-":
        raise UserError(
            f"{option} - names no file here (not standard output): give one, such as {example}."
        )
    return None if text is None else given_path(text, option, example)


def file_path(text: str | None, option: str, example: str) -> Path | None:
    """The file an option names (see :func:`named_path`). A name that ends in a slash names a
    directory, which a path drops: `plot -o figs/` wrote figs.png, `analyze --out runs/` an
    HDF5 file named runs."""
    if text is not None and text.endswith(("/", os.sep)):
        raise UserError(
            f"{option} {text} names a directory; give a file name such as {text}{example}."
        )
    path = named_path(text, option, example)
    if path is not None and _in_a_loop(path):  # analyze --out: "unexpected RuntimeError"
        raise UserError(f"{option} {text} leads into a loop of symbolic links; give another path.")
    return path


def _in_a_loop(path: Path) -> bool:
    """Whether ``path``, or a folder on the way to it, is a symbolic link that leads back to
    itself: no file can be written there."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def refuse_empty(*given: tuple[str | None, str, str]) -> None:
    """Refuse an option given an empty name (``--data "$DATA"``, the variable unset): analyze
    took the checkpoint's data, model, loss or data root instead, train --loss the default
    one and --data-root the working directory, unsaid.
    ``given``: (text, option, example) of each option."""
    for text, option, example in given:
        if text is not None and not text.strip():
            raise UserError(f"{option} needs a name, such as {example}.")


def given_path(text: str, name: str, example: str) -> Path:
    """The path an option or argument names. They take paths as text, because a path parameter
    turns an empty name into ``.``, a directory the user did not name (``analyze "$CKPT"`` with
    the variable unset analysed every checkpoint in the working directory). A leading ``~`` is
    the home directory, also where quotes kept the shell from saying so (``'~/run/a.pt'`` was
    "no such file"; ``--out '~/runs'`` made a folder named ``~``); os.path's expanduser leaves
    an unknown ``~user`` as it is (pathlib's raises). ``-``, standard input's usual name, is
    refused: `show -` said "The file - does not exist."."""
    if not text.strip():
        raise UserError(f"{name} needs a name, such as {example}.")
    if text == "-":
        raise UserError(
            f"{name} - names standard input, which hessian-cli does not read: give a path, such "
            f"as {example} (./- for a file named -)."
        )
    path = Path(os.path.expanduser(text))
    # A path drops a trailing slash: `show s.h5/` showed the file, where the system says no.
    if text.endswith(("/", os.sep)) and path.exists() and not path.is_dir():
        raise UserError(f"{name} {text}: {path} is not a directory; leave the slash out.")
    return path


# What a flag given a value (`--trace true`, as other tools' flags take) is followed by.
_FLAG_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


def flag_given_a_value(command: TyperCommand, args: list[str]) -> str | None:
    """What is wrong where a flag of ``command`` is followed by a value (``--quiet true``), if
    one is: Click takes the value for the next argument, so that train said "Got unexpected
    extra argument(s) (true)" and analyze "No such checkpoint file or directory: true". A file
    of that name is an argument."""
    options = {o: p for p in command.params if isinstance(p, TyperOption) for o in p.opts}
    at = 0
    while at < len(args) - 1 and args[at] != "--":
        option, value = options.get(args[at]), args[at + 1]
        if option is not None and not option.is_flag:
            at += 2  # its value, whatever it reads
            continue
        if option is not None and value.lower() in _FLAG_VALUES and not Path(value).exists():
            return (
                f"{args[at]} takes no value: give it alone to turn it on, or leave it out "
                f"(not {args[at]} {value})."
            )
        at += 1
    return None


def refuse_unused(ctx: typer.Context, needs: dict[str, tuple[bool, str]]) -> None:
    """Refuse an option given on the command line whose feature is off (``needs``: parameter
    name -> (whether it is read, what it needs)), rather than let it look used; defaults are
    never refused."""
    for name, (read, what) in needs.items():
        source = ctx.get_parameter_source(name)
        if not read and source is not None and source.name != "DEFAULT":
            flag = next(o for o in _param(ctx, name).opts if o.startswith("--"))
            raise UserError(f"{flag} has no effect without {what}; leave it out.")


def _param(ctx: typer.Context, name: str) -> Any:
    return next(p for p in ctx.command.params if p.name == name)
