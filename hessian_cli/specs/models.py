"""Where the model comes from: built-in architectures, torchvision, or the user's factory.

The built-in ResNets use the parameter names of the classic CIFAR ResNet implementations
(PyHessian's ``resnet20``, and akamaster/pytorch_resnet_cifar10's with ``shortcut`` "A") so that
their checkpoints load as they are.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parameter import is_lazy

from hessian_cli.errors import UserError, a_type
from hessian_cli.specs.user_code import (
    USER_CODE_FORMS,
    call_user,
    load_object,
    refuse_file_without_name,
    split_user_spec,
)

# The ResNets: the depths of akamaster/pytorch_resnet_cifar10's published checkpoints (but
# 1202), PyHessian's resnet20 among them.
_RESNET_DEPTHS = {f"resnet{depth}": depth for depth in (20, 32, 44, 56, 110)}
BUILTIN_MODELS: tuple[str, ...] = ("mlp", "cnn", *_RESNET_DEPTHS)
# The built-in models' own options and their defaults (the ResNets' one, shortcut, is "B" for
# good, and a checkpoint's names choose "A": :func:`with_checkpoint_layout`; input_shape,
# input_size, in_channels and num_classes come from the data, which checkpoints record apart).
BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 128], "activation": "tanh"},
    "cnn": {"widths": [16, 32], "batchnorm": False},
}
# Defaults of the past, which a checkpoint that records none of its options may have been
# trained with (said where its weights do not fit today's). Runs before 2026-12-01 recorded only
# the options given: a default changed above rebuilds their checkpoints as another model (one
# of another activation silently), so add the old value here.
_FORMER_DEFAULTS = {"mlp": ('{"hidden": [64, 128, 128]}', "2026-11-28")}


def model_names_code(spec: str) -> bool:
    """Whether the model spec names user code to import (a factory), not a built-in."""
    builtin = spec in BUILTIN_MODELS or spec.startswith("torchvision:")
    return not builtin and split_user_spec(spec) is not None


def with_builtin_defaults(spec: Any, kwargs: Any) -> Any:
    """``kwargs`` with the defaults of the built-in model ``spec`` filled in: the arguments it is
    built with, which a run records so that its checkpoints rebuild the same model whatever
    the defaults become. Other models' arguments (and ones that are no object) as they are:
    a factory's defaults are its code's, which the spec names."""
    if spec not in BUILTIN_DEFAULTS or not isinstance(kwargs, dict | None):
        return kwargs
    return {**copy.deepcopy(BUILTIN_DEFAULTS[spec]), **(kwargs or {})}


def with_checkpoint_layout(spec: str, kwargs: Any, state: dict[str, Any]) -> Any:
    """``kwargs`` with ``shortcut`` "A" where ``spec`` is a built-in ResNet, the options do not
    name a shortcut, and the checkpoint's weights ``state`` are akamaster/pytorch_resnet_cifar10's
    (among the most used CIFAR ResNet checkpoints): no shortcut weights, a classifier named
    ``linear``. They were refused for 12 missing keys (the projections) and 2 unexpected."""
    if spec not in _RESNET_DEPTHS or not isinstance(kwargs, dict | None):
        return kwargs
    names = [k.split(".") for k in state]
    option_a = any(n[-2:] == ["linear", "weight"] for n in names) and not any(
        "downsample" in n or "shortcut" in n for n in names
    )
    if not option_a or "shortcut" in (kwargs or {}):
        return kwargs
    return {**(kwargs or {}), "shortcut": "A"}


def defaults_hint(spec: str, chosen: dict[str, Any] | None, *, recorded: bool) -> str:
    """For weights that do not fit the built-in model ``spec`` built with the options ``chosen``
    (recorded or given): where none of its own options was chosen, that it took today's
    defaults, and how to give others ('' otherwise). Runs before 2026-12-01 recorded only the
    options given, so their checkpoints (``recorded``: the checkpoint names ``spec``) get
    today's defaults, not those they were trained with: the former defaults are named for
    them alone (a bare state dict's were never ours)."""
    taken = BUILTIN_DEFAULTS.get(spec, {})
    if not taken or any(k in (chosen or {}) for k in taken):
        return ""
    former = _FORMER_DEFAULTS.get(spec) if recorded else None
    was = f" ({former[0]} until {former[1]})" if former else ""
    return (
        f"; {spec!r} was built with today's defaults {json.dumps(taken)}, which neither the "
        f"checkpoint nor --model-kwargs names: pass the options it was trained with{was} as "
        "--model-kwargs"
    )


def build_model(
    spec: str,
    *,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    kwargs: dict[str, Any] | None = None,
    trusted: bool = True,
) -> nn.Module:
    """Build the model ``spec`` names.

    Built-ins take ``input_shape`` / ``num_classes`` from the data unless ``kwargs`` override them
    (keys ``input_shape``, ``num_classes``, ``in_channels``); user factories get only ``kwargs``,
    and only a ``trusted`` spec may name one (:func:`load_object`). ``input_shape`` None: the
    data's samples are several tensors, which only a user's model takes.
    """
    kwargs = dict(kwargs or {})
    if input_shape is None and not model_names_code(spec):
        raise UserError(
            f"model {spec!r} takes one input tensor, but the data's samples hold several: "
            "give --model your own module's factory (it is called as model(*x) for a tuple "
            "of inputs, model(**x) for a dict)."
        )
    if spec in BUILTIN_MODELS:
        try:
            return _build_builtin(spec, tuple(input_shape), num_classes, dict(kwargs))
        except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
            # Labels of 2**40 made a 2**40-class layer; sizes past 2**63 overflow in torch.
            text = str(exc)
            if "can't allocate memory" in text:
                fit = "does not fit in memory"
            elif "overflow" in text.lower():
                fit = "has sizes too large for torch"
            else:
                raise
            options = f" and model arguments {json.dumps(kwargs)}" if kwargs else ""
            outputs = f"{num_classes:,}" if isinstance(num_classes, int) else num_classes
            raise UserError(
                f"model {spec!r} with {outputs} outputs{options} {fit}: "
                "check its options, and that class labels count classes from 0."
            ) from exc
    if spec.startswith("torchvision:"):
        return _build_torchvision(spec.partition(":")[2], num_classes, kwargs)
    if model_names_code(spec):
        factory = load_object(spec, "model factory", trusted=trusted)
        model = call_user(factory, "model factory", spec, **kwargs)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"the model factory {spec!r} returned {a_type(model)}, not a torch.nn.Module."
            )
        tensors = (*model.parameters(), *model.buffers())
        if any(is_lazy(t) for t in tensors):  # every use of them raised torch's ValueError
            raise UserError(
                f"the model factory {spec!r} returned a model with lazy modules (nn.LazyLinear, "
                "...) whose parameters are not initialized: run it on a sample batch in the "
                "factory before returning it."
            )
        if any(t.is_meta for t in tensors):
            raise UserError(
                f"the model factory {spec!r} returned a model on the meta device, whose "
                "parameters hold no values: build it on the CPU."
            )
        return model
    refuse_file_without_name(spec, "model")
    raise UserError(
        f"unknown model {spec!r}: use a built-in ({', '.join(BUILTIN_MODELS)}), "
        f"'torchvision:NAME', or user code as {USER_CODE_FORMS}."
    )


