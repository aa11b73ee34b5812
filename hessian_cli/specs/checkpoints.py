"""Where the weights come from: safe checkpoint loading, applying, writing and ordering.

Loading never runs code from the file unless the user explicitly trusts it: torch files are read
with ``weights_only=True`` and safetensors files hold nothing but tensors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import numbers
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
from torch.nn.parameter import is_lazy

from hessian_cli.atomic import atomic_path, file_sha256
from hessian_cli.errors import UserError, a_type, first_line
from hessian_cli.series_order import natural_key, series_key

CHECKPOINT_FORMAT = "hessian-cli-checkpoint"
CHECKPOINT_VERSION = 1
# What a directory's checkpoints are named (a single file is read whatever its name): torch's
# own, pytorch/examples' .pth.tar, akamaster/pytorch_resnet_cifar10's .th, Lightning's .ckpt,
# .safetensors. Not .bin: Hugging Face's
# output folders hold training_args.bin, a pickled settings object, beside the weights.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (
    ".pt",
    ".pth",
    ".pth.tar",
    ".th",
    ".pkl",
    ".safetensors",
    ".ckpt",
)
TRUST_FLAG = "--trust-checkpoint"
# The weights file of a Hugging Face Trainer's checkpoint folder (checkpoint-500/), beside its
# optimizer.pt, scheduler.pt and rng_state.pth, which are not weights, and its trainer_state.json;
# also of an accelerate save_state folder, where an FSDP model's full state dict is
# pytorch_model_fsdp.bin (a Trainer's under FSDP too: its folders were skipped unsaid).
TRAINER_WEIGHTS: tuple[str, ...] = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model_fsdp.bin",
)
# save_pretrained's index of the shards it writes a model in beyond max_shard_size (5 GB),
# model-00001-of-00002.safetensors...: they are joined.
SHARD_INDEXES = tuple(f"{n}.index.json" for n in TRAINER_WEIGHTS)
# The weights in a DeepSpeed checkpoint folder (global_step500/), beside its optimizer's shards.
DEEPSPEED_WEIGHTS = "mp_rank_00_model_states.pt"
# The DeepSpeed checkpoint folder of accelerate's save_state under DeepSpeed, inside its own
# folder (checkpoints/checkpoint_3/pytorch_model/), which names the checkpoint.
ACCELERATE_DEEPSPEED = "pytorch_model"
# Weights files named alike in every checkpoint folder, which the folder's name tells apart.
FOLDER_WEIGHTS: tuple[str, ...] = (*TRAINER_WEIGHTS, DEEPSPEED_WEIGHTS, *SHARD_INDEXES)
TRAINER_STATE = "trainer_state.json"
# PEFT's save_pretrained (a Trainer's checkpoint-N of a PEFT model too): an adapter's weights
# beside its settings, changes to a base model's weights that are not the model's.
PEFT_ADAPTERS: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
WEIGHTS_FLAG = "--weights-key"


class UntrustedCheckpoint(UserError):
    """A checkpoint that only an unsafe load (one that may run code from it) could read."""


class WeightsMismatch(UserError):
    """Weights whose names or shapes are not the model's: often the model's options are not
    those it was trained with."""


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
    weights_key: str | None = None  # where in the file the weights were taken from, if asked
    # The model itself where the file pickles it whole (torch.save(model), read only trusted):
    # the module whose weights ``state_dict`` holds, which analyze takes where no --model is given.
    module: nn.Module | None = None

    @property
    def name(self) -> str:
        """Its name in a series (:func:`series_name`)."""
        return series_name(self.path)

    @property
    def label(self) -> str:
        """How messages name it (:func:`checkpoint_label`)."""
        return checkpoint_label(self.path)


def checkpoint_label(path: Path) -> str:
    """How messages name a checkpoint: its file's name, after its Trainer folder's where it has
    one (``checkpoint-500/model.safetensors``: the file's name alone is every folder's)."""
    folder = _naming_folder(path)
    return path.relative_to(folder.parent).as_posix() if folder is not None else path.name


def series_name(path: Path) -> str:
    """A checkpoint's name in a series: its file's name without its suffix (``.pth.tar`` whole:
    pytorch/examples' checkpoint.pth.tar was named ``checkpoint.pth``), or, for the weights of a
    Trainer's or DeepSpeed's checkpoint folder (all named alike), the folder's name."""
    if (folder := _naming_folder(path)) is not None:
        return folder.name
    return path.name[: -len(".pth.tar")] if path.name.lower().endswith(".pth.tar") else path.stem


def _naming_folder(path: Path) -> Path | None:
    """The folder whose name tells apart weights named alike in every checkpoint folder: the
    one they are in, or accelerate's save_state folder around its ``pytorch_model/`` under
    DeepSpeed (all the series' checkpoints were named pytorch_model)."""
    if path.name not in FOLDER_WEIGHTS or not path.parent.name:
        return None
    accelerate = path.name == DEEPSPEED_WEIGHTS and path.parent.name == ACCELERATE_DEEPSPEED
    return path.parent.parent if accelerate and path.parent.parent.name else path.parent


# ----------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path, *, trust: bool = False, weights_key: str | None = None
) -> LoadedCheckpoint:
    """Read a checkpoint; ``trust=True`` allows arbitrary unpickling (only for trusted files).

    ``weights_key`` picks the weights where a file holds several sets (an EMA copy beside the
    trained weights, say): an entry of the file (``state_dict_ema``), or the leading name its
    weights carry (``model_ema`` for keys ``model_ema.*``)."""
    path = Path(path).expanduser()
    if not path.exists():
        what = "is a symbolic link that leads nowhere" if path.is_symlink() else "does not exist"
        raise UserError(f"checkpoint {str(path)!r} {what}.")
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a directory, not a file.")
    if not path.is_file():  # a FIFO or a device: reading it could wait forever
        raise UserError(f"checkpoint {str(path)!r} is not a regular file.")
    if (index := _shard_index(path)) is not None:  # it would miss the other shards' weights
        raise UserError(
            f"checkpoint {str(path)!r} is one of the shards of {index.name}: give that index, "
            "or its folder, which joins them."
        )
    _refuse_model_parallel(path)
    if path.suffix == ".distcp":  # (was "corrupt, truncated or not a torch file")
        raise UserError(
            f"checkpoint {str(path)!r} is one of the shards of a torch.distributed.checkpoint, "
            f"which are not joined: {_join_dcp(path.parent)}"
        )
    if _FSDP_LOCAL.fullmatch(path.name):  # it was read as the model's, or asked for trust
        raise UserError(
            f"checkpoint {str(path)!r} is one FSDP rank's local state dict, a shard of the "
            f"flattened weights, which are not joined: {_JOIN_FSDP_LOCAL}"
        )
    if path.name in PEFT_ADAPTERS and (path.parent / PEFT_CONFIG).is_file():
        raise UserError(f"checkpoint {str(path)!r} is a PEFT adapter, {_MERGE_ADAPTER}")
    if path.name in SHARD_INDEXES:  # (was refused: "which are not joined")
        state, fmt, digest = _joined_shards(path, trust)
        metadata, raw, module = {}, dict(state), None
        if weights_key is not None:
            state = _part(_strip_prefixes(state), weights_key, path, list(raw))
    else:
        digest, state, metadata, raw, fmt, module = _read_file(path, trust, weights_key)
    if path.name in (*TRAINER_WEIGHTS, *SHARD_INDEXES) and "step" not in metadata:
        metadata = {**metadata, **_trainer_step(path.parent / TRAINER_STATE)}
    state = _strip_prefixes(state)
    if (lazy := next((k for k, v in state.items() if is_lazy(v)), None)) is not None:
        # (torch's ValueError at the first use of it, as an unexpected error)
        raise UserError(
            f"checkpoint {str(path)!r} holds {lazy!r} uninitialized, a lazy module's "
            "(nn.LazyLinear, ...) saved before the model's first forward pass: it holds no values."
        )
    if "param_shapes" in raw and any(v.numel() == 0 for v in state.values()):
        # (refused as "4 mismatches (0.weight (model (5, 4) vs checkpoint (0,)), ...)")
        raise UserError(
            f"checkpoint {str(path)!r} holds DeepSpeed ZeRO-3's placeholders for its weights "
            f"(empty tensors), which are partitioned among its optimizer's files: {_JOIN_ZERO3}"
        )
    return LoadedCheckpoint(
        path=path,
        sha256=digest,
        state_dict=state,
        metadata=metadata,
        raw=raw,
        format=fmt,
        weights_key=weights_key,
        module=_holding(module, state),
    )


