"""Where the data comes from, and how it is cut into the fixed batches the Hessian is taken over.

Analysis needs the operator to be the same matrix at every product, so nothing here shuffles or
augments: batches are the first samples of a dataset, in order.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    default_collate,
)
from torch.utils.data.distributed import DistributedSampler

from hessian_cli.atomic import file_sha256
from hessian_cli.engine.batches import Batch, check_range
from hessian_cli.engine.inputs import Inputs, input_tensors, is_inputs, map_inputs
from hessian_cli.errors import UserError, a_type, described, out_of_host_memory
from hessian_cli.specs.checkpoints import pickle_protocol
from hessian_cli.specs.user_code import (
    USER_CODE_FORMS,
    absolute,
    anchored,
    call_user,
    load_object,
    missing_code_file,
    refuse_file_without_name,
    split_user_spec,
)

TENSOR_FILE_SUFFIXES: tuple[str, ...] = (".npz", ".pt", ".pth", ".h5", ".hdf5")
DIGITS_TRAIN_SIZE = 1300
_SYNTHETIC_SEED = 0
_SCAN_LIMIT = 10_000  # samples looked at to count the classes of a user dataset
IGNORE_INDEX = -100  # the label cross-entropy skips (torch's default: a language model's padding)
LABEL_KEYS = ("labels", "label")  # where a dict sample (a Hugging Face dataset's) keeps its target

# name: (torchvision class, per-channel mean, per-channel std, classes, sample shape)
_VISION: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], int, tuple[int, ...]]] = {
    # CIFAR-10 statistics as in PyHessian and the classic CIFAR ResNet training scripts.
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 10, (3, 32, 32)),
    # ImageNet's statistics, as akamaster/pytorch_resnet_cifar10 trained its ResNets with: its
    # checkpoints' BatchNorm statistics are of those inputs (CIFAR-10's std is 12% smaller).
    "cifar10-imagenet-norm": (
        "CIFAR10",
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        10,
        (3, 32, 32),
    ),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, (3, 32, 32)),
    "mnist": ("MNIST", (0.1307,), (0.3081,), 10, (1, 28, 28)),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,), 10, (1, 28, 28)),
    "svhn": ("SVHN", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 10, (3, 32, 32)),
}


@dataclass
class DataSource:
    """A training set, an optional test set, and what a model needs to know about them."""

    spec: str
    train: Dataset
    test: Dataset | None
    input_shape: tuple[int, ...] | None  # None: each sample's inputs are several tensors
    num_classes: int | None
    # Per-sample target shape: () for a class label, (tokens,) for a class label per token
    # (num_classes set), the regression targets' shape otherwise.
    target_shape: tuple[int, ...] = ()

    @property
    def num_outputs(self) -> int:
        """How many outputs a built-in model (one row of outputs per sample) needs for this
        data: its classes, else one per target value (also integer targets with a shape, which
        a built-in model cannot take per token: multi-hot labels under the user's loss)."""
        if self.num_classes is not None and not self.target_shape:
            return self.num_classes
        return math.prod(self.target_shape) if self.target_shape else 1


def float_labels_note(data: DataSource) -> str | None:
    """What to tell of targets that are real numbers all whole (class labels stored as floats,
    as far as a dataset of tensors shows), read as regression targets, for which a built-in
    model is made: analyze's checkpoint of a classifier did not fit it, and train regressed
    onto the labels as numbers. None where they are not."""
    ds = data.train
    if data.num_classes is not None or not isinstance(ds, TensorDataset) or len(ds.tensors) < 2:
        return None
    y = ds.tensors[1]
    if not (y.is_floating_point() and bool((y == y.round()).all())):
        return None
    outputs = data.num_outputs
    return (
        f"the data's targets are real numbers, read as {outputs} regression "
        f"output{'s' if outputs > 1 else ''}: class labels must be stored as integers"
    )


def labels_note(data: DataSource) -> str | None:
    """What to tell where a checkpoint does not fit the built-in model made for the data: of
    class labels stored as floats (:func:`float_labels_note`), or counted from 1 (as MATLAB
    and R count), read as one class more (the mismatch named only the outputs), as far as a
    dataset of tensors shows. None where neither."""
    ds = data.train
    if data.num_classes is None or data.target_shape or not isinstance(ds, TensorDataset):
        return float_labels_note(data)
    y = ds.tensors[1] if len(ds.tensors) > 1 and len(ds) else None
    if y is None or y.is_floating_point() or (low := int(y.min())) < 1:
        return None
    return (
        f"the data's class labels start at {low}, not 0, and are read as {data.num_classes} "
        f"classes, 0 to {data.num_classes - 1}: store them from 0 (y - {low})"
    )


def data_names_code(spec: str) -> bool:
    """Whether the data spec names user code to import, not built-in data or a file."""
    builtin = spec == "digits" or spec.startswith(("synthetic-regression:", "synthetic:"))
    data_file = spec.lower() in _VISION or spec.lower().endswith(TENSOR_FILE_SUFFIXES)
    return not (builtin or data_file) and split_user_spec(spec) is not None


def load_data(
    spec: str, *, root: str | Path | None = None, download: bool = False, trusted: bool = True
) -> DataSource:
    """Resolve a data spec into train/test datasets and the shapes a model needs.

    The spec string alone fixes the data (synthetic sets use a fixed generator), so a checkpoint
    that records its data spec is always analysed on the data it was trained on.
    """
    if data_names_code(spec):
        return _user_data(spec, trusted)
    if spec == "digits":
        return _digits()
    if spec.startswith("synthetic-regression:"):
        return _synthetic(spec, regression=True)
    if spec.startswith("synthetic:"):
        return _synthetic(spec, regression=False)
    if spec.lower() in _VISION:
        return _torchvision(spec.lower(), root, download)
    if spec.lower().endswith(TENSOR_FILE_SUFFIXES):
        return _tensor_file(spec)
    refuse_file_without_name(spec, "data")
    _refuse_other_path(spec)
    raise UserError(
        f"unknown data {spec!r}: use digits, synthetic:CxHxW[:classes[:count]], "
        f"synthetic-regression:D[:outputs[:count]], {', '.join(_VISION)} (with --data-root), "
        f"a .npz/.pt/.h5 file holding x and y, or user code as {USER_CODE_FORMS}."
    )


def _refuse_other_path(spec: str) -> None:
    """Data that names a folder or a file of a kind not read says what to give instead: a
    folder of images or a .npy file met the list of every form a data spec takes."""
    path = Path(spec).expanduser()
    if path.is_dir() and (found := _torchvision_folder(path)) is not None:
        name, root = found
        raise UserError(
            f"data {spec!r} is {name}'s folder as torchvision keeps it: give --data {name} "
            f"--data-root {root}."
        )
    if path.is_dir():
        raise UserError(
            f"data {spec!r} is a directory: give a file of x and y (.npz, .pt, .h5), a "
            "torchvision dataset by name with this folder as --data-root, or, for a folder of "
            "images, a factory (file.py:NAME) returning torchvision.datasets.ImageFolder(folder, "
            "transform) of images of one size."
        )
    if path.suffix.lower() == ".npy" and path.is_file():
        raise UserError(
            f"data {spec!r} is a .npy file, which holds one array: save the inputs and labels "
            "together, np.savez(path, x=x, y=y), and give that .npz file."
        )
    if path.is_file():
        raise UserError(
            f"data file {spec!r} is not of a kind that is read ({', '.join(TENSOR_FILE_SUFFIXES)}"
            "): save the inputs and labels as np.savez(path, x=x, y=y) does."
        )


# What torchvision keeps each dataset's files in, under its root.
_VISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "svhn": "train_32x32.mat",
}


