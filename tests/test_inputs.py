"""Models of several inputs (a dict, as tokenizers give input_ids and attention_mask; a tuple):
the operator against the dense Hessian of the same model fed one packed tensor, and the data,
analyze and train paths end to end."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from cli_runner import one_sentence, run
from torch import nn
from torch.utils.data import TensorDataset

from hessian_cli.engine import HessianOperator
from hessian_cli.engine.dense import dense_hessian
from hessian_cli.errors import UserError
from hessian_cli.specs import analysis_batches, build_model, load_data, takes_token_ids
from hessian_cli.specs.losses import cross_entropy

# A masked bag of embeddings: which tokens count depends on the mask, so a mask that did not
# reach the model (or reached it as the wrong argument) changes the Hessian.
CODE = '''
import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB, LENGTH, CLASSES = 9, 5, 3


class MaskedBag(nn.Module):
    def __init__(self, dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(torch.tanh(pooled))


class Pair(nn.Module):
    """Two real inputs, taken positionally: model(a, b)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, a, b):
        return torch.tanh(self.a(a)) * self.b(b)


def tokens(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(1, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    labels = (ids * mask).sum(1) % CLASSES
    return ids, mask, labels


class Tokens(Dataset):
    def __init__(self):
        self.ids, self.mask, self.labels = tokens()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


class Rows(Tokens):
    """Samples as a Hugging Face dataset gives them: one dict, the label an entry of it."""

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "label": self.labels[i], "attention_mask": self.mask[i]}


class CountedRows(Rows):
    num_classes = 4  # more than the labels show


class Triples(Tokens):
    def __getitem__(self, i):
        return self.ids[i], self.mask[i], self.labels[i]


class Lists(Tokens):
    """A Hugging Face dataset not in torch format: Python lists and ints."""

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i].tolist(),
            "attention_mask": self.mask[i].tolist(),
            "labels": int(self.labels[i]),
        }


class WithText(Tokens):
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "text": "a b c"}, 0


class Ragged(Tokens):
    """Samples from the 9th on are longer: the first ones the fit check reads stack."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if i >= 8:
            x = {k: torch.cat([t, t[:1]]) for k, t in x.items()}
        return x, y


class Unlabelled(Tokens):
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


class Pairs(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(2)
        self.a, self.b = torch.randn(30, 4, generator=g), torch.randn(30, 2, generator=g)
        self.y = torch.randn(30, 3, generator=g)

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return (self.a[i].numpy(), self.b[i].numpy()), self.y[i]


class IntPairs(Pairs):
    """Counts stored as integers, for a model without an embedding table."""

    def __getitem__(self, i):
        return ((self.a[i] * 4).long(), (self.b[i] * 4).long()), self.y[i]


class IntNamed(IntPairs):
    def __getitem__(self, i):
        (a, b), y = super().__getitem__(i)
        return {"a": a, "b": b}, y


def bag(**kw):
    return MaskedBag(**kw)


def pair():
    return Pair()


def int_pair_data():
    return IntPairs()


def int_named_data():
    return IntNamed()


def token_data():
    return Tokens()


def pair_data():
    return Pairs()


def rows_data():
    return Rows(), Rows()


def counted_rows():
    return CountedRows(), CountedRows()


def triples():
    return Triples()


def lists():
    return Lists()


def with_text():
    return WithText()


def ragged():
    return Ragged()


def unlabelled_data():
    return Unlabelled()
'''
NS: dict = {}
exec(compile(CODE, "inputs_models", "exec"), NS)


class Packed(nn.Module):
    """The same model fed one tensor holding both inputs: the reference path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, 0], x[:, 1])


@pytest.fixture
def code_file(tmp_path):
    path = tmp_path / "lm.py"
    path.write_text(CODE)
    return path


@pytest.fixture
def bag_ckpt(tmp_path):
    path = tmp_path / "bag.pt"
    torch.save(NS["MaskedBag"]().state_dict(), path)
    return path


