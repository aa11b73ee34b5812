"""What produced a number: the code (commit, uncommitted library files, refresh budgets), the
machine and the time, for the experiment scripts here, and the generated blocks of RESULTS.md.

The scripts import the library before anything else, so :func:`provenance` called at their start
describes the code they run; the digest of the uncommitted changes tells two runs of the same
commit apart when the working tree differed between them. Git is only read (``--no-optional-locks``:
not even the index's stat cache is written).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The code a training run or a measurement executes.
LIBRARY = ("eigensam", "hessian_cli")
# Keys that identify the code and the machine (what a run's numbers depend on); the rest of an
# entry (when it started, from which step) is bookkeeping.
IDENTITY = (
    "commit",
    "uncommitted",
    "uncommitted_digest",
    "refresh_warm_max_hvps",
    "refresh_cold_max_hvps",
    "refresh_tol",
    "cpu",
    "cores",
    "python",
    "torch",
)


def git(*cmd: str) -> str:
    """Output of a read-only git command in the repository ('' if git is not there)."""
    try:
        return subprocess.run(
            ["git", "--no-optional-locks", *cmd],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rstrip()  # not strip(): porcelain lines start with a space
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) give it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance() -> dict[str, Any]:
    """The code and machine of this process, and the time."""
    import torch

    from eigensam import refresh

    status = git("status", "--porcelain", "--untracked-files=all", "--", *LIBRARY)
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    digest = hashlib.sha256(git("diff", "HEAD", "--", *LIBRARY).encode())
    for line in status.splitlines():
        if line.startswith("??"):  # untracked: git diff does not show them
            try:
                digest.update((ROOT / line[3:]).read_bytes())
            except OSError:
                pass
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "uncommitted": changed,
        "uncommitted_digest": digest.hexdigest()[:12] if changed else "",
        "refresh_warm_max_hvps": refresh.DEFAULT_MAX_HVPS,
        "refresh_cold_max_hvps": getattr(refresh, "COLD_MAX_HVPS", refresh.DEFAULT_MAX_HVPS),
        "refresh_tol": refresh.DEFAULT_TOL,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": now(),
    }


def identity(entry: dict[str, Any]) -> tuple:
    """What two entries must share to count as the same code on the same machine."""
    return tuple(tuple(v) if isinstance(v := entry.get(k), list) else v for k in IDENTITY)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The identity keys in which two entries differ."""
    return [k for k in IDENTITY if a.get(k) != b.get(k)]


def describe_code(p: dict[str, Any]) -> str:
    """``commit abc1234 with uncommitted changes to ... (digest ...); refresh budget ...``."""
    text = f"commit {p.get('commit', 'unknown')}"
    if p.get("uncommitted"):
        text += (
            f" with uncommitted changes to {', '.join(p['uncommitted'])} "
            f"(diff digest {p['uncommitted_digest']})"
        )
    return text + (
        f"; Eigen-SAM refresh budget: up to {p.get('refresh_warm_max_hvps')} HVPs warm-started, "
        f"up to {p.get('refresh_cold_max_hvps')} for the first (cold) refresh of a run, each "
        f"stopping early at residual <= {p.get('refresh_tol')} lambda"
    )


def describe_machine(p: dict[str, Any]) -> str:
    """``2-core CPU (model), Linux, Python ..., torch ...``."""
    return (
        f"{p.get('cores')}-core {platform.machine()} CPU ({p.get('cpu')}), {platform.system()}, "
        f"Python {p.get('python')}, torch {p.get('torch')}"
    )


def markers(block: str) -> tuple[str, str]:
    """The comment lines around a generated block ('' is the main one)."""
    name = f" {block}" if block else ""
    return f"<!-- BEGIN GENERATED{name} -->", f"<!-- END GENERATED{name} -->"


def write_block(path: Path, block: str, lines: list[str]) -> None:
    """Replace the generated block ``block`` of the markdown file ``path`` (text outside it is
    kept; the block is appended where its markers are missing, the file made if need be)."""
    begin, end = markers(block)
    body = "\n".join([begin, *lines, end])
    text = path.read_text() if path.is_file() else "# Eigen-SAM experiment\n"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
