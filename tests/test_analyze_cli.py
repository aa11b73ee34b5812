"""`hessian-cli analyze` end to end, through the real entry point (`main`), on tiny models."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import one_sentence, run
from safetensors.torch import save_file

from hessian_cli.analysis import AnalyzeRequest, SeriesStopped, analyze_target
from hessian_cli.engine import distributed
from hessian_cli.engine.dense import dense_eigh, dense_hessian
from hessian_cli.engine.params import select_parameters
from hessian_cli.errors import Terminated, UserError
from hessian_cli.specs import build_model, load_checkpoint, load_data, save_checkpoint
from hessian_cli.specs.checkpoints import DEEPSPEED_WEIGHTS
from hessian_cli.specs.models import BUILTIN_DEFAULTS
from hessian_cli.storage import read_analyses
from hessian_cli.storage.hdf5 import group_names

FIXTURE = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pyhessian_resnet20_cifar10.pkl"
)
MLP_KW = {"hidden": [12]}


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory) -> Path:
    """A self-describing checkpoint (as `train` writes them) of a small digits MLP."""
    path = tmp_path_factory.mktemp("ck") / "digits_mlp.pt"
    data = load_data("digits")
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs=MLP_KW)
    save_checkpoint(
        path,
        state_dict=model.state_dict(),
        metadata={
            "model": "mlp",
            "model_kwargs": json.dumps(MLP_KW),
            "data": "digits",
            "loss": "ce",
            "step": 7,
            "epoch": 1,
        },
    )
    return path


def test_self_describing_checkpoint_needs_no_flags(capsys, digits_mlp):
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "3", "--json")
    assert code == 0
    # Naming the recorded model again keeps its recorded arguments (MLP_KW is not the default).
    again = run(capsys, "analyze", digits_mlp, "--top-k", "3", "--json", "--model", "mlp")
    values = json.loads(out)["eigen"]["eigenvalues"]
    assert again[0] == 0 and json.loads(again[1])["eigen"]["eigenvalues"] == values
    report = json.loads(out)
    assert report["provenance"]["model"] == "mlp" and report["provenance"]["step"] == 7
    assert report["provenance"]["batch_weight"] == "labels"  # as many as samples: none is -100
    assert "data_root" not in report["provenance"]  # none given, none recorded
    assert len(report["eigen"]["eigenvalues"]) == 3 and all(report["eigen"]["converged"])
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "2")
    assert code == 0 and "Eigenvalues" in out and "converged" in out


def test_every_option_of_fixed_words_takes_them_in_any_case(capsys, digits_mlp):
    """--which Largest, --loss CE, --dtype Float64 and --device CPU were refused where train's
    --optimizer SGD was taken."""
    args = ("--which", "Largest", "--loss", "CE", "--bn", "Eval", "--dtype", "Float64")
    more = ("--precision", "Full", "--criterion", "Residual", "--device", "CPU")
    code, out, err = run(capsys, "analyze", digits_mlp, "--top-k", "1", *args, *more, "--json")
    assert code == 0, err
    said = json.loads(out)["provenance"]
    assert [said[k] for k in ("loss", "bn", "dtype", "precision")] == [
        "ce",
        "eval",
        "float64",
        "full",
    ]


def test_what_user_code_prints_stays_out_of_the_json(capsys, tmp_path, digits_mlp):
    """A model factory that printed put its line on stdout before the JSON: not JSON."""
    (tmp_path / "chatty.py").write_text(
        "from hessian_cli.specs import build_model\n\n\ndef net():\n"
        "    print('building the model')\n"
        f"    return build_model('mlp', input_shape=(1, 8, 8), num_classes=10, kwargs={MLP_KW})\n"
    )
    model = f"{tmp_path / 'chatty.py'}:net"
    code, out, err = run(capsys, "analyze", digits_mlp, "--model", model, "--top-k", "1", "--json")
    assert code == 0 and "building the model" in err
    assert json.loads(out)["provenance"]["model"] == model


def test_the_checkpoint_path_recorded_is_absolute(capsys, digits_mlp, monkeypatch):
    """A relative path, recorded as given, pointed nowhere once read from another directory."""
    monkeypatch.chdir(digits_mlp.parent)
    code, out, _ = run(capsys, "analyze", digits_mlp.name, "--top-k", "1", "--json")
    assert code == 0
    assert json.loads(out)["provenance"]["checkpoint"] == str(digits_mlp.absolute())


def test_the_data_and_code_files_recorded_are_absolute(capsys, tmp_path, digits_mlp, monkeypatch):
    """--data batch.npz was recorded as given, which names no file once read elsewhere."""
    x, y = load_data("digits").train.tensors
    np.savez(tmp_path / "batch.npz", x=x[:32].numpy(), y=y[:32].numpy())
    (tmp_path / "net.py").write_text(
        "from hessian_cli.specs import build_model\n\n\ndef net():\n"
        f"    return build_model('mlp', input_shape=(1, 8, 8), num_classes=10, kwargs={MLP_KW})\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ("--data", "batch.npz", "--model", "net.py:net", "--top-k", "1", "--json")
    code, out, err = run(capsys, "analyze", digits_mlp, *args)
    assert code == 0, err
    provenance = json.loads(out)["provenance"]
    assert provenance["data"] == str(tmp_path / "batch.npz")
    assert provenance["model"] == f"{tmp_path / 'net.py'}:net"


@pytest.mark.parametrize(
    "method, top_k, samples",
    # The eigenpairs computed begin Hutch++'s sketch: 60 - 2 * (20 - 3) samples.
    [("hutch++", 0, 20), ("hutchinson", 0, 60), ("hutch++", 3, 26), ("hutchinson", 3, 60)],
)
def test_trace_method_is_chosen_and_within_its_error_of_the_dense_trace(
    capsys, digits_mlp, method, top_k, samples
):
    args = ("--top-k", top_k, "--trace", "--trace-probes", 60, "--trace-method", method, "--json")
    code, out, err = run(capsys, "analyze", digits_mlp, *args, "--dtype", "float64")
    assert code == 0, err
    t = json.loads(out)["trace"]
    assert t["method"] == method and t["num_samples"] == samples
    assert (t["sketch_trace"] == 0) == (method == "hutchinson")
    assert t["known_eigenpairs"] == (top_k if method == "hutch++" else 0)
    data = load_data("digits")
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs=MLP_KW)
    model.load_state_dict(torch.load(digits_mlp, weights_only=True)["model"])
    xs, ys = data.train.tensors[0][:128].double(), data.train.tensors[1][:128]
    model = model.double()
    exact = float(
        torch.trace(dense_hessian(model, F.cross_entropy, [(xs, ys)], select_parameters(model)))
    )
    assert abs(t["estimate"] - exact) <= 4 * t["stderr"]


def test_a_float64_checkpoint_keeps_its_weights_under_dtype_float64(capsys, tmp_path):
    """The model was built in float32 and the weights loaded into it before --dtype float64 cast
    it: a float64 checkpoint was rounded to float32 (its loss off by about 1e-8 relative)."""
    data = load_data("digits")
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs=MLP_KW)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():  # weights no float32 holds
            p.add_(torch.randn_like(p) * 1e-3)
    meta = {"model": "mlp", "model_kwargs": json.dumps(MLP_KW), "data": "digits", "loss": "ce"}
    save_checkpoint(tmp_path / "f64.pt", state_dict=model.state_dict(), metadata=meta)
    args = ("--top-k", 0, "--batch-size", 64, "--dtype", "float64", "--json")
    code, out, err = run(capsys, "analyze", tmp_path / "f64.pt", *args)
    assert code == 0, err
    xs, ys = data.train.tensors[0][:64].double(), data.train.tensors[1][:64]
    with torch.no_grad():
        exact = float(F.cross_entropy(model(xs), ys))
    assert abs(json.loads(out)["loss"] - exact) <= 1e-13 * abs(exact)


def test_a_recorded_user_model_named_relatively_keeps_its_arguments(capsys, tmp_path, monkeypatch):
    """train records user code by its absolute path; naming it as it was trained is the same."""
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make(width=4, **kwargs):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width),\n"
        "                               torch.nn.Tanh(), torch.nn.Linear(width, 10))\n"
    )
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.Tanh(), torch.nn.Linear(5, 10)
    )
    meta = {"model": f"{tmp_path}/mymodel.py:make", "model_kwargs": '{"width": 5}'}
    save_checkpoint(
        tmp_path / "c.pt", state_dict=model.state_dict(), metadata=meta | {"data": "digits"}
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "analyze", "c.pt", "--model", "mymodel.py:make", "--top-k", "1")
    assert code == 0, err


def test_a_guard_of_pairs_beyond_top_k_is_reported(capsys, digits_mlp):
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "20", "--json")
    eigen = json.loads(out)["eigen"]
    assert code == 0 and eigen["guard"] == 2 and len(eigen["eigenvalues"]) == 20
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "20")
    assert "and 2 more pairs as a guard against skipping one" in " ".join(out.split())
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "20", "--guard", "0", "--json")
    assert code == 0 and json.loads(out)["eigen"]["guard"] == 0


def test_the_residuals_rounding_floor_is_recorded(capsys, digits_mlp, tmp_path):
    """In float32 at --tol 2e-7 the residuals (5e-8) are below tol and every pair is NOT
    converged: the floor the test adds (1.8e-7) was in no output, so no reader of the file
    could tell why."""
    out_file = tmp_path / "s.h5"
    code, out, _ = run(
        capsys, "analyze", digits_mlp, "--top-k", "3", "--tol", "2e-7", "--json", "--out", out_file
    )
    eigen = json.loads(out)["eigen"]
    assert code == 3 and max(eigen["residuals"]) < eigen["tol"] and not any(eigen["converged"])
    assert eigen["floor"] is not None
    assert all(r + eigen["floor"] > eigen["tol"] for r in eigen["residuals"])
    code, out, _ = run(capsys, "show", out_file, "--json")
    assert code == 0 and json.loads(out)[0]["eigen"]["floor"] == eigen["floor"]


def test_the_check_for_a_skipped_eigenvalue_is_reported_and_can_be_left_out(
    capsys, digits_mlp, tmp_path
):
    out_file = tmp_path / "s.h5"
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "3", "--json", "--out", out_file)
    eigen = json.loads(out)["eigen"]
    assert code == 0 and eigen["check_hvps"] == 6 and eigen["skipped_found"] == 0
    code, out, _ = run(
        capsys, "analyze", digits_mlp, "--top-k", "3", "--json", "--check-steps", "0"
    )
    unchecked = json.loads(out)["eigen"]
    assert code == 0 and unchecked["check_hvps"] == 0
    assert eigen["hvps"] == unchecked["hvps"] + 6
    code, out, _ = run(capsys, "show", out_file)
    assert (
        "6 of the HVPs looked outside the pairs for a skipped eigenvalue, found none"
        in " ".join(out.split())
    )
    assert "--check-steps must be at least 0" in _bad(
        capsys, "analyze", digits_mlp, "--check-steps", "-1"
    )


def test_a_budget_that_left_no_room_for_the_check_says_so(capsys, digits_mlp, tmp_path):
    """Pairs converged within --max-hvps with too few products left to look for a skipped
    eigenvalue read as checked ones: check_hvps 0 was the only sign."""
    out_file = tmp_path / "s.h5"
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "3", "--json", "--out", out_file)
    looked = json.loads(out)["eigen"]
    assert code == 0 and looked["check_hvps"] == 6 and looked["unchecked"] is False
    budget = str(looked["hvps"] - 4)  # the solve's own products and 2 more: the look takes 6
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "3", "--max-hvps", budget)
    said = "not looked outside the pairs for a skipped eigenvalue: too few of the budget's HVPs"
    assert code == 0 and said in " ".join(out.split())
    argv = ("analyze", digits_mlp, "--top-k", "3", "--max-hvps", budget, "--out", out_file)
    code, out, _ = run(capsys, *argv, "--json")
    eigen = json.loads(out)["eigen"]
    assert code == 0 and all(eigen["converged"]) and eigen["check_hvps"] == 0
    assert eigen["unchecked"] is True
    code, out, _ = run(capsys, "show", out_file, "--json")
    assert code == 0 and [d["eigen"]["unchecked"] for d in json.loads(out)] == [False, True]
    code, out, _ = run(capsys, "show", out_file)  # two analyses of one checkpoint: a series
    note = "not looked outside the pairs for a skipped eigenvalue (1 of the 2 rows)"
    assert code == 0 and note in " ".join(out.split())


def test_a_bare_state_dict_asks_for_model_and_data_at_once(capsys, tmp_path):
    """A user's first command on a plain state dict asked for --model, and once that was
    given, for --data: two tries where one sentence could name both."""
    ckpt = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(64, 10).state_dict(), ckpt)
    code, _, err = run(capsys, "analyze", ckpt)
    assert code == 2
    assert "pass --model and --data" in one_sentence(err)
    code, _, err = run(capsys, "analyze", ckpt, "--model", "mlp")
    assert code == 2 and "pass --data." in one_sentence(err)
    code, _, err = run(capsys, "analyze", ckpt, "--data", "digits")
    assert code == 2 and "pass --model." in one_sentence(err)


def test_a_trusted_whole_pickled_model_is_the_model_analysed(capsys, tmp_path):
    """torch.save(model) with --trust-checkpoint and no --model: the pickled module is the model
    (--model was asked for), cast to --dtype, in eval mode though saved training (dropout off,
    BatchNorm's running statistics unless --bn train), recorded by its class; in a series each
    file's own; it takes no --model-kwargs; untrusted, it is refused naming --trust-checkpoint."""
    data = load_data("digits")
    xs = torch.stack([data.train[i][0] for i in range(200)])
    ys = torch.tensor([int(data.train[i][1]) for i in range(200)])
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
        torch.nn.Dropout(0.5), torch.nn.Linear(5, 10),
    )  # fmt: skip
    model(xs)  # running statistics of its own; saved in train mode
    batches = [(xs[i : i + 50].double(), ys[i : i + 50]) for i in range(0, 200, 50)]

    def top(bn: str = "eval") -> np.ndarray:
        H = dense_hessian(copy.deepcopy(model).double(), F.cross_entropy, batches, bn=bn)
        return dense_eigh(H)[0][:3].numpy()

    ckpt = tmp_path / "m.pt"
    torch.save(model, ckpt)
    args = ("--data", "digits", "--num-samples", "200", "--batch-size", "50", "--dtype", "float64")
    args += ("--top-k", "3", "--tol", "1e-9", "--json")
    code, _, err = run(capsys, "analyze", ckpt, *args)
    assert code == 2 and "--trust-checkpoint" in one_sentence(err)
    for bn in ("eval", "train"):
        code, out, _ = run(capsys, "analyze", ckpt, "--trust-checkpoint", "--bn", bn, *args)
        assert code == 0
        r = json.loads(out)
        np.testing.assert_allclose(r["eigen"]["eigenvalues"], top(bn), rtol=1e-7)
        assert r["provenance"]["model"] == "pickled torch.nn.modules.container.Sequential"
        assert r["provenance"].get("model_kwargs") is None
    (tmp_path / "net.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(64, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), "
        "torch.nn.Dropout(0.5), torch.nn.Linear(5, 10))\n"
    )
    given = f"{tmp_path}/net.py:make"  # --model wins: the pickled weights go into its model
    code, out, _ = run(capsys, "analyze", ckpt, "--trust-checkpoint", "--model", given, *args)
    assert code == 0
    r = json.loads(out)
    np.testing.assert_allclose(r["eigen"]["eigenvalues"], top(), rtol=1e-7)
    assert r["provenance"]["model"] == given
    code, _, err = run(capsys, "analyze", ckpt, "--trust-checkpoint", "--model-kwargs", "{}", *args)
    assert code == 2 and "--model-kwargs has no effect" in one_sentence(err)
    (tmp_path / "series").mkdir()
    expected = []
    for name, step in (("b", 10), ("a", 20)):  # the steps order the series
        torch.save({"model": model, "step": step}, tmp_path / "series" / f"{name}.pt")
        expected.append(top())
        with torch.no_grad():
            model[-1].weight.mul_(2)
    code, out, _ = run(capsys, "analyze", tmp_path / "series", "--trust-checkpoint", *args)
    assert code == 0
    for r, values in zip(json.loads(out), expected, strict=True):
        np.testing.assert_allclose(r["eigen"]["eigenvalues"], values, rtol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_trusted_torchscript_archive_is_the_model_analysed(capsys, tmp_path):
    """torch.jit.save's archive with --trust-checkpoint and no --model: the script is the model
    (--model was asked for, since double backward through a script could be wrong), recorded
    by the script's class; against the dense Hessian of the eager model, with the layers whose
    scripted double backward was wrong from a script's second run (BatchNorm, Tanh, Dropout)."""
    data = load_data("digits")
    xs = torch.stack([data.train[i][0] for i in range(100)]).double()
    ys = torch.tensor([int(data.train[i][1]) for i in range(100)])
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
        torch.nn.Dropout(0.5), torch.nn.Linear(5, 10),
    ).double()  # fmt: skip
    model(xs)  # running statistics of its own
    model.eval()
    batches = [(xs[i : i + 50], ys[i : i + 50]) for i in range(0, 100, 50)]
    expected = dense_eigh(dense_hessian(copy.deepcopy(model), F.cross_entropy, batches))[0][:3]
    ckpt = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(ckpt))
    args = ("--data", "digits", "--num-samples", "100", "--batch-size", "50", "--dtype", "float64")
    args += ("--top-k", "3", "--tol", "1e-9", "--json")
    code, out, err = run(capsys, "analyze", ckpt, "--trust-checkpoint", *args)
    assert code == 0, err
    r = json.loads(out)
    np.testing.assert_allclose(r["eigen"]["eigenvalues"], expected.numpy(), rtol=1e-7)
    assert r["provenance"]["model"] == "torchscript Sequential"


