"""The spectra HDF5 file (layout and version in docs/hdf5.md).

Writes are atomic: a temporary copy is edited and renamed over the original, so a failure or an
interrupt leaves the original as it was. Appends only add groups, never change existing ones.
Reading returns :func:`hessian_cli.report.analysis_to_dict` structures and tolerates missing
optional parts and unknown extra attributes, so files of other versions still read.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import re
import signal
import stat
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from hessian_cli.atomic import check_replaceable, remove_temporaries, temporary_stem
from hessian_cli.errors import Terminated, UserError
from hessian_cli.report import analysis_to_dict, cost_dict, number, numbers, provenance_dict
from hessian_cli.series_order import natural_key, series_key
from hessian_cli.storage.files import (
    DAMAGED,
    check_folder_makeable,
    dangling_link,
    file_format,
    hdf5_written,
    locked,
    make_folder,
    member,
    open_format,
    open_hdf5,
    signals_deferred,
    storable_text,
)

if TYPE_CHECKING:
    import torch

    from hessian_cli.checkpoint_analysis import CheckpointAnalysis

FORMAT_NAME = "hessian-cli-spectra"
FORMAT_VERSION = 2  # 2: `trace` is a dataset (a group in version 1)

_STR = h5py.string_dtype()
_VECTOR_CHUNK = 1 << 18  # elements per eigenvector chunk: 1 MiB in float32
_EIGEN_ARRAYS = ("eigenvalues", "residuals", "errors", "converged")
_DENSITY_ARRAYS = ("nodes", "weights", "grid", "values")


# --- writing ----------------------------------------------------------------------------------


def write_analyses(
    path: str | Path,
    analyses: Sequence[CheckpointAnalysis],
    *,
    command_line: str = "",
    save_eigenvectors: bool = False,
    series: bool = False,
) -> list[str]:
    """Add one group per analysis to ``path`` (created if missing); returns the group names.

    ``analyses`` are what :func:`hessian_cli.analysis.analyze_target` returns. ``command_line``
    is recorded as how they were made (the CLI's invocation; a script may give its own).
    ``series`` marks the file's checkpoints as one training trajectory (root attr
    ``trajectory``); the root ``series`` dataset lists the groups in series order (by epoch, then
    step: :func:`~hessian_cli.series_order.series_key`, then name) either way.

    A stop (Ctrl-C, or torchrun's SIGTERM when another rank ends) takes effect once the file is
    in place; while another process writing the file is awaited, at once, and its
    KeyboardInterrupt or :class:`Terminated` then says "nothing was written to PATH" (a stop
    held back for the write says nothing).
    """
    import torch  # only writers need it; `show` starts faster without

    from hessian_cli import __version__  # read from the package metadata: here, once

    path = Path(path).resolve()  # a link's target is appended to, the link kept
    with contextlib.ExitStack() as stack:  # a stop's effect: see the docstring
        try:
            check_writable(path)
            make_folder(path.parent)
            held = stack.enter_context(locked(path))
        except (KeyboardInterrupt, Terminated) as exc:
            raise type(exc)(f"nothing was written to {path}") from None
        stack.enter_context(signals_deferred(signal.SIGTERM, signal.SIGINT))
        if held:  # a writer of this file killed outright (kill -9) left its copy, as large
            remove_temporaries(path.parent, re.escape(temporary_stem(path.parent, path.name)))
        exists = _holds_something(path)  # after the lock: another writer may have made it
        with hdf5_written(
            path, append=exists, adding=_bytes_to_add(analyses, save_eigenvectors)
        ) as f:
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if not exists:
                f.attrs["format"] = FORMAT_NAME
                f.attrs["created"] = now
            f.attrs["format_version"] = FORMAT_VERSION  # the newest layout among the file's groups
            f.attrs["tool_version"] = __version__
            f.attrs["torch_version"] = str(torch.__version__)
            f.attrs["modified"] = now
            f.attrs["command_line"] = storable_text(command_line)
            f.attrs["trajectory"] = bool(series or f.attrs.get("trajectory", False))
            checkpoints = f.require_group("checkpoints")
            written: list[str] = []
            for a in analyses:
                group = checkpoints.create_group(
                    _unique_name(checkpoints, a.name), track_order=True
                )
                _write_group(group, a, save_eigenvectors=save_eigenvectors)
                written.append(group.name.rsplit("/", 1)[-1])
            entry = {
                "time": now,
                "tool_version": __version__,
                "torch_version": str(torch.__version__),
                "command_line": command_line,
                "groups": written,
            }
            _append_strings(f, "history", [json.dumps(entry)])
            _set_strings(f, "series", _series_order(f, written))
    return written


def _bytes_to_add(analyses: Sequence[CheckpointAnalysis], save_eigenvectors: bool) -> int:
    """About what the groups take: eigenvectors (before compression), plus a MiB each."""
    total = len(analyses) << 20
    for a in analyses:
        vectors = a.eigen.eigenvectors if a.eigen is not None else None
        if save_eigenvectors and vectors is not None:
            total += vectors.numel() * (8 if vectors.dtype.itemsize == 8 else 4)
    return total


# Names whose suffix says another kind of file: an HDF5 file written there would mislead every
# program that goes by the name (an image viewer, a JSON parser, torch.load).
_OTHER_FORMATS = frozenset(
    "png pdf svg svgz eps ps jpg jpeg tif tiff webp gif bmp pgf "  # figures: `hessian-cli plot`
    "json csv tsv txt md "  # text: `--json` prints JSON
    "pt pth ckpt bin safetensors npz npy pkl pickle".split()  # weights and arrays
)


def check_output_name(path: str | Path) -> None:
    """Refuse a new ``--out`` whose name says another kind of file (as the user gave it: a link
    is named by its own name; an existing spectra file is appended to whatever its name)."""
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix in _OTHER_FORMATS and not _holds_something(Path(path)):
        raise UserError(
            f"--out {path} names a .{suffix} file, but the results are written as HDF5; give a "
            "name such as spectra.h5 (`hessian-cli plot` draws figures, `--json` prints JSON)."
        )


def check_writable(path: str | Path) -> None:
    """Refuse, in one sentence, an output that :func:`write_analyses` could not write: callers
    check before the work whose results it would hold."""
    if Path(path).is_dir():
        raise UserError(f"--out {path} is a directory; give a file name such as spectra.h5.")
    if (kind := _special_file(Path(path))) is not None:
        raise UserError(
            f"--out {path} is {kind}, not a file: the results are written as an HDF5 file; give "
            "one such as spectra.h5 (`--json` prints them)."
        )
    output = f"--out {path}"
    path = Path(path).resolve()
    check_folder_makeable(path.parent, output)
    check_replaceable(path)
    if _holds_something(path):
        _check_appendable(path)


def _special_file(path: Path) -> str | None:
    """What ``path`` is (through links) where it is a pipe, socket or device: `--out
    /dev/stdout` into a pipe was refused as "cannot write to the directory /proc/N/fd", and
    /dev/null as "not an HDF5 file"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # nothing there yet (or a dangling link): a new file
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None


def _holds_something(path: Path) -> bool:
    """Whether ``path`` exists and is not an empty file: an empty one (``mktemp``'s, say) holds
    nothing an append could keep or a write could spoil, and is written as a new file (it was
    refused as "not an HDF5 file")."""
    return path.exists() and not (path.is_file() and path.stat().st_size == 0)


def _check_appendable(path: Path) -> None:
    """Refuse, before the work, a file that an append would make worse or could not extend."""
    try:
        fmt = file_format(path)
    except UserError as exc:  # not HDF5, unreadable: "m.pt is not an HDF5 file." said no more
        raise UserError(
            f"{str(exc).rstrip('.')}; refusing to write into it (choose another --out path)."
        ) from exc
    if fmt != FORMAT_NAME:
        raise UserError(
            f"{path} is a {fmt!r} file, not a spectra file; refusing to write into it "
            "(choose another --out path)."
        )

    def refused(why: str) -> UserError:
        return UserError(f"{path} {why}; refusing to add to it (choose another --out path).")

    with open_hdf5(path) as f:
        version = _format_version(f.attrs.get("format_version", 0))
        if version is None:
            raise refused(f"{_NOT_LAID_OUT} (its format_version is not an integer)")
        if version > FORMAT_VERSION:
            raise UserError(
                f"{path} was written by a newer hessian-cli (format version {version}); "
                "write to a new file or upgrade hessian-cli."
            )
        # Found now, not after the work: damage (the new groups would go into a file that no
        # reader can open) and lists that an append could not extend.
        try:
            f.visititems(_read_attributes)
        except DAMAGED as exc:
            raise refused(f"is damaged ({exc})") from exc
        if (link := _external_link(f)) is not None:
            raise refused(f"{_NOT_LAID_OUT} ({link} is a link to another file)")
        held = f.get("checkpoints")
        if held is not None and not isinstance(held, h5py.Group):
            raise refused(f"{_NOT_LAID_OUT} (/checkpoints is not a group)")
        for name in ("series", "history"):
            ds = f.get(name)
            if ds is not None and (not isinstance(ds, h5py.Dataset) or ds.maxshape != (None,)):
                raise refused(f"{_NOT_LAID_OUT} (/{name} cannot grow)")
            if ds is not None and h5py.check_string_dtype(ds.dtype) is None:
                raise refused(f"{_NOT_LAID_OUT} (/{name} does not hold strings)")
        # And what the readers refuse: groups added to a file that `show` cannot read are lost.
        try:
            _info(f)
            for name in _stored_order(f):
                _read_group(f["checkpoints"][name])
        except DAMAGED as exc:
            raise refused(f"is damaged or {_NOT_LAID_OUT.removeprefix('is ')} ({exc})") from exc


_NOT_LAID_OUT = "is not laid out as docs/hdf5.md says"


def _external_link(f: h5py.File) -> str | None:
    """The first link in ``f`` to another file: edited in memory, HDF5 opens its target through
    the same buffer, and the written file can come out truncated."""
    groups = [f]

    def visit(_: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group):
            groups.append(obj)

    f.visititems(visit)  # each group once, however many links lead to it
    for group in groups:
        for name in group:
            if isinstance(group.get(name, getlink=True), h5py.ExternalLink):
                return f"{group.name.rstrip('/')}/{name}"
    return None


def _format_version(value: Any) -> int | None:
    """The root ``format_version`` as an int; ``None`` where it is not one (text, an array)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _read_attributes(_: str, obj: h5py.HLObject) -> None:
    dict(obj.attrs)


def _unique_name(parent: h5py.Group, name: str) -> str:
    """An HDF5-safe name derived from ``name`` that no group in ``parent`` has yet."""
    base = re.sub(r"[^\w.+=@-]+", "_", name).strip("._") or "checkpoint"
    candidate, i = base, 1
    while candidate in parent:
        i += 1
        candidate = f"{base}-{i}"
    return candidate


def _floats(values: Any) -> np.ndarray:
    """Report numbers (``None`` for non-finite) as a float64 array (NaN for ``None``)."""
    return np.array(values, dtype=np.float64)


def _set_attrs(obj: h5py.HLObject, values: dict[str, Any], *, none: Any = None) -> None:
    """Store ``values`` as attributes; a ``None`` is stored as ``none``, or skipped where that
    is None (provenance). A section's ``None`` is a number that is not finite: NaN."""
    for key, value in values.items():
        if value is None:
            value = none
        if isinstance(value, str):
            value = storable_text(value)  # e.g. a spec read from a checkpoint, holding NUL
        elif isinstance(value, list):
            value = [storable_text(v) if isinstance(v, str) else v for v in value]
        if value is not None:
            obj.attrs[key] = value


def _write_group(group: h5py.Group, a: CheckpointAnalysis, *, save_eigenvectors: bool) -> None:
    d = analysis_to_dict(a)
    _set_attrs(group, d["provenance"])
    group.create_dataset("name", data=storable_text(d["name"]), dtype=_STR)
    group.create_dataset("loss", data=np.nan if d["loss"] is None else d["loss"])
    if (e := d["eigen"]) is not None:
        ev = group.create_dataset("eigenvalues", data=_floats(e["eigenvalues"]))
        _set_attrs(ev, {k: v for k, v in e.items() if k not in _EIGEN_ARRAYS}, none=np.nan)
        group.create_dataset("residuals", data=_floats(e["residuals"]))
        group.create_dataset("eigenvalue_errors", data=_floats(e["errors"]))
        group.create_dataset("converged", data=np.array(e["converged"], dtype=np.uint8))
        vectors = a.eigen.eigenvectors if a.eigen is not None else None
        if save_eigenvectors and vectors is not None and vectors.shape[0] > 0:
            _write_eigenvectors(group, a, vectors)
    if (t := d["trace"]) is not None:
        estimate = np.nan if t["estimate"] is None else t["estimate"]
        tr = group.create_dataset("trace", data=np.float64(estimate))
        _set_attrs(tr, {k: v for k, v in t.items() if k != "estimate"}, none=np.nan)
        samples = a.trace.samples.detach().cpu().double().numpy()
        group.create_dataset("trace_samples", data=samples)
    if (dn := d["density"]) is not None:
        dg = group.create_group("density")
        for key in _DENSITY_ARRAYS:
            dg.create_dataset(key, data=_floats(dn[key]))
        _set_attrs(dg, {k: v for k, v in dn.items() if k not in _DENSITY_ARRAYS}, none=np.nan)
    if (al := d["alignment"]) is not None:
        ag = group.create_group("alignment")
        ag.create_dataset("alignment", data=_floats(al["alignment"]))
        mb = al["minibatch"]
        # [M, k] also where M is 0 (a list of no rows says nothing of k)
        rows = _floats(mb["values"]).reshape(len(mb["values"]), len(al["alignment"]))
        ag.create_dataset("minibatch", data=rows)
        ag.create_dataset("minibatch_mean", data=_floats(mb["mean"]))
        ag.create_dataset("minibatch_std", data=_floats(mb["std"]))
        _set_attrs(
            ag, {k: v for k, v in al.items() if k not in ("alignment", "minibatch")}, none=np.nan
        )


def _write_eigenvectors(group: h5py.Group, a: CheckpointAnalysis, vectors: torch.Tensor) -> None:
    import torch

    # As computed where that is float64 (their residuals describe those vectors), else float32.
    v = vectors.detach().cpu()
    v = (v if v.dtype == torch.float64 else v.float()).numpy()
    group.create_dataset(
        "eigenvectors",
        data=v,
        chunks=(1, max(1, min(v.shape[1], _VECTOR_CHUNK))),
        compression="gzip",
        compression_opts=4,
        shuffle=True,
    )
    space = a.space
    group.create_dataset("param_names", data=list(space.names), dtype=_STR)
    shapes = json.dumps([list(s) for s in space.shapes])
    group.create_dataset("param_shapes", data=shapes, dtype=_STR)
    group.create_dataset("param_offsets", data=np.array(space.offsets, dtype=np.int64))


def _append_strings(f: h5py.File, name: str, values: list[str]) -> None:
    """Append to a resizable string dataset (no space is leaked in the file on each write)."""
    if name not in f:
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(64,))
    ds = f[name]
    start = ds.shape[0]
    ds.resize((start + len(values),))
    ds[start:] = values


