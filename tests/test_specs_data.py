"""Data specs: the bundled digits, synthetic sets, tensor files, torchvision and user code."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hessian_cli.errors import UserError
from hessian_cli.specs import (
    analysis_batches,
    check_labels,
    default_loss,
    load_data,
    takes_token_ids,
)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


# ----------------------------------------------------------------------------- digits


def test_digits_is_the_real_uci_set() -> None:
    data = load_data("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) == 1300 and len(data.test) == 497
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    x = torch.cat([x_train, x_test])
    y = torch.cat([y_train, y_test])
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Known facts of scikit-learn's load_digits: class sizes and the total of all pixel counts.
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert round(float(x.double().sum()) * 16) == 561_718
    # Pixel values are counts 0..16, so x * 16 is integral.
    assert torch.equal(x * 16, (x * 16).round())
    # Both halves hold every class: the split was permuted, not the original order.
    assert set(y_test.tolist()) == set(range(10))
    assert y_train[:10].tolist() != list(range(10))


def test_digits_split_is_fixed() -> None:
    a, b = load_data("digits"), load_data("digits")
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_images() -> None:
    data = load_data("synthetic:3x32x32:5:40")
    assert data.input_shape == (3, 32, 32) and data.num_classes == 5
    x, y = data.train.tensors
    assert x.shape == (40, 3, 32, 32) and y.shape == (40,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 5
    assert data.test is not None and len(data.test) == 10
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # Gaussian inputs


def test_synthetic_defaults_flat_and_determinism() -> None:
    data = load_data("synthetic:20")
    assert data.input_shape == (20,) and data.num_classes == 10 and len(data.train) == 256
    again = load_data("synthetic:20")
    assert torch.equal(data.train.tensors[0], again.train.tensors[0])
    # The spec alone names the data, so checkpoints that record it are analysed on the same data.
    bigger = load_data("synthetic:20:10:300")
    assert not torch.equal(data.test.tensors[0], bigger.test.tensors[0][: len(data.test)])
    assert not torch.equal(data.train.tensors[1], load_data("synthetic:20:3").train.tensors[1])


def test_synthetic_regression() -> None:
    data = load_data("synthetic-regression:6:2:30")
    assert data.num_classes is None and data.input_shape == (6,)
    assert data.target_shape == (2,) and data.num_outputs == 2
    x, y = data.train.tensors
    assert y.shape == (30, 2) and y.is_floating_point()
    # The targets follow a linear teacher: least squares explains most of their variance.
    sol = torch.linalg.lstsq(x, y).solution
    assert float((x @ sol - y).var()) < 0.2 * float(y.var())
    assert load_data("synthetic-regression:4").target_shape == (1,)


@pytest.mark.parametrize(
    "spec",
    [
        "synthetic:",
        "synthetic:3xAx3",
        "synthetic:4:0",
        "synthetic:4:2:3:9",
        "synthetic-regression:-1",
    ],
)
def test_bad_synthetic_specs(spec: str) -> None:
    with pytest.raises(UserError, match="form"):
        load_data(spec)


@pytest.mark.parametrize(
    "spec", ["synthetic:3x1000x1000:10:999999", "synthetic-regression:9:1:1000000000000"]
)
def test_synthetic_data_larger_than_memory_is_refused_before_it_is_made(spec: str) -> None:
    with pytest.raises(UserError, match=r"would take \d+\.\d GiB .* give it a smaller count"):
        load_data(spec)


def test_unknown_data_spec_lists_the_forms() -> None:
    with pytest.raises(UserError) as info:
        load_data("imagenet")
    message = str(info.value)
    for word in ("digits", "synthetic:", "cifar10", ".npz", "file.py:"):
        assert word in message


def test_data_naming_a_folder_or_a_file_not_read_says_what_to_give(tmp_path: Path) -> None:
    """They met the list of every form a data spec takes ("unknown data ...")."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"'.*images' is a directory: .*--data-root.*ImageFolder"):
        load_data(str(tmp_path / "images"))
    # A torchvision dataset's folder, or the root that holds it, is named with its spec.
    (tmp_path / "vision" / "cifar-10-batches-py").mkdir(parents=True)
    root = tmp_path / "vision"
    for given in (root, root / "cifar-10-batches-py"):
        with pytest.raises(
            UserError, match=f"is cifar10's folder .*--data cifar10 --data-root {root}.$"
        ):
            load_data(str(given))
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(UserError, match=r"x.npy' is a .npy file, which holds one array: save"):
        load_data(str(tmp_path / "x.npy"))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(UserError, match=r"d.csv' is not of a kind that is read \(.npz, .pt, "):
        load_data(str(tmp_path / "d.csv"))


# ----------------------------------------------------------------------------- tensor files


def _arrays(n: int = 12, classes: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n) if classes else rng.normal(size=n).astype(np.float32)
    return {"x": rng.normal(size=(n, 2, 3)).astype(np.float32), "y": y}


def test_npz_classification_with_test_split(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["y"][0] = 3
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, x_test=arrays["x"][:5], y_test=np.array([0, 1, 2, 5, 1]))
    data = load_data(str(path))
    assert data.input_shape == (2, 3) and data.num_classes == 6  # max over train and test, + 1
    assert len(data.train) == 12 and len(data.test) == 5
    assert np.array_equal(data.train.tensors[0].numpy(), arrays["x"])
    assert data.train.tensors[1].dtype == torch.int64