def test_alignment_scores_match_dense_hessian(capsys, tmp_path):
    """Every alignment score from the CLI against values computed from the dense Hessian."""
    data = load_data("digits")
    torch.manual_seed(1)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs={"hidden": [6]})
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    code, out, _ = run(
        capsys,
        "analyze",
        ckpt,
        "--model",
        "mlp",
        "--model-kwargs",
        '{"hidden": [6]}',
        "--data",
        "digits",
        "--num-samples",
        "200",
        "--batch-size",
        "50",
        "--dtype",
        "float64",
        "--top-k",
        "3",
        "--tol",
        "1e-9",
        "--alignment",
        "--rho",
        "0.1",
        "--alpha",
        "0.3",
        "--minibatches",
        "4",
        "--json",
    )
    assert code == 0
    r = json.loads(out)
    m = model.double()
    xs = torch.stack([data.train[i][0] for i in range(200)]).double()
    ys = torch.tensor([int(data.train[i][1]) for i in range(200)])
    space = select_parameters(m)
    H = dense_hessian(m, F.cross_entropy, [(xs, ys)], space)
    values, vectors = dense_eigh(H)
    loss = F.cross_entropy(m(xs), ys)
    g = space.flatten(torch.autograd.grad(loss, space.tensors))
    gh = g / g.norm()
    V = vectors[:3]
    np.testing.assert_allclose(r["eigen"]["eigenvalues"], values[:3].numpy(), rtol=1e-7)
    a = r["alignment"]
    np.testing.assert_allclose(a["alignment"], (V @ gh).abs().numpy(), rtol=1e-6, atol=1e-9)
    assert a["subspace_alignment"] == pytest.approx(float((V @ gh).norm()), rel=1e-6)
    assert a["curvature_ratio"] == pytest.approx(float(gh @ H @ gh / values[0]), rel=1e-8)
    v1 = V[0]
    d = gh + 0.3 * torch.sign(g @ v1) * (v1 - (gh @ v1) * gh)
    assert a["eigensam_alignment"] == pytest.approx(float((d / d.norm() @ v1).abs()), rel=1e-6)
    mb = []
    for i in range(4):  # minibatch gradients of the first four batches of 50
        batch = slice(50 * i, 50 * i + 50)
        gb = space.flatten(
            torch.autograd.grad(F.cross_entropy(m(xs[batch]), ys[batch]), space.tensors)
        )
        mb.append((V @ gb).abs() / gb.norm())
    np.testing.assert_allclose(
        a["minibatch"]["values"], torch.stack(mb).numpy(), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(a["minibatch"]["mean"], torch.stack(mb).mean(0).numpy(), rtol=1e-6)
    space.copy_(space.values() + 0.1 * gh)  # L(w + rho g_hat) - L(w), with plain arithmetic
    sharp = F.cross_entropy(m(xs), ys).item() - loss.item()
    assert a["sam_sharpness"] == pytest.approx(sharp, rel=1e-6)


def test_an_exact_fit_has_eigenpairs_and_undefined_alignment_scores(capsys, tmp_path):
    """At an exact fit the gradient is zero: the eigenpairs are still well defined and shown,
    the scores of g_hat are NaN (null), and a series goes on (it used to stop with an error)."""
    (tmp_path / "lin.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(3, 1)\n"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3))
    net = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        y = net(torch.from_numpy(x)).numpy()
    np.savez(tmp_path / "fit.npz", x=x, y=y)
    (tmp_path / "series").mkdir()
    torch.save(net.state_dict(), tmp_path / "series" / "a_fit.pt")
    torch.save(torch.nn.Linear(3, 1).double().state_dict(), tmp_path / "series" / "b_other.pt")
    code, out, err = run(
        capsys,
        "analyze",
        tmp_path / "series",
        "--model",
        f"{tmp_path}/lin.py:make",
        "--data",
        tmp_path / "fit.npz",
        "--dtype",
        "float64",
        "--top-k",
        "2",
        "--alignment",
        "--minibatches",
        "2",
        "--batch-size",
        "16",
        "--json",
        # The exact fit is of the CPU's arithmetic: on a GPU the model's outputs need not equal
        # the targets computed here to the last bit, and the gradient is then not exactly 0.
        "--device",
        "cpu",
    )
    assert code == 0, err
    r, other = json.loads(out)
    X = np.c_[x[:16], np.ones(16)]  # the Hessian's one batch of 16
    H = 2 * X.T @ X / 16  # mse: the mean of squares
    np.testing.assert_allclose(r["eigen"]["eigenvalues"], np.linalg.eigvalsh(H)[::-1][:2])
    a = r["alignment"]
    assert a["grad_norm"] == 0 and a["alignment"] == [None, None]
    assert a["curvature_ratio"] is None and a["eigensam_alignment"] is None
    assert a["minibatch"]["values"] == [[None, None], [None, None]]
    assert other["alignment"]["grad_norm"] > 0 and None not in other["alignment"]["alignment"]


TOKEN_MODEL = """
import torch
from torch import nn

class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)).mean(1))

def make():
    torch.manual_seed(0)
    return Bag()
"""


def test_a_token_model_is_analysed_and_trained_on_integer_inputs(capsys, tmp_path):
    """Token ids reach the embedding as integers (a float cast would fail there); eigenvalues
    against the dense Hessian, and a train run on the same file."""
    (tmp_path / "bag.py").write_text(TOKEN_MODEL)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, (40, 5)), rng.integers(0, 2, 40)
    np.savez(tmp_path / "tokens.npz", x=x, y=y)
    spec = f"{tmp_path}/bag.py:make"
    sys.path.insert(0, str(tmp_path))
    try:
        from bag import make  # the same model the CLI builds
    finally:
        sys.path.remove(str(tmp_path))
    model = make()
    torch.save(model.state_dict(), tmp_path / "bag.pt")
    args = ("--model", spec, "--data", tmp_path / "tokens.npz", "--batch-size", 40)
    code, out, err = run(
        capsys, "analyze", tmp_path / "bag.pt", *args, "-k", 3, "--dtype", "float64", "--json"
    )
    assert code == 0, err
    m = model.double()
    space = select_parameters(m)
    H = dense_hessian(m, F.cross_entropy, [(torch.from_numpy(x), torch.from_numpy(y))], space)
    values, _ = dense_eigh(H)
    np.testing.assert_allclose(json.loads(out)["eigen"]["eigenvalues"], values[:3], rtol=1e-6)
    code, _, err = run(capsys, "train", *args, "--epochs", 2, "--out", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()


@pytest.mark.parametrize("samples", [None, 100])  # 100: batches of 40, 40 and a cut-short 20
def test_minibatch_alignment_reads_more_batches_than_the_hessian(capsys, tmp_path, samples):
    """By default the Hessian is one batch's; the minibatch statistics still take the data's
    first --minibatches batches (of the batch size), as SAM's minibatch gradients would be."""
    data = load_data("digits")
    torch.manual_seed(2)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs={"hidden": [6]})
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    args = ["analyze", ckpt, "--model", "mlp", "--model-kwargs", '{"hidden": [6]}']
    args += ["--data", "digits", "--batch-size", "40", "--dtype", "float64"]
    args += ["--top-k", "2", "--tol", "1e-10"]
    if samples:
        args += ["--num-samples", str(samples)]
    code, out, _ = run(capsys, *args, "--alignment", "--minibatches", "3", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["provenance"]["num_samples"] == (samples or 40)  # by default one batch
    m = model.double()
    space = select_parameters(m)
    xs = torch.stack([data.train[i][0] for i in range(120)]).double()
    ys = torch.tensor([int(data.train[i][1]) for i in range(120)])
    n = samples or 40
    hessian = dense_hessian(m, F.cross_entropy, [(xs[:n], ys[:n])], space)
    _, vectors = dense_eigh(hessian)
    V = vectors[:2]
    expected = []
    for i in range(3):
        batch = slice(40 * i, 40 * i + 40)
        gb = space.flatten(
            torch.autograd.grad(F.cross_entropy(m(xs[batch]), ys[batch]), space.tensors)
        )
        expected.append((V @ gb).abs() / gb.norm())
    np.testing.assert_allclose(
        r["alignment"]["minibatch"]["values"], torch.stack(expected).numpy(), rtol=1e-6
    )


def test_minibatches_beyond_the_data_are_said(capsys, digits_mlp):
    """The digits' 1,300 training samples are 6 batches of 256: --minibatches 100 took those 6,
    which only the table's caption said (--json: nothing)."""
    args = ["analyze", digits_mlp, "--top-k", "1", "--alignment", "--batch-size", "256", "--json"]
    code, out, err = run(capsys, *args, "--minibatches", "100")
    assert code == 0
    assert len(json.loads(out)["alignment"]["minibatch"]["values"]) == 6
    assert "--minibatches 100: the data holds only 6 batches" in " ".join(err.split())
    code, _, err = run(capsys, *args)  # the default, 8, not given: the caption's to say
    assert code == 0 and "--minibatches" not in err
    one = [*args[:-2], "2000", "--minibatches", "2"]  # all 1,300 in one: "only 1 batches"
    code, _, err = run(capsys, *one)
    assert code == 0 and "the data holds only 1 batch of this" in " ".join(err.split()), err


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    from hessian_cli.cli.app import state

    monkeypatch.setattr(state, "debug", False)


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared/fixtures is absent (a user's clone)")
def test_real_resnet20_checkpoint_just_works(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "analyze",
        FIXTURE,
        "--model",
        "resnet20",
        "--data",
        "synthetic:3x32x32:10:16",
        "--top-k",
        "1",
        "--tol",
        "1e-3",
        "--json",
    )
    assert code == 0
    r = json.loads(out)
    assert (
        r["provenance"]["num_params"] == 272_474
        and r["provenance"]["checkpoint_format"] == "torch-legacy"
    )
    assert r["eigen"]["converged"] == [True] and r["eigen"]["eigenvalues"][0] > 0


def test_akamaster_resnet_checkpoint_just_works(capsys, tmp_path):
    """akamaster/pytorch_resnet_cifar10's layout (zero-padding shortcuts, no weights for them,
    classifier `linear`) was refused for 12 missing keys and 2 unexpected: it now builds the
    ResNet with those shortcuts, and says so in the results and on screen (where the
    arguments a model was built with were not shown)."""
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 8, 8), num_classes=10, kwargs={"shortcut": "A"})
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert not any("downsample" in k for k in state) and "module.linear.weight" in state
    torch.save({"epoch": 200, "state_dict": state, "best_prec1": 91.7}, tmp_path / "r20.th")
    args = ["--data", "synthetic:3x8x8:10:4", "--top-k", "1", "--tol", "1e-2", "--json"]
    code, out, _ = run(capsys, "analyze", tmp_path / "r20.th", "--model", "resnet20", *args)
    assert code == 0
    provenance = json.loads(out)["provenance"]
    assert provenance["num_params"] == 269_722
    assert json.loads(provenance["model_kwargs"]) == {"shortcut": "A"}
    code, out, _ = run(capsys, "analyze", tmp_path / "r20.th", "--model", "resnet20", *args[:-1])
    assert code == 0 and 'model=resnet20  model_kwargs={"shortcut": "A"}  data=' in out


def test_safetensors_user_factory_npz_mse_json(capsys, tmp_path):
    factory = tmp_path / "nets.py"
    factory.write_text(
        "import torch.nn as nn\n"
        "def make_net(width=4):\n"
        "    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))\n"
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "batch.npz",
        x=rng.normal(size=(40, 3)).astype("float32"),
        y=rng.normal(size=(40, 2)).astype("float32"),
    )
    code, out, _ = run(
        capsys,
        "analyze",
        tmp_path / "model.safetensors",
        "--model",
        f"{factory}:make_net",
        "--model-kwargs",
        '{"width": 5}',
        "--data",
        tmp_path / "batch.npz",
        "--loss",
        "mse",
        "--num-samples",
        "40",
        "--top-k",
        "4",
        "--trace",
        "--json",
    )
    assert code == 0
    r = json.loads(out)
    assert r["provenance"]["loss"] == "mse" and r["provenance"]["num_params"] == 32
    assert r["provenance"]["batch_weight"] == "samples"
    assert r["provenance"]["checkpoint_format"] == "safetensors"
    ev = r["eigen"]["eigenvalues"]
    assert ev == sorted(ev, reverse=True) and r["trace"]["stderr"] >= 0


def test_directory_series_show_and_plot(capsys, tmp_path, digits_mlp):
    runs = tmp_path / "ckpts"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    for step in (30, 10, 20):  # written out of order: the series must be in step order
        meta = dict(state["hessian_cli"], step=step, epoch=step // 10)
        sd = {k: v * (1 + step / 100) for k, v in state["model"].items()}
        save_checkpoint(runs / f"ckpt_{step}.pt", state_dict=sd, metadata=meta)
    out_h5 = tmp_path / "traj.h5"
    code, out, _ = run(capsys, "analyze", runs, "--top-k", "3", "--out", out_h5)
    assert code == 0 and "3 checkpoints" in out
    with h5py.File(out_h5) as f:
        groups = [g.decode() if isinstance(g, bytes) else g for g in f["series"][()]]
        steps = [int(f["checkpoints"][g].attrs["step"]) for g in groups]
    assert steps == [10, 20, 30]
    code, out, _ = run(capsys, "show", out_h5)
    assert code == 0 and "ckpt_20" in out
    png = tmp_path / "traj.png"
    code, _, _ = run(capsys, "plot", out_h5, "-o", png)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = tmp_path / "one.png"  # one checkpoint of the series: its own figure
    code, _, _ = run(capsys, "plot", out_h5, "-c", "ckpt_20", "-o", one)
    assert code == 0 and one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert one.read_bytes() != png.read_bytes()
    code, _, err = run(capsys, "plot", out_h5, "-c", "ckpt_99", "-o", one)
    assert code == 2 and "no checkpoint named 'ckpt_99'" in one_sentence(err)


def test_a_series_holds_no_other_files_weights_or_optimizer_state_while_it_is_analysed(
    tmp_path, digits_mlp, monkeypatch
):
    """Every checkpoint of a directory is read before the first analysis; each was held whole
    until the series ended, its optimizer state (often twice the weights) too: a series of 8
    files of a 4.3M-parameter MLP with Adam state peaked 350 MB above one file's analysis.
    Now a file's weights are read again at its turn, and no other file's are held."""
    import gc
    import weakref

    import hessian_cli.analysis as analysis

    state = torch.load(digits_mlp, weights_only=True)
    runs = tmp_path / "ckpts"
    runs.mkdir()
    for step in (1, 2, 3):
        extra = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}}}
        meta = dict(state["hessian_cli"], step=step)
        save_checkpoint(runs / f"c{step}.pt", state_dict=state["model"], metadata=meta, extra=extra)
    held: list[weakref.ref] = []
    weights: dict[str, list[weakref.ref]] = {}
    real_load, real_analyze = analysis.load_checkpoint, analysis.analyze_checkpoint

    def load(path, *args, **kwargs):
        ckpt = real_load(path, *args, **kwargs)
        held.append(weakref.ref(ckpt.raw["optimizer"]["state"][0]["exp_avg"]))
        weights.setdefault(ckpt.name, []).extend(weakref.ref(t) for t in ckpt.state_dict.values())
        return ckpt

    def analyze(ckpt, *args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in held)  # not held while the products run
        others = [ref for name, refs in weights.items() if name != ckpt.name for ref in refs]
        assert others and all(ref() is None for ref in others)
        return real_analyze(ckpt, *args, **kwargs)

    monkeypatch.setattr(analysis, "load_checkpoint", load)
    monkeypatch.setattr(analysis, "analyze_checkpoint", analyze)
    results = analyze_target(runs, AnalyzeRequest(top_k=1))
    assert [r.provenance["step"] for r in results] == [1, 2, 3]


def _series_of_two(tmp_path, digits_mlp) -> tuple[Path, dict]:
    """A directory of the digits MLP's checkpoint at steps 1 and 2 (c1.pt, c2.pt), and the
    checkpoint's contents."""
    state = torch.load(digits_mlp, weights_only=True)
    runs = tmp_path / "ckpts"
    runs.mkdir()
    for step in (1, 2):
        meta = dict(state["hessian_cli"], step=step)
        save_checkpoint(runs / f"c{step}.pt", state_dict=state["model"], metadata=meta)
    return runs, state


def test_a_warm_started_checkpoint_of_a_series_names_its_start_in_the_provenance(
    capsys, tmp_path, digits_mlp
):
    """c2's solve began from c1's eigenvectors: its seed alone did not reproduce it (analysed
    by itself, it took other products to other values within the tolerance), unsaid."""
    runs, _ = _series_of_two(tmp_path, digits_mlp)
    out_file = tmp_path / "s.h5"
    code, out, err = run(capsys, "analyze", runs, "--top-k", "2", "--json", "--out", out_file)
    assert code == 0, err
    c1 = str(runs / "c1.pt")
    assert [r["provenance"].get("warm_start") for r in json.loads(out)] == [None, c1]
    with h5py.File(out_file) as f:
        assert "warm_start" not in f["checkpoints/c1"].attrs
        assert f["checkpoints/c2"].attrs["warm_start"] == f["checkpoints/c1"].attrs["checkpoint"]


def test_the_warm_start_of_a_series_of_files_of_one_name_says_which_started_it(
    capsys, tmp_path, digits_mlp
):
    """A glob over runs (runs/*/last.pt) gives files of one name: each warm start recorded
    'last', which named all three, and the third started from the second."""
    state = torch.load(digits_mlp, weights_only=True)
    for step in (1, 2, 3):
        meta = dict(state["hessian_cli"], step=step)
        save_checkpoint(
            tmp_path / f"run{step}" / "last.pt", state_dict=state["model"], metadata=meta
        )
    files = [tmp_path / f"run{step}" / "last.pt" for step in (1, 2, 3)]
    code, out, err = run(capsys, "analyze", *files, "--top-k", "1", "--json")
    assert code == 0, err
    reports = json.loads(out)
    assert [r["provenance"].get("warm_start") for r in reports] == [None, *map(str, files[:2])]