def _torchvision_folder(path: Path) -> tuple[str, Path] | None:
    """The torchvision dataset whose files ``path`` holds or is, and its --data-root."""
    for name, inner in _VISION_FOLDERS.items():
        if (path / inner).exists():
            return name, path
        if path.name == inner:
            return name, path.parent
    return None


def check_root_options(spec: str, *, data_root: bool, download: bool) -> None:
    """Refuse ``--data-root`` or ``--download`` (``True``: given by the user) for data that does
    not read them, rather than let the user believe they were used."""
    given = [flag for flag, set_ in (("--data-root", data_root), ("--download", download)) if set_]
    if given and spec.lower() not in _VISION:
        them = "it" if len(given) == 1 else "them"
        raise UserError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} read only for the "
            f"torchvision datasets ({', '.join(_VISION)}); data {spec!r} does not use {them}."
        )


def data_file_digest(spec: str) -> str | None:
    """The sha256 of the tensor file ``spec`` names (None for other data, or a file that is
    not there): what tells a resumed run that its data file was rewritten with as many samples."""
    path = Path(spec)
    if not spec.lower().endswith(TENSOR_FILE_SUFFIXES) or not path.is_file():
        return None
    return file_sha256(path)


def missing_data_file(spec: str) -> str | None:
    """The file data ``spec`` names (a tensor file, or a factory's Python file) where it is not
    there: for a spec read from a checkpoint or a run, which the file may have left since."""
    if spec.lower().endswith(TENSOR_FILE_SUFFIXES):
        return None if Path(spec).expanduser().exists() else spec
    return missing_code_file(spec) if data_names_code(spec) else None


def missing_recorded_file(specs: dict[str, str | None]) -> tuple[str, str] | None:
    """The first of the specs a checkpoint or a run records (``{"model": ..., "data": ...,
    "loss": ...}``; None: not recorded, or given anew) whose file has gone since, as (what, the
    file); None where all are there."""
    for what, spec in specs.items():
        missing = (missing_data_file if what == "data" else missing_code_file)(spec or "")
        if missing:
            return what, missing
    return None


def anchored_data(spec: str) -> str:
    """``spec`` with the file it names made absolute (a tensor file, or user code as
    :func:`anchored` does), so that it means the same data from any working directory."""
    if spec.lower().endswith(TENSOR_FILE_SUFFIXES):
        return absolute(spec)
    return anchored(spec)


# ----------------------------------------------------------------------------- built-ins


