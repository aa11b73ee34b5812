"""Model specs: built-ins, the real PyHessian ResNet-20 checkpoint, torchvision and user code."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from hessian_cli.errors import UserError
from hessian_cli.specs import BUILTIN_MODELS, apply_weights, build_model, load_checkpoint
from hessian_cli.specs.models import with_checkpoint_layout

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "fixtures"
RESNET20_FIXTURE = FIXTURES / "pyhessian_resnet20_cifar10.pkl"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cifar_resnet_params(depth: int, num_classes: int = 10) -> int:
    """Parameter count of the CIFAR ResNet with projection shortcuts, counted by hand."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    cin = 16
    for width in (16, 32, 64):
        for i in range(n):
            c = cin if i == 0 else width
            total += c * width * 9 + width * width * 9 + 4 * width
            if c != width:
                total += c * width + 2 * width  # 1x1 projection + its BN
        cin = width
    return total + 64 * num_classes + num_classes


SHAPES = {
    "mlp": (1, 8, 8),
    "cnn": (1, 8, 8),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "resnet44": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "resnet110": (3, 32, 32),
}


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_every_builtin_builds_and_runs(name: str) -> None:
    shape = SHAPES[name]
    # In float64: at initialisation, by running statistics of 0 and 1, resnet110's outputs
    # reach ~5e8, and the squared gradients below overflowed float32.
    model = build_model(name, input_shape=shape, num_classes=7).double().eval()
    out = model(torch.randn(3, *shape, dtype=torch.float64))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    # Differentiable twice: the Hessian-vector products need it.
    loss = out.square().sum()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((g * g).sum() for g in grads), params[0])
    assert torch.isfinite(hv[0]).all()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 272_474),
        ("resnet32", 466_906),
        ("resnet44", 661_338),
        ("resnet56", 855_770),
        ("resnet110", 1_730_714),
    ],
)
def test_resnet_parameter_counts(name: str, expected: int) -> None:
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10)
    assert n_params(model) == expected == cifar_resnet_params(int(name[6:]))


def test_resnet_names_match_the_classic_layout() -> None:
    state = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).state_dict()
    assert len(state) == 128
    assert state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert state["layer3.0.downsample.1.running_var"].shape == (64,)
    assert state["fc.weight"].shape == (10, 64)
    assert "layer1.0.downsample.0.weight" not in state
    assert not any(k.endswith("conv1.bias") for k in state)  # convolutions carry no bias


