"""File plumbing shared by every writer and reader: atomic replacement and checked opening."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import h5py

from hessian_cli.atomic import atomic_path, os_reason, unwritable_directory
from hessian_cli.errors import UserError


@contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold, across processes, the right to rewrite ``path``: two appends at once would each
    copy the original, and the later replacement would drop the earlier one's additions.

    The lock is on the directory that holds ``path``, so no file is left behind; where the file
    system refuses that (some network ones), on a file ``.NAME.lock`` beside it, which stays:
    removing it would let a third writer lock a new one while the second held the old. (POSIX
    only; elsewhere no lock.) Yields whether the lock is held.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    fd, error = -1, None
    try:
        for target, flags in (
            (path.parent, os.O_RDONLY),
            (path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT),
        ):
            try:
                fd = os.open(target, flags, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except OSError as exc:
                error = exc
                if fd >= 0:
                    os.close(fd)
                    fd = -1
        if fd < 0:
            assert error is not None
            raise unwritable_directory(path.parent, error)
        yield True
    finally:
        if fd >= 0:
            os.close(fd)  # and with it the lock


def check_directory_writable(folder: Path) -> None:
    """Refuse, in one sentence, a directory no file can be made in (before the work whose
    results it would hold). Tried with a nameless temporary file and a byte written to it,
    which also says why: a read-only file system, permissions, a full disk (of inodes, or of
    blocks: an empty file could still be made there, and the results were refused after the
    work)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0")  # written as it closes (where a network file system tells)
    except OSError as exc:
        raise unwritable_directory(folder, exc) from exc


def check_folder_makeable(folder: Path, output: str) -> None:
    """Refuse, in one sentence, an output directory that cannot be made or written in: the
    nearest that exists of it and those above it must be a writable directory. The missing
    ones are made when the output is written (:func:`make_folder`), as `train` makes its run
    directory: `analyze --out` and `plot -o` refused them where `train --out` made them.
    ``output`` is the option and path that put it there (``--out run/s.h5``): the three
    commands said a file in the way each in their own words."""
    there = folder
    while not there.exists() and there != there.parent:
        # A link to a folder yet to be made: where that will be (a loop of links: the parent).
        target = Path(os.path.realpath(there))
        there = target if there.is_symlink() and not target.is_symlink() else there.parent
    if not there.is_dir():
        raise UserError(f"{output} lies under {there}, which is not a directory.")
    check_directory_writable(there)


def make_folder(folder: Path) -> None:
    """Make ``folder`` and those above it that are missing (see :func:`check_folder_makeable`),
    through a link to a folder yet to be made, as analyze --out makes it (plot -o said "could
    not create the output directory figs: file exists" of the link)."""
    try:
        Path(os.path.realpath(folder)).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"could not create the output directory {folder}: {os_reason(exc)}."
        ) from exc


@contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Hold back the Python handlers of ``signums`` for the block and run them after it, so
    that a file being written when one arrives is finished first (the replacement an atomic
    write would otherwise abandon, taking the rows it held with it). Main thread only, where
    handlers can be swapped; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []
    previous = {s: signal.signal(s, lambda n, frame: caught.append((n, frame))) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s, frame in caught:
            handler = previous[s]
            if callable(handler):
                handler(s, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


@contextmanager
def held(path: Path, busy: str) -> Iterator[bool]:
    """Hold the existing file ``path`` exclusively across processes for the block, or refuse at
    once with the sentence ``busy`` where another process holds it: a training run, say, which
    two processes would each overwrite. (POSIX only, and where the file system has locks.)
    Yields whether it is held."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:  # for writing where allowed: NFS locks only files open for writing exclusively
        fd = os.open(path, os.O_RDWR)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"could not read {path}: {os_reason(exc)}.") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        except OSError:  # a file system without locks (some network ones): nothing to hold
            yield False
            return
        yield True
    finally:
        os.close(fd)  # and with it the lock


# Files up to this size are built in memory; larger ones (eigenvectors of big models) on disk.
IN_MEMORY_BYTES = 256 << 20


@contextmanager
def hdf5_written(path: Path, *, append: bool = False, adding: int = 0) -> Iterator[h5py.File]:
    """An HDF5 file (a copy of ``path`` with ``append``) that replaces ``path`` atomically once
    the block finishes; ``adding`` is about how many bytes the block writes.

    HDF5 writing to a full disk says so as a RuntimeError, or crashes the process while it
    closes the file: a file that fits in memory is therefore built there and written with plain
    I/O (a full disk is then one OSError); a larger one only where the disk has room for it.
    """
    size = (path.stat().st_size if append else 0) + adding
    if size > IN_MEMORY_BYTES:
        _check_room(path, size)
        with (
            atomic_path(path, copy_existing=append) as tmp,
            h5py.File(tmp, "r+" if append else "w") as f,
        ):
            yield f
        return
    buffer = io.BytesIO(path.read_bytes() if append else b"")
    with h5py.File(buffer, "r+" if append else "w") as f:
        yield f
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _check_room(path: Path, size: int) -> None:
    """Refuse a write the disk has no room for (with 5% and 16 MiB to spare)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < size * 1.05 + (16 << 20):
        raise UserError(
            f"could not write {path}: it needs about {size / 2**20:.0f} MiB and the disk has "
            f"{free / 2**20:.0f} MiB free."
        )


def open_hdf5(path: Path) -> h5py.File:
    """Open an existing HDF5 file for reading, or say in one sentence why it cannot be."""
    if not path.exists():
        raise UserError(f"the file {path} does not exist.")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an HDF5 file.")
    try:
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file.")
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"could not read {path}: {_open_reason(exc)}.") from exc


# HDF5's words for a file shorter than its superblock says it is.
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def _open_reason(exc: OSError) -> str:
    """Why HDF5 could not open a file, for a sentence: a truncated one (a copy or download cut
    short) read "unable to synchronously open file (truncated file: eof = 5000,
    sblock->base_addr = 0, stored_eof = 70101)"."""
    if (found := _TRUNCATED.search(str(exc))) is not None:
        held, whole = (int(n) for n in found.groups())
        cut = "a copy, download or write cut short"
        return f"it is truncated, {held:,} of its {whole:,} bytes ({cut})"
    return os_reason(exc)


def file_format(path: Path) -> str:
    """The ``format`` root attribute of a hessian-cli HDF5 file (spectra or metrics)."""
    try:
        with open_hdf5(path) as f:
            fmt = f.attrs.get("format")
    except (OSError, RuntimeError) as exc:  # damaged bytes where the attributes are
        raise UserError(f"could not read {path}: {os_reason(exc)}.") from exc
    # An attribute of another kind (an array, a number) read "is a '[1 2]' file".
    if not isinstance(fmt, str | bytes):
        raise UserError(f"{path} is an HDF5 file but not one written by hessian-cli.")
    # Bytes that are no UTF-8 crashed (UnicodeDecodeError): they are refused as another format.
    return fmt.decode(errors="backslashreplace") if isinstance(fmt, bytes) else fmt


def storable_text(text: str) -> str:
    """``text`` as UTF-8 can hold it, for HDF5 strings and the terminal: the bytes of a file
    name that is not UTF-8 (which Python holds as lone surrogates) as ``\\xNN``, and NUL, which
    an HDF5 string cannot hold, as ``\\x00`` (either failed the write after all the work)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate no file name decoding makes
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\0", "\\x00")


# What h5py raises for damaged bytes (RuntimeError: a metadata checksum) or what reading code
# raises for a layout other than the documented one.
DAMAGED = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError)


def dangling_link(group: h5py.Group, name: str) -> bool:
    """Whether ``group[name]`` is a soft or external link whose target cannot be opened (gone,
    or in a file that is not there): nothing, where a hard link that cannot be opened is
    damage."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.SoftLink | h5py.ExternalLink):
        return False
    try:
        group[name]
    except DAMAGED:
        return True
    return False


def member(group: h5py.Group, name: str) -> h5py.HLObject | None:
    """``group[name]``, None where there is no such name or a link to nothing; an object of the
    file there that cannot be opened raises (``get`` and ``items()`` said None: a damaged trace
    read as no trace, a damaged column as no column)."""
    if name not in group or dangling_link(group, name):
        return None
    return group[name]


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """What reading or drawing a damaged file, or one laid out otherwise (a dataset where a
    group belongs, a string where a number does, columns of different lengths), raises inside a
    valid-looking file: one sentence."""
    try:
        yield
    except DAMAGED as exc:
        raise UserError(
            f"could not read {path}: it is damaged or not laid out as docs/hdf5.md says ({exc})."
        ) from exc


@contextmanager
def open_format(path: str | Path, name: str, what: str) -> Iterator[h5py.File]:
    """Open a hessian-cli file of format ``name`` for reading; anything else, or damage found
    while reading inside it, is one sentence (``what`` names the kind, e.g. "spectra")."""
    path = Path(path)
    fmt = file_format(path)
    if fmt != name:
        raise UserError(f"{path} is a {fmt!r} file, not a hessian-cli {what} file.")
    with reading(path), open_hdf5(path) as f:
        yield f
