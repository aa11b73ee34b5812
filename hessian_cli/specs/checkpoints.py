"""Where the weights come from: safe checkpoint loading, applying, writing and ordering.

Loading never runs code from the file unless the user explicitly trusts it: torch files are read
with ``weights_only=True`` and safetensors files hold nothing but tensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_cli.errors import UserError, a_type, first_line
from hessian_cli.storage.files import atomic_path

CHECKPOINT_FORMAT = "hessian-cli-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".pkl", ".safetensors", ".ckpt")
TRUST_FLAG = "--trust-checkpoint"


class UntrustedCheckpoint(UserError):
    """A checkpoint that only an unsafe load (one that may run code from it) could read."""


RUN_CHECKPOINTS = "checkpoints"  # where a training run directory keeps its checkpoints

_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedCheckpoint:
    """A checkpoint read from disk, reduced to what the analysis needs plus everything else."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    format: str = "torch-zip"


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint; ``trust=True`` allows arbitrary unpickling (only for trusted files)."""
    path = Path(path).expanduser()
    if not path.exists():
        what = "is a symbolic link that leads nowhere" if path.is_symlink() else "does not exist"
        raise UserError(f"checkpoint {str(path)!r} {what}.")
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a directory, not a file.")
    if not path.is_file():  # a FIFO or a device: reading it could wait forever
        raise UserError(f"checkpoint {str(path)!r} is not a regular file.")
    try:
        digest = _sha256(path)
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}.") from exc
    if not head:
        raise UserError(f"checkpoint {str(path)!r} is empty.")
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(head):
        state, metadata, raw = _load_safetensors(path)
        fmt = "safetensors"
    else:
        fmt = "torch-zip" if zipfile.is_zipfile(path) else "torch-legacy"
        if fmt == "torch-legacy" and _is_plain_pickle(head):
            fmt, obj = "pickle", _plain_pickle_load(path, trust)
        else:
            obj = _torch_load(path, trust, pickle_or_zip=fmt == "torch-zip" or head[:1] == b"\x80")
        raw = obj if isinstance(obj, dict) else {}
        state, metadata = _unwrap(obj, path)
    return LoadedCheckpoint(
        path=path,
        sha256=digest,
        state_dict=_strip_prefixes(state),
        metadata=metadata,
        raw=raw,
        format=fmt,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


# torch's legacy format pickles this number first (LONG1 0x1950a86a20f9469cfc6c), after the
# protocol and, from protocol 4, a frame header.
_TORCH_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _is_plain_pickle(head: bytes) -> bool:
    """A pickle (protocol 2 or later) that does not open with torch's legacy magic number."""
    return head[:1] == b"\x80" and head[1:2] >= b"\x02" and _TORCH_MAGIC not in head


def _plain_pickle_load(path: Path, trust: bool) -> Any:
    """A file written by ``pickle.dump`` (tensors or NumPy arrays); torch.load cannot read one,
    and only a trusted one is unpickled, since unpickling runs code from the file."""
    if not trust:
        raise UntrustedCheckpoint(
            f"checkpoint {str(path)!r} is a plain pickle, not a torch file, and safe loading cannot "
            f"read it; pass {TRUST_FLAG} only if you trust where it came from, or save the weights "
            "with torch.save or safetensors."
        )
    try:
        with path.open("rb") as fh:
            obj = pickle.load(fh)
    except Exception as exc:
        raise UserError(
            f"checkpoint {str(path)!r} is a corrupt or truncated pickle ({first_line(exc)})."
        ) from exc
    return _arrays_as_tensors(obj)


def _arrays_as_tensors(obj: Any) -> Any:
    """NumPy arrays (in nested dicts) as tensors: pickles from outside torch hold them."""
    if isinstance(obj, dict):
        return {k: _arrays_as_tensors(v) for k, v in obj.items()}
    if type(obj).__module__ == "numpy" and hasattr(obj, "__array__"):
        try:
            return torch.as_tensor(obj)
        except (TypeError, RuntimeError):  # strings, objects: named as not tensors later
            return obj
    return obj


