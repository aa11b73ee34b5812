"""The benchmark scripts' command lines: their docstring as the help."""

from __future__ import annotations

import argparse


def parser_for(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's whole docstring, laid out as written: what it
    measures and how to run it (a first line alone cut some mid-sentence)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