def test_resnet20_loads_the_real_pyhessian_checkpoint() -> None:
    if not RESNET20_FIXTURE.is_file():
        pytest.skip("shared fixtures are not available in this checkout")
    ckpt = load_checkpoint(RESNET20_FIXTURE)
    assert ckpt.format == "torch-legacy"
    assert not any(k.startswith("module.") for k in ckpt.state_dict)
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    before = model.fc.weight.detach().clone()
    apply_weights(model, ckpt.state_dict)
    assert not torch.equal(before, model.fc.weight)
    assert torch.equal(model.fc.weight, ckpt.state_dict["fc.weight"])
    assert n_params(model) == 272_474
    model.eval()
    out = model(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (16, 10)
    assert torch.isfinite(out).all()
    assert out.std() > 0
    # Trained running statistics were loaded (fresh BN would have mean 0 / var 1).
    assert not torch.allclose(model.bn1.running_var, torch.ones(16))


class _AkamasterPad(nn.Module):
    """Their LambdaLayer of option A: no parameters."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (0, 0, 0, 0, self.pad, self.pad)
        return nn.functional.pad(x[:, :, ::2, ::2], pad, "constant", 0)


class _AkamasterBlock(nn.Module):
    """akamaster/pytorch_resnet_cifar10's BasicBlock, option A, as published: the shortcut
    subsamples and pads channels with planes // 4 zeros on each side."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _AkamasterPad(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class _AkamasterResNet(nn.Module):
    """akamaster/pytorch_resnet_cifar10's ResNet (its ``resnet20()`` for ``n=3``)."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = [(16, 16, 1), (16, 32, 2), (32, 64, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            blocks = [_AkamasterBlock(cin, cout, stride)]
            blocks += [_AkamasterBlock(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = nn.functional.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def test_resnet20_loads_akamaster_option_a_checkpoints(tmp_path: Path) -> None:
    """Their checkpoints (zero-padding shortcuts, classifier ``linear``, saved by DataParallel
    under ``state_dict``) were refused for 12 missing keys and 2 unexpected; the checkpoint's
    names now choose the shortcut, and the model computes theirs."""
    torch.manual_seed(0)
    reference = _AkamasterResNet(3).eval()
    for bn in (m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.running_var, 0.5, 1.5)
        nn.init.normal_(bn.running_mean, std=0.1)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 200, "state_dict": state, "best_prec1": 91.73}, tmp_path / "r20.th")
    ckpt = load_checkpoint(tmp_path / "r20.th")
    kwargs = with_checkpoint_layout("resnet20", None, ckpt.state_dict)
    assert kwargs == {"shortcut": "A"}
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, kwargs=kwargs)
    apply_weights(model, ckpt.state_dict)
    assert n_params(model) == n_params(reference) == 269_722
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.eval()(x), reference(x))
    # Given options win; other models' and PyHessian's layout are left as they are.
    assert with_checkpoint_layout("resnet20", {"shortcut": "B"}, ckpt.state_dict) == {
        "shortcut": "B"
    }
    assert with_checkpoint_layout("mlp", None, ckpt.state_dict) is None
    projections = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).state_dict()
    assert with_checkpoint_layout("resnet20", None, projections) is None
    with pytest.raises(UserError, match="shortcut"):
        build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, kwargs={"shortcut": 1})


@pytest.mark.parametrize(
    ("name", "blocks", "params"), [("resnet44", 7, 658_586), ("resnet110", 18, 1_727_962)]
)
def test_akamasters_other_depths_are_built_in(name: str, blocks: int, params: int) -> None:
    """akamaster/pytorch_resnet_cifar10 publishes ResNet-44 and -110 (0.66M and 1.7M
    parameters) beside 20, 32 and 56: they were "unknown model", and their checkpoints
    needed the user's own factory."""
    reference = _AkamasterResNet(blocks).eval()
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    kwargs = with_checkpoint_layout(name, None, state)
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10, kwargs=kwargs).eval()
    apply_weights(model, state)
    assert n_params(model) == n_params(reference) == params
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), reference(x))


def test_builtin_kwargs_override_data_shape() -> None:
    model = build_model(
        "resnet20",
        input_shape=(3, 32, 32),
        num_classes=10,
        kwargs={"num_classes": 100, "in_channels": 1},
    )
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    assert model.conv1.weight.shape == (16, 1, 3, 3)