def test_files_of_one_name_in_a_series_are_named_by_their_paths(tmp_path, digits_mlp, monkeypatch):
    """runs/*/last.pt: the progress bar said 'last.pt (3/3)', and an error 'last.pt: ...', of
    either file; they go by their paths (a name no other file has, by its name)."""
    import hessian_cli.analysis as analysis

    state = torch.load(digits_mlp, weights_only=True)
    files = [tmp_path / f"run{step}" / "last.pt" for step in (1, 2)]
    for step, path in enumerate(files, 1):
        save_checkpoint(
            path, state_dict=state["model"], metadata={**state["hessian_cli"], "step": step}
        )
    meta = {**state["hessian_cli"], "step": 0}  # first, and named by its name alone
    save_checkpoint(tmp_path / "run2" / "c.pt", state_dict=state["model"], metadata=meta)
    started = []
    real_analyze = analysis.analyze_checkpoint

    def analyze(ckpt, *args, **kwargs):
        if ckpt.path == files[1]:
            raise UserError("bad weights.")
        return real_analyze(ckpt, *args, **kwargs)

    monkeypatch.setattr(analysis, "analyze_checkpoint", analyze)
    request = AnalyzeRequest(top_k=1)
    with pytest.raises(SeriesStopped) as stopped:
        analyze_target(
            [*files, tmp_path / "run2" / "c.pt"], request, starting=lambda *a: started.append(a)
        )
    assert started == [("c.pt", 1, 3), (str(files[0]), 2, 3), (str(files[1]), 3, 3)]
    assert str(stopped.value).startswith(f"{files[1]}: bad weights")


def test_the_progress_bar_of_a_series_names_the_checkpoint_that_runs(
    capsys, monkeypatch, tmp_path, digits_mlp
):
    """The bar said 'eigenpairs (1/2 converged)' for every checkpoint of a series alike: which
    of them ran, and how many were left, went unsaid."""
    from rich.progress import Progress

    runs, _ = _series_of_two(tmp_path, digits_mlp)
    shown: list[str] = []
    real_update = Progress.update

    def update(self, task, **fields):
        shown.append(fields.get("description"))
        return real_update(self, task, **fields)

    monkeypatch.setattr(Progress, "update", update)
    assert run(capsys, "analyze", runs, "--top-k", "2")[0] == 0
    assert shown[0] == "c1.pt (1/2): loading" and "c2.pt (2/2): loading" in shown
    assert shown[-1].startswith("c2.pt (2/2): eigenpairs (") and shown[-1].endswith(" converged)")
    shown.clear()
    assert run(capsys, "analyze", runs / "c1.pt", "--top-k", "2")[0] == 0
    assert shown[0] == "loading" and shown[-1] == "eigenpairs (2/2 converged)"


def test_the_progress_bar_counts_the_traces_products(capsys, monkeypatch, digits_mlp):
    """The bar said 'trace' at 0% through all of the trace's products, minutes on a large
    network: it counts them as each pass of them ends, up to the products the trace made."""
    from rich.progress import Progress

    shown: list[tuple[str, int, int]] = []
    real_update = Progress.update

    def update(self, task, **fields):
        shown.append((fields.get("description"), fields.get("completed"), fields.get("total")))
        return real_update(self, task, **fields)

    monkeypatch.setattr(Progress, "update", update)
    code, out, err = run(
        capsys, "analyze", digits_mlp, "--top-k", "0", "--trace", "--trace-probes", "12", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["trace"]["hvps"] == 12
    # Hutch++: the sketch's 4 products, then its basis's 4 with the 4 probes'.
    assert [s for s in shown if s[0].startswith("trace")] == [
        ("trace", 0, 1),
        ("trace (4/12 HVPs)", 4, 12),
        ("trace (12/12 HVPs)", 12, 12),
    ]


def test_several_checkpoint_files_are_a_series_in_step_order(capsys, tmp_path, digits_mlp):
    """A shell glob (analyze run/c*.pt) gives several paths: Typer refused them as 'unexpected
    extra argument(s)'. They are a series, in step order as a directory's."""
    runs, _ = _series_of_two(tmp_path, digits_mlp)
    args = ("--top-k", "1", "--json")
    code, out, err = run(capsys, "analyze", runs / "c2.pt", runs / "c1.pt", *args)
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)] == ["c1", "c2"]
    assert json.loads(out)[1]["provenance"]["warm_start"] == str(runs / "c1.pt")
    code, _, err = run(capsys, "analyze", runs / "c1.pt", runs, *args)
    assert code == 2 and one_sentence(err) == (
        f"error: {runs} is a directory of 2 checkpoints, a series: give it alone, or the "
        "checkpoint files themselves (a shell glob such as run/*.pt)."
    )


def test_a_glob_of_accelerate_checkpoint_folders_is_a_series_of_their_weights(
    capsys, tmp_path, digits_mlp
):
    """analyze checkpoints/checkpoint_* (accelerate's save_state folders; under DeepSpeed the
    weights are in pytorch_model/) was refused: "checkpoint_0 is a directory: give it alone"."""
    runs, state = _series_of_two(tmp_path, digits_mlp)
    folders = []
    for step in (2, 1):
        folder = tmp_path / "checkpoints" / f"checkpoint_{step}"
        (folder / "pytorch_model").mkdir(parents=True)
        shutil.copyfile(runs / f"c{step}.pt", folder / "pytorch_model" / DEEPSPEED_WEIGHTS)
        torch.save({"last_epoch": step}, folder / "custom_checkpoint_0.pkl")
        folders.append(folder)
    args = ("--top-k", "1", "--json")
    code, out, err = run(capsys, "analyze", *folders, *args)
    assert code == 0, err
    results = json.loads(out)
    assert [r["name"] for r in results] == ["checkpoint_1", "checkpoint_2"]
    code, out, err = run(capsys, "analyze", runs / "c1.pt", runs / "c2.pt", *args)
    assert code == 0, err
    files = json.loads(out)
    assert [r["eigen"]["eigenvalues"] for r in results] == [
        r["eigen"]["eigenvalues"] for r in files
    ]
    # One such folder alone is its weights, one checkpoint (as a Trainer's checkpoint-N is),
    # not a series of one: the JSON was a list of one.
    code, out, err = run(capsys, "analyze", folders[1], *args)
    assert code == 0, err
    alone = json.loads(out)
    assert alone["name"] == "checkpoint_1"
    assert alone["eigen"]["eigenvalues"] == results[0]["eigen"]["eigenvalues"]


def test_an_optimizer_state_in_a_series_directory_is_named_as_such(capsys, tmp_path, digits_mlp):
    """optimizer.pt beside the checkpoints stopped the series with advice to pick its weights
    with --weights-key, which no key finds in an optimizer's state."""
    runs, _ = _series_of_two(tmp_path, digits_mlp)
    torch.save(torch.optim.SGD(torch.nn.Linear(2, 1).parameters()).state_dict(), runs / "optim.pt")
    code, _, err = run(capsys, "analyze", runs, "--top-k", "1")
    message = one_sentence(err)
    assert code == 2 and "optim.pt' holds an optimizer's state" in message, message
    assert "--weights-key" not in message and "give them as files without it" in message


def test_the_data_file_in_a_series_directory_is_not_taken_for_a_checkpoint(
    capsys, tmp_path, digits_mlp
):
    """--data DIR/z_batch.pt beside the checkpoints was analysed as one, its x and y refused as
    weights that do not match the model after the others' analyses."""
    runs, _ = _series_of_two(tmp_path, digits_mlp)
    x, y = load_data("digits").train.tensors
    torch.save({"x": x[:32], "y": y[:32]}, runs / "z_batch.pt")
    model = ("--model", "mlp", "--model-kwargs", json.dumps(MLP_KW))
    args = ("--data", runs / "z_batch.pt", *model, "--top-k", "1", "--json")
    code, out, err = run(capsys, "analyze", runs, *args)
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)] == ["c1", "c2"]


def test_a_checkpoint_rewritten_while_its_series_runs_is_refused_at_its_turn(
    tmp_path, digits_mlp, monkeypatch
):
    """A series reads each file's weights again at its turn: one changed since the series was
    read (and ordered) is refused there, the analyses before it kept."""
    import hessian_cli.analysis as analysis

    runs, state = _series_of_two(tmp_path, digits_mlp)
    real_analyze = analysis.analyze_checkpoint

    def analyze(ckpt, *args, **kwargs):
        result = real_analyze(ckpt, *args, **kwargs)
        meta = dict(state["hessian_cli"], step=2)
        sd = {k: 2 * v for k, v in state["model"].items()}
        save_checkpoint(runs / "c2.pt", state_dict=sd, metadata=meta)  # a run writing it again
        return result

    monkeypatch.setattr(analysis, "analyze_checkpoint", analyze)
    with pytest.raises(SeriesStopped, match="^c2.pt: changed since the series was read") as info:
        analyze_target(runs, AnalyzeRequest(top_k=1))
    assert [r.name for r in info.value.results] == ["c1"]


def test_a_copy_of_a_checkpoint_in_its_directory_is_analysed_once(capsys, tmp_path, digits_mlp):
    """Lightning's save_last writes last.ckpt as a copy, not a link: the series analysed step 20
    twice (a row and a second analysis's time). Of files of the same content, the first in
    order is kept, and the others named (they were left out unsaid)."""
    state = torch.load(digits_mlp, weights_only=True)
    runs = tmp_path / "ckpts"
    runs.mkdir()
    for step in (10, 20):
        meta = dict(state["hessian_cli"], step=step)
        sd = {k: v * (1 + step / 100) for k, v in state["model"].items()}
        save_checkpoint(runs / f"epoch=0-step={step}.pt", state_dict=sd, metadata=meta)
    shutil.copyfile(runs / "epoch=0-step=20.pt", runs / "last.pt")
    results = analyze_target(runs, AnalyzeRequest(top_k=1))
    assert [r.name for r in results] == ["epoch=0-step=10", "epoch=0-step=20"]
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == [r.name for r in results]
    assert " ".join(err.split()) == (
        "left out, as copies of another checkpoint of the series (the same sha256): last.pt "
        "(of epoch=0-step=20.pt)."
    )
    assert run(capsys, "analyze", runs, "--top-k", "1", "--quiet")[2] == ""
    # A file given twice is named as that, not as a copy of itself ("last.pt (of last.pt)").
    code, out, err = run(capsys, "analyze", runs / "last.pt", runs / "last.pt", "--json")
    assert code == 0 and len(json.loads(out)) == 1
    assert " ".join(err.split()).endswith(": last.pt (given again).")
    # A link to another file (Lightning's last.ckpt) is named so too (it was left out unsaid),
    # and the file's own name is the one analysed, also where the link's sorts before it.
    (runs / "last.pt").unlink()
    (runs / "a_link.pt").symlink_to(runs / "epoch=0-step=20.pt")
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == [r.name for r in results]
    assert " ".join(err.split()).endswith("a_link.pt (of epoch=0-step=20.pt).")
    given = analyze_target(sorted(runs.iterdir()), AnalyzeRequest(top_k=1))
    assert [r.name for r in given] == [r.name for r in results]  # files, as a shell glob's
    (runs / "a_link.pt").unlink()
    shutil.copyfile(runs / "epoch=0-step=20.pt", runs / "last.pt")
    # Runs from one start (runs/*/init.pt): copies in other folders are named by their paths,
    # the first in their folders' order kept, whatever order they are given in.
    (tmp_path / "b").mkdir()
    shutil.copyfile(runs / "last.pt", tmp_path / "b" / "last.pt")
    code, _, err = run(capsys, "analyze", runs / "last.pt", tmp_path / "b" / "last.pt", "-k", "1")
    assert code == 0 and f"{runs / 'last.pt'} (of {tmp_path / 'b' / 'last.pt'})." in err, err


def test_a_hugging_face_trainer_run_is_a_series_of_its_checkpoint_folders(
    capsys, tmp_path, digits_mlp
):
    """A Trainer's output directory holds checkpoint-N folders of model.safetensors (or
    pytorch_model.bin) beside optimizer.pt, scheduler.pt and rng_state.pth: it held "no
    checkpoint files", and a folder given itself was a series whose optimizer.pt ended it."""
    state = torch.load(digits_mlp, weights_only=True)["model"]
    run_dir = tmp_path / "trainer_output"
    for step in (500, 1000, 1500):  # by name, checkpoint-1000 came first
        folder = run_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        weights = {k: v * (1 + step / 1000) for k, v in state.items()}
        if step == 1000:
            torch.save(weights, folder / "pytorch_model.bin")
        else:
            save_file(weights, folder / "model.safetensors")
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        torch.save({"last_epoch": 3}, folder / "scheduler.pt")
        torch.save({"python": (3, (1,), None)}, folder / "rng_state.pth")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.5}))
    spec = ("--model", "mlp", "--model-kwargs", json.dumps(MLP_KW), "--data", "digits")
    args = ("--num-samples", "64", "--top-k", "1", "--json", *spec)
    code, out, err = run(capsys, "analyze", run_dir, *args)
    assert code == 0, err
    results = json.loads(out)
    assert [r["name"] for r in results] == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
    assert [r["provenance"]["step"] for r in results] == [500, 1000, 1500]
    top = [r["eigen"]["eigenvalues"][0] for r in results]
    assert top[0] != top[1] != top[2]  # each folder's own weights
    code, out, err = run(capsys, "analyze", run_dir / "checkpoint-1000", *args)
    assert code == 0, err
    # Its weights alone, not its optimizer's state: one checkpoint, one object as its file's
    # (a list of one, as a directory of checkpoints gives, before).
    alone = json.loads(out)
    assert alone["name"] == "checkpoint-1000" and alone["provenance"]["step"] == 1000
    assert alone["eigen"]["eigenvalues"][0] == pytest.approx(top[1], rel=1e-5)
    (tmp_path / "one").mkdir()  # a directory of one checkpoint file: a series, a list
    shutil.copyfile(digits_mlp, tmp_path / "one" / "c.pt")
    code, out, err = run(capsys, "analyze", tmp_path / "one", *args)
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["c"], err
    # A glob of the folders (checkpoint-*) is a series of their weights.
    folders = (run_dir / "checkpoint-1500", run_dir / "checkpoint-500")
    code, out, err = run(capsys, "analyze", *folders, *args)
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)] == ["checkpoint-500", "checkpoint-1500"]
    # The output directory among others was its final weights, its folders skipped unsaid.
    save_file(state, run_dir / "model.safetensors")
    code, _, err = run(capsys, "analyze", run_dir, tmp_path / "one" / "c.pt", *args)
    assert code == 2 and one_sentence(err) == (
        f"error: {run_dir} is a Trainer output directory, a series of its checkpoint folders: "
        f"give it alone, or its final weights as the file {run_dir / 'model.safetensors'}."
    )


def test_a_directory_of_different_models_is_analysed_without_a_shared_warm_start(
    capsys, tmp_path, digits_mlp
):
    """Each checkpoint's eigenvectors start the next one's search only in the same space."""
    runs = tmp_path / "mixed"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    save_checkpoint(runs / "a.pt", state_dict=state["model"], metadata=state["hessian_cli"])
    small = build_model("mlp", input_shape=(64,), num_classes=10, kwargs={"hidden": [5]})
    meta = dict(state["hessian_cli"], model_kwargs=json.dumps({"hidden": [5]}), step=8)
    save_checkpoint(runs / "b.pt", state_dict=small.state_dict(), metadata=meta)
    code, out, err = run(capsys, "analyze", runs, "--top-k", "2", "--json")
    assert code == 0, err
    reports = json.loads(out)
    assert [r["provenance"]["num_params"] for r in reports] == [
        sum(p.numel() for p in m.parameters())
        for m in (
            build_model("mlp", input_shape=(64,), num_classes=10, kwargs=MLP_KW),
            small,
        )
    ]
    assert all(all(r["eigen"]["converged"]) for r in reports)
    assert all("warm_start" not in r["provenance"] for r in reports)  # b started cold
    # The architecture is in the provenance (it recorded "mlp" alone, for two different nets).
    assert [json.loads(r["provenance"]["model_kwargs"]) for r in reports] == [
        MLP_KW,
        {"hidden": [5]},
    ]
    (runs / "b.pt").unlink()  # a directory of one is still a series: a list, for scripts
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["a"], err


def test_hdf5_round_trip_equals_json_and_append_keeps_data(capsys, tmp_path, digits_mlp):
    out_h5 = tmp_path / "s.h5"
    code, out, _ = run(
        capsys,
        "analyze",
        digits_mlp,
        "--top-k",
        "3",
        "--trace",
        "--density",
        "--density-probes",
        "2",
        "--density-steps",
        "8",
        "--alignment",
        "--save-eigenvectors",
        "--out",
        out_h5,
        "--json",
    )
    assert code == 0
    r = json.loads(out)
    with h5py.File(out_h5) as f:
        (name,) = list(f["checkpoints"])
        g = f["checkpoints"][name]
        np.testing.assert_array_equal(g["eigenvalues"][()], r["eigen"]["eigenvalues"])
        np.testing.assert_array_equal(g["residuals"][()], r["eigen"]["residuals"])
        assert g["eigenvectors"].shape == (3, r["provenance"]["num_params"])
        np.testing.assert_array_equal(g["alignment/alignment"][()], r["alignment"]["alignment"])
        np.testing.assert_array_equal(g["density/values"][()], r["density"]["values"])
        # The 3 eigenpairs are part of the trace's sketch and of every density rule (1/n each).
        assert r["trace"]["known_eigenpairs"] == r["density"]["known_eigenpairs"] == 3
        assert g["density/nodes"].shape == (2, 8 + 3)
        np.testing.assert_array_equal(g["density/nodes"][:, 8:], [r["eigen"]["eigenvalues"]] * 2)
        before = {k: g["eigenvalues"][()].copy() for k in ["v"]}
        sha = g.attrs["sha256"]
    code, _, _ = run(capsys, "analyze", digits_mlp, "--top-k", "2", "--out", out_h5, "--quiet")
    assert code == 0
    with h5py.File(out_h5) as f:
        assert len(f["checkpoints"]) == 2
        np.testing.assert_array_equal(f["checkpoints"][name]["eigenvalues"][()], before["v"])
        assert f["checkpoints"][name].attrs["sha256"] == sha