def test_pt_regression(tmp_path: Path) -> None:
    arrays = _arrays(classes=False)
    path = tmp_path / "d.pt"
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    data = load_data(str(path))
    assert data.num_classes is None and data.target_shape == (1,)
    assert data.train.tensors[1].shape == (12, 1) and data.test is None


def test_keras_names_of_the_training_split_are_read(tmp_path: Path) -> None:
    """Keras' mnist.npz holds x_train, y_train, x_test, y_test: it had "no 'x' array"."""
    arrays = _arrays()
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=arrays["x"], y_train=arrays["y"], x_test=arrays["x"][:5], y_test=[0] * 5)
    data = load_data(str(path))
    assert torch.equal(data.train.tensors[0], torch.from_numpy(arrays["x"]))
    assert torch.equal(data.train.tensors[1], torch.from_numpy(arrays["y"]))
    assert len(data.test) == 5 and data.num_classes == int(arrays["y"].max()) + 1
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x_train"], f["y_train"] = arrays["x"], arrays["y"]
    assert torch.equal(load_data(str(tmp_path / "d.h5")).train.tensors[0], data.train.tensors[0])
    # Where x and y are there, they are the training split, x_train not read.
    np.savez(path, x=arrays["x"][:3], y=arrays["y"][:3], x_train=arrays["x"], y_train=arrays["y"])
    assert len(load_data(str(path)).train) == 3


def test_a_pt_data_file_of_an_x_y_pair_is_read(tmp_path: Path) -> None:
    """torch.save((x, y), path) was refused: the file 'must hold a dict with x and y tensors'."""
    arrays = _arrays()
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    torch.save((x, y), tmp_path / "pair.pt")
    data = load_data(str(tmp_path / "pair.pt"))
    assert torch.equal(data.train.tensors[0], x) and torch.equal(data.train.tensors[1], y)
    assert data.num_classes == int(y.max()) + 1
    torch.save((x, y, y), tmp_path / "three.pt")
    with pytest.raises(UserError, match=r"holds a tuple of 3 items, not a dict with x and y"):
        load_data(str(tmp_path / "three.pt"))


def test_class_labels_from_1_are_told_where_a_checkpoint_does_not_fit(tmp_path: Path) -> None:
    """Labels 1 to 3 (as MATLAB counts) made a 4-output model, and a 3-class checkpoint's
    mismatch named only the outputs (model (4, 128) vs checkpoint (3, 128))."""
    from hessian_cli.specs.data import labels_note

    arrays = _arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x=arrays["x"], y=arrays["y"] % 3 + 1)
    note = labels_note(load_data(str(path)))
    assert note == (
        "the data's class labels start at 1, not 0, and are read as 4 classes, 0 to 3: store "
        "them from 0 (y - 1)"
    )
    np.savez(path, x=arrays["x"], y=arrays["y"] % 3)
    assert labels_note(load_data(str(path))) is None
    np.savez(path, x=arrays["x"], y=(arrays["y"] % 3).astype(np.float32))  # floats: said so
    assert "class labels must be stored as integers" in labels_note(load_data(str(path)))