def _digits() -> DataSource:
    """The UCI 8x8 digits (1797 samples), split 1300/497 by a permutation stored in the file."""
    with resources.as_file(resources.files("hessian_cli") / "data" / "digits.npz") as path:
        if not path.is_file():
            raise UserError("the bundled digits data file is missing; reinstall hessian-cli.")
        with np.load(path, allow_pickle=False) as arrays:
            images, labels, perm = arrays["images"], arrays["labels"], arrays["split_permutation"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.from_numpy(perm.astype(np.int64))
    train, test = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    return DataSource(
        spec="digits",
        train=TensorDataset(x[train], y[train]),
        test=TensorDataset(x[test], y[test]),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


def _synthetic(spec: str, *, regression: bool) -> DataSource:
    """Gaussian inputs with uniform labels, or with a noisy linear teacher's targets."""
    form = (
        "synthetic-regression:D[:outputs[:count]]"
        if regression
        else "synthetic:CxHxW[:classes[:count]]"
    )
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise UserError(f"data spec {spec!r} is not of the form {form}.")
    shape = tuple(_spec_int(d, spec, form) for d in parts[0].lower().split("x"))
    second = _spec_int(parts[1], spec, form) if len(parts) > 1 else (1 if regression else 10)
    count = _spec_int(parts[2], spec, form) if len(parts) > 2 else 256
    test_count = max(1, count // 4)
    _check_fits_in_memory(spec, (count + test_count) * math.prod(shape) * 4)
    gen = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    x = torch.randn(count + test_count, *shape, generator=gen)
    if regression:
        dim = math.prod(shape)
        teacher = torch.randn(dim, second, generator=gen) / math.sqrt(dim)
        y = x.reshape(len(x), dim) @ teacher + 0.1 * torch.randn(len(x), second, generator=gen)
        num_classes, target_shape = None, (second,)
    else:
        y = torch.randint(0, second, (len(x),), generator=gen)
        num_classes, target_shape = second, ()
    return DataSource(
        spec=spec,
        train=TensorDataset(x[:count], y[:count]),
        test=TensorDataset(x[count:], y[count:]),
        input_shape=shape,
        num_classes=num_classes,
        target_shape=target_shape,
    )


def _check_fits_in_memory(spec: str, nbytes: int) -> None:
    """Refuse synthetic data larger than half this machine's memory: it is generated up front,
    so the count of the spec (not --num-samples) is what has to shrink."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return
    if nbytes > memory // 2:
        raise UserError(
            f"data spec {spec!r} would take {nbytes / 2**30:.1f} GiB (with its test split), more "
            f"than half this machine's {memory / 2**30:.0f} GiB; give it a smaller count."
        )


def _spec_int(text: str, spec: str, form: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise UserError(f"data spec {spec!r} is not of the form {form} with positive integers.")
    if int(text) >= 2**63:  # beyond any tensor's size or label (torch overflowed on them)
        raise UserError(f"data spec {spec!r}: {text} is too large for a size or a count.")
    return int(text)


def _torchvision(name: str, root: str | Path | None, download: bool) -> DataSource:
    cls_name, mean, std, classes, shape = _VISION[name]
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as exc:
        raise UserError(
            f"data {name!r} needs torchvision; install the 'vision' extra "
            "(pip install -e '.[vision]' in hessian-cli's folder), or torchvision itself."
        ) from exc
    if root is None:
        raise UserError(
            f"data {name!r} needs --data-root DIR pointing at its files (add --download to fetch "
            "them into DIR)."
        )
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    cls = getattr(torchvision.datasets, cls_name)
    root = str(Path(root).expanduser())
    splits = []
    for train in (True, False):
        where = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
        try:
            splits.append(cls(root, download=download, transform=transform, **where))
        except Exception as exc:
            hint = "check --data-root" if download else "pass the right --data-root, or --download"
            raise UserError(
                f"data {name!r} could not be loaded from {root!r} ({type(exc).__name__}); {hint}."
            ) from exc
    return DataSource(
        spec=name, train=splits[0], test=splits[1], input_shape=shape, num_classes=classes
    )


# ----------------------------------------------------------------------------- tensor files


def _tensor_file(spec: str) -> DataSource:
    """x and y (optionally x_test, y_test) from .npz, .pt or .h5; integer y means classes."""
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"data file {spec!r} is a directory.")
    if not path.is_file():
        raise UserError(f"data file {spec!r} does not exist.")
    arrays = _read_arrays(path)
    if _keras_named(list(arrays)):
        arrays = {_KERAS_SPLIT.get(k, k): v for k, v in arrays.items()}
    for key in ("x", "y"):
        if key not in arrays:
            # np.savez names the arrays it is given by position arr_0, arr_1, ...
            unnamed = any(re.fullmatch(r"arr_\d+", k) for k in arrays)
            hint = (
                ": name them when saving, np.savez(path, x=x, y=y)"
                if unnamed
                # Of other names (X and Y, data and target), which were only listed.
                else ": the inputs are read as x, the targets as y (name them so when saving)"
                if arrays
                else ""
            )
            raise UserError(
                f"data file {spec!r} has no {key!r} array at its top level (found: "
                f"{', '.join(sorted(arrays)) or 'none'}){hint}."
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"data file {spec!r} must hold both x_test and y_test, or neither.")
    x, y = _to_tensor(arrays["x"], spec, "x"), _to_tensor(arrays["y"], spec, "y")
    pairs = [(x, y)]
    if "x_test" in arrays:
        pairs.append(
            (
                _to_tensor(arrays["x_test"], spec, "x_test"),
                _to_tensor(arrays["y_test"], spec, "y_test"),
            )
        )
    classification = not (y.is_floating_point() or y.is_complex())
    datasets = []
    for i, (xs, ys) in enumerate(pairs):
        which = "x and y" if i == 0 else "x_test and y_test"
        if xs.ndim == 0 or ys.ndim == 0 or len(xs) != len(ys):
            raise UserError(f"data file {spec!r}: {which} must have the same, non-zero length.")
        if len(xs) == 0:
            raise UserError(f"data file {spec!r} holds no samples in {which}.")
        if 0 in xs.shape[1:]:  # a model built for it was refused for an option never given
            raise UserError(
                f"data file {spec!r}: the samples in {which} hold no values "
                f"(shape {tuple(xs.shape[1:])} each)."
            )
        if classification:
            ys = _class_labels(ys, spec, which)
        elif _is_one_hot(ys):  # Keras' to_categorical: regressed onto under mse, unsaid
            raise _real_one_hot(f"data {spec!r}: the targets in {which}", ys)
        elif ys.ndim == 1:
            ys = ys.unsqueeze(1)  # one regression target per sample
        if xs.shape[1:] != x.shape[1:]:
            raise UserError(f"data file {spec!r}: x_test samples are not shaped like x samples.")
        datasets.append(TensorDataset(xs, ys))
    num_classes = None
    if classification:
        num_classes = int(max(int(ds.tensors[1].max()) for ds in datasets)) + 1
        if "num_classes" in arrays:  # fewer than the labels need was raised to them, unsaid
            stored = _whole_number(arrays["num_classes"], spec)
            if stored < num_classes:
                raise UserError(
                    f"data file {spec!r}: num_classes is {stored}, but the class labels go up "
                    f"to {num_classes - 1}; store the number of classes, at least {num_classes}."
                )
            num_classes = stored
    return DataSource(
        spec=spec,
        train=datasets[0],
        test=datasets[1] if len(datasets) > 1 else None,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        target_shape=() if classification else tuple(datasets[0].tensors[1].shape[1:]),
    )


_FILE_KEYS = ("x", "y", "x_test", "y_test", "num_classes")
# How Keras' datasets (mnist.npz) name the training split beside x_test and y_test: read as x
# and y where the file holds neither (it had "no 'x' array").
_KERAS_SPLIT = {"x_train": "x", "y_train": "y"}


def _keras_named(names: list[str]) -> bool:
    """Whether a file's entries name its training split as Keras does, and not as x and y."""
    return not {"x", "y"} & set(names) and _KERAS_SPLIT.keys() <= set(names)


def _keys_read(names: list[str]) -> tuple[str, ...]:
    """The entries of a file holding ``names`` that are read (others are only listed)."""
    return (*_FILE_KEYS, *_KERAS_SPLIT) if _keras_named(names) else _FILE_KEYS


def _read_arrays(path: Path) -> dict[str, Any]:
    """The entries of a data file that it may hold (others are listed, not read: an HDF5 group
    as ``name/``), so that an error can say what the file has."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                read = _keys_read(npz.files)
                return {k: npz[k] if k in read else None for k in npz.files}
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as h5:
                read = _keys_read(list(h5))
                return {
                    k if isinstance(h5[k], h5py.Dataset) else f"{k}/": (
                        h5[k][()] if k in read and isinstance(h5[k], h5py.Dataset) else None
                    )
                    for k in h5
                }
        with warnings.catch_warnings():  # of pickle protocols, said below where it matters
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # NumPy arrays saved with torch.save were refused as not "plain arrays or tensors".
        if found := re.search(r"GLOBAL ([\w.]+)", str(exc)):
            raise UserError(
                f"data file {str(path)!r} holds objects other than tensors ({found.group(1)}), "
                "which safe loading does not read: save x and y as tensors (torch.from_numpy for "
                "NumPy arrays), or as an .npz file."
            ) from exc
        if (protocol := pickle_protocol(path)) is not None and protocol >= 4:
            raise UserError(
                f"data file {str(path)!r} was saved with pickle protocol {protocol}, whose "
                "framing torch's safe loading cannot read: save it again with torch.save's "
                "default protocol."
            ) from exc
        raise UserError(f"data file {str(path)!r} is corrupt or not a torch file.") from exc
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if isinstance(obj, (tuple, list)) and len(obj) == 2:  # torch.save((x, y), path)
        return {"x": obj[0], "y": obj[1]}
    if not isinstance(obj, dict):
        raise UserError(
            f"data file {str(path)!r} holds {_held(obj)}, not a dict with x and y tensors (or "
            "an (x, y) pair)."
        )
    return dict(obj)


def _held(obj: Any) -> str:
    """What a data file holds, for a refusal: a tuple or list by its length."""
    if isinstance(obj, (tuple, list)):
        return f"{a_type(obj)} of {len(obj)} item{'s' if len(obj) != 1 else ''}"
    return a_type(obj)


def _unreadable(path: Path, exc: Exception) -> UserError:
    """Why a data file failed to read: an empty, cut-short or other kind of file was said to
    be "could not be read safely (BadZipFile); it must hold plain arrays or tensors"."""
    where = f"data file {str(path)!r}"
    if str(exc).startswith("Object arrays"):  # NumPy's, of an .npz that unpickling would read
        return UserError(
            f"{where} holds object arrays, which safe loading does not read: store numbers."
        )
    if out_of_host_memory(exc):  # a sound file larger than memory was "truncated, damaged"
        return UserError(
            f"{where} does not fit in the machine's memory (it is read whole): store fewer "
            "samples in it."
        )
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return UserError(f"{where} is empty.")
    kind = {".npz": "an .npz archive", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file"}
    return UserError(
        f"{where} is truncated, damaged or not {kind.get(path.suffix.lower(), 'a torch file')} "
        f"({type(exc).__name__})."
    )


def _to_tensor(value: Any, spec: str, key: str) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except Exception as exc:
        raise UserError(f"data file {spec!r}: entry {key!r} is not a numeric array.") from exc
    # What batching, the checks and the loss cannot take, said here rather than by torch's
    # dispatcher in the middle of the work.
    kind = (
        "a sparse tensor"
        if t.layout != torch.strided
        else "a meta tensor, without values"
        if t.is_meta
        else "a quantized tensor"
        if t.is_quantized
        else "complex numbers"
        if t.is_complex()
        else None
    )
    if kind is not None:
        raise UserError(
            f"data file {spec!r}: entry {key!r} holds {kind}; store a dense real array."
        )
    return t


def _whole_number(value: Any, spec: str) -> int:
    """A file's ``num_classes``: one whole number, however it was stored."""
    array = np.asarray(value)
    number = array.item() if array.size == 1 and array.dtype.kind in "iuf" else None
    if number is None or not math.isfinite(number) or number != int(number):
        raise UserError(
            f"data file {spec!r}: num_classes must be one whole number, not {array.tolist()!r}."
        )
    return int(number)


def _class_labels(y: torch.Tensor, spec: str, which: str) -> torch.Tensor:
    if y.is_floating_point() or y.is_complex():
        raise UserError(f"data {spec!r}: {which} mixes integer class labels with real targets.")
    if y.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has few ops for these
        labels = y.numpy()
        if labels.size and labels.max() > np.iinfo(np.int64).max:
            raise UserError(f"data {spec!r}: the class labels in {which} are too large to count.")
        y = torch.from_numpy(labels.astype(np.int64))
    if y.dtype == torch.bool:
        y = y.long()
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot rows: store the class indices, y.argmax(1))" if _is_one_hot(y) else ""
        raise UserError(
            f"data {spec!r}: integer labels in {which} must be one per sample, got shape "
            f"{tuple(y.shape)}{hint}."
        )
    if int(y.min()) < 0:
        raise UserError(
            f"data {spec!r}: the class labels in {which} include {int(y.min())}, below 0."
        )
    return y.long()


def _real_one_hot(where: str, y: torch.Tensor) -> UserError:
    """Class labels stored as one-hot rows of real numbers (Keras' to_categorical), which would
    be regression targets: a classifier's checkpoint was analysed under mse, unsaid."""
    return UserError(
        f"{where} are one-hot rows of real numbers, shape {tuple(y.shape)}, which would be read "
        f"as {y.shape[1]} regression outputs: store the class indices, y.argmax(1), as integers "
        "(the mse loss takes them as one-hot rows too)."
    )


def _is_one_hot(y: torch.Tensor) -> bool:
    """Whether ``y`` is rows of one 1 among 0s, over two classes or more: class labels stored
    one-hot, of integers or of real numbers."""
    return (
        y.ndim == 2
        and y.shape[1] > 1
        and bool(((y == 0) | (y == 1)).all() and (y.sum(1) == 1).all())
    )


# ----------------------------------------------------------------------------- user code


def _user_data(spec: str, trusted: bool) -> DataSource:
    """A user factory returning a Dataset, a DataLoader, (train, test), {"train": ..., "test":
    ...} ("validation" for a missing "test"), (x, y) or a DataSource."""
    factory = load_object(spec, "data factory", trusted=trusted)
    result = call_user(factory, "data factory", spec)
    if isinstance(result, DataSource):  # its splits too: an empty one was "batch size 0"
        _check_splits(result.train, result.test, spec)
        return result
    hint_classes = getattr(result, "num_classes", None)
    train: Any
    test: Any = None
    if isinstance(result, Mapping) and "train" in result:  # splits by name: a DatasetDict
        # Held out: its test split, or its validation split where it has none (SQuAD's holds
        # train and validation only: train measured nothing held out, its test loss empty).
        train, test = result["train"], result.get("test", result.get("validation"))
    elif isinstance(result, (tuple, list)):
        # Arrays and lists as well as tensors: NumPy's (x, y) or (x.tolist(), y.tolist()) was
        # taken for (train, test), and refused as samples that are not (x, y) pairs.
        pair = [_list_as_array(t) for t in result]
        if len(result) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in pair):
            try:
                x, y = (torch.as_tensor(t) for t in pair)
            except TypeError as exc:  # strings or objects
                raise UserError(
                    f"the data factory {spec!r} returned (x, y) arrays of "
                    f"{' and '.join(str(t.dtype) for t in pair)}, not numbers: class labels "
                    "must be integers 0 to C - 1."
                ) from exc
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise UserError(
                    f"the data factory {spec!r} returned inputs of shape {tuple(x.shape)} and "
                    f"targets of shape {tuple(y.shape)}: they need one row per sample each."
                )
            if y.is_floating_point() and _is_one_hot(y):  # as a tensor file's are
                raise _real_one_hot(f"the data factory {spec!r} returned targets that", y)
            train = TensorDataset(x, y)
        elif all(map(_is_sample, result)):  # a list of samples is a Dataset: the training set
            train = result
        elif len(result) == 2:
            train, test = result
        else:
            raise UserError(
                f"the data factory {spec!r} returned a sequence of {len(result)} items, not (train, test)."
            )
    else:
        train = result
    train, test = _as_dataset(train, spec, "training data"), _as_dataset(test, spec, "test data")
    if train is None:
        raise UserError(f"the data factory {spec!r} returned no training data.")
    _check_splits(train, test, spec)
    if (key := _label_key(train)) is not None:
        train = _LabelledDicts(train, key)
        test = None if test is None else _LabelledDicts(test, key)
    x, y = _sample(train, spec)
    if not is_inputs(x):
        raise UserError(
            f"data {spec!r}: the inputs x of a sample are {a_type(x)}: give a tensor, or a "
            "tuple or dict of tensors (passed to the model as model(*x) or model(**x))."
        )
    if _are_token_labels(y) and torch.as_tensor(y).shape == (1,):
        # A label stored as a column, (N, 1): one class per sample, as a tensor file's y is read.
        train, test = _label_per_sample(train), None if test is None else _label_per_sample(test)
        y = torch.as_tensor(y).reshape(())
    token_labels = _are_token_labels(y)
    classification = _is_integer_label(y) or token_labels
    if not classification:
        try:
            torch.as_tensor(y, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"data {spec!r}: the targets are not numbers ({a_type(y)}); class "
                "labels must be integers 0 to C - 1."
            ) from exc
    num_classes = None
    if classification:
        hint = getattr(train, "num_classes", None) or hint_classes
        num_classes = (
            int(hint) if hint else _count_classes([d for d in (train, test) if d is not None], spec)
        )
    return DataSource(
        spec=spec,
        train=train,
        test=test,
        input_shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None,
        num_classes=num_classes,
        target_shape=() if classification and not token_labels else tuple(torch.as_tensor(y).shape),
    )


def _is_sample(item: Any) -> bool:
    """Whether ``item`` is a sample, an (x, y) pair of arrays or a dict of named inputs, which
    a split of (train, test) is not: a factory's list of samples was refused as "a sequence of
    10 items, not (train, test)", or, of two, taken for two splits."""
    if isinstance(item, Mapping):
        return True
    if not (isinstance(item, tuple) and len(item) >= 2):
        return False
    x = item[0]
    parts = list(x.values()) if isinstance(x, Mapping) else x if isinstance(x, tuple) else [x]
    return bool(parts) and all(isinstance(p, (torch.Tensor, np.ndarray)) for p in parts)


def _list_as_array(value: Any) -> Any:
    """A list of numbers, or of equal lists, arrays or tensors of them, as one NumPy array (x or
    y of a factory's pair); other values as they are: a list of samples, (x, y) tuples, is a
    split."""
    if not isinstance(value, list) or not value or isinstance(value[0], tuple):
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RuntimeError):  # ragged, or tensors numpy cannot take
        return value
    return value if array.dtype == object else array