def _bad(capsys, *args) -> str:
    code, _, err = run(capsys, *args)
    assert code != 0
    return one_sentence(err)


def test_too_many_samples_names_the_split_analyze_reads(capsys, digits_mlp):
    """The digits hold 1,797 samples: "the data has only 1300" read as a miscount."""
    message = _bad(capsys, "analyze", digits_mlp, "--num-samples", "5000")
    assert message == (
        "error: asked for 5000 samples but the data's training split, which analyze reads, "
        "has only 1300."
    )


def test_user_code_that_exits_or_misfits_is_one_sentence(capsys, tmp_path, digits_mlp):
    """sys.exit in user code used to end the command with the user's status (0: a run that
    did nothing); mismatched factory tensors and a model whose outputs are detached were
    'unexpected' errors (status 1)."""
    (tmp_path / "uc.py").write_text(
        "import sys\nimport torch\n\n\n"
        "def exit0(out, y):\n    sys.exit(0)\n\n\n"
        "def net7(**kw):\n    sys.exit(7)\n\n\n"
        "def mismatch():\n    return torch.zeros(10, 64), torch.zeros(5, dtype=torch.long)\n\n\n"
        "class Detached(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.l = torch.nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.l(x.flatten(1)).detach()\n\n\n"
        "def detached(**kw):\n    return Detached()\n\n\n"
        "calls = []\n\n\n"
        "def later(out, y):  # fine for the checks before the work, then not\n"
        "    calls.append(1)\n"
        "    if len(calls) > 3:\n"
        "        raise ValueError('boom later')\n"
        "    return torch.nn.functional.cross_entropy(out, y)\n"
    )
    uc = tmp_path / "uc.py"
    assert f"the loss function '{uc}:later' raised ValueError: boom later" in _bad(
        capsys, "analyze", digits_mlp, "--loss", f"{uc}:later"
    )
    assert "called sys.exit(0) instead of returning" in _bad(
        capsys, "analyze", digits_mlp, "--loss", f"{uc}:exit0"
    )
    assert "called sys.exit(7) instead of returning" in _bad(
        capsys, "analyze", digits_mlp, "--model", f"{uc}:net7"
    )
    assert "inputs of shape (10, 64) and targets of shape (5,)" in _bad(
        capsys, "analyze", digits_mlp, "--data", f"{uc}:mismatch"
    )
    torch.save({"l.weight": torch.zeros(10, 64), "l.bias": torch.zeros(10)}, tmp_path / "d.pt")
    assert "outputs do not depend on its parameters" in _bad(
        capsys, "analyze", tmp_path / "d.pt", "--model", f"{uc}:detached", "--data", "digits"
    )


def test_files_that_are_not_checkpoints_are_named_as_such(capsys, tmp_path):
    """A FIFO used to hang the command; a text file was told to pass --trust-checkpoint; a loop
    of links was 'no such file'."""
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    assert "is not a regular file" in _bad(capsys, "analyze", fifo, "--model", "mlp")
    (tmp_path / "script.pt").write_text("import os\n")
    message = _bad(capsys, "analyze", tmp_path / "script.pt", "--model", "mlp", "--data", "digits")
    assert "is not a torch, safetensors or pickle file" in message and "trust" not in message
    (tmp_path / "notes.txt").write_text("hi\n")  # torch.load fails on it with a KeyError
    message = _bad(capsys, "analyze", tmp_path / "notes.txt", "--model", "mlp", "--data", "digits")
    assert "is not a torch, safetensors or pickle file" in message and "KeyError" not in message
    with h5py.File(tmp_path / "spectra.h5", "w"):
        pass
    message = _bad(capsys, "analyze", tmp_path / "spectra.h5")
    assert "is an HDF5 file, not a checkpoint (`hessian-cli show`" in message
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    assert "symbolic link that leads nowhere" in _bad(capsys, "analyze", tmp_path / "a.pt")


@pytest.mark.parametrize("flag", ["--model", "--data", "--loss"])
def test_a_python_file_without_the_name_to_call_says_so(capsys, tmp_path, digits_mlp, flag):
    """`--model net.py` (for `net.py:make`) was an 'unknown model' with every form listed."""
    (tmp_path / "net.py").write_text("def make():\n    pass\n")
    message = _bad(capsys, "analyze", digits_mlp, flag, str(tmp_path / "net.py"))
    assert f"names nothing in it to call: give '{tmp_path / 'net.py'}:NAME'" in message


def test_a_glob_that_reached_analyze_says_the_shell_expands_it(capsys, tmp_path, digits_mlp):
    """`--help` showed the glob quoted, 'run/step*.pt', and a quoted one was 'No such checkpoint
    file or directory' with no word of why."""
    shutil.copy(digits_mlp, tmp_path / "step1.pt")
    message = _bad(capsys, "analyze", str(tmp_path / "step*.pt"))
    assert "the shell expands a pattern such as this" in message
    assert "shell" not in _bad(capsys, "analyze", tmp_path / "missing.pt")


def test_bad_inputs_get_one_sentence(capsys, tmp_path, digits_mlp):
    assert "no such checkpoint" in _bad(
        capsys, "analyze", tmp_path / "missing.pt", "--model", "mlp"
    )
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    assert "corrupt.pt" in _bad(capsys, "analyze", corrupt, "--model", "mlp", "--data", "digits")
    msg = _bad(capsys, "analyze", digits_mlp, "--model", "cnn")
    assert "missing" in msg or "unexpected" in msg
    assert "mlp" in _bad(capsys, "analyze", digits_mlp, "--model", "nosuchnet")
    assert "digits" in _bad(capsys, "analyze", digits_mlp, "--data", "nosuchdata")
    assert "ce" in _bad(capsys, "analyze", digits_mlp, "--loss", "nosuchloss")
    fixed_input = json.dumps({**MLP_KW, "input_size": 64})
    assert "does not fit" in _bad(
        capsys, "analyze", digits_mlp, "--data", "synthetic:3x32x32", "--model-kwargs", fixed_input
    )
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((8, 1, 8, 8), "float32"), y=np.array([0, 1, 2, 3, 4, 5, 6, 42]))
    assert (
        "label"
        in _bad(
            capsys,
            "analyze",
            digits_mlp,
            "--data",
            labels,
            "--model-kwargs",
            json.dumps({**MLP_KW, "num_classes": 10}),
        ).lower()
    )
    message = _bad(capsys, "analyze", digits_mlp, "--top-k", "100000")
    assert "choose --top-k of at most" in message
    # A classifier's recorded cross-entropy on other data's real targets (a negative "loss").
    assert "give --loss mse for regression targets" in _bad(
        capsys, "analyze", digits_mlp, "--data", "synthetic-regression:64:10"
    )
    nan_sd = {k: v.clone() for k, v in torch.load(digits_mlp, weights_only=True)["model"].items()}
    next(iter(nan_sd.values()))[0] = float("nan")
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(nan_sd, nan_ckpt)
    assert (
        "nan"
        in _bad(
            capsys,
            "analyze",
            nan_ckpt,
            "--model",
            "mlp",
            "--model-kwargs",
            json.dumps(MLP_KW),
            "--data",
            "digits",
        ).lower()
    )
    nan_data = tmp_path / "nan.npz"
    np.savez(nan_data, x=np.full((8, 1, 8, 8), np.nan, "float32"), y=np.arange(8))
    assert "the data's inputs hold NaN or infinite values" in _bad(
        capsys,
        "analyze",
        digits_mlp,
        "--data",
        nan_data,
        "--model-kwargs",
        json.dumps({**MLP_KW, "num_classes": 10}),
    )
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert "file" in _bad(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", blocked / "s.h5")
    if not torch.cuda.is_available():
        assert "CUDA" in _bad(capsys, "analyze", digits_mlp, "--device", "cuda")
    assert "--which" in _bad(capsys, "analyze", digits_mlp, "--which", "middle")
    assert "--precision" in _bad(capsys, "analyze", digits_mlp, "--precision", "fp8")


def test_out_of_memory_suggests_smaller_batch(capsys, monkeypatch, digits_mlp, tmp_path):
    import hessian_cli.analysis as analysis_module

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(analysis_module, "eigenpairs", oom)
    out_h5 = tmp_path / "never.h5"
    assert "--batch-size" in _bad(capsys, "analyze", digits_mlp, "--out", out_h5)
    assert not out_h5.exists()


def test_out_of_memory_in_the_trace_names_its_probes_and_no_option_not_in_use(
    capsys, monkeypatch, digits_mlp
):
    """The advice named --top-k and the density's options, whatever ran out: never
    --trace-probes, and options that, given without --density, are refused."""
    import hessian_cli.analysis as analysis_module

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(analysis_module, "stochastic_trace", oom)
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "1", "--trace")
    assert _bad(capsys, *args).endswith(
        "try a smaller --batch-size (or fewer --top-k or --trace-probes)."
    )
    assert _bad(capsys, *args[:-3], "--top-k", "0", "--trace").endswith(
        "try a smaller --batch-size (or fewer --trace-probes)."
    )


def test_the_machine_running_out_of_memory_is_one_sentence(capsys, monkeypatch, digits_mlp):
    import hessian_cli.analysis as analysis_module

    def too_big(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 31999999999488 bytes. Error code 12"
        )

    monkeypatch.setattr(analysis_module, "eigenpairs", too_big)
    code, _, err = run(capsys, "analyze", digits_mlp)
    assert code != 0 and "ran out of memory" in one_sentence(err)
    assert "alloc_cpu" not in err


def test_the_gradient_hints_the_top_eigenvectors_start(capsys, monkeypatch, digits_mlp):
    import hessian_cli.analysis as analysis_module
    from hessian_cli.engine.operator import HessianOperator

    seen: dict[str, object] = {}
    real_gradient, real_eigenpairs = HessianOperator.gradient, analysis_module.eigenpairs

    def gradient(self):
        loss, seen["gradient"] = real_gradient(self)
        return loss, seen["gradient"]

    def eigenpairs(*args, **kwargs):
        seen["hint"] = kwargs["hint"]
        return real_eigenpairs(*args, **kwargs)

    monkeypatch.setattr(HessianOperator, "gradient", gradient)
    monkeypatch.setattr(analysis_module, "eigenpairs", eigenpairs)
    for which in ("largest", "both", "smallest"):
        code, _, _ = run(capsys, "analyze", digits_mlp, "--top-k", "2", "--which", which, "-q")
        assert code == 0
        if which == "smallest":  # the gradient leans toward the top, not the bottom
            assert seen["hint"] is None
        else:
            assert seen["hint"] is seen["gradient"]


def test_the_unit_of_cost_is_a_warm_gradient_timed_after_the_analysis(
    capsys, monkeypatch, digits_mlp
):
    from hessian_cli.engine.operator import HessianOperator

    hvps_then = []

    def gradient_seconds(self):
        hvps_then.append(self.hvp_count)
        return 0.25

    monkeypatch.setattr(HessianOperator, "gradient_seconds", gradient_seconds)
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "2", "--trace", "--json")
    assert code == 0
    prov = json.loads(out)["provenance"]
    assert hvps_then == [prov["hvps"]]  # once, when every product has been made
    assert prov["grad_seconds"] == 0.25
    assert prov["grad_equivalents"] == pytest.approx(prov["wall_seconds"] / 0.25)


def test_a_series_whose_budget_ran_out_on_some_checkpoints_says_it_was_accepted():
    """--max-hvps given, c1 ran out of it and c2 converged: the warning asked the user to pass
    the --max-hvps they had passed (c2's stop reason, "converged", hid the budget)."""
    from hessian_cli.presentation.tables import unconverged_warning

    def report(name: str, converged: bool, reason: str) -> dict:
        return {"name": name, "eigen": {"converged": [converged] * 2, "stop_reason": reason}}

    reports = [report("c1", False, "budget"), report("c2", True, "converged")]
    warning = unconverged_warning(
        reports, tol=1e-4, precision="full", dtype="float32", budget_accepted=True
    )
    assert warning is not None and warning.endswith("(c1: 2 pairs); kept, as --max-hvps asks.")


def test_the_warning_of_a_failed_full_precision_check_says_so():
    """A reduced-precision solve whose full-precision check failed ("unverified", as its table
    says) was told that "the residuals stopped improving"."""
    from hessian_cli.presentation.tables import unconverged_warning

    reports = [{"name": "c", "eigen": {"converged": [False], "stop_reason": "unverified"}}]
    warning = unconverged_warning(reports, tol=1e-2, precision="bf16", dtype="float32")
    assert warning is not None and "stopped improving" not in warning
    assert "the full-precision check of the residuals failed" in warning
    assert warning.endswith("loosen --tol or use --precision full.")


def test_unconverged_exits_nonzero_unless_budget_accepted(capsys, digits_mlp):
    # A residual of 1e-12 is out of float32's reach: the pairs cannot converge.
    args = ("analyze", digits_mlp, "--num-samples", "16", "--top-k", "2", "--tol", "1e-12")
    code, _, err = run(capsys, *args, "--block-size", "2", "--quiet")
    assert code == 3 and "not converged" in err
    err = " ".join(err.split())
    assert "stopped improving" in err and "--dtype float64" in err
    code, out, err = run(capsys, *args, "--max-hvps", "10", "--json")
    eigen = json.loads(out)["eigen"]
    assert code == 0 and not any(eigen["converged"]) and eigen["stop_reason"] == "budget"
    # Accepted, but still said on stderr (it was silent, against the README's --quiet).
    assert "not converged to tol 1e-12" in err and "kept, as --max-hvps asks" in err
    code, out, err = run(capsys, *args, "--max-hvps", "10", "--quiet")
    assert code == 0 and not out and "kept, as --max-hvps asks" in " ".join(err.split())
    # A budget that did not run out is not why: the advice is the stall's (it said "kept").
    code, out, err = run(capsys, *args, "--block-size", "2", "--max-hvps", "1500", "--quiet")
    err = " ".join(err.split())
    assert code == 0 and "stopped improving" in err and "kept" not in err


def test_a_slow_solve_is_not_blamed_on_rounding_noise(capsys, monkeypatch, digits_mlp):
    import dataclasses

    import hessian_cli.analysis as analysis_module

    real = analysis_module.eigenpairs

    def slow(*args, **kwargs):
        res = real(*args, **kwargs)
        return dataclasses.replace(
            res, stop_reason="slow", converged=torch.zeros_like(res.converged)
        )

    monkeypatch.setattr(analysis_module, "eigenpairs", slow)
    code, _, err = run(capsys, "analyze", digits_mlp, "--top-k", "2", "--quiet")
    err = " ".join(err.split())
    assert code == 3 and "not converged" in err
    assert "crowded" in err and "rounding noise" not in err


def test_eigenvalue_criterion_end_to_end(capsys, tmp_path, digits_mlp):
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "3", "--tol", "1e-6")
    code, out, _ = run(capsys, *args, "--json")
    by_residual = json.loads(out)["eigen"]
    out_h5 = tmp_path / "e.h5"
    code, out, _ = run(capsys, *args, "--criterion", "eigenvalue", "--out", out_h5, "--json")
    eigen = json.loads(out)["eigen"]
    assert code == 0 and eigen["criterion"] == "eigenvalue" and all(eigen["converged"])
    assert all(e <= 1e-6 for e in eigen["errors"])
    assert eigen["hvps"] <= by_residual["hvps"]
    for a, b in zip(eigen["eigenvalues"], by_residual["eigenvalues"], strict=True):
        assert abs(a - b) <= 1.1e-6 * abs(b)
    with h5py.File(out_h5) as f:
        (g,) = f["checkpoints"].values()
        np.testing.assert_array_equal(g["eigenvalue_errors"][()], eigen["errors"])
        assert g["eigenvalues"].attrs["criterion"] == "eigenvalue"
    code, out, _ = run(capsys, "show", out_h5)
    text = " ".join(out.split())
    assert code == 0 and "rel. error ≤" in text and "residual² / gap" in text
    assert "--criterion must be one of" in _bad(capsys, *args, "--criterion", "value")


@pytest.mark.parametrize(
    ("field", "value"), [("top_k", 2.0), ("num_samples", 64.0), ("trace_probes", True)]
)
def test_the_library_refuses_counts_that_are_not_whole_numbers(digits_mlp, field, value):
    """top_k=2.0 failed in torch.full ("must be tuple of ints"), num_samples=64.0 in a slice:
    tracebacks."""
    request = AnalyzeRequest(**{field: value}, trace=True)
    with pytest.raises(UserError, match=rf"--{field.replace('_', '-')} must be a whole number"):
        analyze_target(digits_mlp, request)


def test_model_kwargs_that_are_no_json_are_refused_where_the_ranks_agree(
    capsys, monkeypatch, digits_mlp
):
    """Under torchrun every rank said "rank R: --model-kwargs is not valid JSON ..." (2 ranks:
    twice), where other bad options are said once by rank 0: it was read outside the block
    whose errors the ranks agree on."""
    agreed: list[str] = []
    together = distributed.fail_together

    @contextlib.contextmanager
    def recorded(**kwargs: bool) -> Iterator[None]:
        try:
            with together(**kwargs):
                yield
        except UserError as exc:
            agreed.append(str(exc))
            raise

    monkeypatch.setattr(distributed, "fail_together", recorded)
    code, _, err = run(capsys, "analyze", digits_mlp, "--model-kwargs", "{bad", "-q")
    assert code == 2, err
    assert agreed == [
        "--model-kwargs is not valid JSON: Expecting property name enclosed in double quotes at "
        "position 1."
    ]