def _joined_shards(index: Path, trust: bool) -> tuple[dict[str, Any], str, str]:
    """The weights in the shards a Hugging Face index (``weight_map``: name to shard) lists,
    joined; the shards' format; a sha256 of the index's and the shards' own, in turn, which
    changes where any of them does."""
    listed = _small_json(index)
    weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
    if not (
        isinstance(weight_map, dict) and weight_map and all(map(_plain_name, weight_map.values()))
    ):
        raise UserError(
            f"checkpoint {str(index)!r} is no readable index of shards (a weight_map of the "
            "weights' names to files beside it)."
        )
    digest = hashlib.sha256(_file_digest(index).encode())
    state: dict[str, Any] = {}
    fmt = "safetensors"
    for name in sorted(set(weight_map.values()), key=natural_key):
        shard = index.parent / name
        if not shard.is_file():
            raise UserError(
                f"checkpoint {str(index)!r} lists the shard {name!r}, which is not beside it "
                "(a download cut short?)."
            )
        sha, part, _, _, fmt, _ = _read_file(shard, trust, None)
        wanted = [k for k, v in weight_map.items() if v == name]
        if missing := [k for k in wanted if k not in part]:
            raise UserError(
                f"the shard {str(shard)!r} lacks {_listing(len(missing), 'weight', missing)} "
                f"that {index.name} places in it."
            )
        state.update((k, part[k]) for k in wanted)
        digest.update(sha.encode())
    return state, fmt, digest.hexdigest()


def _plain_name(name: Any) -> bool:
    """A file's name alone, as an index names its shards beside it (not a path elsewhere)."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and name != ".."


def _file_digest(path: Path) -> str:
    """A checkpoint file's sha256, a failure to read it in one sentence."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}.") from exc


def _read_file(
    path: Path, trust: bool, weights_key: str | None
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str, nn.Module | None]:
    """A checkpoint file's sha256, weights, metadata, entries, format and pickled module (see
    :func:`load_checkpoint`)."""
    digest = _file_digest(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}.") from exc
    if not head:
        raise UserError(f"checkpoint {str(path)!r} is empty.")
    if head.startswith(_HDF5_SIGNATURE):  # a spectra or metrics file given to analyze, usually
        raise UserError(
            f"checkpoint {str(path)!r} is an HDF5 file, not a checkpoint (`hessian-cli show` and "
            "`plot` read the files that `analyze --out` and `train` write)."
        )
    module = None
    # By its content first: torch.save's file named .safetensors was "not a readable
    # safetensors file".
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    named = path.suffix.lower() == ".safetensors" and not torch_file
    if named or _looks_like_safetensors(head):
        state, metadata, raw = _load_safetensors(path)
        fmt = "safetensors"
        if weights_key is not None:
            state = _part(_strip_prefixes(state), weights_key, path, list(raw))
    else:
        fmt = "torch-zip" if zipfile.is_zipfile(path) else "torch-legacy"
        # Not what --trust-checkpoint (which an empty archive was told to pass) would read.
        if fmt == "torch-legacy" and head.startswith(b"PK\x03\x04"):
            raise UserError(
                f"checkpoint {str(path)!r} is a truncated or damaged zip archive (a download or "
                "copy cut short?)."
            )
        if fmt == "torch-zip" and not _in_zip(path, "data.pkl"):
            raise UserError(
                f"checkpoint {str(path)!r} is a zip archive without torch's data.pkl (empty, or "
                "another kind of archive), not a torch file."
            )
        if fmt == "torch-zip" and not trust and _in_zip(path, "constants.pkl"):
            raise UntrustedCheckpoint(
                f"checkpoint {str(path)!r} is a TorchScript archive (torch.jit.save), which safe "
                "loading cannot read: save the model's state_dict with torch.save, or pass "
                f"{TRUST_FLAG} only if you trust where it came from."
            )
        if fmt == "torch-legacy" and _is_plain_pickle(head):
            fmt, obj = "pickle", _plain_pickle_load(path, trust)
        else:
            obj = _torch_load(path, trust, pickle_or_zip=fmt == "torch-zip" or head[:1] == b"\x80")
        raw = obj if isinstance(obj, dict) else {}
        state, metadata, module = _unwrap(obj, path, weights_key)
    return digest, state, metadata, raw, fmt, module


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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