def _check_splits(train: Any, test: Any, spec: str) -> None:
    _check_not_empty(train, spec, "dataset" if test is None else "training split")
    if test is not None:
        _check_not_empty(test, spec, "test split")


def _check_not_empty(dataset: Any, spec: str, what: str) -> None:
    """Refuse a split without samples by its name: an empty test split failed later, as
    classes that could not be counted or as data with no samples to analyse."""
    try:
        size = len(dataset)
    except TypeError as exc:
        raise UserError(f"the data factory {spec!r} returned a {what} without a length.") from exc
    if size == 0:
        advice = (
            "return only the training data, or a test split that holds samples"
            if what == "test split"
            else "it must hold the samples to train on and analyse"
        )
        raise UserError(f"the data factory {spec!r} returned an empty {what}: {advice}.")


class _LabelledDicts(Dataset):
    """A dataset of dict samples (a Hugging Face dataset's) as (inputs, target) pairs: the entry
    ``key`` is the target, the others are the model's named inputs."""

    def __init__(self, dataset: Any, key: str) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        item = dict(self.dataset[i])
        return item, item.pop(self.key)

    def __getattr__(self, name: str) -> Any:
        """The dataset's class count and labels, which count its classes (they were lost)."""
        dataset = self.__dict__.get("dataset")
        if name in ("num_classes", "targets", "labels") and dataset is not None:
            return getattr(dataset, name)
        raise AttributeError(name)