def _set_strings(f: h5py.File, name: str, values: list[str]) -> None:
    """Overwrite a resizable string dataset with ``values``."""
    if name not in f:
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(64,))
    ds = f[name]
    ds.resize((len(values),))
    if values:
        ds[:] = values


def _ordinal(value: Any) -> float | None:
    """A step or epoch attribute as a number to sort by; None where it is none (text, NaN,
    which compares false with everything and left a series unsorted)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series_order(f: h5py.File, new: list[str]) -> list[str]:
    """Group names in series order (:func:`_by_step`); ties keep insertion order (a checkpoint
    analysed again after the first)."""
    return _by_step(f, [n for n in _stored_order(f) if n not in set(new)] + new)


def _by_step(f: h5py.File, names: list[str]) -> list[str]:
    """``names`` by :func:`series_key`, then naturally by checkpoint name, as the loader orders
    a series (appended one by one, ckpt_1, ckpt_10, ckpt_2 were kept so); ties (a checkpoint
    analysed again) keep their order."""

    def key(item: tuple[int, str]) -> tuple:
        i, name = item
        group = f["checkpoints"][name]
        step, epoch = _ordinal(group.attrs.get("step")), _ordinal(group.attrs.get("epoch"))
        return (*series_key(step, epoch, name), natural_key(_name(group)), i)

    return [name for _, name in sorted(enumerate(names), key=key)]


def _is_group(parent: h5py.Group, name: str) -> bool:
    """Whether ``parent[name]`` is a group, or an object of the file that cannot be opened (a
    damaged header), which reading then refuses: h5py's ``items()`` and ``get`` give None for
    it, and the checkpoint dropped out of ``show`` and ``plot`` unsaid. A soft or external link
    whose target is gone points at nothing, and is no checkpoint."""
    try:
        return isinstance(parent[name], h5py.Group)
    except DAMAGED:
        return not dangling_link(parent, name)


def _stored_order(f: h5py.File) -> list[str]:
    """The ``series`` list, then any group it misses (older or foreign writers) by step, then
    name. What is not a group there (a dataset another tool added) is not a checkpoint, and is
    ignored."""
    held = f.get("checkpoints")
    groups = [n for n in held if _is_group(held, n)] if isinstance(held, h5py.Group) else []
    listed = [n for n in f["series"].asstr()[()] if n in groups] if "series" in f else []
    listed = list(dict.fromkeys(listed))  # a name listed twice is still one checkpoint
    return listed + _by_step(f, sorted(set(groups) - set(listed)))


# --- reading ----------------------------------------------------------------------------------


def _open_spectra(path: str | Path) -> AbstractContextManager[h5py.File]:
    return open_format(path, FORMAT_NAME, "spectra")


def read_spectra(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`read_analyses` and :func:`read_file_info` from one opening of the file, so that
    an append landing in between cannot make them disagree."""
    with _open_spectra(path) as f:
        return _reports(path, f), _info(f)