def _arrays_as_tensors(obj: Any, done: dict[int, Any] | None = None) -> Any:
    """NumPy arrays (in nested dicts) as tensors: pickles from outside torch hold them. A dict
    met again is converted once (``done``): a file of dicts that each hold the next twice took
    2**depth copies, seconds and gigabytes from a kilobyte."""
    done = {} if done is None else done
    if isinstance(obj, dict):
        if id(obj) not in done:
            done[id(obj)] = converted = {}
            converted.update((k, _arrays_as_tensors(v, done)) for k, v in obj.items())
        return done[id(obj)]
    if type(obj).__module__ == "numpy" and hasattr(obj, "__array__"):
        try:
            return torch.as_tensor(obj)
        except (TypeError, RuntimeError):  # strings, objects: named as not tensors later
            return obj
    return obj


def _numpy_state(value: Any) -> bool:
    """Whether ``value`` is weights saved as NumPy arrays: a dict of them (beside tensors)."""
    values = list(value.values()) if isinstance(value, dict) else []
    return any(isinstance(v, NumPyValue) for v in values) and all(
        isinstance(v, NumPyValue | torch.Tensor) for v in values
    )


def _numpy_weights(path: Path) -> UntrustedCheckpoint:
    """Weights saved as NumPy arrays, which safe loading reads as :class:`NumPyValue`."""
    return UntrustedCheckpoint(
        f"checkpoint {str(path)!r} holds its weights as NumPy arrays, which safe loading does "
        f"not read: save them as tensors, or pass {TRUST_FLAG} only if you trust where it came "
        "from."
    )


def _in_zip(path: Path, name: str) -> bool:
    """Whether a zip file holds ``name`` in its folder, as torch's do: ``data.pkl``, the object
    saved, and in a TorchScript archive ``constants.pkl`` (as torch tells one; ``weights_only``
    loading refuses it with a RuntimeError that read as a corrupt file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1] == name for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a torch file's object (its data.pkl in a zip), where it says."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as fh:
                    head = fh.read(2)
        else:
            with path.open("rb") as fh:
                head = fh.read(2)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None
    return head[1] if head[:1] == b"\x80" and len(head) == 2 else None


def _safe_globals() -> list[Any]:
    """Classes that training scripts save beside their weights and that rebuild from plain data
    alone, allowed to ``weights_only`` loading: timm's and torchvision's reference scripts save
    their ``argparse.Namespace``, others a path. Without them a file of weights needed the flag
    that lets it run code.

    Nothing of NumPy's own, only stand-ins under its names: a dtype's pickled state is not
    checked by NumPy (a 1 KB file made a number point at an address it chose, and the process
    crashed), a number's pickle may name gigabytes to allocate, and an array's its shape. A
    whole number is read from its bytes here (:func:`_numpy_scalar`), the rest is
    :class:`NumPyValue`."""
    import argparse
    import pathlib

    paths = {n: getattr(pathlib, n) for n in _PATH_CLASSES}
    if torch.__version__ < (2, 6):  # no globals under another name
        return [argparse.Namespace, *paths.values()]
    # A path of the other system cannot be made here ("cannot instantiate 'WindowsPath' on
    # your system": a file saved on Windows was "corrupt, truncated or not a torch file"); it
    # is read as that system's pure path. Python 3.13 names the classes pathlib._local.*.
    other = "WindowsPath" if os.name == "posix" else "PosixPath"
    paths[other] = paths[f"Pure{other}"]
    named = [(c, f"{m}.{n}") for n, c in paths.items() for m in ("pathlib", "pathlib._local")]
    numpy = [(_NumPyDtype, "numpy.dtype"), (NumPyValue, "numpy.ndarray")]
    for core in ("_core", "core"):  # NumPy 2 and NumPy 1
        numpy += [(_numpy_scalar, f"numpy.{core}.multiarray.scalar")]
        numpy += [(NumPyValue, f"numpy.{core}.multiarray._reconstruct")]
    return [argparse.Namespace, *named, *numpy]


_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


class NumPyValue:
    """Stands in, holding nothing, for a NumPy number (not a whole one) or array saved beside the
    weights (a best accuracy as np.float64, an RNG state): no code of NumPy's runs to read it (a
    crafted dtype's state crashed the process), and the weights load without the flag that lets
    a file run code, which such a file needed. Weights that are NumPy arrays are refused
    (load_checkpoint)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<a NumPy value, not read>"


class _NumPyDtype(NumPyValue):
    """Stands in for a NumPy dtype, keeping of its pickle only what names a whole number's
    bytes: its code (``i8``, ``u2``) and byte order (``<``, ``>``, ``|`` for one byte)."""

    def __init__(self, code: Any = None, *args: Any, **kwargs: Any) -> None:
        self.code = code if isinstance(code, str) else None
        self.order: str | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|"):
            self.order = state[1]


def _numpy_scalar(dtype: Any = None, data: Any = None, *args: Any) -> int | NumPyValue:
    """A NumPy number as it unpickles, read without NumPy: a whole number from its bytes (an
    epoch counted over ``np.arange`` orders a series, see _training_position), anything else
    (a float, a crafted dtype) a :class:`NumPyValue`."""
    if not isinstance(dtype, _NumPyDtype) or dtype.code is None or not isinstance(data, bytes):
        return NumPyValue()
    size = int(dtype.code[1]) if re.fullmatch(r"[iu][1248]", dtype.code) else 0
    if len(data) != size or dtype.order is None or (dtype.order == "|") != (size == 1):
        return NumPyValue()
    order = "big" if dtype.order == ">" else "little"
    return int.from_bytes(data, order, signed=dtype.code[0] == "i")