def _label_per_sample(dataset: Any) -> Any:
    """``dataset`` with each sample's target of one value (a label stored as a column) as a
    scalar: kept a TensorDataset where it is one."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        x, y, *rest = dataset.tensors
        if y.shape[1:] == (1,):
            return TensorDataset(x, y.reshape(-1), *rest)
    return _ScalarLabels(dataset)


class _ScalarLabels(Dataset):
    """A dataset of (inputs, target, ...) samples whose targets hold one value, as scalars."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.dataset[i]
        return (item[0], _as_tensor(item[1]).reshape(()), *item[2:])

    def __getattr__(self, name: str) -> Any:
        """The dataset's class count and labels, which count its classes (they were lost)."""
        dataset = self.__dict__.get("dataset")
        if name in ("num_classes", "targets", "labels") and dataset is not None:
            return getattr(dataset, name)
        raise AttributeError(name)


def _label_key(dataset: Any) -> str | None:
    """The entry of LABEL_KEYS that holds the targets where samples are dicts, else None."""
    try:
        item = dataset[0]
    except Exception:  # told by _sample, which reads it again
        return None
    if not isinstance(item, Mapping):
        return None
    return next((key for key in LABEL_KEYS if key in item), None)


def _as_dataset(obj: Any, spec: str, what: str) -> Any:
    if obj is None:
        return None
    inner = obj.dataset if isinstance(obj, DataLoader) else obj
    if isinstance(inner, IterableDataset):  # a Dataset, but without samples by index
        held = " in a DataLoader" if inner is not obj else ""
        raise UserError(
            f"the data factory {spec!r} returned an IterableDataset ({type(inner).__name__})"
            f"{held} as {what}: analysis reads samples by index in a fixed order, so it needs "
            "a map-style Dataset (with __len__ and __getitem__)."
        )
    if isinstance(obj, DataLoader):
        return _loader_samples(obj, spec, what)
    if isinstance(obj, (str, bytes, dict)):
        pass
    elif hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return obj
    raise UserError(
        f"the data factory {spec!r} returned {type(obj).__name__} as {what}, not a Dataset or "
        "DataLoader."
    )