def test_mlp_options() -> None:
    model = build_model(
        "mlp", input_shape=(5,), num_classes=3, kwargs={"hidden": [4, 6], "activation": "relu"}
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 4), (4, 6), (6, 3)]
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    default = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    linears = [m for m in default.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [128, 128, 10]
    assert linears[0].in_features == 64
    assert any(isinstance(m, nn.Tanh) for m in default.modules())


def test_mlp_takes_samples_of_one_number(tmp_path: Path) -> None:
    """x of shape (N,) (a 1-D regression, y = sin(x)) is one feature per sample: the mlp
    asked for input_size, and with it torch's Flatten refused the batch ("Dimension out of
    range"), so no built-in model could take the data."""
    from hessian_cli.specs import load_data

    x = torch.linspace(-2, 2, 6)
    torch.save({"x": x, "y": torch.sin(x)}, tmp_path / "curve.pt")
    data = load_data(str(tmp_path / "curve.pt"))
    assert data.input_shape == ()
    model = build_model(
        "mlp", input_shape=data.input_shape, num_classes=data.num_outputs, kwargs={"hidden": [4]}
    )
    assert model[1].in_features == 1
    out = model(x)
    assert out.shape == (6, 1)
    assert torch.equal(out, model(x[:, None]))


def test_cnn_options() -> None:
    model = build_model(
        "cnn", input_shape=(3, 10, 10), num_classes=4, kwargs={"widths": [8], "batchnorm": True}
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, 4)
    plain = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    assert [c.out_channels for c in plain.modules() if isinstance(c, nn.Conv2d)] == [16, 32]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize(
    ("spec", "shape", "kwargs", "words"),
    [
        ("cnn", (64,), {}, "CxHxW"),
        ("resnet20", (10,), {}, "CxHxW"),
        # A 32x32x3 image (NumPy's channels last) was taken for 32 channels of 32x3.
        ("resnet20", (32, 32, 3), {}, r"32x32x3, channels last.*\"in_channels\": 32"),
        ("cnn", (28, 28, 1), {}, "channels last"),
        # Keras' MNIST, HxW: the refusal did not say how to add the channel axis.
        ("cnn", (28, 28), {}, r"shape 28x28: one-channel images take theirs as 1xHxW \(x\[:, No"),
        ("mlp", (4,), {"depth": 3}, "depth"),
        ("mlp", (4,), {"activation": "swish"}, "swish"),
        ("mlp", (4,), {"hidden": [0]}, "positive integer"),
        ("cnn", (1, 8, 8), {"batchnorm": "yes"}, "batchnorm"),
        # A value is named as --model-kwargs' JSON wrote it: "not True" / "None" read as Python.
        ("mlp", (4,), {"hidden": True}, "must be a list, not true[.]$"),
        ("mlp", (4,), {"hidden": [None]}, "must be a positive integer, not null[.]$"),
        ("mlp", (4,), {"activation": None}, "^unknown activation null for 'mlp'"),
        ("mlp", (4,), {"activation": ["relu"]}, r'^unknown activation \["relu"\] for .mlp.'),
        ("resnet20", (3, 8, 8), {"shortcut": "a"}, '1x1 projections[)], not "a"[.]$'),
    ],
)
def test_bad_builtin_options_are_user_errors(spec, shape, kwargs, words) -> None:
    with pytest.raises(UserError, match=words):
        build_model(spec, input_shape=shape, num_classes=2, kwargs=kwargs)


def test_builtin_without_class_count_asks_for_one() -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("mlp", input_shape=(4,), num_classes=None)
    model = build_model("mlp", input_shape=(4,), num_classes=None, kwargs={"num_classes": 2})
    assert model(torch.randn(1, 4)).shape == (1, 2)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(UserError) as info:
        build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    message = str(info.value)
    for name in BUILTIN_MODELS:
        assert name in message
    assert "file.py:" in message and "package.module:" in message


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_torchvision_missing_is_a_user_error() -> None:
    with pytest.raises(UserError, match="vision"):
        build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_torchvision_model_takes_classes_from_data() -> None:
    model = build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=7)
    # eval mode: one input reaches the last BatchNorm at 1x1 (training mode refuses it)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(UserError, match="no model"):
        build_model("torchvision:nonexistent_net", input_shape=(3, 32, 32), num_classes=7)


def _write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_user_factory_from_file_gets_only_kwargs(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "my_model.py",
        """
        import torch.nn as nn
        def make(**kwargs):
            assert "input_shape" not in kwargs and "num_classes" not in kwargs
            return nn.Linear(kwargs.get("d", 3), 2)
        def not_a_model():
            return 42
        def an_array():
            import numpy
            return numpy.zeros(3)
        def broken():
            raise ValueError("bad width")
        """,
    )
    model = build_model(f"{file}:make", input_shape=(9,), num_classes=5, kwargs={"d": 4})
    assert isinstance(model, nn.Linear) and model.in_features == 4 and model.out_features == 2
    with pytest.raises(UserError, match="returned an int, not a torch.nn.Module"):
        build_model(f"{file}:not_a_model", input_shape=(9,), num_classes=5)
    with pytest.raises(UserError, match="returned a numpy.ndarray, not"):
        build_model(f"{file}:an_array", input_shape=(9,), num_classes=5)
    with pytest.raises(UserError, match="ValueError: bad width"):
        build_model(f"{file}:broken", input_shape=(9,), num_classes=5)
    with pytest.raises(UserError, match="no attribute 'missing'"):
        build_model(f"{file}:missing", input_shape=(9,), num_classes=5)
    with pytest.raises(UserError, match="does not exist"):
        build_model(f"{tmp_path}/nope.py:make", input_shape=(9,), num_classes=5)