def _token_batches(n: int = 12, size: int = 5) -> list:
    ids, mask, labels = NS["tokens"](n)
    return [
        (
            {"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size]},
            labels[i : i + size],
        )
        for i in range(0, n, size)
    ]


@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_named_inputs_give_the_hessian_of_the_model_fed_them_as_one_tensor(backend):
    model = NS["MaskedBag"]().double()
    batches = _token_batches()  # 5 + 5 + 2 samples: weighted by size
    op = HessianOperator(model, cross_entropy, batches, backend=backend, keep_graph=False)
    packed = [(torch.stack([x["input_ids"], x["attention_mask"]], 1), y) for x, y in batches]
    H = dense_hessian(Packed(model), cross_entropy, packed)
    V = torch.randn(3, op.n, dtype=torch.float64)
    assert torch.allclose(op.matmul(V), V @ H, rtol=1e-10, atol=1e-12)
    # The mask reaches the model: another mask is another matrix.
    unmasked = [
        ({**x, "attention_mask": torch.ones_like(x["attention_mask"])}, y) for x, y in batches
    ]
    other = HessianOperator(model, cross_entropy, unmasked, backend=backend)
    assert not torch.allclose(other.matmul(V), V @ H, rtol=1e-3)


def test_a_tuple_of_inputs_is_passed_in_order():
    model = NS["Pair"]().double()
    g = torch.Generator().manual_seed(3)
    a, b, y = (torch.randn(6, k, generator=g, dtype=torch.float64) for k in (4, 2, 3))
    mse = torch.nn.functional.mse_loss
    op = HessianOperator(model, mse, [((a, b), y)])

    class PackedPair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x[:, :4], x[:, 4:])

    H = dense_hessian(PackedPair(), mse, [(torch.cat([a, b], 1), y)])
    eye = torch.eye(op.n, dtype=torch.float64)
    assert torch.allclose(op.matmul(eye), H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "inputs",
    [{"a": {"b": torch.ones(2, 1)}}, {}, ["text", "more"], {1: torch.ones(2, 1)}],
    ids=["nested", "empty", "strings", "int-key"],
)
def test_inputs_of_another_form_are_one_sentence(inputs):
    model = nn.Linear(1, 2)
    with pytest.raises(Exception, match="each batch must be \\(inputs, targets\\)") as info:
        HessianOperator(model, cross_entropy, [(inputs, torch.zeros(2, dtype=torch.long))])
    assert type(info.value).__name__ == "UserError"


def test_a_dataset_given_for_batches_is_one_sentence():
    """A TensorDataset's samples have 0-d targets: len() of them was a TypeError, a traceback."""
    x, y = torch.ones(4, 1), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="not the samples of a dataset"):
        HessianOperator(nn.Linear(1, 2), cross_entropy, TensorDataset(x, y))


def test_a_dataset_of_named_inputs_loads_and_batches_them(code_file):
    data = load_data(f"{code_file}:token_data")
    assert data.input_shape is None and data.num_classes == 3
    model = build_model(f"{code_file}:bag", input_shape=None, num_classes=3)
    batches = analysis_batches(data.train, batch_size=16, num_samples=20, token_ids=True)
    assert [len(y) for _, y in batches] == [16, 4]
    x = batches[0][0]
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].dtype == torch.long
    assert takes_token_ids(model) and x["attention_mask"].dtype == torch.long
    # Positional inputs stored as NumPy arrays become float tensors, in order.
    pairs = load_data(f"{code_file}:pair_data")
    assert pairs.input_shape is None and pairs.num_classes is None
    (a, b), y = analysis_batches(pairs.train, batch_size=8, num_samples=8)[0]
    assert a.shape == (8, 4) and b.shape == (8, 2) and a.dtype == torch.float32


def test_dict_samples_holding_their_label_are_named_inputs_beside_it(capsys, code_file, bag_ckpt):
    rows = load_data(f"{code_file}:rows_data")
    pairs = load_data(f"{code_file}:token_data")
    assert rows.num_classes == 3 and rows.input_shape is None and len(rows.test) == 40
    for (x, y), (x2, y2) in zip(
        analysis_batches(rows.test, batch_size=16),
        analysis_batches(pairs.train, batch_size=16),
        strict=True,
    ):
        assert list(x) == ["input_ids", "attention_mask"] and torch.equal(y, y2)
        assert all(torch.equal(x[k], x2[k]) for k in x)
    code, _, err = run(
        capsys, "analyze", bag_ckpt, "--model", f"{code_file}:bag", "--data",
        f"{code_file}:unlabelled_data",
    )  # fmt: skip
    assert code == 2
    assert (
        "must yield (x, y) pairs or dicts of named inputs beside their 'labels', but its first "
        "sample is a dict without a 'labels' or 'label' entry." in one_sentence(err)
    )


def test_a_built_in_model_for_data_of_several_inputs_is_one_sentence(capsys, code_file, bag_ckpt):
    code, _, err = run(
        capsys, "analyze", bag_ckpt, "--model", "mlp", "--data", f"{code_file}:token_data"
    )
    assert code == 2
    assert "model 'mlp' takes one input tensor, but the data's samples hold several" in (
        one_sentence(err)
    )