def _loader_samples(loader: DataLoader, spec: str, what: str) -> Any:
    """The samples a DataLoader draws from, in a fixed order: its dataset where its sampler
    takes all of it (in order, shuffled, or shared among torchrun's ranks), the indices of a
    SubsetRandomSampler; a sampler or batch sampler of its own is refused (the samples analysed
    were the dataset's first, also those the loader never gives)."""
    sampler, batches = loader.sampler, loader.batch_sampler
    own_batches = batches is not None and not (
        type(batches) is BatchSampler and batches.sampler is sampler
    )
    if not own_batches:
        if type(sampler) in (SequentialSampler, DistributedSampler):
            return loader.dataset
        if (
            type(sampler) is RandomSampler
            and not sampler.replacement
            and sampler.num_samples == len(sampler.data_source)
        ):
            return loader.dataset
        if type(sampler) is SubsetRandomSampler:
            part = Subset(loader.dataset, [int(i) for i in sampler.indices])
            classes = getattr(loader.dataset, "num_classes", None)
            if classes is not None:  # the part need not hold the top class
                part.num_classes = classes  # type: ignore[attr-defined]
            return part
    which = "batch_sampler" if own_batches else f"sampler ({type(sampler).__name__})"
    raise UserError(
        f"the data factory {spec!r} returned a DataLoader as {what} whose {which} picks its "
        "samples, which analysis cannot follow in a fixed order: return the Dataset (a "
        "torch.utils.data.Subset for a part of it) instead."
    )