def test_the_library_refuses_model_kwargs_as_json_text(digits_mlp):
    """The command's text ('{"hidden": [32]}') failed with TypeError: 'str' object is not a
    mapping."""
    request = AnalyzeRequest(top_k=1, model_kwargs='{"hidden": [32]}')
    with pytest.raises(UserError, match=r"--model-kwargs takes a dict .* not a str\."):
        analyze_target(digits_mlp, request)


def test_the_library_takes_a_torch_device(digits_mlp):
    """`device=torch.device("cpu")` failed with AttributeError: no attribute 'startswith'."""
    (result,) = analyze_target(digits_mlp, AnalyzeRequest(top_k=1, device=torch.device("cpu")))
    assert result.provenance["device"] == "cpu"


@pytest.mark.parametrize("params", ["3.*,1.bias", ["3.*", "1.bias"], ("3.*,1.bias",)])
def test_the_library_takes_params_as_the_cli_does(digits_mlp, params):
    """A string was recorded as its letters (`"1.*"` as the globs `1,.,*`) while the operator
    took it whole, and one of globs joined by commas, as the provenance records them, was
    refused."""
    (result,) = analyze_target(digits_mlp, AnalyzeRequest(top_k=1, params=params))
    assert result.provenance["params_glob"] == "3.*,1.bias"
    assert result.provenance["num_params"] == 130 + 12


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bn", "batch", "--bn must be one of eval, train, not 'batch'"),
        ("dtype", "float16", "--dtype must be one of float32, float64, not 'float16'"),
        ("trace_method", "hutch", "--trace-method must be one of hutch[+][+], hutchinson"),
    ],
)
def test_the_library_refuses_the_words_the_cli_refuses(digits_mlp, field, value, message):
    """A request built in Python meets the same checks (it used to run, or fail with a
    KeyError), before any checkpoint is loaded."""
    with pytest.raises(UserError, match=message):
        analyze_target(digits_mlp, AnalyzeRequest(**{field: value}))
    with pytest.raises(UserError, match=message):  # no checkpoint is even looked for
        analyze_target(digits_mlp.parent / "nothing-here.pt", AnalyzeRequest(**{field: value}))


def test_reduced_precision_is_opt_in_and_reports_its_accuracy(capsys, digits_mlp):
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "2", "--json")
    code, out, _ = run(capsys, *args)
    full = json.loads(out)
    assert code == 0 and full["provenance"]["precision"] == "full"
    assert full["provenance"]["hvp_rel_error"] == 0.0
    code, out, _ = run(capsys, *args, "--precision", "bf16", "--tol", "1e-2")
    fast = json.loads(out)
    assert code == 0 and fast["provenance"]["precision"] == "bf16"
    assert 1e-4 < fast["provenance"]["hvp_rel_error"] < 0.1
    # Residuals are full-precision ones, and the eigenvalues are as close as bf16 allows.
    assert all(r <= 1e-2 for r in fast["eigen"]["residuals"])
    for a, b in zip(fast["eigen"]["eigenvalues"], full["eigen"]["eigenvalues"], strict=True):
        assert abs(a - b) <= 1e-2 * abs(b)
    # Alignment evaluates the loss at w + rho g_hat and then still needs products (the check of
    # reduced precision): that point must not disturb the weights the kept graph was built at.
    code, out, err = run(capsys, *args, "--precision", "bf16", "--tol", "1e-2", "--alignment")
    assert code == 0, err
    assert json.loads(out)["alignment"]["sam_sharpness"] is not None


def test_options_that_would_change_nothing_for_this_model_or_device_are_refused(capsys, digits_mlp):
    """--bn train on a model without BatchNorm and --precision tf32 off CUDA ran as if given,
    and the file recorded them."""
    message = _bad(capsys, "analyze", digits_mlp, "--bn", "train", "--top-k", "1")
    assert "the model has none" in message
    message = _bad(capsys, "analyze", digits_mlp, "--precision", "tf32", "--device", "cpu")
    assert message.startswith("error: --precision tf32 is a CUDA matrix format: on cpu")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_bn_train_on_a_scripted_instancenorm_says_it_cannot_switch_it(capsys, tmp_path):
    """A TorchScript model whose InstanceNorm keeps running statistics was refused --bn train
    as having no such layer ('the model has none'), where it has one that cannot switch."""
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Unflatten(1, (4, 16)), torch.nn.Conv1d(4, 2, 3),
        torch.nn.InstanceNorm1d(2, track_running_stats=True), torch.nn.Flatten(),
        torch.nn.Linear(28, 10),
    )  # fmt: skip
    ckpt = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(ckpt))
    message = _bad(
        capsys, "analyze", ckpt, "--trust-checkpoint", "--data", "digits", "--bn", "train",
        "--top-k", "1",
    )  # fmt: skip
    assert "InstanceNorm) layers of a TorchScript module cannot be switched" in message


def test_bn_train_takes_instancenorm_with_running_statistics_as_in_training(capsys, tmp_path):
    """InstanceNorm layers that keep running statistics normalise each sample by its own in
    training: --bn train takes them so (as Eigen-SAM's refresh must), where a model with no
    BatchNorm was refused ('the model has none')."""
    data = load_data("digits")
    xs = torch.stack([data.train[i][0] for i in range(100)]).double()
    ys = torch.tensor([int(data.train[i][1]) for i in range(100)])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Unflatten(1, (4, 16)), torch.nn.Conv1d(4, 2, 3),
        torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(28, 10),
    ).double()  # fmt: skip
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def train_mode_loss(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([s.numel() for s in shapes])
        weights = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(copy.deepcopy(model).train(), weights, xs)
        return F.cross_entropy(out, ys)

    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = dense_eigh(torch.autograd.functional.hessian(train_mode_loss, w))[0][:2]
    ckpt = tmp_path / "m.pt"
    torch.save(model, ckpt)
    code, out, err = run(
        capsys, "analyze", ckpt, "--trust-checkpoint", "--data", "digits", "--num-samples", "100",
        "--dtype", "float64", "--top-k", "2", "--tol", "1e-9", "--bn", "train", "--json",
    )  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["eigen"]["eigenvalues"], expected, rtol=1e-7)


def test_batchnorm_with_its_initial_running_statistics_is_said_and_recorded(capsys, tmp_path):
    """Eval mode by BatchNorm's initial statistics (mean 0, variance 1: a model never trained)
    does not normalise (untrained ResNet-110's largest output 6e8), and analyze said nothing:
    now one line names the layers and --bn train, and the provenance counts them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
        torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 10),
    )  # fmt: skip
    args = ("--trust-checkpoint", "--data", "digits", "--num-samples", "64", "--top-k", "1")
    untrained = tmp_path / "untrained.pt"
    torch.save(model, untrained)
    model[:3].train()(torch.randn(16, 64))  # the first layer's statistics updated, not the second's
    partly = tmp_path / "partly.pt"
    torch.save(model, partly)
    model.train()(torch.randn(16, 64))
    trained = tmp_path / "trained.pt"
    torch.save(model, trained)
    for ckpt, bn, said, count in (
        (untrained, "eval", "all 2 BatchNorm layers hold", 2),
        (partly, "eval", "1 of the 2 BatchNorm layers holds", 1),
        (trained, "eval", None, 0),
        (untrained, "train", None, None),
    ):
        code, out, err = run(capsys, "analyze", ckpt, *args, "--bn", bn, "--json")
        assert code == 0, err
        assert json.loads(out)["provenance"].get("bn_initial_statistics") == count
        notes = " ".join(err.split()).split("note: ")[1:]
        if said is None:
            assert not notes, err
        else:
            assert notes == [
                f"{said} initial running statistics (mean 0, variance 1: no training step "
                "updated them), by which eval mode does not normalise, so these are the numbers "
                "of an unnormalised network; --bn train normalises by each batch's statistics."
            ]
    # A refusal after the setup: the note came first, of an analysis that never ran.
    code, _, err = run(capsys, "analyze", untrained, *args[:-1], "100000")
    assert code != 0 and "choose --top-k of at most" in err and "note:" not in err, err


@pytest.mark.parametrize(
    ("batchnorm", "said", "statistics"),
    [
        (False, "the model's InstanceNorm layer holds", "each sample's statistics"),
        (
            True,
            "all 2 BatchNorm and InstanceNorm layers hold",
            "each batch's statistics (InstanceNorm by each sample's)",
        ),
    ],
)
def test_instancenorm_with_its_initial_running_statistics_is_said_and_recorded(
    capsys, tmp_path, batchnorm, said, statistics
):
    """An InstanceNorm layer with track_running_stats=True runs by its running statistics in
    eval mode as BatchNorm does, so at its initial ones (a model never trained) it does not
    normalise either; analyze counted only BatchNorm's (bn_initial_statistics 0, no note)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.Unflatten(1, (3, 4)),
        torch.nn.InstanceNorm1d(3, track_running_stats=True), torch.nn.Tanh(),
        torch.nn.Flatten(), *([torch.nn.BatchNorm1d(12)] if batchnorm else []),
        torch.nn.Linear(12, 10),
    )  # fmt: skip
    ckpt = tmp_path / "untrained.pt"
    torch.save(model, ckpt)
    code, out, err = run(
        capsys, "analyze", ckpt, "--trust-checkpoint", "--data", "digits", "--num-samples", "64",
        "--top-k", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["provenance"]["bn_initial_statistics"] == 1 + batchnorm
    assert " ".join(err.split()).split("note: ")[1:] == [
        f"{said} initial running statistics (mean 0, variance 1: no training step updated "
        "them), by which eval mode does not normalise, so these are the numbers of an "
        f"unnormalised network; --bn train normalises by {statistics}."
    ]


def test_check_steps_the_budget_never_leaves_room_for_are_refused(capsys, digits_mlp):
    """The check runs only where its steps fit in what the budget leaves once the pairs have
    converged: --check-steps 5000 (default budget 2000) or 8 with --max-hvps 10 ran no check at
    all, with exit 0 and nothing said."""
    top3 = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "3")
    message = _bad(capsys, *top3, "--check-steps", "5000")
    assert message == (
        "error: --check-steps 5000 can never run: the default budget of 2000 HVPs (--max-hvps) "
        "leaves at most 1997 once the pairs have their first products; give --check-steps of "
        "at most that, or a larger --max-hvps."
    )
    message = _bad(capsys, *top3, "--max-hvps", "10", "--check-steps", "8")
    assert "a budget of 10 HVPs (--max-hvps) leaves at most 7" in message
    # both ends: at least a product per pair at each
    message = _bad(capsys, *top3, "--which", "both", "--max-hvps", "10", "--check-steps", "5")
    assert "leaves at most 4" in message
    code, _, err = run(capsys, *top3, "--max-hvps", "10", "--check-steps", "7", "--json")
    assert code == 0, err
    code, _, err = run(capsys, *top3, "--max-hvps", "3", "--json")  # the default is not refused
    assert code == 0, err


def test_precision_without_products_is_refused(capsys, digits_mlp):
    """--precision sets the products' arithmetic only (losses and gradients are full): with
    --top-k 0 and no --trace or --density it changed nothing, yet spent products measuring
    hvp_rel_error and recorded precision bf16."""
    message = _bad(capsys, "analyze", digits_mlp, "--top-k", "0", "--precision", "bf16")
    assert message == (
        "error: --precision has no effect without Hessian-vector products (eigenpairs, --trace "
        "or --density); leave it out."
    )
    with pytest.raises(UserError, match="--precision has no effect without"):
        analyze_target(digits_mlp, AnalyzeRequest(top_k=0, precision="bf16"))
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "0", "--precision", "bf16")
    code, out, err = run(capsys, *args, "--trace", "--trace-probes", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["provenance"]["precision"] == "bf16"


def test_reduced_precision_with_float64_is_refused(capsys, digits_mlp):
    """Autocast and TF32 leave float64 arithmetic alone: --precision bf16 --dtype float64 ran in
    float64, recorded precision bf16 and an hvp_rel_error of 0, and certified the pairs."""
    message = _bad(
        capsys, "analyze", digits_mlp, "--top-k", "1", "--precision", "bf16", "--dtype", "float64"
    )
    assert message.startswith("error: --precision bf16 lowers float32 arithmetic only")
    assert "--dtype float64" in message and "use --precision full, or --dtype float32" in message


class Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": Hostile(str(marker))}, fh)

    def analyze(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "hessian_cli", "analyze", str(evil), "--model", "mlp",
             "--data", "digits", *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    proc = analyze()
    assert proc.returncode != 0
    assert "--trust-checkpoint" in one_sentence(proc.stderr)
    assert not marker.exists()
    analyze("--trust-checkpoint")  # with trust the file's code runs: the check above can fail
    assert marker.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--tol", "0"), "--tol must be a positive number"),
        (("--tol", "-1"), "--tol must be a positive number"),
        (("--tol", "2"), "--tol must be a positive number below 1"),  # all converged at once
        (("--tol", "inf"), "--tol must be a positive number"),
        # They said "the batch size must be a positive integer, not 0" (the number of ...).
        (("--batch-size", "0"), "--batch-size must be at least 1, not 0"),
        (("--num-samples", "0"), "--num-samples must be at least 1, not 0"),
        (("--num-batches", "0"), "--num-batches must be at least 1, not 0"),
        (("--top-k", "-1"), "--top-k must be at least 0, not -1"),
        (("--block-size", "0"), "--block-size must be at least 1, not 0"),
        (("--max-hvps", "0"), "--max-hvps must be at least 1, not 0"),
        (("--top-k", "5", "--max-hvps", "3"), "--max-hvps 3 is too few for 5 eigenpairs"),
        (
            ("--top-k", "2", "--which", "both", "--max-hvps", "3"),
            "--max-hvps 3 is too few for 2 eigenpairs at each end",
        ),
        (("--guard", "-1"), "--guard must be at least 0, not -1"),
        (("--seed", str(2**64)), "--seed must be an integer between -2**63 and 2**64 - 1"),
        (("--seed", str(-(2**63) - 1)), "--seed must be an integer between -2**63 and 2**64 - 1"),
        (("--trace", "--trace-probes", "1"), "--trace-probes must be at least 2, not 1"),
        # Recorded as given: HDF5's 64-bit integers failed the write after the analysis.
        (("--batch-size", str(2**64)), "--batch-size must be below 2**64"),
        (("--trace", "--trace-probes", str(2**64)), "--trace-probes must be below 2**64"),
        (("--density", "--density-steps", "1"), "--density-steps must be at least 2, not 1"),
        (("--density", "--density-sigma", "0"), "--density-sigma must be a positive number"),
        (("--density", "--density-sigma", "nan"), "--density-sigma must be a positive number"),
        (("--density", "--density-probes", "0"), "--density-probes must be at least 1, not 0"),
        (("--alignment", "--minibatches", "-3"), "--minibatches must be at least 0, not -3"),
        (("--alignment", "--alpha", "-1"), "--alpha must be a finite number of at least 0, not -1"),
        (("--alignment", "--rho", "nan"), "--rho must be a finite number of at least 0, not nan"),
        (
            ("--alignment", "--alpha", "inf"),
            "--alpha must be a finite number of at least 0, not inf",
        ),
    ],
)
def test_bad_counts_and_tolerances_are_refused(capsys, monkeypatch, digits_mlp, args, message):
    import hessian_cli.analysis as analysis_module

    def no_loading(*args, **kwargs):
        raise AssertionError("refused values must be refused before any checkpoint is loaded")

    if args[0] not in ("--num-samples", "--num-batches"):  # analysis_batches checks those
        monkeypatch.setattr(analysis_module, "load_checkpoint", no_loading)
    code, _, err = run(capsys, "analyze", digits_mlp, *args)
    assert code == 2 and message in one_sentence(err)


def test_seeds_at_both_ends_of_torchs_range_are_taken(capsys, digits_mlp):
    """analyze took 0 to 2**63 - 1 and train -2**63 to 2**64 - 1; both now take torch's range,
    and --which both seeds its second end with the next seed, wrapping at the top."""
    for seed in (-(2**63), -1, 2**64 - 1):
        code, out, err = run(
            capsys, "analyze", digits_mlp, "--num-samples", "64", "--top-k", "1",
            "--which", "both", "--seed", str(seed), "--json",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["provenance"]["seed"] == seed


def test_density_sigma_reaches_the_density(capsys, digits_mlp):
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "0", "--density")
    code, out, err = run(
        capsys, *args, "--density-steps", "8", "--density-sigma", "0.002", "--json"
    )
    assert code == 0, err
    density = json.loads(out)["density"]
    assert density["sigma"] == 0.002
    area = np.trapezoid(density["values"], density["grid"])
    assert area == pytest.approx(1.0, abs=1e-6)


def test_a_density_that_cannot_fit_is_refused_before_the_eigenpairs(
    capsys, monkeypatch, tmp_path, digits_mlp
):
    """The density's basis used to be allocated after the eigenpairs and the trace were
    computed: a failure then lost them (and on CUDA advised a smaller --batch-size)."""
    import hessian_cli.analysis as analysis_module
    import hessian_cli.engine.density as density_module

    def no_eigenpairs(*args, **kwargs):
        raise AssertionError("the density must be refused before the eigenpairs are computed")

    monkeypatch.setattr(density_module, "density_memory_need", lambda op, p, s: 2**62)
    monkeypatch.setattr(analysis_module, "eigenpairs", no_eigenpairs)
    out = tmp_path / "s.h5"
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "2", "--trace", "--density")
    code, _, err = run(capsys, *args, "--out", out)
    assert code == 2 and "give fewer probes or Lanczos steps" in one_sentence(err)
    assert not out.exists()


