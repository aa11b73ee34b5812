"""Option parsing shared by several commands."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hessian_cli.errors import UserError


def command_line() -> str:
    """This invocation as a shell command, recorded in the files it writes."""
    return shlex.join(["hessian-cli", *sys.argv[1:]])


def parse_model_kwargs(text: str | None) -> dict[str, Any] | None:
    """The ``--model-kwargs`` JSON object, or ``None`` when the option was not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--model-kwargs is not valid JSON: {exc.msg} at position {exc.pos}."
        ) from exc
    if not isinstance(value, dict):
        raise UserError("--model-kwargs must be a JSON object, e.g. '{\"hidden\": [32]}'.")
    return value


def pick_checkpoint(
    file: Path, reports: Sequence[dict[str, Any]], groups: Sequence[str], name: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The reports (and their groups) that ``--checkpoint NAME`` names, as the series table
    shows them: the one checkpoint of that name, else the group of that name (a checkpoint
    analysed twice is stored as name and name-2, which the table then shows), else every
    checkpoint of that name; all without ``name``."""
    pairs = list(zip(reports, groups, strict=True))
    if name is not None:
        named = [(d, g) for d, g in pairs if d["name"] == name]
        grouped = [(d, g) for d, g in pairs if g == name]
        pairs = named if len(named) == 1 else grouped or named
        if not pairs:
            raise UserError(f"{file} holds no checkpoint named {name!r}.")
    return [d for d, _ in pairs], [g for _, g in pairs]