def test_h5_classification(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["x"] = (arrays["x"] * 100).astype(np.uint8)
        f["y"] = arrays["y"].astype(np.int32)
    data = load_data(str(path))
    assert data.train.tensors[0].dtype == torch.uint8  # kept compact; batches are cast
    assert analysis_batches(data.train, batch_size=4)[0][0].dtype == torch.float32
    assert data.num_classes == int(arrays["y"].max()) + 1
    assert torch.equal(data.train.tensors[1], torch.from_numpy(arrays["y"]).long())


def test_bad_tensor_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "no_y.npz", x=np.zeros((3, 2)))
    with pytest.raises(UserError, match=r"no 'y' array at its top level \(found: x\)"):
        load_data(str(tmp_path / "no_y.npz"))
    # np.savez(path, x, y) names them arr_0, arr_1: the fix was not said.
    np.savez(tmp_path / "unnamed.npz", np.zeros((3, 2)), np.zeros(3, dtype=int))
    with pytest.raises(UserError, match=r"\(found: arr_0, arr_1\): name them when saving, np.s"):
        load_data(str(tmp_path / "unnamed.npz"))
    np.savez(tmp_path / "upper.npz", X=np.zeros((3, 2)), Y=np.zeros(3, dtype=int))
    with pytest.raises(UserError, match=r"\(found: X, Y\): the inputs are read as x, the targ"):
        load_data(str(tmp_path / "upper.npz"))
    with h5py.File(tmp_path / "grouped.h5", "w") as f:  # arrays in a group are named as one
        f["train/x"], f["train/y"], f["notes"] = np.zeros((3, 2)), np.zeros(3), np.zeros(2)
    with pytest.raises(UserError, match=r"no 'x' array .*\(found: notes, train/\)"):
        load_data(str(tmp_path / "grouped.h5"))
    np.savez(tmp_path / "lengths.npz", x=np.zeros((3, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(UserError, match="same"):
        load_data(str(tmp_path / "lengths.npz"))
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 2)), y=np.array([0, -1, 2]))
    with pytest.raises(UserError, match="include -1, below 0"):
        load_data(str(tmp_path / "neg.npz"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="junk.h5. is truncated, damaged or not an HDF5 file"):
        load_data(str(tmp_path / "junk.h5"))


def test_unsigned_labels_and_a_stored_class_count(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x=arrays["x"], y=arrays["y"].astype(np.uint64), num_classes=np.array(9.0))
    data = load_data(str(path))
    assert torch.equal(data.train.tensors[1], torch.from_numpy(arrays["y"]).long())
    assert data.num_classes == 9
    for count, shown in (([3, 4], r"\[3, 4\]"), (2.5, "2.5"), ("abc", "'abc'"), (np.inf, "inf")):
        np.savez(path, **arrays, num_classes=np.array(count))
        with pytest.raises(UserError, match=f"num_classes must be one whole number, not {shown}"):
            load_data(str(path))
    # Fewer classes than the labels need (or none) were raised to them, unsaid.
    for count in (3, 0, -1):
        np.savez(path, **arrays, num_classes=np.array(count))
        with pytest.raises(
            UserError, match=rf"num_classes is {count}, but the class labels go up to 3; "
        ):
            load_data(str(path))
    np.savez(path, x=arrays["x"], y=np.full(12, 2**64 - 1, dtype=np.uint64))
    with pytest.raises(UserError, match="the class labels in x and y are too large to count"):
        load_data(str(path))


def test_integer_one_hot_labels_in_a_file_are_named(tmp_path: Path) -> None:
    path, arrays = tmp_path / "d.npz", _arrays()
    np.savez(path, x=arrays["x"], y=np.eye(3, dtype=np.int64)[arrays["y"] % 3])
    with pytest.raises(UserError, match=r"shape \(12, 3\) \(one-hot rows: store the class ind"):
        load_data(str(path))
    np.savez(path, x=arrays["x"], y=np.ones((12, 3), dtype=np.int64))
    with pytest.raises(UserError, match=r"got shape \(12, 3\)\.$"):
        load_data(str(path))


def test_real_one_hot_labels_in_a_file_are_refused(tmp_path: Path) -> None:
    """Keras' to_categorical stores labels as float one-hot rows: they were read as 3 regression
    targets, and a classifier's checkpoint was analysed under mse, not cross-entropy, unsaid."""
    path, arrays = tmp_path / "d.npz", _arrays()
    one_hot = np.eye(3, dtype=np.float32)[arrays["y"] % 3]
    np.savez(path, x=arrays["x"], y=one_hot)
    with pytest.raises(UserError, match=r"one-hot rows of real numbers, shape \(12, 3\), which "):
        load_data(str(path))
    soft = one_hot * 0.9 + 0.1 / 3  # label smoothing: real targets, read as such
    np.savez(path, x=arrays["x"], y=soft)
    data = load_data(str(path))
    assert data.num_classes is None and data.target_shape == (3,)


class _Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pt_data_file_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2, 2), "y": torch.zeros(2), "p": _Hostile(str(marker))}, path)
    with pytest.raises(UserError, match="safe loading does not read"):
        load_data(str(path))
    assert not marker.exists()
    # NumPy arrays saved with torch.save were told that the file "must hold plain arrays".
    torch.save({"x": np.zeros((2, 2)), "y": np.zeros(2)}, path)
    with pytest.raises(UserError, match=r"other than tensors \(numpy.*torch.from_numpy"):
        load_data(str(path))


def test_a_pt_data_file_of_a_pickle_protocol_safe_loading_cannot_read_is_named(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """It was 'corrupt or not a torch file', after torch's warning about the protocol."""
    path = tmp_path / "data.pt"
    torch.save({"x": torch.zeros(2, 2), "y": torch.zeros(2)}, path, pickle_protocol=4)
    with pytest.raises(UserError, match="saved with pickle protocol 4.*default protocol"):
        load_data(str(path))
    assert not recwarn.list


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_torchvision_data_without_torchvision() -> None:
    with pytest.raises(UserError, match="vision"):
        load_data("cifar10", root="/nonexistent")


def test_without_torchvision_the_install_hint_is_one_that_works(monkeypatch) -> None:
    """The hint was `pip install 'hessian-cli[vision]'`, which asks PyPI for a package of that
    name (hessian-cli is installed from its clone, as the README's `pip install -e ".[vision]"`)."""
    from hessian_cli.specs import build_model

    monkeypatch.setitem(sys.modules, "torchvision", None)  # its import fails
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    for load in (
        lambda: load_data("cifar10", root="/nonexistent"),
        lambda: build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10),
    ):
        with pytest.raises(UserError, match="needs torchvision") as caught:
            load()
        assert "hessian-cli[vision]" not in str(caught.value)
        assert "pip install -e '.[vision]'" in str(caught.value)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_torchvision_data_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--download"):
        load_data("cifar10", root=tmp_path)
    with pytest.raises(UserError, match="--data-root"):
        load_data("mnist")


# ----------------------------------------------------------------------------- user code

