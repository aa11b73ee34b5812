"""The CLI run in-process exactly as the console script runs it, and the check that an error is
told in one sentence: shared by the command tests."""

from __future__ import annotations

import sys

from hessian_cli.cli import main


def exit_code(*args: object) -> int:
    """The exit status of ``hessian-cli ARGS`` (through ``main``, the entry point)."""
    argv = sys.argv
    sys.argv = ["hessian-cli", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv


def run(capsys, *args: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``hessian-cli ARGS``."""
    code = exit_code(*args)
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str, *, strict: bool = False) -> str:
    """The error ``err`` tells, unwrapped; it must be a red ``error:`` line and no traceback
    (``strict``: and a single sentence, no ". " inside)."""
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert text.startswith("error:"), text
    assert not strict or text.count(". ") == 0, text
    return text
