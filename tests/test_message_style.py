"""Every refusal the user reads goes on in lower case after the CLI's "error: " (and a series'
"file.pt: "), as Python's own messages do: a sentence that starts with a capital read as
another tool's ("error: Could not write ..."). Proper names and identifiers keep theirs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import eigensam
import eigensam.training
import hessian_cli
import hessian_cli.analysis
from hessian_cli.errors import UserError

SOURCES = [Path(hessian_cli.__file__).parent, Path(eigensam.__file__).parent]
# A capitalised plain word: not an identifier (MatrixOperator, RANK), nor a name (Eigen-SAM).
PLAIN = re.compile(r"[A-Z][a-z]+")


def _kinds(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_kinds(sub) for sub in cls.__subclasses__()))


REFUSALS = _kinds(UserError)  # (its subclasses, once every module that defines one is imported)
PROPER = {"Lightning", "Python", "Typer", "Rich", "Windows", "Linux", "Adam", "Hutchinson"}


def _opening(node: ast.expr) -> str | None:
    """The text a (possibly formatted) string literal starts with, if it starts with text."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _opening(node.values[0])
    if isinstance(node, ast.BinOp):  # "..." + "..."
        return _opening(node.left)
    return None


def _capitalised_refusals(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name not in REFUSALS:
            continue
        text = _opening(node.args[0])
        first = text.split()[0] if text and text.split() else ""
        if PLAIN.fullmatch(first) and first not in PROPER:
            found.append(f"{path.name}:{node.lineno}: {first}")
    return found


def test_refusals_go_on_in_lower_case():
    found = [
        hit
        for root in SOURCES
        for p in sorted(root.rglob("*.py"))
        for hit in _capitalised_refusals(p)
    ]
    assert not found, found