def test_a_user_file_imports_its_siblings_when_called(tmp_path: Path) -> None:
    _write(tmp_path / "blocks_7f3a.py", "import torch.nn as nn\nWIDTH = 6\n")
    file = _write(
        tmp_path / "lazy_net.py",
        """
        import torch.nn as nn
        def make():
            from blocks_7f3a import WIDTH  # as a script run from its folder would
            return nn.Linear(3, WIDTH)
        """,
    )
    model = build_model(f"{file}:make", input_shape=(3,), num_classes=2)
    assert model.out_features == 6


def test_user_factory_from_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "userpkg_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(
        pkg / "nets.py",
        """
        import torch.nn as nn
        def tiny(width=2):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, width))
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(
        "userpkg_models.nets:tiny", input_shape=(4,), num_classes=3, kwargs={"width": 5}
    )
    assert model(torch.randn(2, 4)).shape == (2, 5)
    with pytest.raises(UserError, match="cannot import module 'userpkg_models.nope'"):
        build_model("userpkg_models.nope:tiny", input_shape=(4,), num_classes=3)


def test_a_module_in_the_working_directory_is_found_as_python_m_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console script's sys.path lacks the working directory that `python -m` puts first."""
    pkg = tmp_path / "cwdpkg_models"
    pkg.mkdir()
    _write(pkg / "nets.py", "import torch.nn as nn\ndef tiny():\n    return nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = build_model("cwdpkg_models.nets:tiny", input_shape=(4,), num_classes=2)
    assert model(torch.randn(3, 4)).shape == (3, 2)
    assert sys.path[-1] == str(tmp_path)  # last: nothing installed is shadowed


def test_user_file_with_errors_is_a_user_error(tmp_path: Path) -> None:
    file = _write(tmp_path / "syntax_bad.py", "def f(:\n    pass\n")
    with pytest.raises(UserError, match="SyntaxError"):
        build_model(f"{file}:f", input_shape=(4,), num_classes=3)
    file = _write(tmp_path / "import_bad.py", "import not_a_real_module_xyz\n")
    with pytest.raises(UserError, match="not_a_real_module_xyz"):
        build_model(f"{file}:f", input_shape=(4,), num_classes=3)


def test_torchvision_model_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in torchvision: the class count comes from the data and no weights download."""
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Linear(2, kwargs["num_classes"])

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: ["resnet18", "vgg11"]
    models.get_model = get_model
    root = types.ModuleType("torchvision")
    root.models = models
    monkeypatch.setitem(sys.modules, "torchvision", root)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    model = build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=7)
    assert isinstance(model, nn.Linear) and model.out_features == 7
    assert calls == [("resnet18", {"num_classes": 7, "weights": None})]
    with pytest.raises(UserError, match="no model 'resnet999'"):
        build_model("torchvision:resnet999", input_shape=(3, 32, 32), num_classes=7)


def test_sizes_past_what_torch_holds_are_one_sentence() -> None:
    """A hidden width of 1e20 overflowed inside nn.Linear (a TypeError and a C++ backtrace)."""
    with pytest.raises(UserError, match="has sizes too large for torch"):
        build_model("mlp", input_shape=(4,), num_classes=3, kwargs={"hidden": [10**20]})
    with pytest.raises(UserError, match="has sizes too large for torch"):
        build_model("mlp", input_shape=(4,), num_classes=2**64 - 1)


def test_a_factory_model_on_the_meta_device_is_refused(tmp_path) -> None:
    (tmp_path / "metanet.py").write_text(
        "import torch\n\n\ndef net():\n    return torch.nn.Linear(4, 2, device='meta')\n"
    )
    with pytest.raises(UserError, match="on the meta device"):
        build_model(f"{tmp_path / 'metanet.py'}:net", input_shape=(4,), num_classes=2)


def test_a_factory_model_with_lazy_modules_is_refused(tmp_path) -> None:
    """Its uninitialized parameters raised torch's ValueError, an unexpected error, on use."""
    (tmp_path / "lazynet.py").write_text(
        "import torch\n\n\ndef net():\n    return torch.nn.LazyLinear(2)\n"
    )
    with pytest.raises(UserError, match="lazy modules.*run it on a sample batch"):
        build_model(f"{tmp_path / 'lazynet.py'}:net", input_shape=(4,), num_classes=2)