def _torch_load(path: Path, trust: bool, *, pickle_or_zip: bool) -> Any:
    """``torch.load``, its failures in one sentence; ``pickle_or_zip=False`` (a file that opens
    as neither a zip archive nor a binary pickle) names what the file is not, where a failure
    would otherwise suggest the flag that runs code."""
    try:
        allowed = getattr(torch.serialization, "safe_globals", None)  # torch 2.5 and later
        with (
            warnings.catch_warnings(),
            allowed(_safe_globals()) if allowed else contextlib.nullcontext(),
        ):
            # torch warns about pickle protocols it reads fine; the CLI output stays clean.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # A trusted TorchScript archive is read by torch.jit.load, with a warning that says so.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            # A handle: torch.load reads a path named .safetensors as safetensors.
            with path.open("rb") as fh:
                obj = torch.load(fh, map_location="cpu", weights_only=not trust)
        return _arrays_as_tensors(obj) if trust else obj  # NumPy's: only in a trusted file
    except pickle.UnpicklingError as exc:
        if not pickle_or_zip:  # no flag would help
            raise _not_a_checkpoint(path) from exc
        message = str(exc)
        if not trust and "Weights only load failed" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            if found:
                raise UntrustedCheckpoint(
                    f"checkpoint {str(path)!r} needs arbitrary code execution to load "
                    f"({found.group(1)}) and was refused; pass {TRUST_FLAG} only if you trust "
                    "where it came from."
                ) from exc
            if (protocol := pickle_protocol(path)) is not None and protocol >= 4:
                raise UntrustedCheckpoint(
                    f"checkpoint {str(path)!r} was saved with pickle protocol {protocol}, whose "
                    "framing torch's safe loading cannot read: save it again with torch.save's "
                    f"default protocol, or pass {TRUST_FLAG} only if you trust where it came from."
                ) from exc
            raise UntrustedCheckpoint(
                f"checkpoint {str(path)!r} is corrupt or uses pickle features that safe loading "
                f"refuses; pass {TRUST_FLAG} only if you trust where it came from."
            ) from exc
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a torch file.") from exc
    except (ImportError, AttributeError) as exc:
        if not trust:
            raise UserError(f"checkpoint {str(path)!r} is corrupt or not a torch file.") from exc
        # A whole pickled model (torch.save(model)) rebuilds its classes from their modules.
        raise UserError(
            f"checkpoint {str(path)!r} pickles code that cannot be imported here "
            f"({first_line(exc)}): run where its modules can be imported (PYTHONPATH), or save "
            "the model's state_dict instead."
        ) from exc
    except Exception as exc:
        if not pickle_or_zip:  # a text file failed as a KeyError, named as such
            raise _not_a_checkpoint(path) from exc
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt, truncated or not a torch file "
            f"({type(exc).__name__})."
        ) from exc


def _not_a_checkpoint(path: Path) -> UserError:
    """A file that opens as neither a zip archive nor a binary pickle."""
    return UserError(
        f"checkpoint {str(path)!r} is not a torch, safetensors or pickle file "
        "(pickles of protocol 2 or later: Python 2's text protocols 0 and 1 are not read)."
    )


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


def _unwrap(
    obj: Any, path: Path, weights_key: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], nn.Module | None]:
    """Find the state dict inside a loaded object (the one ``weights_key`` names, see
    :func:`load_checkpoint`); also return self-describing metadata, and the pickled module the
    state dict was taken from, where it was one (:func:`_holding` finds its part that holds it)."""
    if isinstance(obj, nn.Module):  # only reachable with trust=True (a pickled whole model)
        state = obj.state_dict()
        return (state if weights_key is None else _part(state, weights_key, path, [])), {}, obj
    if isinstance(obj, NumPyValue):
        raise _numpy_weights(path)
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {str(path)!r} holds {a_type(obj)}, not a state dict of tensors."
        )
    metadata: dict[str, Any] = {}
    if obj.get("format") == CHECKPOINT_FORMAT:
        meta = obj.get("hessian_cli", {})
        metadata = dict(meta) if isinstance(meta, dict) else {}
    else:
        metadata = _training_position(obj)
    if weights_key is not None and weights_key in obj:
        if not _holds_tensors(entry := obj[weights_key]):  # was "holds no state dict of tensors"
            shown = ", ".join(map(str, list(obj)[:8]))
            raise UserError(
                f"checkpoint {str(path)!r} holds {a_type(entry)} under {weights_key!r}, which "
                f"{WEIGHTS_FLAG} names, not weights (its entries: {shown})."
            )
        state, module = _state_in(entry, path, obj)
        return state, metadata, module
    state, module = _state_in(obj, path, obj)
    if weights_key is not None:
        state = _part(_strip_prefixes(state), weights_key, path, list(obj))
    return state, metadata, module


