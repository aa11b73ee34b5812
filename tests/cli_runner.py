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


# A spec file of 40 token texts, every 4th without a label (all -100): at --batch-size 2 some
# minibatches hold padding only (`data`), and a model for them (`make`).
PADDED_TEXTS = (
    "import torch\nfrom torch import nn\n\n\n"
    "def data():\n"
    "    g = torch.Generator().manual_seed(0)\n"
    "    x = torch.randint(0, 5, (40, 6), generator=g)\n"
    "    y = torch.randint(0, 5, (40, 6), generator=g)\n"
    "    y[::4] = -100  # every 4th text has no label\n"
    "    return torch.utils.data.TensorDataset(x, y)\n\n\n"
    "def make():\n"
    "    return nn.Sequential(nn.Embedding(5, 4), nn.Tanh(), nn.Linear(4, 5))\n"
)