def read_analyses(path: str | Path) -> list[dict[str, Any]]:
    """Every checkpoint's report (as :func:`analysis_to_dict` gives it), in series order."""
    with _open_spectra(path) as f:
        return _reports(path, f)


def _reports(path: str | Path, f: h5py.File) -> list[dict[str, Any]]:
    held = f.get("checkpoints")
    if held is not None and not isinstance(held, h5py.Group):  # read as an empty file before
        raise UserError(
            f"could not read {path}: it is not laid out as docs/hdf5.md says (/checkpoints is "
            "not a group)."
        )
    reports = []
    for name in _stored_order(f):
        try:
            reports.append(_read_group(f["checkpoints"][name]))
        except DAMAGED as exc:
            raise UserError(
                f"could not read {path}: its checkpoint group {name!r} is damaged or not laid "
                f"out as docs/hdf5.md says ({exc})."
            ) from exc
    return reports


def group_names(path: str | Path) -> list[str]:
    """The checkpoint group names, in the order :func:`read_analyses` returns them."""
    with _open_spectra(path) as f:
        return _stored_order(f)


def read_file_info(path: str | Path) -> dict[str, Any]:
    """Root attributes, the write history (oldest first) and the group names in series order."""
    with _open_spectra(path) as f:
        return _info(f)


