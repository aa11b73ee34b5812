"""Class labels per token (a language model's next tokens, with -100 where padding is skipped):
the data, the cross-entropy over logits shaped (batch, tokens, vocabulary), and analyze/train
end to end against the dense Hessian of the loss written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import one_sentence, run
from torch.nn import functional as F

from eigensam.tracking import evaluate
from hessian_cli.engine import HessianOperator, UserError
from hessian_cli.engine.dense import dense_hessian
from hessian_cli.specs import (
    analysis_batches,
    build_model,
    check_targets,
    load_checkpoint,
    load_data,
)
from hessian_cli.specs.fit import guard_embedding_lookups
from hessian_cli.specs.losses import cross_entropy, default_loss, labelled_count
from hessian_cli.storage import read_metrics

CODE = """
import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB, LENGTH = 6, 5


class TinyLM(nn.Module):
    '''Each position's logits over the vocabulary from its token and the one before.'''

    def __init__(self, dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask):
        e = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        before = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)
        return self.out(torch.tanh(self.mix(torch.cat([e, before], -1))))


class Text(Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        nxt = torch.cat([self.ids[:, 1:], self.ids[:, :1]], 1)
        self.labels = torch.where(self.mask.bool(), nxt, torch.full_like(nxt, -100))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def lm():
    return TinyLM()


def text():
    return Text()
"""
NS: dict = {}
exec(compile(CODE, "token_models", "exec"), NS)


@pytest.fixture
def code_file(tmp_path):
    path = tmp_path / "lm.py"
    path.write_text(CODE)
    return path


def load_data_of(tmp_path, x: torch.Tensor, y: torch.Tensor):
    """The data a user's factory returning a dataset of these (x, y) samples gives."""
    torch.save({"x": x, "y": y}, tmp_path / "pairs.pt")
    (tmp_path / "pairs.py").write_text(
        "import torch\n"
        "class Pairs(torch.utils.data.Dataset):\n"
        f"    t = torch.load({str(tmp_path / 'pairs.pt')!r})\n"
        "    def __len__(self):\n        return len(self.t['x'])\n"
        "    def __getitem__(self, i):\n        return self.t['x'][i], self.t['y'][i]\n"
        "def make():\n    return Pairs()\n"
    )
    return load_data(f"{tmp_path / 'pairs.py'}:make")


def data_inputs(data, rows: slice) -> dict:
    return {"input_ids": data.ids[rows], "attention_mask": data.mask[rows]}


def by_hand(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over labelled tokens, written out: log-softmax picked at each label."""
    keep = targets != -100
    logp = outputs.log_softmax(-1)[keep]
    return -logp.gather(1, targets[keep].unsqueeze(1)).mean()


def test_labels_per_token_are_classes_counted_past_the_padding(code_file):
    data = load_data(f"{code_file}:text")
    assert data.num_classes == NS["VOCAB"] and data.target_shape == (NS["LENGTH"],)
    assert default_loss(data.num_classes) == "ce"
    batches = analysis_batches(data.train, batch_size=8, token_ids=True)
    check_targets("ce", batches, data.num_classes)  # -100 is padding to cross-entropy
    with pytest.raises(Exception, match="label -100 is out of range"):
        check_targets("mse", batches, data.num_classes)  # and a label like any other to mse


def test_cross_entropy_takes_the_vocabulary_last_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)  # (batch, tokens, vocab)
    labels = torch.randint(0, 5, (4, 7), generator=g)
    labels[:, 5:] = -100
    assert torch.allclose(cross_entropy(logits, labels), by_hand(logits, labels), rtol=1e-12)
    # torch's own layout, (batch, classes, positions), is still read as torch reads it; where
    # both fit (as many positions as classes) it is said, not guessed (the guess took the
    # tokens for the classes of a language model of 8 tokens over 8 words).
    seg = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    assert torch.equal(cross_entropy(seg, labels), F.cross_entropy(seg, labels))
    square = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    with pytest.raises(UserError, match="cannot tell where the classes are in outputs of shape"):
        cross_entropy(square, labels[:, :5])


def test_targets_of_integers_that_are_no_tokens_keep_their_user_loss(tmp_path):
    """A binary segmentation mask beside one output channel was refused ("class labels up to 1,
    but the model has only 1 outputs"); multi-hot labels built a built-in model of 2 outputs
    (their classes) instead of 4; neither has an accuracy to count."""
    from eigensam.tracking import correct_count
    from hessian_cli.specs import check_fits

    def bce(out, y):
        return F.binary_cross_entropy_with_logits(
            out.squeeze(1) if out.ndim == 4 else out, y.float()
        )

    seg = torch.nn.Conv2d(2, 1, 3, padding=1)
    masks = [(torch.randn(3, 2, 6, 6), torch.randint(0, 2, (3, 6, 6)))]
    check_fits(seg, bce, masks)
    assert correct_count(seg(masks[0][0]), masks[0][1], classify=True) == (0, 0)
    x, y = torch.randn(10, 6), torch.randint(0, 2, (10, 4))
    data = load_data_of(tmp_path, x, y)
    assert data.num_classes == 2 and data.target_shape == (4,) and data.num_outputs == 4
    mlp = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_outputs)
    check_fits(mlp, bce, [(x, y)])
    assert correct_count(mlp(x), y, classify=True) == (0, 0)


@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_the_hessian_of_a_language_models_loss_matches_the_dense_one(backend):
    model = NS["TinyLM"]().double()
    data = NS["Text"]()
    cuts = [(0, 8), (8, 16), (16, 20)]  # 8 + 8 + 4 samples
    batches = [(data_inputs(data, slice(a, b)), data.labels[a:b]) for a, b in cuts]
    op = HessianOperator(model, cross_entropy, batches, backend=backend)
    H = dense_hessian(model, by_hand, batches)
    V = torch.randn(3, op.n, dtype=torch.float64)
    assert torch.allclose(op.matmul(V), V @ H, rtol=1e-9, atol=1e-12)
    # Weighted by labelled tokens: the loss over all of them, however the batches fall.
    tokens = HessianOperator(
        model, cross_entropy, batches, backend=backend, batch_weight=labelled_count
    )
    whole = [(data_inputs(data, slice(0, 20)), data.labels[:20])]
    H = dense_hessian(model, by_hand, whole)
    assert torch.allclose(tokens.matmul(V), V @ H, rtol=1e-9, atol=1e-12)
    assert torch.allclose(
        dense_hessian(model, by_hand, batches, batch_weight=labelled_count), H, atol=1e-12
    )


def test_analyze_and_train_a_language_model_from_the_command_line(capsys, tmp_path, code_file):
    args = ["--model", f"{code_file}:lm", "--data", f"{code_file}:text"]
    ckpt = tmp_path / "lm.pt"
    torch.save(NS["TinyLM"]().state_dict(), ckpt)
    code, stdout, err = run(
        capsys, "analyze", ckpt, *args, "--num-samples", "24", "--batch-size", "12",
        "--top-k", "2", "--dtype", "float64", "--json",
    )  # fmt: skip
    assert code == 0, err
    eigen = json.loads(stdout)["eigen"]
    assert json.loads(stdout)["provenance"]["batch_weight"] == "labels"
    model = build_model(f"{code_file}:lm", input_shape=None, num_classes=NS["VOCAB"]).double()
    # The mean over all 24 samples' labelled tokens, taken in one batch: two batches of 12
    # weighted by their samples were another matrix (their token counts differ).
    whole = analysis_batches(
        NS["Text"](), batch_size=24, num_samples=24, dtype=torch.float64, token_ids=True
    )
    top = torch.linalg.eigvalsh(dense_hessian(model, by_hand, whole)).flip(0)[:2]
    assert torch.allclose(torch.tensor(eigen["eigenvalues"], dtype=torch.float64), top, rtol=1e-6)
    halves = analysis_batches(
        NS["Text"](), batch_size=12, num_samples=24, dtype=torch.float64, token_ids=True
    )
    by_samples = torch.linalg.eigvalsh(dense_hessian(model, by_hand, halves)).flip(0)[:2]
    assert not torch.allclose(by_samples, top, rtol=1e-6)

    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "train", *args, "--optimizer", "eigensam", "--batch-size", "8", "--epochs", "1",
        "--eig-every", "2", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert (out / "checkpoints" / "final.pt").is_file()
    epochs = read_metrics(out / "metrics.h5")["epochs"]
    assert 0 < epochs["train_accuracy"][0] <= 1  # of the labelled tokens


def test_accuracy_is_counted_over_labelled_tokens():
    """It was counted per sample: the tokens right over the batch's samples (or none at all)."""
    model = NS["TinyLM"]().double()
    data = NS["Text"]()
    batches = [({"input_ids": data.ids, "attention_mask": data.mask}, data.labels)]
    loss, acc = evaluate(model, batches, cross_entropy, torch.device("cpu"), classify=True)
    with torch.no_grad():
        picked = model(data.ids, data.mask).argmax(-1)
    keep = data.labels != -100
    assert acc == pytest.approx(float((picked == data.labels)[keep].double().mean()), abs=1e-12)
    assert loss == pytest.approx(float(by_hand(model(data.ids, data.mask), data.labels)))


def test_a_label_past_the_vocabulary_is_one_sentence(capsys, tmp_path, code_file):
    small = tmp_path / "small.py"
    small.write_text(
        CODE.replace("self.out = nn.Linear(dim, VOCAB)", "self.out = nn.Linear(dim, VOCAB - 2)")
    )
    ckpt = tmp_path / "small.pt"
    ns: dict = {}
    exec(compile(small.read_text(), "small", "exec"), ns)
    torch.save(ns["TinyLM"]().state_dict(), ckpt)
    code, _, err = run(
        capsys, "analyze", ckpt, "--model", f"{small}:lm", "--data", f"{code_file}:text"
    )
    assert code == 2
    assert "the data has class labels up to 5, but the model has only 4 outputs" in one_sentence(
        err
    )


def test_padding_everywhere_or_in_a_whole_batch_is_one_sentence(capsys, tmp_path, code_file):
    padded = tmp_path / "padded.py"
    padded.write_text(
        CODE
        + "\ndef first_padded():\n    d = Text()\n    d.labels[:12] = -100\n    return d\n"
        + "\ndef all_padded():\n    d = Text()\n    d.labels[:] = -100\n    return d\n"
    )
    ckpt = tmp_path / "lm.pt"
    torch.save(NS["TinyLM"]().state_dict(), ckpt)
    args = ["analyze", ckpt, "--model", f"{code_file}:lm", "--batch-size", "12"]
    code, _, err = run(capsys, *args, "--data", f"{padded}:first_padded")
    assert code == 2 and "a batch of the data holds no label but -100 (padding)" in err
    code, _, err = run(capsys, *args, "--data", f"{padded}:all_padded")
    assert code == 2 and "holds no class label of 0 or more (only negative ones, or -100" in err


def test_a_token_id_past_the_embedding_in_a_later_batch_is_one_sentence(
    capsys, tmp_path, code_file
):
    """The fit check runs two samples; a token id past the table further on stopped analyze and
    train with "unexpected IndexError: index out of range in self"."""
    late = tmp_path / "late.py"
    late.write_text(
        CODE + "\ndef late_oov():\n    d = Text()\n    d.ids[20, 1] = 9\n    return d\n"
    )
    ckpt = tmp_path / "lm.pt"
    torch.save(NS["TinyLM"]().state_dict(), ckpt)
    specs = ["--model", f"{code_file}:lm", "--data", f"{late}:late_oov", "--batch-size", "4"]
    code, _, err = run(capsys, "analyze", ckpt, *specs, "--num-samples", "24", "--top-k", "1")
    assert code == 2
    assert one_sentence(err) == (
        "error: the data does not fit the model analysing lm.pt: index out of range in self "
        "(its integer inputs reach 9, and the model's embedding tables hold 6 rows)."
    )
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *specs, "--epochs", "1", "--out", out, "-q")
    assert code == 2
    said = one_sentence(err)
    assert said.startswith("error: the data does not fit the model after "), said
    assert said.endswith(
        "(epoch 1): index out of range in self (its integer inputs reach 9, and the model's "
        "embedding tables hold 6 rows); stopped."
    ), said


def test_a_guarded_lookup_out_of_range_is_the_cpus_error_before_the_kernel(monkeypatch):
    """Off the CPU (where analyze and train guard the model) the kernel meets a token id past
    the table with a device-side assert: a RuntimeError no handler took, the CUDA context lost.
    The guard raises the CPU's IndexError first; here on the CPU, with the kernel watched."""
    model = torch.nn.Sequential(torch.nn.Embedding(6, 2), torch.nn.Flatten(), torch.nn.Linear(6, 2))
    guard_embedding_lookups(model)
    lookups = []
    embedding = F.embedding
    monkeypatch.setattr(
        F, "embedding", lambda ids, *a, **k: lookups.append(ids) or embedding(ids, *a, **k)
    )
    model(torch.tensor([[1, 2, 5]]))  # in range: the kernel looks them up
    assert len(lookups) == 1
    for bad in (6, -1):
        with pytest.raises(IndexError, match="index out of range in self"):
            model(torch.tensor([[1, bad, 2]]))
    assert len(lookups) == 1  # never reached


def test_the_guard_leaves_lookups_it_cannot_see_to_the_kernel():
    """A subclass with a forward of its own (BART's learned positions take the token ids for
    their shape), a table grown by a new weight, and ids batched by vmap: none refused."""

    class Positions(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(torch.arange(ids.shape[1]).expand(len(ids), -1))

    positions, grown, plain = Positions(4, 2), torch.nn.Embedding(6, 2), torch.nn.Embedding(6, 2)
    grown.weight = torch.nn.Parameter(torch.randn(10, 2))
    for m in (positions, grown, plain):
        guard_embedding_lookups(m)
    assert positions(torch.tensor([[50, 60, 70]])).shape == (1, 3, 2)
    assert grown(torch.tensor([[8]])).shape == (1, 1, 2)
    assert torch.func.vmap(plain)(torch.tensor([[1, 5], [0, 2]])).shape == (2, 2, 2)


@pytest.mark.parametrize("loss", ["torch.nn:CrossEntropyLoss", "hand"])
def test_a_users_loss_takes_padded_labels_too(capsys, tmp_path, code_file, loss):
    """Only the built-in ce skipped -100: torch's own CrossEntropyLoss was refused ("label -100
    is out of range")."""
    (tmp_path / "hand.py").write_text(
        "def hand(out, y):\n    keep = y != -100\n"
        "    return -out.log_softmax(-1)[keep].gather(1, y[keep][:, None]).mean()\n"
    )
    spec = f"{tmp_path / 'hand.py'}:hand" if loss == "hand" else loss
    ckpt = tmp_path / "lm.pt"
    torch.save(NS["TinyLM"]().state_dict(), ckpt)
    code, out, err = run(
        capsys, "analyze", ckpt, "--model", f"{code_file}:lm", "--data", f"{code_file}:text",
        "--loss", spec, "--top-k", "1", "--json",
    )  # fmt: skip
    if loss == "hand":
        assert code == 0, err
        assert json.loads(out)["eigen"]["converged"] == [True]
    else:  # torch's layout: classes second; the model gives them last, which it says
        assert code == 2 and "the loss fails on the model's outputs" in err


def test_the_shipped_language_model_example_trains_and_is_analysed_exactly(capsys, tmp_path):
    """checkpoints_example/tiny_lm.py, as its docstring runs it: a causal transformer on padded
    text from a Hugging Face-style dataset; lambda_1 against the dense Hessian of the mean
    next-token cross-entropy over all labelled tokens, written by hand."""
    example = Path(__file__).parents[1] / "checkpoints_example" / "tiny_lm.py"
    specs = ["--model", f"{example}:make", "--data", f"{example}:text"]
    out = tmp_path / "lm"
    code, _, err = run(capsys, "train", *specs, "--max-steps", "4", "--out", out, "-q")
    assert code == 0, err
    final = out / "checkpoints" / "step0000004.pt"
    # Two batches of other token counts; 32 texts, not more, keep the dense oracle cheap.
    code, stdout, err = run(
        capsys, "analyze", final, *specs, "--batch-size", "16", "--num-samples", "32",
        "--top-k", "2", "--dtype", "float64", "--json",
    )  # fmt: skip
    assert code == 0, err
    eigen = json.loads(stdout)["eigen"]
    model = build_model(f"{example}:make", input_shape=None, num_classes=16)
    model.load_state_dict(torch.load(final, weights_only=True)["model"])
    data = load_data(f"{example}:text")
    whole = analysis_batches(data.train, batch_size=32, num_samples=32, dtype=torch.float64)
    H = dense_hessian(model.double(), by_hand, whole)
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.allclose(torch.tensor(eigen["eigenvalues"], dtype=torch.float64), top, rtol=1e-6)


def test_unlabelled_samples_weigh_nothing_whatever_the_batch_size(capsys, tmp_path):
    """Labels of -100 per sample: the built-in cross-entropy averages each batch over its
    labelled samples, and batches weighted by samples moved lambda_1 by 8% with --batch-size."""
    (tmp_path / "some.py").write_text(
        "import torch\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)\n"
        "    y[torch.tensor([0, 3, 4, 9, 10, 11, 20])] = -100\n"
        "    return torch.utils.data.TensorDataset(x, y)\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))\n"
    )
    ckpt = tmp_path / "net.pt"
    ns: dict = {}
    exec(compile((tmp_path / "some.py").read_text(), "some", "exec"), ns)
    torch.save(ns["net"]().state_dict(), ckpt)
    found = []
    for size in (30, 7):
        code, out, err = run(
            capsys, "analyze", ckpt, "--model", f"{tmp_path / 'some.py'}:net", "--data",
            f"{tmp_path / 'some.py'}:data", "--num-samples", "30", "--batch-size", size,
            "--top-k", "1", "--dtype", "float64", "--json",
        )  # fmt: skip
        assert code == 0, err
        report = json.loads(out)
        assert report["provenance"]["batch_weight"] == "labels"
        found.append((report["loss"], report["eigen"]["eigenvalues"][0]))
    assert found[0] == pytest.approx(found[1], rel=1e-10)


def test_held_out_loss_and_lambda_max_do_not_depend_on_how_the_batch_is_split():
    """train's tracker splits one held-out batch over the ranks and weighed the shares by
    samples (lambda_max moved with the number of ranks); its test loss likewise."""
    from eigensam.tracking import LambdaMaxTracker

    model = NS["TinyLM"]().double()
    data = NS["Text"]()
    whole = [(data_inputs(data, slice(0, 24)), data.labels[:24])]
    shares = [(data_inputs(data, slice(a, b)), data.labels[a:b]) for a, b in [(0, 5), (5, 24)]]
    values = []
    for batches in (whole, shares):
        tracker = LambdaMaxTracker(
            batches, seed=0, device=torch.device("cpu"), batch_weight=labelled_count
        )
        values.append(tracker.measure(model, cross_entropy).lambda_max)
        values.append(
            evaluate(
                model,
                batches,
                cross_entropy,
                torch.device("cpu"),
                classify=True,
                batch_weight=labelled_count,
            )[0]
        )
    assert values[:2] == pytest.approx(values[2:], rel=1e-8)


def test_a_batch_with_nothing_to_average_is_refused_by_the_operator():
    """Its cross-entropy is 0/0: NaN made every loss, gradient and product NaN."""
    model = NS["TinyLM"]().double()
    data = NS["Text"]()
    labels = data.labels[:4].clone().fill_(-100)
    batches = [
        (data_inputs(data, slice(0, 4)), data.labels[:4]),
        (data_inputs(data, slice(0, 4)), labels),
    ]
    with pytest.raises(UserError, match="a batch holds nothing its loss averages over"):
        HessianOperator(model, cross_entropy, batches, batch_weight=labelled_count)


def test_eigensam_trains_where_the_held_out_batch_begins_with_unlabelled_samples(
    capsys, tmp_path, code_file
):
    """The check that autograd can differentiate the model twice took the held-out batch's
    first two samples, whose loss is 0/0 where they hold no label: train refused good data
    with "The loss is not finite (NaN or inf) on the analysed data"."""
    padded = tmp_path / "padded.py"
    padded.write_text(
        CODE + "\ndef first_unlabelled():\n    d = Text()\n    d.labels[:2] = -100\n    return d\n"
    )
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", f"{code_file}:lm", "--data", f"{padded}:first_unlabelled",
        "--optimizer", "eigensam", "--batch-size", "8", "--max-steps", "2", "--out", out, "-q",
    )  # fmt: skip
    assert code == 0, err


def test_a_test_batch_of_padding_only_weighs_nothing_in_the_test_loss(capsys, tmp_path, code_file):
    """The test loss is a mean over the split's labels, so a test batch holding none adds
    nothing to it: train refused the whole run at start-up ("a batch of the data holds no label
    but -100") for where the split's batches ended, and evaluate's mean took its 0/0."""
    split = tmp_path / "split.py"
    split.write_text(
        CODE + "\ndef split():\n    train, test = Text(48), Text(24)\n"
        "    test.labels[12:] = -100\n    return train, test\n"
    )
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", f"{code_file}:lm", "--data", f"{split}:split",
        "--batch-size", "12", "--epochs", "1", "--out", out, "-q",
    )  # fmt: skip
    assert code == 0, err
    model = NS["TinyLM"]()
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "final.pt").state_dict)
    test = NS["Text"](24)
    with torch.no_grad():  # the first 12 samples hold all the labels
        expected = by_hand(model(test.ids[:12], test.mask[:12]), test.labels[:12])
    test_loss = read_metrics(out / "metrics.h5")["epochs"]["test_loss"][0]
    assert test_loss == pytest.approx(float(expected), rel=1e-5)
    # The held-out batch is measured alone: it must hold labels, and the refusal names it.
    first = tmp_path / "first.py"
    first.write_text(split.read_text().replace("test.labels[12:]", "test.labels[:12]"))
    code, _, err = run(
        capsys, "train", "--model", f"{code_file}:lm", "--data", f"{first}:split",
        "--batch-size", "12", "--epochs", "1", "--out", tmp_path / "first", "-q",
    )  # fmt: skip
    assert code == 2
    assert "the held-out batch (the first 12 samples of the test split, whose loss" in one_sentence(
        err, strict=True
    )