def test_analyze_takes_named_inputs_end_to_end(capsys, tmp_path, code_file, bag_ckpt):
    model = build_model(f"{code_file}:bag", input_shape=None, num_classes=3)
    out = tmp_path / "spectra.h5"
    args = ["--model", f"{code_file}:bag", "--data", f"{code_file}:token_data"]
    code, stdout, err = run(
        capsys, "analyze", bag_ckpt, *args, "--num-samples", "24", "--batch-size", "8",
        "--top-k", "2", "--trace", "--alignment", "--dtype", "float64", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    eigen = json.loads(stdout)["eigen"]
    batches = analysis_batches(
        load_data(f"{code_file}:token_data").train,
        batch_size=8,
        num_samples=24,
        dtype=torch.float64,
        token_ids=True,
    )
    packed = [(torch.stack([x["input_ids"], x["attention_mask"]], 1), y) for x, y in batches]
    H = dense_hessian(Packed(model.double()), cross_entropy, packed)
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.allclose(torch.tensor(eigen["eigenvalues"], dtype=torch.float64), top, rtol=1e-6)
    with h5py.File(out) as f:
        (group,) = f["checkpoints"].values()
        assert group["eigenvalues"].shape == (2,) and "alignment" in group and "trace" in group


def test_a_model_that_does_not_take_the_named_inputs_is_one_sentence(
    capsys, tmp_path, code_file, bag_ckpt
):
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.emb, self.head = nn.Embedding(9, 3), nn.Linear(3, 3)\n"
        "    def forward(self, ids, mask):\n        return self.head(self.emb(ids).sum(1))\n"
        "def make():\n    return M()\n"
    )
    code, _, err = run(
        capsys, "analyze", bag_ckpt, "--model", f"{wrong}:make", "--data", f"{code_file}:token_data"
    )
    assert code == 2
    assert (
        "the data (samples of input_ids of shape (5,) and attention_mask of shape (5,)) does not "
        "fit the model:" in one_sentence(err)
    )


def test_train_runs_eigensam_on_named_inputs_and_analyze_reads_its_checkpoint(
    capsys, tmp_path, code_file
):
    out = tmp_path / "run"
    args = ["--model", f"{code_file}:bag", "--data", f"{code_file}:token_data"]
    code, stdout, err = run(
        capsys, "train", *args, "--optimizer", "eigensam", "--batch-size", "8", "--epochs", "2",
        "--eig-every", "2", "--track-every", "3", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    final = out / "checkpoints" / "final.pt"
    code, stdout, err = run(capsys, "analyze", final, *args, "--top-k", "1", "--json")
    assert code == 0, err
    eigen = json.loads(stdout)["eigen"]
    assert eigen["converged"] == [True] and eigen["eigenvalues"][0] > 0


def test_of_several_inputs_only_the_real_ones_take_the_dtype():
    """A bool key_padding_mask cast to float is a bias added to attention scores, not a mask:
    the analysis took another model's Hessian (the library, which casts only real inputs, not)."""
    from hessian_cli.specs import cast_inputs

    x = {
        "ids": torch.tensor([[1, 2]], dtype=torch.int32),
        "mask": torch.tensor([[True, False]]),
        "features": torch.tensor([[0.5, 1.5]], dtype=torch.float64),
    }
    for token_ids in (False, True):
        cast = cast_inputs(x, torch.float32, token_ids)
        assert [t.dtype for t in cast.values()] == [torch.int32, torch.bool, torch.float32]
    # One input alone is cast as before: integers become real numbers unless they are token ids.
    assert cast_inputs(x["ids"], torch.float32).dtype == torch.float32
    assert cast_inputs(x["ids"], torch.float32, token_ids=True).dtype == torch.long


def test_dict_samples_keep_their_datasets_class_count(code_file):
    """It was read from the wrapper that splits off the label, which has none: 3 counted
    from the labels instead of the dataset's 4."""
    assert load_data(f"{code_file}:counted_rows").num_classes == 4


def test_samples_of_lists_are_batched_as_tensors(code_file):
    """A Hugging Face dataset not in torch format holds lists, which the default collation
    split into their elements ("unexpected RuntimeError: Could not infer dtype of dict")."""
    data = load_data(f"{code_file}:lists")
    (x, y), *_ = analysis_batches(data.train, batch_size=16, token_ids=True)
    ids, mask, labels = NS["tokens"]()
    assert torch.equal(x["input_ids"], ids[:16]) and torch.equal(x["attention_mask"], mask[:16])
    assert torch.equal(y, labels[:16])


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("triples", "yields samples of 3 arrays, where a sample is (inputs, target): give several "
         "inputs as a tuple or dict"),
        ("with_text", "the input 'text' is not numeric arrays (a str in the first sample)"),
    ],
)  # fmt: skip
def test_samples_the_model_cannot_take_are_one_sentence(
    capsys, code_file, bag_ckpt, factory, message
):
    """(input_ids, attention_mask, labels) was read as inputs input_ids and targets the mask."""
    code, _, err = run(
        capsys, "analyze", bag_ckpt, "--model", f"{code_file}:bag", "--data",
        f"{code_file}:{factory}",
    )  # fmt: skip
    assert code == 2 and message in one_sentence(err)


