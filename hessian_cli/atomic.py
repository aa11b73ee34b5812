"""Plain file plumbing, without HDF5: a file's digest, and writes that replace a file
atomically (checkpoints, plots, the HDF5 files of :mod:`hessian_cli.storage`). Apart from
the storage package, so that loading a checkpoint or data imports neither h5py nor the
report."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hessian_cli.errors import UserError


def file_sha256(path: Path) -> str:
    """The file's sha256, read a megabyte at a time."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def os_reason(exc: OSError) -> str:
    """Why an operating system call failed, for a sentence ("permission denied")."""
    return (exc.strerror or str(exc)).lower().rstrip(".")


def unwritable_directory(folder: Path, exc: OSError) -> UserError:
    """Why no file can be made in the existing directory ``folder``, in one sentence. A
    directory that takes no new files (/proc, /proc/self) answers "no such file or directory",
    which read as if the directory were missing."""
    reason = os_reason(exc)
    if exc.errno == errno.ENOENT and folder.is_dir():
        reason = "it takes no new files"
    return UserError(f"cannot write to the directory {folder}: {reason}.")


@contextmanager
def stdout_written() -> Iterator[None]:
    """A failed write to standard output (a full disk under ``> results.json``) as one sentence:
    it was "unexpected OSError". A closed pipe is left to the caller: its reader went away,
    which is no error of the command's."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise UserError(f"could not write to standard output: {os_reason(exc)}.") from exc


def check_replaceable(path: Path) -> None:
    """Refuse, in one sentence, to replace a file no one may write to (``chmod a-w``), or that
    this user may not: the rename that replaces it asks only the directory, so a protected
    spectra file was appended to unsaid. (Root may write to any file: the mode bits tell.)"""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # nothing there yet
    if stat.S_ISREG(mode) and not (mode & 0o222 and os.access(path, os.W_OK)):
        raise UserError(
            f"{path} is read-only; refusing to write to it (make it writable or choose another "
            "path)."
        )


_TEMP_TAG = 12  # hex digits that tell one temporary file from another (atomic_path's names)


def remove_temporaries(directory: Path, names: str) -> None:
    """Remove the temporary files :func:`atomic_path` left in ``directory`` for files whose
    names (their :func:`temporary_stem`) match the regular expression ``names``, when its
    process was killed outright (kill -9: a checkpoint's may be as large as a checkpoint).
    Only for files whose writer's lock is held: another writer's would go too."""
    pattern = re.compile(rf"\.(?:{names})\.[0-9a-f]{{{_TEMP_TAG}}}\.tmp")
    for leftover in directory.glob(".*.tmp"):
        if pattern.fullmatch(leftover.name) and leftover.is_file():
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_path(
    path: Path, *, copy_existing: bool = False, exclusive: bool = False
) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it only if the block finishes.

    Readers never see a half-written file and a failure leaves the original (and no temporary
    file) behind. With ``copy_existing`` the temporary file starts as a copy of ``path``, so an
    append edits the copy, never the original. With ``exclusive`` it never replaces a file: if
    ``path`` exists by then (another process made it meanwhile), ``FileExistsError`` is raised.

    A replaced file keeps its permissions (a 0600 one became 0644), and one they protect is
    refused (:func:`check_replaceable`). A symbolic
    link's target is replaced (the link kept). A device, FIFO or socket (``-o /dev/null``) is
    written to as it is: it holds no file that a half-written one could spoil.
    """
    try:
        mode: int | None = os.stat(path).st_mode  # through links
    except OSError:
        mode = None  # nothing there yet (or a dangling link)
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        if copy_existing or exclusive:
            raise UserError(f"{path} is not a regular file.")
        try:
            yield path
        except OSError as exc:
            raise UserError(f"could not write {path}: {os_reason(exc)}.") from exc
        return
    if not exclusive:
        check_replaceable(path)
    path = written_at(path)
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"the output directory {parent} {what}.")
    tmp = parent / _temporary_name(parent, path.name)
    try:  # os.open with 0o666 honours the umask, as a plainly created file would
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise unwritable_directory(parent, exc) from exc
    try:
        if copy_existing:
            shutil.copyfile(path, tmp)
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        if mode is not None and stat.S_ISREG(mode):  # as a write in place would keep them
            os.chmod(tmp, stat.S_IMODE(mode))
        if exclusive:
            _link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError as exc:
        tmp.unlink(missing_ok=True)
        if exclusive:
            raise
        raise UserError(f"could not write {path}: {os_reason(exc)}.") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {os_reason(exc)}.") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def written_at(path: Path) -> Path:
    """Where writing ``path`` puts the file: a symbolic link's target (the link kept)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def temporary_stem(parent: Path, name: str) -> str:
    """``name`` as the temporary files for it in ``parent`` hold it: cut short where the name
    with its tag would be longer than the file system takes (a figure named with 240 letters,
    a valid name, was refused as "file name too long"). :func:`remove_temporaries` is given
    this, not the name, or a long name's leftover is never matched."""
    try:
        longest = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255  # most file systems'
    encoded = os.fsencode(name)
    if longest > 0:  # -1: no limit
        encoded = encoded[: longest - len(".tmp") - _TEMP_TAG - 2]  # the dots before each
    return os.fsdecode(encoded)


def _temporary_name(parent: Path, name: str) -> str:
    """A new temporary file's name for ``name`` in ``parent``."""
    return f".{temporary_stem(parent, name)}.{uuid.uuid4().hex[:_TEMP_TAG]}.tmp"


def _link(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s file the name ``path`` only if no file has it (a hard link, which fails
    on an existing name, where a rename would replace it), then drop the name ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: a rename, no longer exclusive
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):  # the file is in place; a stray name is harmless
        tmp.unlink()