USER_DATA = """
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

class Squares(Dataset):
    num_classes = 7
    def __len__(self):
        return 9
    def __getitem__(self, i):
        return np.full((2, 2), i, dtype=np.float32), i % 3

def dataset():
    return TensorDataset(torch.arange(24.0).reshape(6, 4), torch.tensor([0, 1, 2, 3, 4, 1]))

def pair():
    return dataset(), TensorDataset(torch.zeros(2, 4), torch.tensor([0, 8]))

def loader():
    return DataLoader(Squares(), batch_size=4, shuffle=True)

def regression():
    return torch.randn(5, 3), torch.randn(5, 2)

def arrays():
    return np.arange(12.0).reshape(6, 2), np.array([0, 1, 2, 0, 1, 3])

def named_labels():
    return np.zeros((2, 2)), np.array(["cat", "dog"])

def lists():
    x, y = arrays()
    return x.tolist(), list(map(torch.tensor, y))

def sample_lists():
    return [(x, int(y)) for x, y in zip(*arrays())], [(np.zeros(2), 3)]

def samples():
    return [(torch.from_numpy(x), int(y)) for x, y in zip(*arrays())]

def two_samples():
    return samples()[:2]

def nothing():
    return 42
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_data.py"
    path.write_text(textwrap.dedent(USER_DATA))
    return path


def test_user_dataset(user_file: Path) -> None:
    data = load_data(f"{user_file}:dataset")
    assert data.input_shape == (4,) and data.num_classes == 5 and data.test is None


def test_user_train_test_pair(user_file: Path) -> None:
    data = load_data(f"{user_file}:pair")
    assert data.num_classes == 9  # the test labels count too
    assert len(data.test) == 2


def test_a_dict_of_named_splits_is_train_and_test(tmp_path: Path) -> None:
    """{"train": ..., "test": ...}, as a Hugging Face DatasetDict holds its splits, was refused
    as "DatasetDict as training data, not a Dataset or DataLoader"; other splits are not read."""
    path = tmp_path / "splits.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "class DatasetDict(dict):  # as Hugging Face's: a dict of the splits\n"
        "    pass\n"
        "def splits():\n"
        "    x = torch.randn(6, 3)\n"
        "    return DatasetDict(\n"
        "        train=TensorDataset(x, torch.arange(6) % 3),\n"
        "        validation=TensorDataset(x[:1], torch.tensor([7])),\n"
        "        test=TensorDataset(x[:2], torch.tensor([0, 3])),\n"
        "    )\n"
    )
    data = load_data(f"{path}:splits")
    assert (len(data.train), len(data.test)) == (6, 2)
    assert data.num_classes == 4 and data.input_shape == (3,)


def test_a_dict_without_a_test_split_holds_out_its_validation_split(tmp_path: Path) -> None:
    """A DatasetDict of "train" and "validation" only (SQuAD's) had no test split: train's test
    loss and accuracy were empty and its held-out batch was training data."""
    path = tmp_path / "splits.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def splits():\n"
        "    x = torch.randn(6, 3)\n"
        "    return {\n"
        '        "train": TensorDataset(x, torch.arange(6) % 3),\n'
        '        "validation": TensorDataset(x[:2], torch.tensor([0, 3])),\n'
        "    }\n"
    )
    data = load_data(f"{path}:splits")
    assert (len(data.train), len(data.test)) == (6, 2) and data.num_classes == 4


def test_labels_numpy_cannot_take_are_counted_as_tensors(tmp_path: Path) -> None:
    """A dataset cached on the GPU holds CUDA labels, which numpy refuses: the classes were
    not counted ("labels must be integers")."""
    cached = tmp_path / "cached.py"
    cached.write_text(
        "import torch\n"
        "class OnDevice(torch.Tensor):  # numpy refuses it, as a CUDA tensor\n"
        "    def __array__(self, *args, **kwargs):\n"
        '        raise TypeError("can\'t convert cuda:0 device type tensor to numpy")\n'
        "class Cached(torch.utils.data.Dataset):\n"
        "    targets = torch.tensor([0, 4, 1, 2, 1, 0]).as_subclass(OnDevice)\n"
        "    def __len__(self):\n"
        "        return 6\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3), int(self.targets[i])\n"
    )
    assert load_data(f"{cached}:Cached").num_classes == 5


def test_user_loader_takes_its_dataset_and_class_attribute(user_file: Path) -> None:
    data = load_data(f"{user_file}:loader")
    assert type(data.train).__name__ == "Squares"
    assert data.input_shape == (2, 2) and data.num_classes == 7


def test_user_loader_sampler_picks_the_samples(tmp_path: Path) -> None:
    """A DataLoader's sampler says which samples it gives: a SubsetRandomSampler (a split of
    one dataset) was ignored, and the dataset's first samples analysed, also those the loader
    never gives; a sampler that cannot be followed in a fixed order is refused."""
    path = tmp_path / "loaders.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset, SubsetRandomSampler\n"
        "from torch.utils.data import WeightedRandomSampler, DistributedSampler\n"
        "ds = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10) % 3)\n"
        "ds.num_classes = 4\n"
        "def part():\n"
        "    return DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler([7, 5, 9]))\n"
        "def shuffled():\n"
        "    return DataLoader(ds, batch_size=2, shuffle=True)\n"
        "def ranks():\n"
        "    return DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=1))\n"
        "def weighted():\n"
        "    return DataLoader(ds, sampler=WeightedRandomSampler([1.0] * 10, 4))\n"
        "def batches():\n"
        "    return DataLoader(ds, batch_sampler=[[8, 9], [1, 2]])\n"
    )
    part = load_data(f"{path}:part")
    assert part.num_classes == 4  # the dataset's, though the part's labels reach 2
    x, _ = analysis_batches(part.train, batch_size=8)[0]
    assert x[:, 0].tolist() == [7.0, 5.0, 9.0]
    for whole in ("shuffled", "ranks"):
        assert len(load_data(f"{path}:{whole}").train) == 10
    with pytest.raises(UserError, match=r"sampler \(WeightedRandomSampler\) picks its samples"):
        load_data(f"{path}:weighted")
    with pytest.raises(UserError, match="batch_sampler picks its samples"):
        load_data(f"{path}:batches")


def test_user_iterable_dataset_is_refused_as_such(tmp_path: Path) -> None:
    """An IterableDataset is a Dataset: it was refused as "not a Dataset or DataLoader", and in
    a DataLoader as "a dataset without a length"."""
    path = tmp_path / "streams.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, IterableDataset\n"
        "class Stream(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        return iter([(torch.zeros(2), 0)] * 4)\n"
        "def stream():\n"
        "    return Stream()\n"
        "def loader():\n"
        "    return DataLoader(Stream(), batch_size=2)\n"
    )
    with pytest.raises(UserError, match=r"an IterableDataset \(Stream\) as training data: .*map-"):
        load_data(f"{path}:stream")
    with pytest.raises(UserError, match=r"an IterableDataset \(Stream\) in a DataLoader as"):
        load_data(f"{path}:loader")


def test_user_labels_stored_as_a_column_are_one_per_sample(tmp_path: Path) -> None:
    """Integer labels of shape (N, 1) (``df[["label"]].values``) are a class per sample, as a
    tensor file's are: they were read as one label per token of one-token samples, a
    built-in model was made with one output, and cross-entropy refused it (torch's
    "multi-target not supported" for the user's model)."""
    path = tmp_path / "columns.py"
    path.write_text(
        "import numpy as np, torch\n"
        "from torch.utils.data import Dataset, TensorDataset\n"
        "x, y = torch.arange(12.0).reshape(6, 2), torch.tensor([[0], [2], [1], [0], [2], [1]])\n"
        "class Rows(Dataset):\n"
        "    num_classes = 4\n"
        "    def __len__(self):\n"
        "        return 6\n"
        "    def __getitem__(self, i):\n"
        "        return x[i].numpy(), y[i].numpy()\n"
        "def rows():\n"
        "    return Rows()\n"
        "def tensors():\n"
        "    return TensorDataset(x, y), TensorDataset(x[:2], y[:2])\n"
    )
    for name, classes in (("rows", 4), ("tensors", 3)):
        data = load_data(f"{path}:{name}")
        assert data.num_classes == classes and data.target_shape == ()
        assert data.num_outputs == classes
        for ds in (data.train, data.test):
            if ds is not None:
                (_, labels), *_ = analysis_batches(ds, batch_size=4)
                assert labels.dtype == torch.int64 and labels.tolist() == [0, 2, 1, 0][: len(ds)]


def test_user_bool_labels_are_classes_as_a_tensor_files_are(tmp_path: Path) -> None:
    """Bool labels from user code were regression targets (one output, mse) but were batched as
    int64 0/1: the built-in model's one output met class 1, and a user model of two outputs
    was analysed under mse (loss 0.67) where the same data in an .npz file gave cross-entropy
    (1.37)."""
    path = tmp_path / "flags.py"
    path.write_text(
        "import numpy as np, torch\n"
        "from torch.utils.data import Dataset, TensorDataset\n"
        "x, y = torch.arange(12.0).reshape(6, 2), torch.tensor([1, 0, 1, 1, 0, 0]).bool()\n"
        "class Rows(Dataset):\n"
        "    def __len__(self):\n"
        "        return 6\n"
        "    def __getitem__(self, i):\n"
        "        return x[i], bool(y[i])\n"
        "def rows():\n"
        "    return Rows()\n"
        "def tensors():\n"
        "    return TensorDataset(x, y)\n"
        "def arrays():\n"
        "    return x.numpy(), y.numpy()\n"
    )
    np.savez(
        tmp_path / "flags.npz",
        x=np.arange(12.0).reshape(6, 2),
        y=np.array([1, 0, 1, 1, 0, 0], bool),
    )
    for spec in (f"{path}:rows", f"{path}:tensors", f"{path}:arrays", str(tmp_path / "flags.npz")):
        data = load_data(spec)
        assert data.num_classes == 2 and data.target_shape == () and data.num_outputs == 2
        assert default_loss(data.num_classes) == "ce"
        (_, labels), *_ = analysis_batches(data.train, batch_size=6)
        assert labels.dtype == torch.int64 and labels.tolist() == [1, 0, 1, 1, 0, 0]


def test_user_regression_tensors(user_file: Path) -> None:
    data = load_data(f"{user_file}:regression")
    assert data.num_classes is None and data.target_shape == (2,) and data.num_outputs == 2


def test_user_numpy_arrays_are_x_and_y(user_file: Path) -> None:
    """NumPy's (x, y) was taken for (train, test), and refused as samples not (x, y) pairs."""
    data = load_data(f"{user_file}:arrays")
    assert data.input_shape == (2,) and data.num_classes == 4 and data.test is None
    ((x, y),) = analysis_batches(data.train, batch_size=6)
    assert torch.equal(x, torch.arange(12.0).reshape(6, 2)) and y.tolist() == [0, 1, 2, 0, 1, 3]
    with pytest.raises(UserError, match="arrays of float64 and <U3, not numbers"):
        load_data(f"{user_file}:named_labels")


def test_user_lists_are_x_and_y(user_file: Path) -> None:
    """(x.tolist(), y.tolist()) was taken for (train, test), and refused as samples that
    could not be batched ('int' object is not subscriptable); lists of samples stay splits."""
    data = load_data(f"{user_file}:lists")
    assert data.input_shape == (2,) and data.num_classes == 4 and data.test is None
    ((x, y),) = analysis_batches(data.train, batch_size=6)
    assert torch.equal(x, torch.arange(12.0).reshape(6, 2)) and y.tolist() == [0, 1, 2, 0, 1, 3]
    data = load_data(f"{user_file}:sample_lists")
    assert len(data.train) == 6 and len(data.test) == 1 and data.num_classes == 4


def test_user_data_errors(user_file: Path) -> None:
    with pytest.raises(UserError, match="not a Dataset"):
        load_data(f"{user_file}:nothing")
    with pytest.raises(UserError, match="no attribute"):
        load_data(f"{user_file}:missing")


def test_an_empty_split_of_a_user_pair_is_named(tmp_path: Path) -> None:
    """An empty test split was refused as classes that "could not count" (RuntimeError: max()
    of nothing) for class labels, as "no samples to analyse" for regression targets."""
    path = tmp_path / "splits.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "x, labels, values = torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]), torch.zeros(4, 1)\n"
        "def labelled():\n"
        "    return TensorDataset(x, labels), TensorDataset(x[:0], labels[:0])\n"
        "def regression():\n"
        "    return TensorDataset(x, values), []\n"
        "def no_train():\n"
        "    return TensorDataset(x[:0], labels[:0]), TensorDataset(x, labels)\n"
    )
    for name in ("labelled", "regression"):
        with pytest.raises(UserError, match="an empty test split: return only the training data"):
            load_data(f"{path}:{name}")
    with pytest.raises(UserError, match="returned an empty training split"):
        load_data(f"{path}:no_train")