def _sample(dataset: Any, spec: str) -> tuple[Any, Any]:
    """The first sample's inputs (tensors, or as given where they are not numeric arrays) and
    its target."""
    try:
        item = dataset[0]
    except Exception as exc:
        raise UserError(
            f"reading the first sample of data {spec!r} failed: {described(exc)}."
        ) from exc
    if isinstance(item, (tuple, list)) and any(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in item[2:]
    ):  # (input_ids, attention_mask, labels) was read as inputs input_ids, targets the mask
        raise UserError(
            f"data {spec!r} yields samples of {len(item)} arrays, where a sample is (inputs, "
            "target): give several inputs as a tuple or dict, e.g. ((input_ids, attention_mask), "
            "labels)."
        )
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        unlabelled = (
            f" without a {' or '.join(map(repr, LABEL_KEYS))} entry"
            if isinstance(item, Mapping)
            else ""
        )
        raise UserError(
            f"data {spec!r} must yield (x, y) pairs or dicts of named inputs beside their "
            f"'labels', but its first sample is {a_type(item)}{unlabelled}."
        )
    named = dict(item[0]) if isinstance(item[0], Mapping) else {"x": item[0]}
    for name, value in named.items():
        try:
            _inputs_as_tensors(value)
        except Exception as exc:
            what = "the inputs x are" if name == "x" else f"the input {name!r} is"
            raise UserError(
                f"data {spec!r}: {what} not numeric arrays ({a_type(value)} in the first sample)."
            ) from exc
    return _inputs_as_tensors(item[0]), item[1]


def _inputs_as_tensors(x: Any) -> Any:
    """A sample's inputs with arrays and lists as tensors: one, a tuple, or a dict of them."""
    if isinstance(x, Mapping):
        return {k: _as_tensor(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], (torch.Tensor, np.ndarray)):
        return tuple(_as_tensor(v) for v in x)
    return _as_tensor(x)


def _as_tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def unbatchable(exc: BaseException) -> UserError:
    """Why samples could not be stacked into a batch, in one sentence."""
    return UserError(
        f"the data samples could not be batched ({described(exc)}); are all samples the same "
        "shape? (they are stacked as they are: a DataLoader's collate_fn is not used, so pad "
        "them in the dataset)"
    )


def collate_samples(samples: Sequence[Any]) -> list[Any]:
    """Samples ``(x, y, ...)`` stacked into ``[inputs, targets]`` (what follows the target,
    an index say, left out). Lists become tensors first: a Hugging Face dataset not in torch
    format holds lists, which the default collation split into their elements."""
    return default_collate([(_inputs_as_tensors(s[0]), _as_tensor(s[1])) for s in samples])


def _are_token_labels(y: Any) -> bool:
    """Whether a sample's target is an array of integer class labels (one per token, as a
    language model's, or per pixel), where :func:`_is_integer_label` takes one per sample."""
    if not isinstance(y, (torch.Tensor, np.ndarray)):
        return False
    t = torch.as_tensor(y)
    return t.ndim >= 1 and not (t.is_floating_point() or t.is_complex())