# ----------------------------------------------------------------------------- built-ins


def _build_builtin(
    name: str, input_shape: tuple[int, ...], num_classes: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    if "input_shape" in kwargs:
        input_shape = _int_tuple(kwargs.pop("input_shape"), "input_shape", name)
    num_classes = kwargs.pop("num_classes", num_classes)
    if num_classes is None:
        raise UserError(
            f"model {name!r} needs a number of outputs and the data does not give one; pass "
            "--model-kwargs '{\"num_classes\": N}'."
        )
    num_classes = _positive_int(num_classes, "num_classes", name)
    if name == "mlp":
        input_size = kwargs.pop("input_size", math.prod(input_shape))  # () is one number
        defaults = BUILTIN_DEFAULTS["mlp"]
        hidden = kwargs.pop("hidden", defaults["hidden"])
        activation = kwargs.pop("activation", defaults["activation"])
        _no_extra(
            name, kwargs, ("hidden", "activation", "input_size", "input_shape", "num_classes")
        )
        return MLP(
            _positive_int(input_size, "input_size", name),
            [_positive_int(h, "hidden", name) for h in _as_list(hidden, "hidden", name)],
            num_classes,
            activation=activation,
        )
    in_channels = _image_channels(name, input_shape, kwargs.pop("in_channels", None))
    if name == "cnn":
        defaults = BUILTIN_DEFAULTS["cnn"]
        widths = kwargs.pop("widths", defaults["widths"])
        batchnorm = kwargs.pop("batchnorm", defaults["batchnorm"])
        _no_extra(
            name, kwargs, ("widths", "batchnorm", "in_channels", "input_shape", "num_classes")
        )
        if not isinstance(batchnorm, bool):
            raise UserError("model option 'batchnorm' of 'cnn' must be true or false.")
        widths_list = [_positive_int(w, "widths", name) for w in _as_list(widths, "widths", name)]
        if not widths_list:
            raise UserError("model option 'widths' of 'cnn' needs at least one width.")
        return SmallCNN(in_channels, widths_list, num_classes, batchnorm=batchnorm)
    shortcut = kwargs.pop("shortcut", "B")
    _no_extra(name, kwargs, ("shortcut", "in_channels", "input_shape", "num_classes"))
    if shortcut not in ("A", "B"):
        raise UserError(
            f"model option 'shortcut' of {name!r} must be \"A\" (zero-padding, as "
            f'akamaster/pytorch_resnet_cifar10) or "B" (1x1 projections), not {_json(shortcut)}.'
        )
    return CifarResNet(
        _RESNET_DEPTHS[name], num_classes=num_classes, in_channels=in_channels, shortcut=shortcut
    )


def _image_channels(name: str, input_shape: tuple[int, ...], override: Any) -> int:
    if override is not None:
        return _positive_int(override, "in_channels", name)
    if len(input_shape) != 3:
        # One-channel images stored HxW (Keras' MNIST): how to give them their channel axis.
        fix = (
            ": one-channel images take theirs as 1xHxW (x[:, None])"
            if len(input_shape) == 2
            else ""
        )
        raise UserError(
            f"model {name!r} needs image data of shape CxHxW, but the data's samples have shape "
            f"{'x'.join(map(str, input_shape)) or 'scalar'}{fix}."
        )
    if input_shape[2] in (1, 3) and input_shape[0] not in (1, 3):
        # Channels last, as NumPy image sets store them (torchvision's CIFAR10.data too): a
        # 32x32x3 image was taken for 32 channels of 32x3, silently.
        shape, channels = "x".join(map(str, input_shape)), input_shape[0]
        raise UserError(
            f"model {name!r} needs images of shape CxHxW, but the data's samples are {shape}, "
            "channels last: store them as CxHxW (x.transpose(0, 3, 1, 2)), or pass "
            f"--model-kwargs '{{\"in_channels\": {channels}}}' if they have {channels} channels."
        )
    return int(input_shape[0])


def _no_extra(name: str, kwargs: dict[str, Any], accepted: Sequence[str]) -> None:
    if kwargs:
        raise UserError(
            f"unknown model option(s) for {name!r}: {', '.join(sorted(kwargs))} "
            f"(accepted: {', '.join(accepted)})."
        )


def _positive_int(value: Any, key: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(
            f"model option {key!r} of {name!r} must be a positive integer, not {_json(value)}."
        )
    return value


def _as_list(value: Any, key: str, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"model option {key!r} of {name!r} must be a list, not {_json(value)}.")
    return list(value)


def _json(value: Any) -> str:
    """A model option's value as the user wrote it in --model-kwargs' JSON (true, not True;
    null, not None), where it is JSON."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # an object given through the library
        return repr(value)


def _int_tuple(value: Any, key: str, name: str) -> tuple[int, ...]:
    return tuple(_positive_int(v, key, name) for v in _as_list(value, key, name))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


class _Flatten(nn.Flatten):
    """``nn.Flatten`` that takes a batch of samples that are one number each, shape (batch,),
    as one feature each (torch's refuses them: a 1-D x was data no MLP could take)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), 1) if x.ndim == 1 else super().forward(x)


class MLP(nn.Sequential):
    """Flatten -> (Linear -> activation)* -> Linear: small enough for the dense Hessian oracle."""

    def __init__(
        self, input_size: int, hidden: Sequence[int], num_classes: int, *, activation: str = "tanh"
    ) -> None:
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise UserError(
                f"unknown activation {_json(activation)} for 'mlp' (choose from "
                f"{', '.join(_ACTIVATIONS)})."
            )
        layers: list[nn.Module] = [_Flatten()]
        width = input_size
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """3x3 convolutions with ReLU, global average pooling, one linear classifier."""

    def __init__(
        self, in_channels: int, widths: Sequence[int], num_classes: int, *, batchnorm: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for w in widths:
            layers.append(nn.Conv2d(width, w, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU())
            width = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut, or, where the shape changes, a 1x1
    projection (option B) or the input subsampled and zero-padded with channels (option A)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        self.stride, self.padding = stride, 0
        if (stride != 1 or cin != cout) and shortcut == "A":
            self.padding = cout - cin
        elif stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        elif self.stride != 1 or self.padding:
            half = self.padding // 2
            channels = (half, self.padding - half)
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *channels))
        else:
            shortcut = x
        # Out-of-place ReLUs throughout: double backward (HVPs) needs the saved activations.
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), depth 6n+2, widths 16/32/64, projection shortcuts
    (``shortcut`` "B") or the paper's zero-padding ones ("A").

    Names match PyHessian's ``resnet`` (``conv1``, ``bn1``, ``layer{1,2,3}.i.*``,
    ``layer{2,3}.0.downsample.{0,1}``, ``fc``), and with "A" akamaster/pytorch_resnet_cifar10's
    (no shortcut weights, the classifier ``linear``). Global average pooling equals the original
    8x8 average pool on 32x32 inputs and also accepts other image sizes.
    """

    def __init__(
        self, depth: int, *, num_classes: int = 10, in_channels: int = 3, shortcut: str = "B"
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise UserError(f"a CIFAR ResNet needs a depth of the form 6n+2, not {depth}.")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1, shortcut)
        self.layer2 = self._stage(16, 32, n, 2, shortcut)
        self.layer3 = self._stage(32, 64, n, 2, shortcut)
        self.head = "linear" if shortcut == "A" else "fc"  # the classifier's name in each
        self.add_module(self.head, nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride, shortcut)]
        layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.head)(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- torchvision


def _build_torchvision(name: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise UserError(
            f"model 'torchvision:{name}' needs torchvision; install the 'vision' extra "
            "(pip install -e '.[vision]' in hessian-cli's folder), or torchvision itself."
        ) from exc
    available = tvm.list_models()
    if name not in available:
        raise UserError(
            f"torchvision has no model {name!r} (for example: {', '.join(sorted(available)[:8])})."
        )
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("weights", None)
    try:
        return tvm.get_model(name, **kwargs)
    except Exception as exc:
        raise UserError(f"building torchvision model {name!r} failed: {exc}") from exc