def test_a_trace_that_cannot_fit_is_refused_before_the_eigenpairs(
    capsys, monkeypatch, tmp_path, digits_mlp
):
    """The trace's probes were allocated after the eigenpairs were computed, unchecked: a trace
    that could not fit lost them (killed on the CPU; on CUDA advised a smaller --batch-size)."""
    import hessian_cli.analysis as analysis_module
    import hessian_cli.engine.trace as trace_module

    def no_eigenpairs(*args, **kwargs):
        raise AssertionError("the trace must be refused before the eigenpairs are computed")

    monkeypatch.setattr(trace_module, "trace_memory_need", lambda *args: 2**62)
    monkeypatch.setattr(analysis_module, "eigenpairs", no_eigenpairs)
    out = tmp_path / "s.h5"
    args = ("analyze", digits_mlp, "--num-samples", "64", "--top-k", "2", "--trace")
    code, _, err = run(capsys, *args, "--out", out)
    assert code == 2 and "trace's 99 probes on" in one_sentence(err)
    assert "give fewer probes" in one_sentence(err) and not out.exists()


def test_brackets_in_an_error_message_are_printed_as_they_are(capsys, tmp_path):
    missing = tmp_path / "model[vision].pt"
    code, _, err = run(capsys, "analyze", missing)
    assert code == 2 and "model[vision].pt" in one_sentence(err)


def test_download_reaches_the_data_loader(capsys, tmp_path, digits_mlp, monkeypatch):
    import hessian_cli.analysis

    seen = {}

    def load_data(spec, *, root=None, download=False, trusted=False):
        seen.update(spec=spec, root=root, download=download, trusted=trusted)
        raise UserError("stopped by the test.")

    monkeypatch.setattr(hessian_cli.analysis, "load_data", load_data)
    root = tmp_path / "d"
    code, _, err = run(
        capsys, "analyze", digits_mlp, "--data", "cifar10", "--data-root", root, "--download"
    )
    assert code == 2 and "stopped by the test" in err
    assert seen == {"spec": "cifar10", "root": str(root), "download": True, "trusted": True}


@pytest.mark.parametrize("given", [["--data-root", "."], ["--download"]])
def test_root_options_for_data_that_does_not_read_them_are_refused(capsys, digits_mlp, given):
    """The checkpoint's recorded data (digits) reads neither: silently unused before."""
    message = _bad(capsys, "analyze", digits_mlp, "--top-k", "1", *given)
    assert f"{given[0]} is read only for the torchvision datasets" in message
    assert "data 'digits' does not use it" in message


def test_an_analysis_without_eigenpairs_records_no_eigensolver_settings(
    capsys, tmp_path, digits_mlp
):
    """--top-k 0 --trace recorded the eigensolver's tol 0.0001 (and solver ''), though none ran:
    `show` named that tol for it beside an analysis at --tol 1e-6, and a series of such traces
    in files written so split, beside new ones, into runs by it."""
    args = ("analyze", digits_mlp, "--top-k", "0", "--trace", "--trace-probes", "6", "-q")
    code, out, _ = run(capsys, *args, "--json")
    provenance = json.loads(out)["provenance"]
    assert code == 0 and "tol" not in provenance and "solver" not in provenance
    out_h5 = tmp_path / "traces.h5"
    for _ in range(2):
        assert run(capsys, *args, "--out", out_h5)[0] == 0
    with h5py.File(out_h5, "a") as f:  # the first as files written before recorded it
        f["checkpoints/digits_mlp"].attrs.update(tol=1e-4, solver="")
    code, out, _ = run(capsys, "show", out_h5)
    assert code == 0 and "tol" not in out
    tight = ("--top-k", "1", "--tol", "1e-6", "-q", "--out", out_h5)
    assert run(capsys, "analyze", digits_mlp, *tight)[0] == 0
    code, out, _ = run(capsys, "show", out_h5)
    # One analysis of eigenpairs has a tol: no column (it was 1e-06 beside dashes)
    table = out.partition("last command")[2].partition("\n")[2]
    assert code == 0 and "0.0001" not in out and "tol" not in table and "0.84" in table, out


def test_an_analysis_without_products_records_no_hvp_backend(capsys, digits_mlp):
    """--top-k 0 alone recorded hvp_backend 'auto', the option, as if a backend had been used,
    and an hvp_rel_error of 0, measured on no product."""
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "0", "--json")
    provenance = json.loads(out)["provenance"]
    assert code == 0 and provenance["hvps"] == 0
    assert {"hvp_backend", "hvp_rel_error"}.isdisjoint(provenance), provenance
    code, out, _ = run(capsys, "analyze", digits_mlp, "--top-k", "1", "--json")
    assert code == 0 and json.loads(out)["provenance"]["hvp_backend"] in ("func", "double-backward")


def test_a_checkpoint_analysed_twice_is_shown_by_its_group(capsys, tmp_path, digits_mlp):
    out_h5 = tmp_path / "twice.h5"
    for k in ("1", "2"):
        code, _, err = run(capsys, "analyze", digits_mlp, "--top-k", k, "-q", "--out", out_h5)
        assert code == 0, err
    code, out, _ = run(capsys, "show", out_h5)
    assert code == 0 and "digits_mlp-2" in out
    code, out, _ = run(capsys, "show", out_h5, "-c", "digits_mlp-2", "--json")
    assert code == 0
    (report,) = json.loads(out)
    assert len(report["eigen"]["eigenvalues"]) == 2
    # Its own table is headed by its group: it was headed 'digits_mlp', the other's name too.
    code, out, _ = run(capsys, "show", out_h5, "-c", "digits_mlp-2")
    assert code == 0 and "\ndigits_mlp-2\n" in out, out


@pytest.mark.parametrize(
    "args, message",
    [(("--top-k", "0"), "give --top-k 1 or more"), (("--which", "smallest"), "--which largest")],
)
def test_alignment_without_top_eigenvectors_is_refused_before_any_work(
    capsys, tmp_path, digits_mlp, monkeypatch, args, message
):
    import hessian_cli.analysis

    def load_checkpoint(*a, **kw):
        raise AssertionError("the request should have been refused before loading")

    monkeypatch.setattr(hessian_cli.analysis, "load_checkpoint", load_checkpoint)
    code, _, err = run(capsys, "analyze", digits_mlp, "--trace", "--alignment", *args)
    assert code == 2 and message in one_sentence(err)


@pytest.mark.parametrize("key", ["model", "data", "loss"])
def test_code_named_by_a_checkpoint_runs_only_when_trusted(capsys, tmp_path, digits_mlp, key):
    """A checkpoint's metadata is not the user's choice: code it names (here, a file that would
    leave a marker when imported) is refused unless the user names it or trusts the file."""
    marker = tmp_path / "ran"
    code_file = tmp_path / "planted.py"
    real = {
        "model": "from hessian_cli.specs import build_model\n"
        "def make(**kw):\n    return build_model('mlp', input_shape=(64,), num_classes=10, kwargs=kw)\n",
        "data": "from hessian_cli.specs import load_data\n"
        "def make():\n    return load_data('digits')\n",
        "loss": "from hessian_cli.specs.losses import cross_entropy as make\n",
    }[key]
    code_file.write_text(f"open({str(marker)!r}, 'w').close()\n{real}")
    state = torch.load(digits_mlp, weights_only=True)
    planted = tmp_path / "planted.pt"
    meta = dict(state["hessian_cli"], **{key: f"{code_file}:make"})
    save_checkpoint(planted, state_dict=state["model"], metadata=meta)
    code, _, err = run(capsys, "analyze", planted, "--top-k", "1")
    assert code == 2 and not marker.exists()
    assert "the checkpoint names code to run" in one_sentence(err)
    code, _, err = run(capsys, "analyze", planted, "--top-k", "1", "--trust-checkpoint")
    assert code == 0, err
    assert marker.exists()


def test_a_checkpoint_that_records_one_of_torchs_losses_needs_no_trust(
    capsys, tmp_path, digits_mlp
):
    """train --loss torch.nn:CrossEntropyLoss records that spec: analyze of its checkpoints
    asked for --loss or --trust-checkpoint, though torch's own losses run no code of the file's
    choosing. Other torch.nn names (a module that is not a loss) still need trust."""
    state = torch.load(digits_mlp, weights_only=True)
    values = []
    for spec in ("ce", "torch.nn:CrossEntropyLoss", "torch.nn.functional:cross_entropy"):
        path = tmp_path / f"{len(values)}.pt"
        meta = dict(state["hessian_cli"], loss=spec)
        save_checkpoint(path, state_dict=state["model"], metadata=meta)
        code, out, err = run(capsys, "analyze", path, "--top-k", "2", "--json")
        assert code == 0, err
        values.append(json.loads(out)["eigen"]["eigenvalues"])
    assert values[1] == pytest.approx(values[0], rel=1e-5) == values[2]
    planted = tmp_path / "module.pt"
    meta = dict(state["hessian_cli"], loss="torch.nn:Identity")
    save_checkpoint(planted, state_dict=state["model"], metadata=meta)
    assert "the checkpoint names code to run" in _bad(capsys, "analyze", planted, "--top-k", "1")


def test_all_the_code_a_checkpoint_names_is_refused_in_one_sentence(
    capsys, tmp_path, digits_mlp, monkeypatch
):
    """Each refusal named one spec: the user passed --data, ran again and met --model's. (The
    files are there: one the checkpoint records and that is gone is said to be gone.)"""
    monkeypatch.chdir(tmp_path)
    for name in ("nets.py", "my data.py"):
        (tmp_path / name).write_text("raise SystemExit('never run')\n")
    state = torch.load(digits_mlp, weights_only=True)
    planted = tmp_path / "planted.pt"
    meta = dict(state["hessian_cli"], model="nets.py:make", data="my data.py:load")
    save_checkpoint(planted, state_dict=state["model"], metadata=meta)
    assert _bad(capsys, "analyze", planted, "--top-k", "1") == (
        "error: the checkpoint names code to run as its data factory ('my data.py:load') and "
        "model factory ('nets.py:make'): it runs only if you name it yourself (--data 'my "
        "data.py:load' --model nets.py:make), or pass --trust-checkpoint if you trust where "
        "the file came from."
    )
    # One named by the user is theirs to run; the other is still refused.
    message = _bad(capsys, "analyze", planted, "--top-k", "1", "--data", "digits")
    assert "its model factory ('nets.py:make'): " in message and "data" not in message


def test_a_checkpoint_that_records_no_options_of_a_built_in_model_names_the_defaults_taken(
    capsys, tmp_path
):
    """`train` recorded {} where no --model-kwargs were given, so its checkpoints from before
    mlp's default hidden changed ([64, 128, 128]) said only: 2 unexpected keys, 5 mismatches."""
    data = load_data("digits")
    path = tmp_path / "old.pt"
    meta = {"model": "mlp", "model_kwargs": "{}", "data": "digits", "loss": "ce"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BUILTIN_DEFAULTS, "mlp", {"hidden": [64, 128, 128], "activation": "tanh"})
        old = build_model("mlp", input_shape=data.input_shape, num_classes=10, kwargs=None)
    save_checkpoint(path, state_dict=old.state_dict(), metadata=meta)
    message = _bad(capsys, "analyze", path, "--top-k", "1")
    assert message.startswith("error: the checkpoint does not match the model (MLP): 2 unexpected")
    assert message.endswith(
        '\'mlp\' was built with today\'s defaults {"hidden": [128, 128], "activation": '
        '"tanh"}, which neither the checkpoint nor --model-kwargs names: pass the options it '
        'was trained with ({"hidden": [64, 128, 128]} until 2026-11-28) as --model-kwargs.'
    )
    given = run(
        capsys, "analyze", path, "--top-k", "1", "--model-kwargs", '{"hidden": [64, 128, 128]}'
    )
    assert given[0] == 0, given[2]
    # Options that were named are not blamed on the defaults.
    message = _bad(capsys, "analyze", path, "--top-k", "1", "--model-kwargs", '{"hidden": [64]}')
    assert "defaults" not in message
    # A bare state dict was never trained by us: no former default of ours is named for it.
    bare = tmp_path / "bare.pt"
    torch.save(old.state_dict(), bare)
    message = _bad(capsys, "analyze", bare, "--top-k", "1", "--model", "mlp", "--data", "digits")
    assert message.endswith(
        '\'mlp\' was built with today\'s defaults {"hidden": [128, 128], "activation": '
        '"tanh"}, which neither the checkpoint nor --model-kwargs names: pass the options it '
        "was trained with as --model-kwargs."
    )


def test_another_model_than_the_checkpoint_records_is_named_not_blamed_on_defaults(
    capsys, digits_mlp
):
    """`--model cnn` on the digits MLP's checkpoint said that 'cnn' was built with today's
    defaults and asked for the options it was trained with as --model-kwargs."""
    message = _bad(capsys, "analyze", digits_mlp, "--top-k", "1", "--model", "cnn")
    assert message.startswith("error: the checkpoint does not match the model (SmallCNN): ")
    assert message.endswith("; the checkpoint records the model 'mlp', not 'cnn'.")
    assert "defaults" not in message


@pytest.mark.parametrize("recorded", ["{not json", "[1]"])
def test_recorded_model_kwargs_that_are_not_an_object_are_one_sentence(
    capsys, tmp_path, digits_mlp, recorded
):
    state = torch.load(digits_mlp, weights_only=True)
    path = tmp_path / "odd_kwargs.pt"
    meta = dict(state["hessian_cli"], model_kwargs=recorded)
    save_checkpoint(path, state_dict=state["model"], metadata=meta)
    assert "model_kwargs are not a JSON object" in _bad(capsys, "analyze", path, "--top-k", "1")
    # As it asks: the arguments given are taken alone (they were merged with the recorded
    # ones, which failed again).
    given = run(capsys, "analyze", path, "--top-k", "1", "--model-kwargs", '{"hidden": [12]}')
    assert given[0] == 0, given[2]