@pytest.mark.parametrize("command", ["analyze", "train"])
def test_labels_that_are_the_input_ids_unshifted_are_one_sentence(
    capsys, tmp_path, code_file, command
):
    """A Hugging Face causal LM's dataset holds labels = input_ids (the model shifts them in
    its forward); the built-in ce compares each position's logits with its own label, so it
    analysed and trained the copying of the current token, unsaid."""
    unshifted = tmp_path / "unshifted.py"
    unshifted.write_text(
        CODE + "\ndef copies():\n    d = Text()\n"
        "    d.labels = torch.where(d.mask.bool(), d.ids, torch.full_like(d.ids, -100))\n"
        "    return d\n"
    )
    specs = ["--model", f"{code_file}:lm", "--data", f"{unshifted}:copies"]
    if command == "analyze":
        ckpt = tmp_path / "lm.pt"
        torch.save(NS["TinyLM"]().state_dict(), ckpt)
        code, _, err = run(capsys, "analyze", ckpt, *specs, "--top-k", "1")
    else:
        code, _, err = run(capsys, "train", *specs, "--out", tmp_path / "run", "-q")
    assert code == 2
    assert "the labels are the input_ids at every labelled token" in one_sentence(err), err
    # A loss of the user's own may shift them itself.
    (tmp_path / "shift.py").write_text(
        "import torch.nn.functional as F\n"
        "def shifted(out, y):\n"
        "    return F.cross_entropy(out[:, :-1].transpose(1, 2), y[:, 1:])\n"
    )
    if command == "analyze":
        code, _, err = run(
            capsys, "analyze", ckpt, *specs, "--loss", f"{tmp_path / 'shift.py'}:shifted",
            "--top-k", "1",
        )  # fmt: skip
        assert code == 0, err