def test_real_one_hot_targets_of_a_factory_pair_are_refused(tmp_path: Path) -> None:
    """A factory's (x, y) of float one-hot rows was read as 3 regression targets, as a tensor
    file's were: a classifier's checkpoint was analysed under mse."""
    path = tmp_path / "keras.py"
    path.write_text(
        "import numpy as np\n"
        "x, labels = np.zeros((4, 2), np.float32), np.array([0, 1, 2, 1])\n"
        "def one_hot():\n"
        "    return x, np.eye(3, dtype=np.float32)[labels]\n"
        "def smoothed():\n"
        "    return x, np.eye(3, dtype=np.float32)[labels] * 0.9 + 0.1 / 3\n"
    )
    with pytest.raises(UserError, match=r"returned targets that are one-hot rows of real numbers"):
        load_data(f"{path}:one_hot")
    assert load_data(f"{path}:smoothed").target_shape == (3,)


def test_an_empty_split_of_a_users_own_data_source_is_named(tmp_path: Path) -> None:
    """A factory's DataSource skipped the checks: an empty training set was refused as 'the
    batch size must be a positive integer, not 0', an empty test split as no samples."""
    path = tmp_path / "sources.py"
    path.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from hessian_cli.specs import DataSource\n"
        "full = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]))\n"
        "empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))\n"
        "def no_train():\n"
        "    return DataSource('mine', empty, None, (2,), 3)\n"
        "def no_test():\n"
        "    return DataSource('mine', full, empty, (2,), 3)\n"
    )
    with pytest.raises(UserError, match="returned an empty dataset"):
        load_data(f"{path}:no_train")
    with pytest.raises(UserError, match="an empty test split: return only the training data"):
        load_data(f"{path}:no_test")