@pytest.mark.parametrize(
    "kind",
    [
        "text file",
        "under a file",
        "metrics file",
        "figure name",
        "empty name",
        "dash",
        "directory name",
        "pipe",
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    capsys, monkeypatch, tmp_path, digits_mlp, kind
):
    import hessian_cli.analysis as analysis_module

    def no_loading(*args, **kwargs):
        raise AssertionError("an unwritable --out must be refused before any loading")

    monkeypatch.setattr(analysis_module, "load_checkpoint", no_loading)
    out = {
        "text file": tmp_path / "notes",
        "under a file": tmp_path / "notes" / "runs" / "s.h5",
        "metrics file": tmp_path / "metrics.h5",
        "figure name": tmp_path / "spectrum.PNG",  # HDF5 under an image's name misleads
        "empty name": "",
        "dash": "-",  # standard output's name: an HDF5 file named "-" was written
        "directory name": f"{tmp_path / 'runs'}/",  # an HDF5 file named runs was written
        "pipe": tmp_path / "fifo.h5",  # as /dev/stdout into a pipe: "cannot write to /proc/N/fd"
    }[kind]
    if kind == "pipe":
        if not hasattr(os, "mkfifo"):
            pytest.skip("named pipes are POSIX")
        os.mkfifo(out)
    if kind in ("text file", "under a file"):
        (tmp_path / "notes").write_text("my notes")
    if kind == "metrics file":
        with h5py.File(out, "w") as f:
            f.attrs["format"] = "hessian-cli-metrics"
    expected = {
        "text file": "is not an HDF5 file; refusing to write into it (choose another --out",
        "under a file": f"lies under {tmp_path / 'notes'}, which is not a directory",
        "metrics file": "not a spectra file",
        "figure name": "names a .png file, but the results are written as HDF5",
        "empty name": "--out needs a name, such as spectra.h5",
        "dash": "--out - names no file here (not standard output): give one, such as spectra.h5",
        "directory name": f"--out {out} names a directory; give a file name such as "
        f"{out}spectra.h5.",
        "pipe": f"--out {out} is a pipe, not a file: the results are written as an HDF5 file",
    }[kind]
    assert expected in _bad(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", out)
    if kind == "text file":
        assert out.read_text() == "my notes"
    held = {"metrics file": ["metrics.h5"], "text file": ["notes"], "under a file": ["notes"]}
    held["pipe"] = ["fifo.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == held.get(kind, [])


def test_an_empty_target_is_refused_not_taken_for_the_working_directory(
    capsys, monkeypatch, digits_mlp
):
    """`analyze "$CKPT"` with the variable unset: a path argument turned "" into ".", and every
    checkpoint in the working directory was analysed."""
    monkeypatch.chdir(digits_mlp.parent)
    assert "TARGET needs a name, such as model.pt" in _bad(capsys, "analyze", "", "--top-k", "1")


@pytest.mark.parametrize("option", ["--model", "--data", "--loss", "--data-root"])
def test_an_empty_spec_is_refused_not_taken_for_the_checkpoints(capsys, digits_mlp, option):
    """`--data "$DATA"` with the variable unset analysed the data the checkpoint records,
    unsaid (and so for --model, --loss and --data-root)."""
    message = _bad(capsys, "analyze", digits_mlp, option, "", "--top-k", "1")
    assert message.startswith(f"error: {option} needs a name, such as ")


def test_a_flag_given_a_value_is_told_that_it_takes_none(capsys, tmp_path, digits_mlp):
    """Typer's help shows each flag as `--trace <bool>`: `--trace true` left 'true' a target,
    'No such checkpoint file or directory: true.', with no word of why."""
    code, _, err = run(capsys, "analyze", digits_mlp, "--trace", "true", "--out", tmp_path / "s.h5")
    assert code == 2
    assert (
        "--trace takes no value: give it alone to turn it on, or leave it out (not --trace true)."
        in " ".join(err.replace("│", " ").split())
    )
    assert not (tmp_path / "s.h5").exists()


def test_a_quoted_tilde_in_a_target_or_out_is_the_home_directory(
    capsys, monkeypatch, tmp_path, digits_mlp
):
    """The shell leaves a quoted '~/x.pt' as it is: 'No such checkpoint file or directory:
    ~/x.pt', and --out '~/s.h5' was refused ("the output directory ./~ does not exist")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copyfile(digits_mlp, tmp_path / "x.pt")
    code, _, err = run(capsys, "analyze", "~/x.pt", "--top-k", "1", "--out", "~/s.h5", "-q")
    assert code == 0, err
    assert [r["name"] for r in read_analyses(tmp_path / "s.h5")] == ["x"]


def test_results_are_shown_even_when_their_write_fails(capsys, monkeypatch, tmp_path, digits_mlp):
    import hessian_cli.storage.hdf5 as hdf5_module

    def full_disk(*args, **kwargs):
        raise UserError("could not write s.h5: No space left on device.")

    monkeypatch.setattr(hdf5_module, "write_analyses", full_disk)
    code, out, err = run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", tmp_path / "s.h5")
    assert code == 2 and "No space left" in one_sentence(err)
    assert "Eigenvalues" in out


def test_an_output_that_is_a_link_appends_to_its_target(capsys, tmp_path, digits_mlp):
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "real.h5", tmp_path / "link.h5"
    assert run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", target)[0] == 0
    link.symlink_to(target)
    assert run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", link)[0] == 0
    assert link.is_symlink()
    with h5py.File(target) as f:
        assert len(f["checkpoints"]) == 2


def test_a_loss_or_model_that_does_not_fit_is_one_sentence(capsys, tmp_path, digits_mlp):
    user = tmp_path / "user_code.py"
    user.write_text(
        "import torch\n"
        "def raises(out, y):\n    raise ValueError('bad shapes in my loss')\n"
        "def returns_float(out, y):\n    return 1.0\n"
        "def constant(out, y):\n    return torch.tensor(1.0)\n"
        "def per_sample(out, y):\n"
        "    return torch.nn.functional.cross_entropy(out, y, reduction='none')\n"
        "class Pair(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.l = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n        return self.l(x.flatten(1)), 0\n"
    )
    for loss, message in (
        ("raises", "user_code.py:raises' raised ValueError: bad shapes in my loss"),
        ("returns_float", "the loss returns a float, not a scalar tensor"),
        ("per_sample", "the loss returns a tensor of shape (2,) for a batch of 2, not a scalar"),
        ("constant", "the loss does not depend on the model's outputs"),
    ):
        assert message in _bad(capsys, "analyze", digits_mlp, "--loss", f"{user}:{loss}")
    pair = tmp_path / "pair.pt"
    weights = {"l.weight": torch.zeros(10, 64), "l.bias": torch.zeros(10)}
    save_checkpoint(pair, state_dict=weights, metadata={})
    assert "the model returns a tuple, not a tensor" in _bad(
        capsys, "analyze", pair, "--model", f"{user}:Pair", "--data", "digits"
    )


def test_a_series_with_a_checkpoint_naming_no_model_is_refused_before_any_work(
    capsys, tmp_path, digits_mlp
):
    """A bare state dict after the series' first file was found only at its turn, once the
    files before it had been analysed."""
    runs = tmp_path / "series"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    save_checkpoint(runs / "a.pt", state_dict=state["model"], metadata=state["hessian_cli"])
    torch.save(state["model"], runs / "b.pt")  # a bare state dict: no model or data recorded
    out_h5 = tmp_path / "none.h5"
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--out", out_h5)
    assert code == 2
    assert one_sentence(err).startswith("error: b.pt: the checkpoint does not say which model")
    assert "Eigenvalues" not in out and not out_h5.exists()


def test_a_series_keeps_what_it_analysed_before_a_bad_checkpoint(capsys, tmp_path, digits_mlp):
    runs = tmp_path / "series"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    save_checkpoint(runs / "a.pt", state_dict=state["model"], metadata=state["hessian_cli"])
    other = build_model("mlp", input_shape=(64,), num_classes=10, kwargs={"hidden": [5]})
    later = dict(state["hessian_cli"], step=99)  # its recorded model does not fit its weights
    save_checkpoint(runs / "b.pt", state_dict=other.state_dict(), metadata=later)
    out_h5 = tmp_path / "kept.h5"
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--out", out_h5)
    assert code == 2
    message = one_sentence(err)
    assert (
        message.startswith("error: b.pt: ") and "the checkpoint before it was analysed" in message
    )
    assert "Eigenvalues" in out
    assert [d["name"] for d in read_analyses(out_h5)] == ["a"]
    # The first of a series failing: which one (a file of data beside the checkpoints said
    # "2 unexpected keys (x, y)" of no file).
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({"x": torch.zeros(2, 64), "y": torch.zeros(2)}, plain / "a_batch.pt")
    torch.save(state["model"], plain / "b_weights.pt")
    flags = ["--model", "mlp", "--model-kwargs", json.dumps(MLP_KW), "--data", "digits"]
    code, _, err = run(capsys, "analyze", plain, *flags, "--top-k", "1")
    assert code == 2 and one_sentence(err).startswith("error: a_batch.pt: the checkpoint does")


def test_weights_picked_by_key_are_analysed_and_recorded(capsys, tmp_path, digits_mlp):
    state = torch.load(digits_mlp, weights_only=True)["model"]
    ema = {k: v * 0.5 for k, v in state.items()}
    path = tmp_path / "run.ckpt"  # a LightningModule's: its model's keys under "model."
    both = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v for k, v in ema.items()},
    }
    torch.save({"state_dict": both, "epoch": 4, "global_step": 40}, path)
    flags = ["--model", "mlp", "--model-kwargs", json.dumps(MLP_KW), "--data", "digits"]
    reports = {}
    for key in ("model", "ema"):
        code, out, err = run(
            capsys, "analyze", path, *flags, "--weights-key", key, "--top-k", "1", "--json"
        )
        assert code == 0, err
        reports[key] = json.loads(out)["provenance"]
        assert reports[key]["weights_key"] == key and reports[key]["step"] == 40
    (reference,) = json.loads(run(capsys, "analyze", digits_mlp, "--top-k", "1", "--json")[1])[
        "eigen"
    ]["eigenvalues"][:1]
    code, out, _ = run(
        capsys, "analyze", path, *flags, "--weights-key", "model", "--top-k", "1", "--json"
    )
    assert json.loads(out)["eigen"]["eigenvalues"][0] == pytest.approx(reference, rel=1e-6)
    code, _, err = run(capsys, "analyze", path, *flags, "--top-k", "1")
    assert code == 2 and "pick one with --weights-key" in one_sentence(err)
    # One set under a leading name: taken, and where from is recorded.
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, path)
    code, out, err = run(capsys, "analyze", path, *flags, "--top-k", "1", "--json")
    provenance = json.loads(out)["provenance"]
    assert code == 0 and provenance["weights_prefix"] == "net", err
    assert provenance.get("weights_key") is None
    code, out, err = run(capsys, "analyze", path, *flags, "--top-k", "1")
    assert code == 0 and "weights_prefix=net" in out, err  # said where the results are shown
    # An entry asked for, whose weights carry a leading name: each is recorded as what it is
    # (joined, "ema.net" would have named other weights to --weights-key).
    torch.save({"ema": {f"net.{k}": v for k, v in ema.items()}, "state_dict": state}, path)
    code, out, err = run(capsys, "analyze", path, *flags, "--weights-key", "ema", "--json")
    provenance = json.loads(out)["provenance"]
    assert code == 0 and (provenance["weights_key"], provenance["weights_prefix"]) == ("ema", "net")


@pytest.mark.parametrize(
    "stop", [KeyboardInterrupt, Terminated, TypeError, MemoryError, distributed.PeerLost]
)
def test_an_interrupted_series_keeps_what_it_analysed(
    capsys, tmp_path, digits_mlp, monkeypatch, stop
):
    """Ctrl-C or SIGTERM during a series' second checkpoint: the first is shown and written,
    and the exit status is the signal's (a series used to lose it, and said nothing). An
    error of ours there lost the first too."""
    from hessian_cli import analysis as analysis_module

    runs = tmp_path / "series"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    for name, step in (("a", 1), ("b", 2)):
        meta = dict(state["hessian_cli"], step=step)
        save_checkpoint(runs / f"{name}.pt", state_dict=state["model"], metadata=meta)
    real = analysis_module.analyze_checkpoint

    def second_stops(ckpt, *args, **kwargs):
        if ckpt.path.name == "b.pt":
            raise stop()
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(analysis_module, "analyze_checkpoint", second_stops)

    def leave(code):  # the entry point's os._exit, which would end pytest too
        raise SystemExit(code)

    monkeypatch.setattr(sys.modules["hessian_cli.cli.app"], "_leave_now", leave)
    out_h5 = tmp_path / "kept.h5"
    code, out, err = run(capsys, "analyze", runs, "--top-k", "1", "--out", out_h5)
    assert code == {KeyboardInterrupt: 130, Terminated: 143}.get(stop, 1)
    why = {
        TypeError: "unexpected TypeError (run with --debug",
        MemoryError: "the machine ran out of memory: try fewer samples",
        distributed.PeerLost: "another rank left or stopped answering",  # not Gloo's words
    }.get(stop, "interrupted")
    assert f"b.pt: {why}" in " ".join(err.split())
    assert "(the checkpoint before it was analysed and is kept)" in err
    assert "Eigenvalues" in out
    assert [d["name"] for d in read_analyses(out_h5)] == ["a"]


def _series_with_a_misfit(tmp_path: Path, digits_mlp: Path, *, steps: int, misfit: int) -> Path:
    """A directory of checkpoints s1.pt .. s{steps}.pt of steps 1.., the one of step ``misfit``
    missing a weight, so that it does not fit the model."""
    runs = tmp_path / "series"
    runs.mkdir()
    state = torch.load(digits_mlp, weights_only=True)
    for step in range(1, steps + 1):
        weights = dict(state["model"])
        if step == misfit:
            weights.popitem()
        meta = dict(state["hessian_cli"], step=step)
        save_checkpoint(runs / f"s{step}.pt", state_dict=weights, metadata=meta)
    return runs


def test_a_series_stopped_in_its_middle_says_which_were_not_analysed(capsys, tmp_path, digits_mlp):
    """A file whose weights do not fit, third of four: the two before are kept, and the message
    says the one after it was never reached (it read as a series that had ended there)."""
    runs = _series_with_a_misfit(tmp_path, digits_mlp, steps=4, misfit=3)
    out_h5 = tmp_path / "kept.h5"
    code, _, err = run(capsys, "analyze", runs, "--top-k", "1", "-q", "--out", out_h5)
    assert code == 2
    said = " ".join(err.split())
    assert said.startswith("error: s3.pt: the checkpoint does not match the model")
    assert said.endswith(
        "(the 2 checkpoints before it were analysed and are kept; the one after it, s4.pt, "
        "was not analysed)."
    )
    assert [d["name"] for d in read_analyses(out_h5)] == ["s1", "s2"]


def test_a_series_stopped_at_its_first_checkpoint_says_the_others_were_not_analysed(
    capsys, tmp_path, digits_mlp
):
    """The first file's weights do not fit: nothing is written, and the message says the two
    after it were never reached (it named the first alone, as if it were the whole series)."""
    runs = _series_with_a_misfit(tmp_path, digits_mlp, steps=3, misfit=1)
    out_h5 = tmp_path / "none.h5"
    code, _, err = run(capsys, "analyze", runs, "--top-k", "1", "-q", "--out", out_h5)
    assert code == 2
    said = " ".join(err.split())
    assert said.startswith("error: s1.pt: the checkpoint does not match the model")
    assert said.endswith("(the 2 after it, from s2.pt on, were not analysed).")
    assert not out_h5.exists()


def test_a_rerun_into_the_same_out_says_it_added_beside_what_the_file_held(
    capsys, tmp_path, digits_mlp
):
    """--out appends: the second run said "wrote" as the first did, as if it had replaced the
    file's analysis; it names the group added (digits_mlp-2, the name `show -c` takes)."""
    out_h5 = tmp_path / "twice.h5"
    args = ("analyze", digits_mlp, "--top-k", "1", "--out", out_h5)
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.splitlines()[-1] == f"wrote {out_h5}"
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert (
        out.splitlines()[-1] == f"wrote {out_h5}: added digits_mlp-2 beside the 1 analysis it held"
    )
    assert group_names(out_h5) == ["digits_mlp", "digits_mlp-2"]


@pytest.mark.parametrize("rank, size, named", [("x", "2", "RANK"), ("0", "", "WORLD_SIZE")])
def test_a_rank_or_world_size_torchrun_would_not_set_is_one_sentence(
    capsys, digits_mlp, monkeypatch, rank, size, named
):
    """RANK or WORLD_SIZE that is no whole number (a job's shell's, not torchrun's) was a
    ValueError traceback, raised again by the report of it."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    code, out, err = run(capsys, "analyze", digits_mlp, "--top-k", "1")
    assert (code, out) == (2, "")
    value = {"RANK": rank, "WORLD_SIZE": size}[named]
    assert one_sentence(err) == (
        f"error: {named} is {value!r}, not the whole number torchrun sets: start the job with "
        "torchrun, or unset RANK and WORLD_SIZE to run one process."
    )


@pytest.mark.parametrize(
    "stop, code, said",
    [
        (KeyboardInterrupt, 130, "interrupted: nothing was written."),
        (Terminated, 143, "stopped: the process received SIGTERM; nothing was written."),
    ],
)
def test_a_stop_before_the_first_result_says_nothing_was_written(
    capsys, tmp_path, digits_mlp, monkeypatch, stop, code, said
):
    """An existing --out stays as it was, and the run says so (a Ctrl-C ended silently before;
    a SIGTERM, a scheduler's, said only that it came)."""
    from hessian_cli import analysis as analysis_module

    out_h5 = tmp_path / "kept.h5"
    assert run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", out_h5)[0] == 0
    before = out_h5.read_bytes()

    def stops(*args, **kwargs):
        raise stop

    def leave(status):  # the entry point's os._exit, which would end pytest too
        raise SystemExit(status)

    monkeypatch.setattr(analysis_module, "analyze_checkpoint", stops)
    monkeypatch.setattr(sys.modules["hessian_cli.cli.app"], "_leave_now", leave)
    status, out, err = run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", out_h5)
    assert (status, out, err.strip()) == (code, "", said)
    assert out_h5.read_bytes() == before


@pytest.mark.parametrize(
    "signum, code, said",
    [
        (signal.SIGINT, 130, "interrupted: {} was written first."),
        (signal.SIGTERM, 143, "stopped: the process received SIGTERM; {} was written first."),
    ],
)
def test_a_stop_while_the_file_is_written_says_it_was_written(
    capsys, tmp_path, digits_mlp, monkeypatch, signum, code, said
):
    """A Ctrl-C or SIGTERM waits for the file to be in place, then stopped the run with
    nothing said of it: neither the "wrote" line nor that the file had been written."""
    from hessian_cli.storage import hdf5

    real = hdf5._write_group

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    def leave(code):  # the entry point's os._exit, which would end pytest too
        raise SystemExit(code)

    monkeypatch.setattr(hdf5, "_write_group", stopped)
    monkeypatch.setattr(sys.modules["hessian_cli.cli.app"], "_leave_now", leave)
    out_h5 = tmp_path / "spectra.h5"
    status, _, err = run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", out_h5)
    assert status == code
    assert " ".join(err.split()) == said.format(out_h5)
    assert [d["name"] for d in read_analyses(out_h5)] == ["digits_mlp"]


@pytest.mark.parametrize(
    "signum, code, said",
    [
        (signal.SIGINT, 130, "interrupted: nothing was written to {}"),
        (signal.SIGTERM, 143, "stopped: the process received SIGTERM; nothing was written to {}"),
    ],
)
def test_a_stop_while_waiting_for_another_writer_says_nothing_was_written(
    capsys, tmp_path, digits_mlp, monkeypatch, signum, code, said
):
    """A Ctrl-C or SIGTERM while another process held the file (its lock) stops the wait at
    once: the run said the file "was written first", and there was none."""
    from hessian_cli.storage import hdf5

    real = hdf5.locked

    @contextlib.contextmanager
    def waited(path):  # the stop arrives while the lock is awaited
        os.kill(os.getpid(), signum)
        with real(path) as held:
            yield held

    def leave(code):  # the entry point's os._exit, which would end pytest too
        raise SystemExit(code)

    monkeypatch.setattr(hdf5, "locked", waited)
    monkeypatch.setattr(sys.modules["hessian_cli.cli.app"], "_leave_now", leave)
    out_h5 = tmp_path / "spectra.h5"
    status, _, err = run(capsys, "analyze", digits_mlp, "--top-k", "1", "--out", out_h5)
    assert status == code
    assert " ".join(err.split()).startswith(said.format(out_h5)), err
    assert not out_h5.exists()


@pytest.mark.parametrize("shown", [[], ["--json"]])
def test_results_are_written_where_their_reader_has_gone(tmp_path, digits_mlp, shown):
    """A pager quit before the results came (`| less`, then q): printing them to the closed
    pipe ended the command, silently with status 1, before it wrote its --out."""
    out_h5 = tmp_path / "spectra.h5"
    reader, writer = os.pipe()
    os.close(reader)
    try:
        subprocess.run(
            [sys.executable, "-m", "hessian_cli", "analyze", str(digits_mlp), "-k", "1",
             "--out", str(out_h5), *shown],
            stdout=writer, stderr=subprocess.PIPE, timeout=300,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert [d["name"] for d in read_analyses(out_h5)] == ["digits_mlp"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("shown", [[], ["--json"]])
def test_results_that_standard_output_cannot_take_are_said_and_still_written(
    tmp_path, digits_mlp, shown
):
    """`analyze ... --json > results.json` on a full disk said "unexpected OSError: [Errno
    28] No space left on device": one sentence names standard output, and --out is written."""
    out_h5 = tmp_path / "spectra.h5"
    with open("/dev/full", "w") as full_disk:  # every write to it fails: no space left
        done = subprocess.run(
            [sys.executable, "-m", "hessian_cli", "analyze", str(digits_mlp), "-k", "1",
             "--out", str(out_h5), *shown],
            stdout=full_disk, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 2
    said = "error: could not write to standard output: no space left on device."
    assert one_sentence(done.stderr) == said
    assert [d["name"] for d in read_analyses(out_h5)] == ["digits_mlp"]


def test_recorded_values_hdf5_cannot_hold_do_not_lose_the_results(capsys, tmp_path, digits_mlp):
    """A step of 2**80 or of bytes, a file name that is not UTF-8, model_kwargs stored as a
    dict: the writes (or the model's build) failed after all the work, exit 1, no file."""
    state = torch.load(digits_mlp, weights_only=True)
    meta = state["hessian_cli"]
    odd = {
        "huge.pt": dict(meta, step=2**80, epoch=float("nan")),
        "bytes.pt": dict(meta, step=b"\xff\x00"),
        "kwargs.pt": dict(meta, model_kwargs=json.loads(meta["model_kwargs"])),
        os.fsdecode(b"name\xff.pt"): meta,
    }
    runs = tmp_path / "series"
    runs.mkdir()
    for name, metadata in odd.items():
        torch.save({**state, "hessian_cli": metadata}, runs / name)
    out_h5 = tmp_path / "odd.h5"
    code, _, err = run(capsys, "analyze", runs, "--top-k", "1", "--out", out_h5, "-q")
    assert code == 0, err
    written = {d["name"]: d["provenance"] for d in read_analyses(out_h5)}
    assert sorted(written) == ["bytes", "huge", "kwargs", "name\\xff"]
    assert "step" not in written["huge"] and "epoch" not in written["huge"]
    assert "step" not in written["bytes"]
    assert written["name\\xff"]["checkpoint"].endswith("name\\xff.pt")


@pytest.mark.parametrize("kwargs", [{"hidden": [12], 1: 2}, {"hidden": [12], "dtype": torch.int8}])
def test_recorded_model_kwargs_json_cannot_hold_are_one_sentence(
    capsys, tmp_path, digits_mlp, kwargs
):
    """A dict recorded by hand is taken as JSON would hold it: an int key or a dtype value
    failed later, as an unexpected error (status 1)."""
    state = torch.load(digits_mlp, weights_only=True)
    path = tmp_path / "odd.pt"
    torch.save({**state, "hessian_cli": dict(state["hessian_cli"], model_kwargs=kwargs)}, path)
    assert "model_kwargs are not a JSON object" in _bad(capsys, "analyze", path, "--top-k", "1")
    # What JSON writes as another type is fine: a tuple (a list in JSON), as before.
    tupled = dict(state["hessian_cli"], model_kwargs={"hidden": tuple(MLP_KW["hidden"])})
    torch.save({**state, "hessian_cli": tupled}, path)
    assert run(capsys, "analyze", path, "--top-k", "1")[0] == 0


def test_analyze_errors_go_on_in_lower_case_after_error(capsys, tmp_path, digits_mlp):
    """A sentence after "error:" goes on in lower case, as the CLI's own ("--top-k must be
    ..."): analyze's read "error: No such checkpoint file ..." and "error: Give --num-samples"."""
    (tmp_path / "empty").mkdir()
    bare = tmp_path / "bare.pt"
    torch.save(load_checkpoint(digits_mlp).state_dict, bare)
    for args in (
        (tmp_path / "missing.pt",),
        (tmp_path / "empty",),
        (bare,),
        (digits_mlp, "--num-samples", "8", "--num-batches", "1"),
    ):
        first = _bad(capsys, "analyze", *args).removeprefix("error: ").split()[0]
        assert first.islower(), (args, first)
    code, _, err = run(
        capsys, "analyze", digits_mlp, "--num-samples", "8", "-k", "0", "--seed", "1"
    )
    assert code == 0 and err.startswith("note: --seed 1"), err


def test_an_out_path_in_a_loop_of_links_is_refused_before_the_work(capsys, tmp_path, digits_mlp):
    """--out a link to itself, or a file under such a folder, was "unexpected RuntimeError:
    Symlink loop from ...", status 1 (pathlib's resolve)."""
    (tmp_path / "loop.h5").symlink_to(tmp_path / "loop.h5")
    (tmp_path / "runs").symlink_to(tmp_path / "runs")
    for out in ("loop.h5", "runs/spectra.h5"):
        code, _, err = run(capsys, "analyze", digits_mlp, "-k", "1", "--out", tmp_path / out)
        assert code == 2
        said = f"error: --out {tmp_path / out} leads into a loop of symbolic links; give another"
        assert one_sentence(err).startswith(said)


def test_debug_shows_the_traceback_with_the_same_exit_status(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _bad(capsys, "analyze", empty)
    assert "holds no checkpoint files" in message and ".ckpt" in message
    code, _, err = run(capsys, "--debug", "analyze", empty)
    assert code == 2
    assert "Traceback" in err and "UserError" in err


def test_models_the_analysis_cannot_take_are_refused_before_the_work(capsys, tmp_path):
    nets = tmp_path / "nets.py"
    nets.write_text(
        "import torch, torch.nn as nn\n"
        "def bn_net():\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))\n"
        "class Phased(nn.Linear):\n"
        "    def __init__(self):\n"
        "        super().__init__(3, 2)\n"
        "        self.phase = nn.Parameter(torch.full((2,), 1 + 1j))\n"
        "    def forward(self, x):\n"
        "        return (super().forward(x) * self.phase).abs()\n"
        "def complex_net():\n"
        "    return Phased()\n"
        "class Checked(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        assert x.shape[1] == 5, 'five features expected'\n"
        "        return super().forward(x)\n"
        "def checked_net():\n"
        "    return Checked(3, 2)\n"
    )
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.normal(size=(33, 3)).astype("float32"), y=rng.integers(0, 2, 33))
    namespace: dict = {}
    exec(nets.read_text(), namespace)
    cases = [
        ("bn_net", ["--bn", "train", "--batch-size", "16", "--num-samples", "33"], "batch of 1"),
        ("complex_net", [], "the parameter phase is complex"),
        ("checked_net", [], "does not fit the model: five features expected"),
    ]
    for factory, options, message in cases:
        ckpt = tmp_path / f"{factory}.pt"
        torch.save(namespace[factory]().state_dict(), ckpt)
        args = ["analyze", ckpt, "--model", f"{nets}:{factory}", "--data", data, *options]
        code, out, err = run(capsys, *args, "--top-k", "1")
        assert code == 2, err
        assert message in one_sentence(err)


def test_the_smallest_of_a_trained_float32_network_are_not_given_up_as_noise(capsys, tmp_path):
    """The stall guard took a trained MLP's smallest eigenpairs (float32, 64 samples) for
    noise-bound: 108 of 2000 products, residuals 2.8e-3, and advice to loosen --tol, where the
    products' asymmetry was 1.8e-7 and the tolerance 1e-4 is met (about 300 products)."""
    run_dir = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", "mlp", "--data", "digits", "--epochs", "30",
        "--eig-every", "10", "--track-every", "0", "--max-steps", "294",
        "--checkpoint-every", "0", "-q", "--out", run_dir,
    )  # fmt: skip
    assert code == 0, err
    ckpt = run_dir / "checkpoints" / "step0000294.pt"
    args = ("analyze", ckpt, "-k", "2", "--which", "smallest", "--num-samples", "64", "--json")
    code, out, err = run(capsys, *args)
    eigen = json.loads(out)["eigen"]
    assert code == 0 and not err, err
    assert eigen["stop_reason"] == "converged" and all(r <= 1e-4 for r in eigen["residuals"])


def test_the_checkpoints_recorded_classes_build_its_model(capsys, tmp_path, digits_mlp):
    """Data whose labels miss the top classes made a smaller output layer than the weights'
    (a shape mismatch was said); labels beyond the model's classes are refused as such."""
    ckpt = load_checkpoint(digits_mlp)
    recorded = tmp_path / "recorded.pt"
    metadata = {**ckpt.metadata, "num_classes": 10}
    save_checkpoint(recorded, state_dict=ckpt.state_dict, metadata=metadata)
    x, y = load_data("digits").train.tensors
    below = y < 8
    np.savez(tmp_path / "eight.npz", x=x[below].numpy(), y=y[below].numpy())
    np.savez(tmp_path / "ten.npz", x=x[below].numpy(), y=y[below].numpy(), num_classes=10)
    values = []
    for data in ("eight.npz", "ten.npz"):
        code, out, err = run(capsys, "analyze", recorded, "-k", "2", "--data", tmp_path / data,
                             "--num-samples", "64", "--json")  # fmt: skip
        assert code == 0, err
        values.append(json.loads(out)["eigen"]["eigenvalues"])
    assert values[0] == values[1]
    y_out = y.clone()
    y_out[0] = 12
    np.savez(tmp_path / "twelve.npz", x=x.numpy(), y=y_out.numpy())
    message = _bad(capsys, "analyze", recorded, "-k", "1", "--data", tmp_path / "twelve.npz")
    assert "label 12 is out of range for 10 classes" in message


def test_a_label_far_beyond_any_class_count_is_one_sentence_not_out_of_memory():
    with pytest.raises(UserError, match="with 1,099,511,627,777 outputs and model arguments"):
        build_model("mlp", input_shape=(1, 8, 8), num_classes=2**40 + 1, kwargs={"hidden": [32]})
    with pytest.raises(UserError, match=r"with 10 outputs and model arguments .*check its options"):
        build_model("mlp", input_shape=(1, 8, 8), num_classes=10, kwargs={"hidden": [2**20] * 2})


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            ("--save-eigenvectors",),
            "--save-eigenvectors has no effect without eigenpairs and --out",
        ),
        (("-k", "0", "--trace", "--save-eigenvectors"), "--save-eigenvectors has no effect"),
        (("--density-steps", "1"), "--density-steps has no effect without --density"),
        (("--rho", "-5"), "--rho has no effect without --alignment"),
        (("--trace-probes", "3"), "--trace-probes has no effect without --trace"),
        (("-k", "0", "--trace", "--tol", "1e-3"), "--tol has no effect without eigenpairs"),
    ],
)
def test_an_option_whose_feature_is_off_is_refused(capsys, tmp_path, digits_mlp, given, message):
    """These were accepted and silently unused (their values unchecked), as train refuses
    options its optimizer does not read."""
    out = tmp_path / "s.h5"
    to_file = () if given == ("--save-eigenvectors",) else ("-o", out)  # read with it
    assert message in _bad(capsys, "analyze", digits_mlp, "--num-samples", "16", *given, *to_file)
    assert not out.exists()
    code, _, err = run(capsys, "analyze", digits_mlp, "-k", "1", "--num-samples", "16", "--rho", "0.05",
                       "--alignment", "-q", "--save-eigenvectors", "--out", out)  # fmt: skip
    assert code == 0, err  # given with their features, the same options are read


def test_a_seed_that_draws_nothing_is_noted_not_refused(capsys, digits_mlp):
    """`--top-k 0 --seed 3` was accepted unsaid and recorded seed 3 as if used; scripts pass
    --seed every time, so it is noted rather than refused as the options above are."""
    args = ("analyze", digits_mlp, "--num-samples", "16", "--json", "--seed", "3")
    code, _, err = run(capsys, *args, "-k", "0")
    assert code == 0, err
    assert " ".join(err.split()) == (
        "note: --seed 3 draws nothing here: there are no eigenpairs (--top-k 0), --trace or "
        "--density (it seeds only what the model's or data's own code draws)."
    )
    for read in (("-k", "0", "--trace"), ("-k", "1"), ("-k", "0", "-q")):  # it draws, or quiet
        code, _, err = run(capsys, *args, *read)
        assert code == 0 and "Note" not in err, err


def test_an_out_link_is_named_by_its_own_name_and_any_spectra_file_is_appended_to(
    capsys, tmp_path, digits_mlp
):
    """The name check read a link's target (refused after the work: target.bin), and would
    refuse to add to a spectra file that already has another suffix."""
    link = tmp_path / "link.h5"
    link.symlink_to(tmp_path / "target.bin")
    args = ("analyze", digits_mlp, "-k", "1", "--num-samples", "16", "-q")
    code, _, err = run(capsys, *args, "--out", link)
    assert code == 0, err
    assert len(read_analyses(tmp_path / "target.bin")) == 1
    code, _, err = run(capsys, *args, "--out", tmp_path / "target.bin")  # exists: appended to
    assert code == 0, err
    assert len(read_analyses(tmp_path / "target.bin")) == 2


def test_class_labels_stored_as_floats_are_named_as_the_cause_of_a_mismatch(capsys, tmp_path):
    """They are read as one regression target, the built-in model is made with one output, and
    the message blamed only the checkpoint."""
    x, y = load_data("digits").train.tensors
    floaty = tmp_path / "floaty.npz"
    np.savez(floaty, x=x.numpy(), y=y.numpy().astype("float32"))
    example = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    message = _bad(capsys, "analyze", example, "--data", floaty)
    assert message.startswith("error: the checkpoint does not match the model (MLP): 2 mismatches")
    assert message.endswith(
        "(the data's targets are real numbers, read as 1 regression output: class labels must "
        "be stored as integers)."
    )


def test_the_library_refuses_an_option_whose_analysis_was_not_asked_for(digits_mlp):
    """The command refused --rho without --alignment; the library ran and ignored it."""
    with pytest.raises(UserError, match="--rho has no effect without --alignment; leave it out"):
        analyze_target(digits_mlp, AnalyzeRequest(top_k=5, rho=0.1))
    with pytest.raises(UserError, match="--density-steps has no effect without --density"):
        analyze_target(digits_mlp, AnalyzeRequest(top_k=1, density_steps=10))


def test_model_kwargs_change_the_recorded_ones_they_name(capsys):
    """--model-kwargs replaced the recorded arguments: {"activation": "relu"} lost the recorded
    hidden sizes, and the weights no longer fit."""
    example = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    code, out, err = run(
        capsys, "analyze", example, "--model-kwargs", '{"activation": "relu"}', "--top-k", "1",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    used = json.loads(json.loads(out)["provenance"]["model_kwargs"])
    assert used == {"hidden": [32], "activation": "relu"}


def test_real_regression_targets_get_no_hint_about_class_labels(capsys, tmp_path):
    """The hint blamed the targets' storage where they were real regression targets."""
    x, y = load_data("digits").train.tensors
    real = tmp_path / "real.npz"
    np.savez(real, x=x.numpy(), y=y.numpy().astype("float32") + 0.5)
    example = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    message = _bad(capsys, "analyze", example, "--data", real)
    assert message.startswith("error: the checkpoint does not match the model (MLP)")
    assert "class labels" not in message


def test_a_directory_of_copies_of_one_checkpoint_analyses_its_weights(tmp_path, digits_mlp):
    """A directory of two copies of one file (a checkpoint and Lightning's last.ckpt written as
    a copy) is one file once the copies are left out: its weights, held only for the series'
    order, were not read again, and the analysis met an empty state dict ('the checkpoint does
    not match the model: 4 missing keys')."""
    runs = tmp_path / "ckpts"
    runs.mkdir()
    shutil.copyfile(digits_mlp, runs / "epoch=0-step=20.pt")
    shutil.copyfile(digits_mlp, runs / "last.pt")
    results = analyze_target(runs, AnalyzeRequest(top_k=1, num_samples=64))
    alone = analyze_target(digits_mlp, AnalyzeRequest(top_k=1, num_samples=64))
    assert [r.name for r in results] == ["epoch=0-step=20"]
    assert results[0].eigen.eigenvalues.tolist() == alone[0].eigen.eigenvalues.tolist()


def test_a_first_checkpoint_rewritten_before_its_turn_is_named_once(
    tmp_path, digits_mlp, monkeypatch
):
    """The file of a series rewritten before its turn was named twice: 'c1.pt: c1.pt changed
    since the series was read'."""
    import hessian_cli.analysis as analysis

    runs, state = _series_of_two(tmp_path, digits_mlp)
    real_load, loads = analysis.load_checkpoint, []

    def load(path, *args, **kwargs):
        loads.append(path)
        if len(loads) == 3:  # its turn: a run wrote it again since the series was read
            sd = {k: 2 * v for k, v in state["model"].items()}
            meta = dict(state["hessian_cli"], step=1)
            save_checkpoint(runs / "c1.pt", state_dict=sd, metadata=meta)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(analysis, "load_checkpoint", load)
    with pytest.raises(UserError) as info:
        analyze_target(runs, AnalyzeRequest(top_k=1))
    assert str(info.value) == (
        "c1.pt: changed since the series was read (its sha256 differs) (the one after it, c2.pt, "
        "was not analysed)."
    )


def test_comma_joined_globs_are_globs(capsys, digits_mlp):
    """The provenance records `--params` as its globs joined by commas ("3.*,1.bias"): given
    back as one --params, that named no parameter and was refused."""
    code, out, err = run(
        capsys, "analyze", digits_mlp, "--params", "3.*", "--params", "1.bias", "--json"
    )
    assert code == 0, err
    first = json.loads(out)
    glob = first["provenance"]["params_glob"]
    assert glob == "3.*,1.bias"
    code, out, err = run(capsys, "analyze", digits_mlp, "--params", glob, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["provenance"]["num_params"] == first["provenance"]["num_params"] == 130 + 12
    assert again["eigen"]["eigenvalues"] == first["eigen"]["eigenvalues"]


def test_params_globs_are_read_without_spaces_and_an_empty_one_names_the_flag(capsys, digits_mlp):
    """'3.*, 1.bias' (a space after the comma) was refused: no parameter matched ' 1.bias'; an
    empty --params was told in the library's words, 'params selects no parameters'."""
    code, out, err = run(capsys, "analyze", digits_mlp, "--params", "3.*, 1.bias", "--json")
    assert code == 0, err
    assert json.loads(out)["provenance"]["params_glob"] == "3.*,1.bias"
    message = _bad(capsys, "analyze", digits_mlp, "--params", " ,")
    assert message == "error: --params needs a glob of parameter names, such as 'fc.*'."