def _torch_load(path: Path, trust: bool, *, pickle_or_zip: bool) -> Any:
    """``torch.load``, its failures in one sentence; ``pickle_or_zip=False`` (a file that opens
    as neither a zip archive nor a binary pickle) names what the file is not, where a failure
    would otherwise suggest the flag that runs code."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it reads fine; the CLI output stays clean.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not pickle_or_zip:  # no flag would help
            raise UserError(
                f"checkpoint {str(path)!r} is not a torch, safetensors or pickle file "
                "(pickles of protocol 2 or later: Python 2's text protocols 0 and 1 are not read)."
            ) from exc
        message = str(exc)
        if not trust and "Weights only load failed" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            if found:
                raise UntrustedCheckpoint(
                    f"checkpoint {str(path)!r} needs arbitrary code execution to load "
                    f"({found.group(1)}) and was refused; pass {TRUST_FLAG} only if you trust "
                    "where it came from."
                ) from exc
            raise UntrustedCheckpoint(
                f"checkpoint {str(path)!r} is corrupt or uses pickle features that safe loading "
                f"refuses; pass {TRUST_FLAG} only if you trust where it came from."
            ) from exc
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a torch file.") from exc
    except Exception as exc:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt, truncated or not a torch file "
            f"({type(exc).__name__})."
        ) from exc


def _load_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:
        raise UserError(f"checkpoint {str(path)!r} is not a readable safetensors file.") from exc
    metadata: dict[str, Any] = {}
    if "hessian_cli" in header:
        try:
            metadata = json.loads(header["hessian_cli"])
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested deep
            raise UserError(
                f"checkpoint {str(path)!r} has unreadable hessian_cli metadata in its header."
            ) from exc
        if not isinstance(metadata, dict):
            raise UserError(
                f"checkpoint {str(path)!r} has hessian_cli metadata that is not a dict."
            )
    return state, metadata, dict(state)


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Find the state dict inside a loaded object; also return self-describing metadata."""
    if isinstance(obj, nn.Module):  # only reachable with trust=True (a pickled whole model)
        return obj.state_dict(), {}
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {str(path)!r} holds {a_type(obj)}, not a state dict of tensors."
        )
    metadata: dict[str, Any] = {}
    if obj.get("format") == CHECKPOINT_FORMAT:
        meta = obj.get("hessian_cli", {})
        metadata = dict(meta) if isinstance(meta, dict) else {}
    current: Any = obj
    for _ in range(4):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(current, nn.Module):
            current = current.state_dict()
        if _is_state_dict(current):
            return dict(current), metadata
        nested = next(
            (current[k] for k in _NESTING_KEYS if isinstance(current.get(k), (dict, nn.Module))),
            None,
        )
        if nested is None:
            break
        current = nested
    if isinstance(current, dict) and current and all(isinstance(k, str) for k in current):
        bad = next(k for k, v in current.items() if not isinstance(v, torch.Tensor))
        keys = ", ".join(list(map(str, obj))[:6])
        raise UserError(
            f"checkpoint {str(path)!r} holds no state dict of tensors (entry {bad!r} is a "
            f"{type(current[bad]).__name__}; top-level keys: {keys})."
        )
    raise UserError(f"checkpoint {str(path)!r} holds no state dict of tensors.")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefixes(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` wrappers.

    A prefix is stripped only while every key carries it, so a model that really has a
    submodule called ``module`` keeps its names.
    """
    while state:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- applying


def apply_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` strictly into ``model``, explaining any mismatch in one sentence.

    A prefix that loading stripped from every key (``module.``) is put back where the model's
    own names all carry it (a wrapper whose one child is called ``module``)."""
    expected = model.state_dict()
    state = dict(state_dict)
    for prefix in _PREFIXES:  # a model whose own names carry the prefix loading stripped
        if state and all(k.startswith(prefix) for k in expected):
            if all(prefix + k in expected for k in state):
                state = {prefix + k: v for k, v in state.items()}
    for key, value in expected.items():
        # Checkpoints older than torch 0.4.1 have no BatchNorm step counter; that is harmless.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} (model {tuple(expected[k].shape)} vs checkpoint {tuple(state[k].shape)})"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    # Loading casts: int or bool weights into float ones, complex into real (imaginary parts
    # dropped) would silently be other numbers. Another float precision is only rounding.
    wrong += [
        f"{k} (model {str(expected[k].dtype)[6:]} vs checkpoint {str(state[k].dtype)[6:]})"
        for k in expected
        if k in state and _kind(expected[k]) != _kind(state[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(_listing(len(missing), "missing key", missing))
        if unexpected:
            parts.append(_listing(len(unexpected), "unexpected key", unexpected))
        if wrong:
            parts.append(_listing(len(wrong), "mismatch", wrong, plural="mismatches"))
        raise UserError(
            f"the checkpoint does not match the model ({type(model).__name__}): "
            + "; ".join(parts)
            + "."
        )
    for key, value in state.items():
        if value.is_meta or value.layout != torch.strided:  # load_state_dict hid why
            kind = "a meta tensor, which holds no values" if value.is_meta else "sparse"
            raise UserError(f"the checkpoint's {key!r} is {kind}: save the dense weights.")
    for key, value in state.items():
        if not _finite(value):
            raise UserError(f"the checkpoint holds non-finite values (NaN or inf) in {key!r}.")
    _check_tied(expected, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"the checkpoint does not fit the model: {first_line(exc)}.") from exc


def _kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "real" if t.is_floating_point() else "integer"


def _finite(value: torch.Tensor) -> bool:
    """No NaN or inf in a dense floating tensor of any precision (float8 has no isfinite)."""
    if not (value.is_floating_point() or value.is_complex()):
        return True
    if not value.is_complex() and value.element_size() == 1:
        value = value.float()
    return bool(torch.isfinite(value).all())


def _check_tied(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Names of one tied tensor (a decoder sharing its encoder's weight) must hold one value in
    the checkpoint: loading would keep whichever comes last."""
    names: dict[tuple, list[str]] = {}
    for key, t in expected.items():
        if t.layout == torch.strided and t.numel():
            names.setdefault((t.data_ptr(), t.shape, t.stride()), []).append(key)
    for keys in names.values():
        if any(not torch.equal(state[keys[0]], state[k]) for k in keys[1:]):
            raise UserError(
                f"the checkpoint holds different values for {', '.join(keys)}, which the model "
                "ties into one tensor."
            )


def _listing(
    count: int, noun: str, items: list[str], *, plural: str | None = None, shown: int = 5
) -> str:
    word = noun if count == 1 else (plural or noun + "s")
    more = f", ... {count - shown} more" if count > shown else ""
    return f"{count} {word} ({', '.join(items[:shown])}{more})"


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    path: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing checkpoint atomically (temp file in the same folder + rename).

    The file must stay loadable with ``weights_only=True``, so ``metadata`` and ``extra`` may hold
    only tensors, dicts with str keys, lists, tuples, str, int, float, bool and None (encode
    anything else, e.g. model kwargs, as a JSON string); a ``TypeError`` names what does not fit.
    A ``.safetensors`` path writes the tensors plus metadata (as JSON in the header) and refuses
    ``extra``.
    """
    path = Path(path).expanduser()
    state = {k: v.detach() for k, v in state_dict.items()}
    _check_safe(state, "state_dict")
    _check_safe(metadata, "metadata")
    if extra:
        _check_safe(extra, "extra")
        clash = sorted({"format", "version", "model", "hessian_cli"} & set(extra))
        if clash:
            raise ValueError(f"extra may not use the reserved key(s) {clash}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic_path: readers never see half a file, and it is created as the umask says (a
    # shared run directory's checkpoints are readable by whoever may read its metrics).
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        if path.suffix.lower() == ".safetensors":
            if extra:
                raise ValueError("a .safetensors checkpoint cannot hold `extra` objects")
            _write_safetensors(fh, state, metadata)
        else:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": state,
                "hessian_cli": dict(metadata),
                **(extra or {}),
            }
            try:
                torch.save(payload, fh)
            except RuntimeError as exc:  # torch's zip writer reports a failed write so
                raise _write_failure(path, exc) from exc


def _write_failure(path: Path, exc: RuntimeError) -> OSError:
    """What torch's writer means by its own error: most often a full disk."""
    if shutil.disk_usage(path.parent).free < 64 * 2**20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(f"torch.save failed: {first_line(exc)}")


def _write_safetensors(fh: Any, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save

    tensors = {k: v.cpu().contiguous().clone() for k, v in state.items()}
    fh.write(save(tensors, metadata={"hessian_cli": json.dumps(metadata)}))


def _check_safe(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back."""
    if obj is None or isinstance(obj, (torch.Tensor, str, bool, int, float)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_safe(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            _check_safe(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is {a_type(obj)}, which weights_only loading cannot read back")


# ----------------------------------------------------------------------------- series


def checkpoint_order_key(ckpt: LoadedCheckpoint) -> tuple:
    """Sort key for a training series: (step, epoch) from metadata, else the file name's numbers.

    Self-describing checkpoints sort before name-ordered ones; names sort naturally
    (``ckpt2`` before ``ckpt10``).
    """
    meta = ckpt.metadata or {}
    step, epoch = _as_number(meta.get("step")), _as_number(meta.get("epoch"))
    name = _natural_key(ckpt.path.name)
    if step is not None or epoch is not None:
        return (0, -1.0 if step is None else step, -1.0 if epoch is None else epoch, name)
    return (1, -1.0, -1.0, name)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _natural_key(name: str) -> tuple:
    return tuple(
        (1, int(part), "") if part.isdigit() else (0, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files directly inside ``directory``, in natural name order (no temp files)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory.")
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise UserError(f"cannot list {str(directory)!r}: {exc.strerror or exc}.") from exc
    # A link that points nowhere is listed, so that reading it ends the run as any unreadable
    # checkpoint does (it was skipped silently).
    found = [
        p
        for p in entries
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.suffix.lower() in CHECKPOINT_SUFFIXES
        and not p.name.startswith(".")
    ]
    return sorted(found, key=lambda p: _natural_key(p.name))