def _info(f: h5py.File) -> dict[str, Any]:
    info = provenance_dict(dict(f.attrs))
    history = f["history"].asstr()[()] if "history" in f else []
    info["history"] = [_history_entry(h) for h in history]
    info["groups"] = _stored_order(f)
    return info


def _history_entry(text: str) -> Any:
    """One write's record; text that is not JSON (another tool's note) is kept as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_eigenvectors(
    path: str | Path, group: str
) -> tuple[torch.Tensor, list[str], list[tuple[int, ...]], list[int]]:
    """Eigenvectors ``[k, n]`` (float32, or float64 as a float64 analysis stored them) of one
    checkpoint with what unflattens them.

    ``group`` is a group name or, where unambiguous, the checkpoint's report ``name``.
    Returns ``(vectors, param_names, param_shapes, param_offsets)``.
    """
    import torch

    with _open_spectra(path) as f:
        g = _find_group(f, group, path)
        if "eigenvectors" not in g:
            raise UserError(f"checkpoint {group!r} in {path} has no saved eigenvectors.")
        stored = np.asarray(g["eigenvectors"][()])
        kept = np.float64 if stored.dtype == np.float64 else np.float32
        vectors = torch.from_numpy(stored.astype(kept, copy=False))
        names = list(g["param_names"].asstr()[()])
        shapes = [tuple(s) for s in json.loads(g["param_shapes"].asstr()[()])]
        offsets = [int(o) for o in g["param_offsets"][()]]
    return vectors, names, shapes, offsets


def _find_group(f: h5py.File, group: str, path: str | Path) -> h5py.Group:
    checkpoints = f["checkpoints"] if "checkpoints" in f else {}
    if group in checkpoints:
        return checkpoints[group]
    matches = [
        g
        for g in checkpoints.values()
        if isinstance(g, h5py.Group) and "name" in g and _name(g) == group
    ]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(checkpoints) or "none"
    raise UserError(f"no single checkpoint {group!r} in {path} (groups: {known}).")


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _bool(value: Any) -> bool | None:
    """A flag as h5py reads one back (NumPy's bool); None where absent or not a flag."""
    return bool(value) if isinstance(value, bool | np.bool_) else None


def _array(group: h5py.Group, name: str, default: list) -> list:
    return numbers(group[name][()]) if name in group else default


def _name(g: h5py.Group) -> str:
    """The ``name`` dataset: one string (the group's own name where it is absent)."""
    if "name" not in g:
        return g.name.rsplit("/", 1)[-1]
    name = g["name"].asstr()[()]
    if not isinstance(name, str):
        raise ValueError(f"name has shape {g['name'].shape}, not a single string")
    return name


def _pairs(g: h5py.Group, key: str, k: int | None = None) -> np.ndarray:
    """A per-eigenpair dataset: one value per eigenvalue (``k`` of them), else refused, so that
    no table pairs an eigenvalue with another's residual or leaves some out."""
    values = np.asarray(g[key][()])
    if values.ndim != 1:
        raise ValueError(f"{key} has shape {values.shape}, not one value per eigenvalue")
    if k is not None and len(values) != k:
        raise ValueError(f"{key} has length {len(values)}, eigenvalues {k}")
    return values


def _converged(g: h5py.Group, k: int) -> list[bool]:
    """Only an exact 1 (or true) is converged: an unknown convergence (NaN, 0.5, absent) is
    never reported as converged."""
    if "converged" not in g:
        return [False] * k
    values = _pairs(g, "converged", k)
    if values.dtype.kind not in "biuf":
        held = "text" if values.dtype.kind in "OSU" else str(values.dtype)
        raise ValueError(f"converged holds {held}, not 0 and 1")
    return [bool(c == 1) for c in values.tolist()]


def _cost(prov: dict[str, Any]) -> dict[str, Any]:
    """:func:`cost_dict` with its counts and times as numbers: text where one belongs is
    refused here, not only by the table that formats it, so that ``--json`` and ``plot`` agree."""
    cost = cost_dict(prov)
    return cost | {
        "hvps": _int(cost["hvps"]),
        "grad_equivalents": number(cost["grad_equivalents"]),
        "seconds": number(cost["seconds"]),
    }


def _read_group(g: h5py.Group) -> dict[str, Any]:
    prov = provenance_dict(dict(g.attrs))
    if "hvp_rel_error" in prov:  # a number the table formats, as _cost's are
        prov["hvp_rel_error"] = number(prov["hvp_rel_error"])
        if prov["hvp_rel_error"] is None:  # non-finite: dropped, as provenance_dict drops NaN
            del prov["hvp_rel_error"]
    name = _name(g)
    eigen = trace = density = alignment = None
    if "eigenvalues" in g:
        ev = g["eigenvalues"]
        a = ev.attrs
        values = numbers(_pairs(g, "eigenvalues"))
        k = len(values)
        residuals = numbers(_pairs(g, "residuals", k)) if "residuals" in g else [None] * k
        # A pair whose value or residual is not finite is not converged, whatever the file
        # says (damage: shown as converged before).
        known = [
            v is not None and (r is not None or "residuals" not in g)
            for v, r in zip(values, residuals, strict=True)
        ]
        eigen = {
            "which": _str(a.get("which")),
            "eigenvalues": values,
            "residuals": residuals,
            "errors": (
                numbers(_pairs(g, "eigenvalue_errors", k))
                if "eigenvalue_errors" in g
                else [None] * k
            ),
            "converged": [c and ok for c, ok in zip(_converged(g, k), known, strict=True)],
            "tol": number(a.get("tol")),
            # Files written before the eigenvalue criterion existed converged by residual.
            "criterion": _str(a.get("criterion")) or "residual",
            "scale": number(a.get("scale")),
            "hvps": _int(a.get("hvps")),
            "iterations": _int(a.get("iterations")),
            "seconds": number(a.get("seconds")),
            "block_size": _int(a.get("block_size")),
            "guard": _int(a.get("guard")),  # null in files written before it
            "check_hvps": _int(a.get("check_hvps")),  # and these two before 2026-11-30
            "skipped_found": _int(a.get("skipped_found")),
            "unchecked": _bool(a.get("unchecked")),  # null in files written before 2026-12-02
            "floor": number(a.get("floor")),  # null in files written before 2026-12-01
            "stop_reason": _str(a.get("stop_reason")),
            "method": _str(a.get("method")),
        }
    if isinstance(t := member(g, "trace"), h5py.Dataset | h5py.Group):
        a = t.attrs
        trace = {
            # format version 1 kept the estimate as an attribute of a `trace` group
            "estimate": number(t[()] if isinstance(t, h5py.Dataset) else a.get("estimate")),
            "stderr": number(a.get("stderr")),
            "num_probes": _int(a.get("num_probes")),
            "method": _str(a.get("method")),
            "hvps": _int(a.get("hvps")),
            "seconds": number(a.get("seconds")),
            # None in files written before 2026-11-29
            "sketch_trace": number(a.get("sketch_trace")),
            "num_samples": _int(a.get("num_samples")),
            "known_eigenpairs": _int(a.get("known_eigenpairs")),  # None before 2026-11-30
        }
    if isinstance(dn := member(g, "density"), h5py.Group):
        a = dn.attrs
        density = {key: _array(dn, key, []) for key in _DENSITY_ARRAYS}
        for x, y in (("nodes", "weights"), ("grid", "values")):  # read (and drawn) as pairs
            if np.shape(density[x]) != np.shape(density[y]):
                shapes = f"{np.shape(density[x])} and {np.shape(density[y])}"
                raise ValueError(f"density/{x} and density/{y} have shapes {shapes}")
        density |= {
            "sigma": number(a.get("sigma")),
            "num_probes": _int(a.get("num_probes")),
            "steps": _int(a.get("steps")),
            "hvps": _int(a.get("hvps")),
            "seconds": number(a.get("seconds")),
            "known_eigenpairs": _int(a.get("known_eigenpairs")),  # None before 2026-11-30
        }
    if isinstance(al := member(g, "alignment"), h5py.Group):
        a = al.attrs
        minibatch = _array(al, "minibatch", [])
        if minibatch and np.ndim(minibatch) != 2:  # rows of batches; none: stored as []
            raise ValueError(f"alignment/minibatch has shape {np.shape(minibatch)}, not [M, k]")
        alignment = {
            "alignment": _array(al, "alignment", []),
            **{
                key: number(a.get(key))
                for key in (
                    "subspace_alignment",
                    "curvature_ratio",
                    "eigensam_alignment",
                    "sam_sharpness",
                    "grad_norm",
                    "loss",
                    "rho",
                    "alpha",
                )
            },
            "minibatch": {
                "values": minibatch,
                "mean": _array(al, "minibatch_mean", []),
                "std": _array(al, "minibatch_std", []),
            },
            "hvps": _int(a.get("hvps")),
        }
    return {
        "name": name,
        "provenance": prov,
        "loss": number(g["loss"][()]) if "loss" in g else None,
        "eigen": eigen,
        "trace": trace,
        "density": density,
        "alignment": alignment,
        "cost": _cost(prov),
    }
