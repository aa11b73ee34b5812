"""The engine's source as its readers meet it: docstrings and comments within the 100 columns
that ruff holds its code to (pyproject.toml), which `ruff format` does not fold for them."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import hessian_cli.engine

ENGINE = Path(hessian_cli.engine.__file__).parent
WIDTH = 100


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """The (line number, line) of ``path``'s comments and docstrings (strings alone on their
    statement), wider than WIDTH."""
    source = path.read_text()
    lines = source.splitlines()
    wide = []
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        prose = tok.type == tokenize.COMMENT or (
            tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT)
        )
        for number in range(tok.start[0], tok.end[0] + 1) if prose else ():
            if len(lines[number - 1]) > WIDTH:
                wide.append((number, lines[number - 1]))
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.type
    return wide


def test_engine_docstrings_and_comments_fit_100_columns():
    """Six were wider, up to 154 columns (solver_plan's memory note, a warm start's folding)."""
    wide = [f"{p.name}:{n}" for p in sorted(ENGINE.glob("*.py")) for n, _ in _prose_lines(p)]
    assert not wide, wide