def test_class_labels_that_are_not_integers_are_one_sentence(tmp_path: Path) -> None:
    named = tmp_path / "named.py"
    named.write_text(
        "import torch\n"
        "class Pets(torch.utils.data.Dataset):\n"
        "    labels = ['cat', 'dog']\n"
        "    def __len__(self):\n"
        "        return 2\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3), i\n"
        "class Named(Pets):\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3), self.labels[i]\n"
    )
    with pytest.raises(UserError, match="could not count the classes .* integers 0 to C - 1"):
        load_data(f"{named}:Pets")  # integer samples, but a `labels` attribute of names
    with pytest.raises(UserError, match="the targets are not numbers \\(a str\\)"):
        load_data(f"{named}:Named")


# ----------------------------------------------------------------------------- batches


def test_analysis_batches_fixed_order_and_partial_batch() -> None:
    data = load_data("digits")
    batches = analysis_batches(data.train, batch_size=64, num_samples=150, dtype=torch.float64)
    assert [len(x) for x, _ in batches] == [64, 64, 22]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float64 and y.dtype == torch.int64
    assert torch.equal(x, data.train.tensors[0][:150].double())
    assert torch.equal(y, data.train.tensors[1][:150])
    again = analysis_batches(data.train, batch_size=64, num_samples=150, dtype=torch.float64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_analysis_batches_num_batches_and_whole_set() -> None:
    ds = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10.0).unsqueeze(1))
    batches = analysis_batches(ds, batch_size=3, num_batches=2)
    assert [b[0].squeeze(1).tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[0][1].dtype == torch.float32  # regression targets follow dtype
    assert sum(len(b[0]) for b in analysis_batches(ds, batch_size=4)) == 10


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_integer_inputs_are_token_ids_only_for_a_model_with_an_embedding(tmp_path: Path) -> None:
    """uint8 images become real numbers; token ids stay int64 for a model that looks them up."""
    np.savez(tmp_path / "d.npz", x=np.arange(12, dtype=np.uint8).reshape(4, 3), y=[0, 1, 0, 1])
    data = load_data(str(tmp_path / "d.npz"))
    images = analysis_batches(data.train, batch_size=4, dtype=torch.float64)[0][0]
    assert images.dtype == torch.float64 and images[1].tolist() == [3.0, 4.0, 5.0]
    np.savez(tmp_path / "t.npz", x=np.arange(12).reshape(4, 3), y=[0, 1, 0, 1])  # int64 ids
    tokens = analysis_batches(
        load_data(str(tmp_path / "t.npz")).train, batch_size=4, token_ids=True
    )
    assert tokens[0][0].dtype == torch.int64 and tokens[0][0][1].tolist() == [3, 4, 5]
    reals = TensorDataset(torch.rand(4, 3), torch.zeros(4))  # real inputs stay real
    assert analysis_batches(reals, batch_size=4, token_ids=True)[0][0].dtype == torch.float32
    small = TensorDataset(torch.arange(12, dtype=torch.int16).reshape(4, 3), torch.zeros(4))
    assert analysis_batches(small, batch_size=4, token_ids=True)[0][0].dtype == torch.int64
    # uint8 is an image's type, also for a model that holds an embedding besides its convolutions
    assert analysis_batches(data.train, batch_size=4, token_ids=True)[0][0].dtype == torch.float32
    mlp = nn.Sequential(nn.Linear(3, 2))
    bag = nn.Sequential(nn.Embedding(12, 2), nn.Flatten(), nn.Linear(6, 2))
    assert not takes_token_ids(mlp) and takes_token_ids(bag)
    assert takes_token_ids(torch.jit.script(bag)) and not takes_token_ids(torch.jit.script(mlp))


class _NumpyPairs(Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        return np.full(3, i, dtype=np.float32), i


def test_analysis_batches_generic_dataset() -> None:
    batches = analysis_batches(_NumpyPairs(), batch_size=2, num_samples=5, dtype=torch.float64)
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[2][0].dtype == torch.float64 and batches[2][0].tolist() == [[4.0, 4.0, 4.0]]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_samples": 11}, "only 10"),
        ({"num_batches": 4}, "only 10"),
        ({"num_samples": 0}, "positive"),
        ({"num_samples": 2, "num_batches": 1}, "not both"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_analysis_batches_errors(kwargs: dict, words: str) -> None:
    ds = TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    with pytest.raises(UserError, match=words):
        analysis_batches(ds, **{"batch_size": 3, **kwargs})
    with pytest.raises(UserError, match="no samples"):
        analysis_batches(TensorDataset(torch.zeros(0, 2), torch.zeros(0)), batch_size=3)


def test_check_labels() -> None:
    batches = [(torch.zeros(2, 1), torch.tensor([0, 9]))]
    check_labels(batches, 10)
    check_labels(batches, None)
    with pytest.raises(UserError, match="label 9 is out of range for 5 classes"):
        check_labels(batches, 5)
    with pytest.raises(UserError, match="label -1"):
        check_labels([(torch.zeros(1, 1), torch.tensor([-1]))], 5)
    with pytest.raises(UserError, match="real numbers"):
        check_labels([(torch.zeros(2, 1), torch.randn(2, 1))], 5)
    check_labels([(torch.zeros(2, 1), torch.softmax(torch.randn(2, 5), 1))], 5)  # soft labels


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Install a stand-in torchvision so the dataset plumbing runs where it is not installed."""
    seen: dict = {"calls": []}

    class Normalize:
        def __init__(self, mean, std) -> None:
            seen["mean"], seen["std"] = mean, std

    class FakeSet(Dataset):
        def __init__(self, root, download=False, transform=None, **where) -> None:
            seen["calls"].append((type(self).__name__, where, download))
            if not (Path(root) / "present").exists():
                raise RuntimeError("Dataset not found or corrupted.")

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), i

    datasets = types.ModuleType("torchvision.datasets")
    for name in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN"):
        setattr(datasets, name, type(name, (FakeSet,), {}))
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = lambda steps: steps
    transforms.ToTensor = lambda: "to_tensor"
    transforms.Normalize = Normalize
    root = types.ModuleType("torchvision")
    root.datasets, root.transforms = datasets, transforms
    for name, module in [
        ("torchvision", root),
        ("torchvision.datasets", datasets),
        ("torchvision.transforms", transforms),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_torchvision_data_plumbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_torchvision(monkeypatch)
    with pytest.raises(UserError, match="--data-root"):
        load_data("cifar10")
    with pytest.raises(UserError, match="--download"):
        load_data("cifar10", root=tmp_path)
    (tmp_path / "present").touch()
    data = load_data("CIFAR10", root=tmp_path)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32) and len(data.test) == 3
    assert seen["mean"] == (0.4914, 0.4822, 0.4465)
    assert seen["calls"][-2:] == [
        ("CIFAR10", {"train": True}, False),
        ("CIFAR10", {"train": False}, False),
    ]
    data = load_data("svhn", root=tmp_path, download=True)
    assert seen["calls"][-1] == ("SVHN", {"split": "test"}, True)
    assert load_data("fashion-mnist", root=tmp_path).input_shape == (1, 28, 28)


def test_cifar10_normalised_as_akamasters_resnets_were_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """akamaster/pytorch_resnet_cifar10 normalised CIFAR-10 by ImageNet's mean and std (its
    std 0.229 for CIFAR-10's 0.2023), which its checkpoints' BatchNorm statistics are of:
    only a factory of one's own gave that data."""
    seen = _fake_torchvision(monkeypatch)
    (tmp_path / "present").touch()
    data = load_data("cifar10-imagenet-norm", root=tmp_path)
    assert (seen["mean"], seen["std"]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert seen["calls"][-1] == ("CIFAR10", {"train": False}, False)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)


def test_user_factory_returning_a_string_is_refused() -> None:
    with pytest.raises(UserError, match="not a Dataset"):
        load_data("os:getcwd")


def test_data_arrays_no_analysis_can_use_are_one_sentence(tmp_path) -> None:
    """Sparse, meta and complex entries, a directory, and sizes past 2**63 reached torch's
    dispatcher or an overflow mid-work (exit 1, a 40-line dump)."""
    x, y = torch.randn(6, 3), torch.arange(6) % 2
    cases = {
        "sparse.pt": ({"x": x.to_sparse(), "y": y}, "holds a sparse tensor"),
        "meta.pt": ({"x": torch.empty(6, 3, device="meta"), "y": y}, "holds a meta tensor"),
        "complex.pt": ({"x": x, "y": y.to(torch.complex64)}, "holds complex numbers"),
    }
    for name, (arrays, why) in cases.items():
        torch.save(arrays, tmp_path / name)
        with pytest.raises(UserError, match=why):
            load_data(str(tmp_path / name))
    np.savez(tmp_path / "empty.npz", x=np.zeros((4, 0)), y=np.arange(4) % 2)
    with pytest.raises(UserError, match=r"hold no values \(shape \(0,\) each\)"):
        load_data(str(tmp_path / "empty.npz"))
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load_data(str(tmp_path / "dir.npz"))
    with pytest.raises(UserError, match="too large for a size or a count"):
        load_data("synthetic:4:100000000000000000000")


def test_a_dataset_whose_length_cannot_be_read_is_one_sentence() -> None:
    class Negative(Dataset):
        def __len__(self) -> int:
            return -1

        def __getitem__(self, i: int):
            return torch.zeros(2), 0

    with pytest.raises(UserError, match="length could not be read"):
        analysis_batches(Negative(), batch_size=2)


def test_values_a_narrower_dtype_cannot_hold_are_named_as_such(tmp_path) -> None:
    """float64 data of 1e300 became inf in float32 and was called NaN or infinite data."""
    path = tmp_path / "big.npz"
    np.savez(path, x=np.full((4, 3), 1e300), y=np.arange(4) % 2)
    batches_of = load_data(str(path)).train
    with pytest.raises(UserError, match="beyond float32's range .*`dtype=float64`"):
        analysis_batches(batches_of, batch_size=2)
    (x, _), _ = analysis_batches(batches_of, batch_size=2, dtype=torch.float64)
    assert float(x[0, 0]) == 1e300


def test_a_missing_data_file_is_found_for_tensor_files_and_factories(tmp_path):
    """What analyze and --resume check of a recorded data spec before loading it."""
    from hessian_cli.specs.data import missing_data_file

    (tmp_path / "here.npz").write_bytes(b"")
    (tmp_path / "fac.py").write_text("")
    assert missing_data_file(f"{tmp_path}/gone.npz") == f"{tmp_path}/gone.npz"
    assert missing_data_file(f"{tmp_path}/gone.py:make") == f"{tmp_path}/gone.py"
    for present in (f"{tmp_path}/here.npz", f"{tmp_path}/fac.py:make", "digits", "os.path:join"):
        assert missing_data_file(present) is None


def test_an_empty_cut_short_or_other_kind_of_data_file_says_so(tmp_path) -> None:
    """Each was "could not be read safely (BadZipFile); it must hold plain arrays or tensors",
    which sent the user to the file's contents, not to a download or copy cut short."""
    x, y = np.ones((8, 3), dtype=np.float32), np.arange(8) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    for suffix, kind in (
        (".npz", "an .npz archive"),
        (".pt", "a torch file"),
        (".h5", "an HDF5 file"),
    ):
        whole = (tmp_path / f"d{suffix}").read_bytes()
        assert len(load_data(str(tmp_path / f"d{suffix}")).train) == 8
        (tmp_path / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
        with pytest.raises(
            UserError, match=rf"cut{suffix}' is truncated, damaged or not {kind} \("
        ):
            load_data(str(tmp_path / f"cut{suffix}"))
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(UserError, match=rf"^data file '.*empty{suffix}' is empty\.$"):
            load_data(str(tmp_path / f"empty{suffix}"))
    (tmp_path / "notes.npz").write_text("x and y to come\n")
    with pytest.raises(UserError, match=r"notes.npz' is truncated, damaged or not an .npz arch"):
        load_data(str(tmp_path / "notes.npz"))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 8, dtype=object), y=y)
    with pytest.raises(UserError, match="holds object arrays, which safe loading does not read"):
        load_data(str(tmp_path / "objects.npz"))


def test_a_data_file_larger_than_memory_says_so(tmp_path, monkeypatch) -> None:
    """A sound HDF5 file too large to read whole was "truncated, damaged or not an HDF5 file
    (MemoryError)"."""
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f["x"], f["y"] = np.ones((8, 3), dtype=np.float32), np.arange(8) % 2

    def too_large(dataset, key):
        raise MemoryError("Unable to allocate 256. GiB for an array with shape (10**9, 64)")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", too_large)
    with pytest.raises(
        UserError, match=r"big.h5' does not fit in the machine's memory \(it is read whole\)"
    ):
        load_data(str(tmp_path / "big.h5"))


def test_a_list_of_samples_is_the_training_set(user_file: Path) -> None:
    """A factory's list of (x, y) samples, a Dataset as torch takes one, was refused as "a
    sequence of 6 items, not (train, test)", and a list of two was taken for two splits of one
    sample each."""
    data = load_data(f"{user_file}:samples")
    assert len(data.train) == 6 and data.test is None and data.num_classes == 4
    assert data.input_shape == (2,) and torch.equal(data.train[5][0], torch.tensor([10.0, 11.0]))
    data = load_data(f"{user_file}:two_samples")
    assert len(data.train) == 2 and data.test is None and data.num_classes == 2
    data = load_data(f"{user_file}:sample_lists")  # two lists of samples: (train, test)
    assert (len(data.train), len(data.test)) == (6, 1)