def _is_integer_label(y: Any) -> bool:
    """Whether a sample's target is one class label: an integer, or a bool (batched as 0 and
    1, as a tensor file's bool labels are classes; read as a regression target, a bool label
    met the built-in model's one output as class 1)."""
    if isinstance(y, (int, np.integer, np.bool_)):
        return True
    if isinstance(y, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(y)
        return t.ndim == 0 and not (t.is_floating_point() or t.is_complex())
    return False


def _count_classes(datasets: list[Any], spec: str) -> int:
    """max label + 1, from label attributes where present, else from the first samples."""
    try:
        top = _top_label(datasets)
    except Exception as exc:  # labels that are names, None, a sample that fails to load
        raise UserError(
            f"could not count the classes of data {spec!r} from its labels ({described(exc)}); "
            "labels must be integers 0 to C - 1."
        ) from exc
    if top < 0:
        raise UserError(
            f"data {spec!r} holds no class label of 0 or more (only negative ones, or -100, "
            "padding)."
        )
    return top + 1


def _top_label(datasets: list[Any]) -> int:
    top = -1
    for ds in datasets:
        labels = None
        if isinstance(ds, TensorDataset) and len(ds.tensors) > 1:
            labels = ds.tensors[1]
        elif not isinstance(ds, Subset):
            labels = (
                getattr(ds, "targets", None)
                if hasattr(ds, "targets")
                else getattr(ds, "labels", None)
            )
        if labels is not None:
            # A tensor as it is: numpy cannot take one on a GPU (a dataset cached there).
            top = max(top, int(_as_tensor(labels).max()))
            continue
        for i in range(min(len(ds), _SCAN_LIMIT)):
            labels = torch.as_tensor(ds[i][1])
            labels = labels[labels != IGNORE_INDEX]  # padding a language model's loss skips
            if labels.numel():
                top = max(top, int(labels.max()))
    return top


# ----------------------------------------------------------------------------- batches


def analysis_batches(
    dataset: Any,
    *,
    batch_size: int,
    num_samples: int | None = None,
    num_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    token_ids: bool = False,
    what: str = "the data",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first samples of ``dataset`` in order, as (x, y) batches (all of it if no count is
    given).

    x is cast as :func:`cast_inputs` says; integer labels stay int64, float targets are cast to
    ``dtype``. ``what`` names ``dataset`` where a count is more than it holds.
    """
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    if num_samples is not None and num_batches is not None:
        raise UserError("give either --num-samples or --num-batches, not both.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"the batch size must be a positive integer, not {batch_size!r}.")
    try:
        available = len(dataset)
    except TypeError as exc:
        raise UserError(
            "analysis needs a dataset with a known length (a map-style Dataset)."
        ) from exc
    except (ValueError, OverflowError) as exc:  # a __len__ of -1, or past sys.maxsize
        raise UserError(f"the dataset's length could not be read ({described(exc)}).") from exc
    if num_batches is not None:
        if num_batches <= 0:
            raise UserError(f"the number of batches must be positive, not {num_batches}.")
        total = num_batches * batch_size
        if total > available:
            raise UserError(
                f"{num_batches} batches of {batch_size} need {total} samples but {what} has only "
                f"{available}."
            )
    elif num_samples is not None:
        if num_samples <= 0:
            raise UserError(f"the number of samples must be positive, not {num_samples}.")
        if num_samples > available:
            raise UserError(f"asked for {num_samples} samples but {what} has only {available}.")
        total = num_samples
    else:
        total = available
    if total == 0:
        raise UserError("the data holds no samples to analyse.")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        xs, ys = dataset.tensors[0][:total], dataset.tensors[1][:total]
        raw = [
            (xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, total, batch_size)
        ]
    else:
        loader = DataLoader(
            Subset(dataset, range(total)),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collate_samples,
        )
        try:
            raw = [(batch[0], batch[1]) for batch in loader]
        except Exception as exc:
            raise unbatchable(exc) from exc
    return [(cast_inputs(x, dtype, token_ids), _cast_y(y, dtype)) for x, y in raw]


def cast_inputs(x: Any, dtype: torch.dtype, token_ids: bool = False) -> Inputs:
    """Inputs as the model takes them: real numbers of ``dtype``, except signed integer inputs
    of a model with an embedding table (``token_ids``, see :func:`takes_token_ids`), which stay
    int64. uint8 is how images are stored, also for models that hold an embedding besides.
    Of several inputs only the real ones take ``dtype``, the others stay as given: a bool
    key_padding_mask made float is a bias added to attention scores, not a mask."""
    if isinstance(x, (Mapping, tuple, list)) and is_inputs(x):
        return map_inputs(
            lambda t: _narrowed(_real(t), dtype) if t.is_floating_point() else _real(t), x
        )
    x = _real(torch.as_tensor(x))
    if token_ids and x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        return x.long()
    return _narrowed(x, dtype)


def _real(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        raise UserError("complex-valued inputs are not supported.")
    return x


def _narrowed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_range(t, dtype)
    return t.to(dtype)


def _cast_y(y: Any, dtype: torch.dtype) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point():
        return _narrowed(y, dtype)
    if y.dtype == torch.bool:
        return y.long()
    return y.long() if not y.is_complex() else y


def check_finite(batch: Batch | Sequence[torch.Tensor], what: str) -> None:
    """Refuse data (inputs, targets) holding NaN or infinite values: training on it can only
    diverge, and the message would otherwise blame the learning rate."""
    named = [("inputs", t) for t in input_tensors(batch[0])] + [("targets", batch[1])]
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"the {what} {name} hold NaN or infinite values; clean the data first.")


def check_labels(
    batches: Sequence[Batch], num_classes: int | None, *, ignored: int | None = None
) -> None:
    """Refuse class labels the model cannot output (``num_classes`` None: regression, no check);
    labels equal to ``ignored`` (the loss skips them) pass.

    Floating-point targets of shape (batch, num_classes) pass as soft labels.
    """
    if num_classes is None:
        return
    for _, y in batches:
        if ignored is not None and not y.is_floating_point():
            y = y[y != ignored]
        if y.is_floating_point():
            if y.ndim == 2 and y.shape[1] == num_classes:
                continue
            raise UserError(
                f"the targets are real numbers of shape {tuple(y.shape[1:])} but a classifier with "
                f"{num_classes} classes was asked for; use integer labels, or --loss mse with a "
                "regression model."
            )
        if y.numel() == 0:
            continue
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise UserError(
                f"label {bad} is out of range for {num_classes} classes (labels must be 0 to "
                f"{num_classes - 1}); check the data or the model's num_classes."
            )