def test_a_users_type_is_named_by_its_file_in_messages(tmp_path):
    from hessian_cli.errors import a_type
    from hessian_cli.specs.user_code import load_object

    (tmp_path / "nets.py").write_text("class Output(dict):\n    pass\n")
    assert a_type(load_object(f"{tmp_path / 'nets.py'}:Output", "model")()) == "a nets.Output"


def test_token_ids_beyond_the_embedding_table_are_said_as_such():
    """torch says only "index out of range in self"."""
    from hessian_cli.specs import check_fits

    model = NS["MaskedBag"]()
    ids, mask, labels = NS["tokens"](4)
    ids[1, 0] = 12  # the table holds 9 rows
    with pytest.raises(Exception, match=r"reach 12, and the model's embedding tables hold 9 rows"):
        check_fits(model, cross_entropy, [({"input_ids": ids, "attention_mask": mask}, labels)])


def test_negative_token_ids_are_named_beside_the_embedding_table():
    from hessian_cli.specs import check_fits

    model = NS["MaskedBag"]()
    ids, mask, labels = NS["tokens"](4)
    ids[1, 0] = -100  # padded like the labels
    with pytest.raises(Exception, match=r"go down to -100 \(below 0: padding with -100, say\?\)"):
        check_fits(model, cross_entropy, [({"input_ids": ids, "attention_mask": mask}, labels)])


def test_samples_that_do_not_stack_mid_run_are_one_sentence(capsys, tmp_path, code_file):
    """A training batch met them after the run had begun: "unexpected RuntimeError"."""
    args = ["--model", f"{code_file}:bag", "--data", f"{code_file}:ragged", "--optimizer", "sgd"]
    code, _, err = run(capsys, "train", *args, "--batch-size", "8", "--out", tmp_path / "r")
    assert code == 2 and "the data samples could not be batched" in one_sentence(err)


@pytest.mark.parametrize(
    "layer", [lambda: nn.Linear(3, 2), lambda: nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 2))]
)
def test_integer_inputs_a_model_refuses_are_said_to_be_integers(layer):
    """The first product failed in torch's "mat1 and mat2 must have the same dtype, but got
    Long and Double" (a LayerNorm's "mixed dtype (CPU)"), naming no input; made real numbers,
    the products are the dense Hessian's."""
    torch.manual_seed(0)
    model = layer().double()
    x, y = torch.randint(-3, 4, (8, 3)), torch.randint(0, 2, (8,))
    said = r"^the model failed on its int64 inputs \(.*\): give them as real numbers, x.float\(\)"
    op = HessianOperator(model, cross_entropy, [(x, y)])
    with pytest.raises(UserError, match=said):
        op.matmul(torch.ones(op.n, dtype=torch.float64))
    with pytest.raises(UserError, match=said):
        dense_hessian(model, cross_entropy, [(x, y)])
    op = HessianOperator(model, cross_entropy, [(x.double(), y)])
    H = dense_hessian(model, cross_entropy, [(x.double(), y)])
    V = torch.randn(3, op.n, dtype=torch.float64)
    torch.testing.assert_close(op.matmul(V), V @ H, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("data", "names"), [("int_pair_data", "0 and 1"), ("int_named_data", "a and b")]
)
def test_integer_inputs_of_several_are_one_plain_sentence_naming_them(
    capsys, tmp_path, code_file, data, names
):
    """Nested in the fit check's "the data (samples of ...) does not fit the model: the model
    failed on its int64 inputs (...): give them ...", which named neither input."""
    ckpt = tmp_path / "pair.pt"
    torch.save(NS["Pair"]().state_dict(), ckpt)
    code, _, err = run(
        capsys, "analyze", ckpt, "--model", f"{code_file}:pair", "--data", f"{code_file}:{data}",
    )  # fmt: skip
    said = one_sentence(err, strict=True)
    assert code == 2 and said.startswith(
        f"error: the model failed on its int64 inputs {names} (mat1 and mat2 must have the same "
        "dtype, but got Long and Float): give them as real numbers"
    ), said


@pytest.mark.parametrize(("batches", "said"), [(None, "None"), (16, "an int")])
def test_batches_that_are_nothing_to_iterate_are_one_sentence(batches, said):
    """None (data not loaded yet) or a count failed in "'NoneType' object is not iterable", a
    TypeError naming no argument; a generator of the batches is the list of them."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    for make in (HessianOperator, dense_hessian):
        with pytest.raises(UserError, match=f"^the batches must be a list, .* not {said}\\.$"):
            make(model, cross_entropy, batches)
    op = HessianOperator(model, cross_entropy, (b for b in data))
    H = dense_hessian(model, cross_entropy, data)
    V = torch.randn(2, op.n, dtype=torch.float64)
    torch.testing.assert_close(op.matmul(V), V @ H, rtol=1e-9, atol=1e-12)