def _holding(module: nn.Module | None, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """The part of ``module`` (itself, or a module inside it) whose state dict is ``state``, the
    very tensors: a wrapper's model (nn.DataParallel's ``module``, whose prefix was stripped),
    the part --weights-key named, a TorchScript archive's module. None where no part is (then
    the weights alone are used)."""
    if module is None:
        return None
    where = {k: v.data_ptr() for k, v in state.items()}
    for part in module.modules():
        own = part.state_dict(keep_vars=True)
        if own.keys() == where.keys() and all(v.data_ptr() == where[k] for k, v in own.items()):
            return part
    return None


def _part(state: dict[str, Any], key: str, path: Path, entries: list) -> dict[str, Any]:
    """The weights ``state`` holds under the leading name ``key``, without it."""
    part = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
    if not part:
        shown = ", ".join(map(str, entries[:8])) or "none"
        raise UserError(
            f"checkpoint {str(path)!r} has no entry {key!r} (its entries: {shown}) and no "
            f"weights named {key + '.*'!r}."
        )
    return part


def _state_in(obj: Any, path: Path, top: Any) -> tuple[dict[str, Any], nn.Module | None]:
    """The state dict in ``obj`` (a part of the loaded ``top``): itself, or nested under one of
    the usual keys (one holding weights before one holding other things), or else the one
    entry that holds weights (DeepSpeed's ``module``, ``model_state``...); and the pickled
    module it is the state dict of, if any. Two usual keys holding different weights are
    refused: which was meant is the user's to say."""
    current: Any = obj
    module = None
    for _ in range(4):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(current, nn.Module):
            module, current = current, current.state_dict()
        if _is_state_dict(current):
            return dict(current), module
        if not isinstance(current, dict):
            break
        weights = {k: v for k, v in current.items() if _holds_weights(v)}
        usual = [k for k in _NESTING_KEYS if k in weights]
        if len(usual) > 1 and not _same_weights([weights[k] for k in usual]):
            raise UserError(
                f"checkpoint {str(path)!r} holds different weights under "
                f"{' and '.join(map(repr, usual))}: pick one with {WEIGHTS_FLAG}."
            )
        # A usual key that holds no tensors is no place for weights: a model's configuration
        # beside its state dict ({"model": {"depth": 20}, "weights": {...}}) was looked in alone.
        nested = next(
            (current[k] for k in (*usual, *_NESTING_KEYS) if _holds_tensors(current.get(k))),
            weights[next(iter(weights))] if len(weights) == 1 else None,
        )
        if nested is None:
            break
        current = nested
    entries = ", ".join(list(map(str, top))[:8]) if isinstance(top, dict) else ""
    if isinstance(top, dict) and {"state", "param_groups"} <= top.keys():
        # The optimizer.pt beside a model.pt: no --weights-key finds weights in it.
        raise UserError(
            f"checkpoint {str(path)!r} holds an optimizer's state (its entries: {entries}), not "
            "a model's weights."
        )
    if isinstance(current, dict) and current and all(isinstance(k, str) for k in current):
        bad = next(k for k, v in current.items() if not isinstance(v, torch.Tensor))
        if _numpy_state(current) or _numpy_state(current[bad]):
            raise _numpy_weights(path)
        raise UserError(
            f"checkpoint {str(path)!r} holds no state dict of tensors where one is looked for "
            f"(its entry {bad!r} is {a_type(current[bad])}; the file's entries: {entries}): "
            f"name the one that holds the weights with {WEIGHTS_FLAG}."
        )
    raise UserError(f"checkpoint {str(path)!r} holds no state dict of tensors.")


def _holds_tensors(value: Any, depth: int = 4) -> bool:
    """Whether a module, or a dict holding a tensor or module within ``depth`` levels."""
    if isinstance(value, nn.Module):
        return True
    return isinstance(value, dict) and any(
        isinstance(v, torch.Tensor) or (depth > 1 and _holds_tensors(v, depth - 1))
        for v in value.values()
    )


def _holds_weights(value: Any) -> bool:
    return isinstance(value, nn.Module) or _is_state_dict(value)


def _same_weights(sets: list[Any]) -> bool:
    """Whether state dicts (or modules) may hold the same weights: the same names, and values
    not shown to differ (one object twice, NaN where the other has NaN; meta and sparse tensors
    are not compared, and are refused as such when applied)."""
    states = [s.state_dict() if isinstance(s, nn.Module) else s for s in sets]
    first = states[0]
    return all(
        s is first or (s.keys() == first.keys() and all(_same(s[k], first[k]) for k in first))
        for s in states[1:]
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or a.is_meta or b.is_meta or torch.strided not in (a.layout, b.layout):
        return True
    if a.layout != b.layout or a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    if a.element_size() == 1:  # float8 has no comparisons of its own
        a = a.float()
    if b.element_size() == 1:
        b = b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# Where other tools record how far training had gone: Lightning's global_step and epoch,
# DeepSpeed's global_steps, the step, iteration or epoch of pytorch/examples, timm and many
# training scripts.
_STEP_KEYS = ("global_step", "global_steps", "step", "iteration", "iter")


def _training_position(obj: dict[str, Any]) -> dict[str, int]:
    """The step and epoch a checkpoint of another tool records as whole numbers at its top
    level: a series is ordered by them (by name, ``best`` came after ``11``), and the results
    carry them."""
    found = {}
    step = next((n for k in _STEP_KEYS if (n := _recorded_count(obj.get(k))) is not None), None)
    if step is not None:
        found["step"] = step
    if (epoch := _recorded_count(obj.get("epoch"))) is not None:
        found["epoch"] = epoch
    return found


def _recorded_count(value: Any) -> int | None:
    """A whole number as other tools' checkpoints record one: an int, NumPy's (a loop over
    ``np.arange``) or a 0-d integer tensor (``torch.tensor(epoch)``), both of which a series
    left unordered; None for a bool, str, float or anything else."""
    if isinstance(value, torch.Tensor):
        whole = not (value.is_floating_point() or value.is_complex() or value.is_meta)
        if value.ndim != 0 or not whole or value.dtype == torch.bool:
            return None
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # NumPy's bool is none
        return None
    return int(value) if value >= 0 else None


def _trainer_step(state: Path) -> dict[str, int]:
    """The step a Trainer's ``trainer_state.json`` records beside its weights (``global_step``),
    which orders a series and goes with the results; none where it is missing or unreadable
    (the folder's name orders it then)."""
    recorded = _small_json(state)
    step = recorded.get("global_step") if isinstance(recorded, dict) else None
    return {"step": step} if is_count(step) else {}


_JSON_CAP = 1 << 26  # a Trainer's state or a shard index of 64 MiB is neither


def _small_json(path: Path) -> Any:
    """The JSON file ``path`` holds, None where it is missing, unreadable or larger than
    ``_JSON_CAP`` (not read: such a file is no state or index of ours to follow)."""
    try:
        if path.stat().st_size > _JSON_CAP:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deep
        return None


def is_count(value: Any) -> bool:
    """A whole number as a checkpoint stores one (not a bool, str or float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def apply_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Load ``state_dict`` strictly into ``model``, explaining any mismatch in one sentence;
    return the leading name the weights were taken from, where they were (see :func:`_fitted`:
    what other tools wrap the weights in is taken off first, and only where the names then are
    exactly the model's do they load)."""
    expected = model.state_dict()
    unsaved = {k: b for k, b in model.named_buffers() if k not in expected}
    state, several, taken = _fitted(expected, dict(state_dict), unsaved)
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
        if several:
            parts.append(
                f"its weights under {' and '.join(repr(h + '.') for h in several)} each fit: "
                f"pick one with {WEIGHTS_FLAG}"
            )
        raise WeightsMismatch(
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
        raise WeightsMismatch(f"the checkpoint does not fit the model: {first_line(exc)}.") from exc
    return taken


# Buffers that tools add beside the weights, which no model expects: thop's operation counts on
# every module, torch.optim.swa_utils.AveragedModel's count of averaged models.
_BOOKKEEPING = ("total_ops", "total_params", "n_averaged")


def _fitted(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    unsaved: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], str | None]:
    """``state`` renamed to the model's names where only a wrapper differs; the leading names
    whose parts each fit the model (names and shapes) where several do (then none is taken);
    the one taken.

    In order: bookkeeping buffers the model lacks are dropped (then ``module.`` may be stripped
    from what is left); a prefix loading stripped is put back where the model's own names all
    carry it (a wrapper whose one child is called ``module``); a name the model ties to another
    (a decoder sharing its embedding) takes that one's value where a writer kept one copy
    (safetensors' ``save_model``); a missing BatchNorm step counter (checkpoints before torch
    0.4.1) is the model's own zero, and one stored as a float is made an integer; a buffer the model
    keeps out of its state dict (``unsaved``: a Hugging Face model's ``position_ids``, which older
    versions saved) is dropped where it
    holds the model's own values. Last, where the names still differ, the model's own names
    are taken where the others are copies of it under leading names (an EMA), else the
    entries under one leading name (a LightningModule's attribute: ``model.``, ``net.``) where
    they alone are exactly the model's.
    """
    extra = [k for k in state if k not in expected and k.rsplit(".", 1)[-1] in _BOOKKEEPING]
    if extra:
        state = _strip_prefixes({k: v for k, v in state.items() if k not in extra})
    for prefix in _PREFIXES:  # a model whose own names carry the prefix loading stripped
        if state and all(k.startswith(prefix) for k in expected):
            if all(prefix + k in expected for k in state):
                state = {prefix + k: v for k, v in state.items()}

    def completed(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        part = dict(part)
        for names in _tied_names(expected):
            held = next((k for k in names if k in part), None)
            for k in names:
                if held is not None and k not in part:
                    part[k] = part[held]
        for key, value in expected.items():
            if not key.endswith("num_batches_tracked"):
                continue
            saved = part.get(key)
            if saved is None:  # checkpoints older than torch 0.4.1 have none: harmless
                part[key] = torch.zeros_like(value)
            elif saved.is_floating_point() and bool(torch.isfinite(saved).all()):
                # A step count that a converter (or a cast of the whole dict) made a float.
                part[key] = saved.round().to(value.dtype)
        for key, value in unsaved.items():
            saved = part.get(key)
            if isinstance(saved, torch.Tensor) and saved.shape == value.shape:
                if torch.equal(saved.to(value.dtype), value):
                    del part[key]
        return part

    state = completed(state)
    if set(state) == set(expected):
        return state, [], None
    fits = {}
    for head in sorted({k.split(".", 1)[0] for k in state if "." in k}):
        part = completed(
            _strip_prefixes(
                {k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")}
            )
        )
        if set(part) == set(expected):
            fits[head] = part
    # Names alone fit where the model's are short (a Linear's `weight`, `bias`): of several
    # that do, those of the model's shapes too ("'1.' and '3.' each fit" a Linear(64, 10) of
    # whose shapes neither was).
    if len(fits) > 1:
        fits = {h: p for h, p in fits.items() if all(p[k].shape == expected[k].shape for k in p)}
    # The model's own names, beside copies of it under leading names (a module holding its
    # EMA as `model_ema`): the model's own, as a file of separate entries is read (the copy,
    # the one leading name that fit, was taken unsaid).
    extra = {k.split(".", 1)[0] for k in state if k not in expected}
    if set(expected) <= set(state) and extra <= set(fits):
        return {k: state[k] for k in expected}, [], None
    if len(fits) == 1:
        ((taken, part),) = fits.items()
        return part, [], taken
    return state, sorted(fits), None


def _tied_names(expected: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of each tensor the model holds under several (tied weights)."""
    names: dict[tuple, list[str]] = {}
    for key, t in expected.items():
        if t.layout == torch.strided and t.numel():
            names.setdefault((t.data_ptr(), t.shape, t.stride()), []).append(key)
    return [keys for keys in names.values() if len(keys) > 1]


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
    for keys in _tied_names(expected):
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
    copies: dict[tuple, torch.Tensor] = {}
    state = _on_cpu({k: v.detach() for k, v in state_dict.items()}, copies)
    _check_safe(state, "state_dict")
    _check_safe(metadata, "metadata")
    if extra:
        _check_safe(extra, "extra")
        extra = _on_cpu(extra, copies)
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


def _on_cpu(obj: Any, copies: dict[tuple, torch.Tensor]) -> Any:
    """``obj`` with its tensors on the CPU: a run trained on a GPU saved CUDA tensors, which a
    plain ``torch.load`` on a machine without one refuses. The same view (tied weights) is
    copied once, as torch.save stores it once."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride())
        key = (*key, obj.dtype, obj.device)
        if key not in copies:
            copies[key] = obj.detach().cpu()
        return copies[key]
    if isinstance(obj, dict):
        return {k: _on_cpu(v, copies) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v, copies) for v in obj)
    return obj


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
    """Sort key for a training series: :func:`series_key` of the step and epoch its metadata
    records, as the HDF5 file orders its groups; ties by name, naturally (``ckpt2`` before
    ``ckpt10``), then by path so (a glob of runs/epoch_*/model.pt came in the shell's order,
    epoch_10 before epoch_2)."""
    meta = ckpt.metadata or {}
    step, epoch = _as_number(meta.get("step")), _as_number(meta.get("epoch"))
    where = natural_key(ckpt.path.as_posix())
    return (*series_key(step, epoch, ckpt.name), natural_key(ckpt.name), where)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files directly inside ``directory``, in natural name order (no temp files; a
    link to another of them, Lightning's ``last.ckpt``, too, which a series names as left out);
    and the weights of the Trainer checkpoint folders inside it
    (``checkpoint-500/model.safetensors``) or DeepSpeed's
    (``global_step500/mp_rank_00_model_states.pt``; also in accelerate's
    save_state folders, ``checkpoint_3/pytorch_model/mp_rank_00_model_states.pt``). A Trainer
    checkpoint folder itself is its weights file alone (not its optimizer's or scheduler's); a
    Trainer's output directory is its final weights (``save_model`` writes them there) beside
    its checkpoint folders' (the series was the final weights alone)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory.")
    own = trainer_weights(directory)
    if own is None:  # its shards would each be taken for a checkpoint, missing the others'
        _refuse_unjoined(directory)
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise UserError(f"cannot list {str(directory)!r}: {exc.strerror or exc}.") from exc
    found = [own] if own is not None else _checkpoint_files(entries)
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    # A Trainer checkpoint folder's global_stepN, under DeepSpeed, is its own weights again
    # (where zero_to_fp32.py wrote weights beside global_stepN folders, they are another's).
    trainer_folder = own is not None and (directory / TRAINER_STATE).is_file()
    for folder in folders:
        # So is accelerate's pytorch_model/ beside the weights zero_to_fp32.py gathered from it.
        again = trainer_folder or (own is not None and folder.name == ACCELERATE_DEEPSPEED)
        if (weights := trainer_weights(folder)) is not None:
            if not (again and weights.name == DEEPSPEED_WEIGHTS):
                found.append(weights)
        else:  # a checkpoint-N folder of shards (or ZeRO-3's) was skipped unsaid
            # (beside weights, a torch.distributed.checkpoint is not them: accelerate's
            # optimizer_0/, or the sharded model merge-weights joined into them)
            _refuse_unjoined(folder, zero3=not again, dcp=own is None)
            if (folder / ACCELERATE_DEEPSPEED).is_dir():
                # accelerate's save_state folder under DeepSpeed (checkpoints/checkpoint_3/
                # pytorch_model/): a project's checkpoints folder held "no checkpoint files".
                found.extend(list_checkpoints(folder))
    for path in found:  # before a series reads the first
        _refuse_model_parallel(path)
    if not found:
        _refuse_registered_only(directory, folders)
    deepspeed_models = re.compile(r"pytorch_model(_\d+)?/" + re.escape(DEEPSPEED_WEIGHTS))
    relative = (p.relative_to(directory).as_posix() for p in found)
    _refuse_several_models(directory, sorted(r for r in relative if deepspeed_models.fullmatch(r)))
    return sorted(found, key=lambda p: natural_key(series_name(p)))


def _refuse_unjoined(folder: Path, *, zero3: bool = True, dcp: bool = True) -> None:
    """Refuses a folder of weights in pieces, which are not joined (save_pretrained's shards
    are, their index being the folder's weights: :func:`trainer_weights`): where ``zero3``,
    DeepSpeed ZeRO-3's partitions (also in the
    global_stepN folder of a Trainer's checkpoint folder), or FSDP's sharded state dict that
    accelerate's save_state writes (its random_states_0.pkl, beside them, was taken for the
    weights, and refused as needing trust) or its local state dicts, one per rank (the folder
    held "no checkpoint files"), or where ``dcp``, a torch.distributed.checkpoint's shards
    (dcp.save's, as FSDP2 and torchtitan save: so too); and a PEFT adapter's folder, whose weights
    are not the model's (they were skipped unsaid, or refused as mismatches)."""
    if (folder / PEFT_CONFIG).is_file() and any((folder / n).is_file() for n in PEFT_ADAPTERS):
        raise UserError(f"{str(folder)!r} holds a PEFT adapter, {_MERGE_ADAPTER}")
    if fsdp := next((p for p in folder.glob("pytorch_model_fsdp_*") if p.is_dir()), None):
        raise UserError(
            f"{str(folder)!r} holds FSDP's sharded weights ({fsdp.name}), which are not joined: "
            f"join them with `accelerate merge-weights {fsdp.name} OUT_DIR` and give the "
            "model.safetensors it writes."
        )
    ranks = [p.name for p in folder.glob("pytorch_model_fsdp*") if _FSDP_LOCAL.fullmatch(p.name)]
    if ranks:
        ranks.sort(key=natural_key)
        raise UserError(
            f"{str(folder)!r} holds FSDP's local state dicts, each rank's shard of the flattened "
            f"weights ({ranks[0]} to {ranks[-1]}), which are not joined: {_JOIN_FSDP_LOCAL}"
        )
    if dcp and (folder / ".metadata").is_file() and any(folder.glob("*.distcp")):
        raise UserError(
            f"{str(folder)!r} holds a torch.distributed.checkpoint, weights sharded in .distcp "
            f"files, which are not joined: {_join_dcp(folder)}"
        )
    states = (*folder.glob(_ZERO3_STATES), *folder.glob(f"global_step*/{_ZERO3_STATES}"))
    if zero3 and states:
        raise UserError(
            f"{str(folder)!r} holds DeepSpeed ZeRO-3's weights partitioned among its optimizer's "
            f"files ({states[0].relative_to(folder)}), which are not joined: {_JOIN_ZERO3}"
        )


# accelerate's save_state of an FSDP model under LOCAL_STATE_DICT: one file per rank.
_FSDP_LOCAL = re.compile(r"pytorch_model_fsdp(_\d+)?_rank\d+\.bin")
_JOIN_FSDP_LOCAL = (
    "load them on as many processes (accelerate's load_state) and save them again with "
    "fsdp_state_dict_type FULL_STATE_DICT, whose pytorch_model_fsdp.bin is read."
)


def _join_dcp(folder: Path) -> str:
    """How to join a torch.distributed.checkpoint (dcp.save's, FSDP2's, torchtitan's) in
    ``folder`` into one file that is read."""
    return (
        "join them with `python -m torch.distributed.checkpoint.format_utils dcp_to_torch "
        f"{folder} OUT.pt` and give that file."
    )


_MERGE_ADAPTER = (
    "changes to a base model's weights, not the weights: merge it into that model "
    "(merge_and_unload()) and save the result (save_pretrained, or torch.save of its state_dict)."
)
# The model states of one rank under ZeRO-3: placeholders, the weights are in the optimizer's.
_ZERO3_STATES = "zero_pp_rank_*_mp_rank_*_model_states.pt"
_JOIN_ZERO3 = (
    "join them with the zero_to_fp32.py that DeepSpeed writes beside its global_stepN folders, "
    "and give the file it writes."
)


_MODEL_PARALLEL = re.compile(r"mp_rank_\d+_model_states\.pt")
# A DeepSpeed PipelineModule's weights, one file per layer (and tensor-parallel rank).
_PIPELINE_LAYER = re.compile(r"layer_\d+(-model_\d+)?-model_states\.pt")


def _refuse_model_parallel(path: Path) -> None:
    """Refuses one rank's model states of a DeepSpeed checkpoint under model parallelism
    (mp_rank_00_model_states.pt beside mp_rank_01_...): a slice of the weights, which was read
    as the model's (refused as shape mismatches, or a series of the slices); and those of a
    pipeline-parallel model, whose ``module`` is None beside its layer_NN-model_states.pt
    files (it was told to name its weights with --weights-key, which none holds), or one of
    those layers (refused as missing the others' keys)."""
    if _MODEL_PARALLEL.fullmatch(path.name) or _PIPELINE_LAYER.fullmatch(path.name):
        layers = [p.name for p in path.parent.iterdir() if _PIPELINE_LAYER.fullmatch(p.name)]
        if layers:
            layers.sort(key=natural_key)
            raise UserError(
                f"checkpoint {str(path)!r} is of a DeepSpeed pipeline-parallel model, whose "
                f"weights are saved one file per layer ({layers[0]} to {layers[-1]}), which are "
                "not joined: load it into your PipelineModule, torch.save its state_dict() and "
                "give that file."
            )
    if not _MODEL_PARALLEL.fullmatch(path.name):
        return
    ranks = sorted(p.name for p in path.parent.iterdir() if _MODEL_PARALLEL.fullmatch(p.name))
    if len(ranks) > 1:
        raise UserError(
            f"checkpoint {str(path)!r} is one of {len(ranks)} model-parallel ranks' slices of the "
            f"weights ({ranks[0]} to {ranks[-1]}), which are not joined: join them into the whole "
            "model's state dict with your model-parallel framework's tool and give that file."
        )


def _shard_index(path: Path) -> Path | None:
    """The Hugging Face index beside ``path`` that lists it as one of its shards, if one does."""
    for index in (path.parent / n for n in SHARD_INDEXES):
        listed = _small_json(index)
        shards = listed.get("weight_map") if isinstance(listed, dict) else None
        if isinstance(shards, dict) and path.name in shards.values():
            return index
    return None


# accelerate's save_state: random states, one per process, and the objects registered for
# checkpointing (register_for_checkpointing), which are no model's weights.
_SAVE_STATE_EXTRAS = re.compile(r"(random_states|custom_checkpoint)_\d+\.pkl")


def _refuse_registered_only(directory: Path, folders: list[Path]) -> None:
    """Refuses accelerate's save_state folders (``directory``, or its ``folders``) that hold no
    model weights but objects registered for checkpointing (custom_checkpoint_0.pkl, never read
    unasked): a model registered rather than prepared has its weights there, and the folder
    was said to hold "no checkpoint files (..., .pkl, ...)"."""
    for folder in (directory, *sorted(folders, key=lambda p: natural_key(p.name))):
        names = [p.name for p in folder.glob("custom_checkpoint_*.pkl")]
        if names := sorted(filter(_SAVE_STATE_EXTRAS.fullmatch, names), key=natural_key):
            raise UserError(
                f"{str(folder)!r} holds no model weights, only accelerate's objects registered for "
                f"checkpointing ({', '.join(names)}), which are not read unasked: give the file "
                f"that holds the weights (for a series, a glob such as checkpoint_*/{names[0]})."
            )


def _checkpoint_files(entries: list[Path]) -> list[Path]:
    """The checkpoint files among a directory's ``entries``.

    A link that points nowhere is listed, so that reading it ends the run as any unreadable
    checkpoint does (it was skipped silently). accelerate's random_states_0.pkl, beside the
    weights of its save_state, is no checkpoint (a series stopped at it, asking for trust), nor
    its custom_checkpoint_0.pkl (under DeepSpeed a series stopped at it: no state dict)."""
    return [
        p
        for p in entries
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.name.lower().endswith(CHECKPOINT_SUFFIXES)
        and not p.name.startswith(".")
        and not _SAVE_STATE_EXTRAS.fullmatch(p.name)
    ]


def trainer_weights(folder: Path) -> Path | None:
    """The weights file of a Hugging Face Trainer or DeepSpeed checkpoint folder, where
    ``folder`` is one; refused where another model's weights are beside it (accelerate's
    save_state writes model_1.safetensors for a second prepared model: it was left out unsaid)."""
    weights = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is not None and weights.name in TRAINER_WEIGHTS:
        stem, suffix = weights.name.split(".", 1)
        other = re.compile(rf"{stem}_\d+\.{suffix}")
        others = sorted(p.name for p in folder.iterdir() if other.fullmatch(p.name))
        _refuse_several_models(folder, [weights.name, *others])
    return weights


def folder_checkpoint(folder: Path) -> Path | None:
    """The weights file of a folder that is one checkpoint: a Trainer's or DeepSpeed's
    (:func:`trainer_weights`), or accelerate's save_state under DeepSpeed, whose weights lie in
    its pytorch_model/ (given alone it was taken for a series of one)."""
    if (weights := trainer_weights(folder)) is not None:
        return weights
    inner = folder / ACCELERATE_DEEPSPEED
    return trainer_weights(inner) if inner.is_dir() else None


def _refuse_several_models(folder: Path, files: list[str]) -> None:
    """Refuses a folder of accelerate's save_state that holds the weights ``files`` (relative
    to it) of several prepared models: one was taken and the others left out unsaid, or, under
    DeepSpeed (pytorch_model/ beside pytorch_model_1/), all were taken for one run's series."""
    if len(files) > 1:
        raise UserError(
            f"{str(folder)!r} holds the weights of {len(files)} models ({', '.join(files)}), as "
            "accelerate's save_state writes one per prepared model: give the file of the model "
            f"to analyse (for a series, a glob such as */{files[1]})."
        )
