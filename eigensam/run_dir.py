"""A training run's directory on disk, and the checks before a run starts or continues in one.

The directory holds ``config.json`` (what defines the run), ``checkpoints/`` (periodic
``stepNNNNNNN.pt`` files and ``final.pt``, self-describing so ``analyze`` needs no flags, and
holding everything a resume needs) and ``metrics.h5`` (see :mod:`hessian_cli.storage.metrics`).
Every message that tells the user how to continue a stopped run says it through
:func:`resume_hint`, so they all say it alike.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from eigensam.config import CONFIG_FILE, CONFIG_FORMAT, CONFIG_VERSION, TrainConfig
from hessian_cli.atomic import atomic_path, remove_temporaries
from hessian_cli.errors import UserError
from hessian_cli.specs.checkpoints import RUN_CHECKPOINTS, UntrustedCheckpoint
from hessian_cli.storage.files import check_directory_writable, check_folder_makeable, held

METRICS_FILE = "metrics.h5"
FINAL_CHECKPOINT = "final.pt"
STEP_CHECKPOINT = re.compile(r"step(\d+)\.pt")


def step_checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint at global step ``step`` goes (an epoch end or a stop)."""
    return run_dir / RUN_CHECKPOINTS / f"step{step:07d}.pt"


def final_checkpoint_path(run_dir: Path) -> Path:
    """Where the checkpoint of the finished run goes."""
    return run_dir / RUN_CHECKPOINTS / FINAL_CHECKPOINT


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``final.pt`` if the run finished, else the interruption/periodic one of the highest step."""
    found = run_checkpoints(Path(run_dir))
    return found[-1] if found else None


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints in step order, ``final.pt`` last."""
    folder = run_dir / RUN_CHECKPOINTS
    found = sorted(
        (int(m.group(1)), p)
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := STEP_CHECKPOINT.fullmatch(p.name)) and p.is_file()
    )
    final = final_checkpoint_path(run_dir)
    return [p for _, p in found] + ([final] if final.is_file() else [])


def resume_hint(run_dir: Path, when: str = "") -> str:
    """How a stopped run continues (and ``when``, a condition such as "once more memory is
    free"): from its latest checkpoint, or not at all where none was written."""
    kept = latest_checkpoint(run_dir)
    if kept is None:
        return "no checkpoint was written"
    return f"the last checkpoint is {kept} (continue with --resume {run_dir}{when})"


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse an ``--out`` a new run cannot be made in, before anything is loaded or written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {str(run_dir)!r} is a file, not a directory.")
    if (run_dir / CONFIG_FILE).exists() or (run_dir / RUN_CHECKPOINTS).exists():
        if latest_checkpoint(run_dir) is None:  # --resume starts it again, with its options
            raise UserError(
                f"{str(run_dir)!r} holds a run that stopped before its first checkpoint: "
                f"start it again with --resume {run_dir} (its own options, from step 0), "
                "remove it, or choose another --out."
            )
        if final_checkpoint_path(run_dir).is_file():  # a resume would have nothing to do
            raise UserError(
                f"{str(run_dir)!r} already holds a finished training run (its final checkpoint "
                f"is {final_checkpoint_path(run_dir)}): choose another --out."
            )
        raise UserError(
            f"{str(run_dir)!r} already holds a training run: {resume_hint(run_dir)}, or choose "
            "another --out."
        )
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--out {str(run_dir)!r} is not empty; choose a new or empty directory.")
    check_folder_makeable(run_dir, f"--out {run_dir}")  # as analyze and plot say it


def check_resumable_dir(run_dir: Path) -> None:
    """A resume writes metrics and checkpoints: find out before the training, not after it."""
    for folder in (run_dir, run_dir / RUN_CHECKPOINTS):
        if folder.is_dir():
            check_directory_writable(folder)


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """Make the run directory and its ``config.json``; refuse where another run wrote one
    first (two new runs that both found ``--out`` free)."""
    try:
        (run_dir / RUN_CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"could not create the run directory {str(run_dir)!r}: {exc.strerror or exc}."
        ) from exc
    text = json.dumps(
        {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "config": config.identity()}, indent=2
    )
    try:
        with atomic_path(run_dir / CONFIG_FILE, exclusive=True) as tmp:
            tmp.write_text(text + "\n")
    except FileExistsError:
        raise UserError(
            f"another run started in {str(run_dir)!r} meanwhile; choose another --out."
        ) from None


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, config: TrainConfig, *, new: bool) -> Iterator[None]:
    """Hold the run for the block (a new one's ``config.json`` written first): two processes
    training one run would overwrite each other's files."""
    if new:
        write_config(run_dir, config)
    busy = f"the run in {str(run_dir)!r} is being trained by another process."
    with held(run_dir / CONFIG_FILE, busy) as holding:
        if not new and holding:  # what a killed process of this run left (its files only)
            own = "|".join(re.escape(name) for name in (CONFIG_FILE, METRICS_FILE))
            remove_temporaries(run_dir, own)
            remove_temporaries(run_dir / RUN_CHECKPOINTS, r"step\d+\.pt|final\.pt")
        yield


def unusable_checkpoint_message(path: Path, exc: UserError) -> str:
    """Why the checkpoint a resume starts from cannot be read, and the one before it."""
    reason = str(exc).rstrip(".")
    if isinstance(exc, UntrustedCheckpoint):  # train writes none that needs it: not its own
        reason = f"checkpoint {str(path)!r} holds code that loading it would run, so it was refused"
    found = run_checkpoints(path.parent.parent)
    at = found.index(path) if path in found else 0
    earlier = found[at - 1] if at > 0 else None
    if earlier is None:
        return f"{reason}."
    return f"{reason}; move it aside to resume from the one before it, {earlier.name}."
