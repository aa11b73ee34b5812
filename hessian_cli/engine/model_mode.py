"""The mode a model is evaluated in while analysed: eval mode throughout (no dropout), BatchNorm by
its running statistics or, on request, by each batch's own, without touching its buffers; and
kernels whose backward torch can differentiate again, where the fast ones cannot."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FunctionType
from typing import Any, Literal, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module_globals
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

from hessian_cli.engine.inputs import Inputs, run_model
from hessian_cli.errors import UserError, first_line

BNMode = Literal["eval", "train"]


def scripted_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a TorchScript BatchNorm layer (by its class name: it is no _BatchNorm)."""
    return isinstance(m, torch.jit.ScriptModule) and "BatchNorm" in getattr(m, "original_name", "")


def scripted_running_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a TorchScript layer that ``bn="train"`` would take by other statistics
    than its running ones: a BatchNorm layer, or an InstanceNorm layer that keeps them."""
    return scripted_batchnorm(m) or (
        isinstance(m, torch.jit.ScriptModule)
        and "InstanceNorm" in getattr(m, "original_name", "")
        and isinstance(getattr(m, "running_mean", None), torch.Tensor)
    )


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer, also as a scripted module."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) or scripted_batchnorm(m)
        for m in model.modules()
    )


def initial_statistics_layers(model: nn.Module) -> tuple[int, int, str]:
    """How many of ``model``'s normalisation layers that keep running statistics (BatchNorm, and
    InstanceNorm with ``track_running_stats=True``) still hold those they were built with (mean
    0, variance 1: no training step updated them), of how many, and which kinds they are
    ("BatchNorm", "InstanceNorm", or "BatchNorm and InstanceNorm").

    By these, eval mode does not normalise: untrained ResNets' outputs grow with depth (largest
    output on random input: ResNet-20 5.5, ResNet-56 1.0e4, ResNet-110 6.0e8).
    """
    initial = layers = 0
    kinds: set[str] = set()
    for m in model.modules():
        batchnorm = isinstance(m, nn.modules.batchnorm._BatchNorm) or scripted_batchnorm(m)
        if batchnorm or holds_running_instance_statistics(m):
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                layers += 1
                initial += not mean.any() and bool(torch.all(var == 1))
                kinds.add("BatchNorm" if batchnorm else "InstanceNorm")
    return initial, layers, " and ".join(sorted(kinds))


def batch_statistics_layers(model: nn.Module) -> int:
    """How many of ``model``'s layers normalise by the batch's statistics (InstanceNorm: each
    sample's) in the mode each is in now and by running ones in eval mode: BatchNorm, and
    InstanceNorm that keeps them, also scripted; not one that keeps none (the batch's in both
    modes) nor one kept in eval mode (frozen statistics). Under ``model.train()`` these are
    what makes training's loss another function than eval mode's."""
    return sum(
        m.training
        and isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and (
            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
            or scripted_running_norm(m)
        )
        for m in model.modules()
    )


def holds_running_instance_statistics(
    m: nn.Module,
) -> TypeGuard[nn.modules.instancenorm._InstanceNorm]:
    """Whether ``m`` is an InstanceNorm layer that keeps running statistics
    (``track_running_stats=True``): by them in eval mode, by each sample's own in training."""
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and isinstance(
        m.running_mean, torch.Tensor
    )


def instance_statistics(
    m: nn.modules.instancenorm._InstanceNorm,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m``'s normalisation as in training mode (each sample's own statistics), its running
    statistics untouched: to stand for its ``_apply_instance_norm``. Unlike BatchNorm's,
    ``track_running_stats = False`` does not keep it from updating the buffers it is given."""
    return lambda x: F.instance_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`forward_mode` (and a kept graph's BatchNorm formula) needs of a model's
    modules, found in one walk.

    Four walks over every module at each entry cost ~0.8 ms on ResNet-20 (58 modules, this
    project's CPU): a product's forward mode, paid at every one (a GPU's products wait on the
    host). An operator finds it once per solve, where it looks for changed weights.
    """

    modules: tuple[nn.Module, ...]
    batchnorms: tuple[nn.modules.batchnorm._BatchNorm, ...]
    rnn: bool
    weight_norms: tuple[_WeightNorm | WeightNorm, ...]  # parametrizations and older hooks
    # The modules and the parameters and buffers that hold backward hooks (_backward_hooks_off)
    backward_hooked: tuple[nn.Module | torch.Tensor, ...] = ()
    # InstanceNorm layers with running statistics, which bn="train" takes as in training
    instancenorms: tuple[nn.modules.instancenorm._InstanceNorm, ...] = ()
    # TorchScript modules, also those its forwards call as globals (_unoptimised)
    scripts: tuple[torch.jit.ScriptModule, ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        modules = tuple(model.modules())
        tensors = {
            id(t): t
            for m in modules
            for t in (*m._parameters.values(), *m._buffers.values())
            if isinstance(t, torch.Tensor)
        }
        return cls(
            modules,
            tuple(m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)),
            any(isinstance(m, nn.RNNBase) for m in modules),
            tuple(
                w
                for m in modules
                for w in (m, *m._forward_pre_hooks.values())
                if isinstance(w, (_WeightNorm, WeightNorm))
            ),
            (
                *(m for m in modules if m._backward_hooks or m._backward_pre_hooks),
                *(t for t in tensors.values() if t._backward_hooks),
            ),
            tuple(m for m in modules if holds_running_instance_statistics(m)),
            (
                *(m for m in modules if isinstance(m, torch.jit.ScriptModule)),
                *forwards_scripts(modules),
            ),
        )


def loss_module(loss: Callable[..., Any] | None) -> nn.Module | None:
    """The loss where it is a module (also behind a wrapper that names it as ``__wrapped__``,
    as the loss spec's does), else None."""
    loss = None if loss is None else inspect.unwrap(loss)
    return loss if isinstance(loss, nn.Module) else None


def held_scripts(
    function: Callable[..., Any], seen: set[Any] | None = None
) -> list[torch.jit.ScriptModule]:
    """The TorchScript modules a plain function holds by name: a global of its module (one that
    ``torch.jit.load`` at import left there) or a closure's, also as a part of an eager module,
    or those of the plain functions it calls by name (a helper of the model's file that calls
    the script: its products were 31% off), each looked at once (``seen``: their code), not
    torch's or ours. Looked up directly (inspect.getclosurevars took 70-100 us, at every
    product)."""
    function = getattr(function, "__func__", function)  # a bound method's
    code = getattr(function, "__code__", None)
    seen = set() if seen is None else seen
    if code is None or code in seen:  # a callable object, a builtin; or looked at already
        return []
    seen.add(code)
    scope = function.__globals__
    held = [scope[name] for name in code.co_names if name in scope]
    for cell in function.__closure__ or ():
        with contextlib.suppress(ValueError):  # an empty cell
            held.append(cell.cell_contents)
    scripts: list[torch.jit.ScriptModule] = []
    for value in held:
        if isinstance(value, nn.Module):
            scripts += [m for m in value.modules() if isinstance(m, torch.jit.ScriptModule)]
        elif isinstance(value, FunctionType) and _package(value) not in _SCRIPTLESS:
            scripts += held_scripts(value, seen)
    return scripts


# Packages whose functions call no user's script (looking through ours cost 30 us a product).
_SCRIPTLESS = frozenset({"torch", "hessian_cli", "eigensam"})


def _package(function: FunctionType) -> str:
    """The top-level package of the module ``function`` was defined in."""
    return (function.__module__ or "").partition(".")[0]


def forwards_scripts(modules: Sequence[nn.Module]) -> list[torch.jit.ScriptModule]:
    """The TorchScript modules the forwards of eager ``modules`` hold by name
    (:func:`held_scripts`): a global of the model's (or a loss module's) file that
    ``torch.jit.load`` left there is no part of the module, and was not flushed (products
    69-97% off for a model, 36-50% for a loss module)."""
    forwards = {type(m).forward for m in modules if not isinstance(m, torch.jit.ScriptModule)}
    return [script for forward in forwards for script in held_scripts(forward)]


@contextlib.contextmanager
def forward_mode(
    model: nn.Module,
    bn: BNMode,
    layout: ModelLayout | None = None,
    loss: Callable[..., Any] | None = None,
) -> Iterator[None]:
    """Put the model in a mode where every forward pass computes the same function.

    Everything is in eval mode (no dropout). With ``bn="train"`` BatchNorm layers normalise by
    the batch statistics, and InstanceNorm layers that keep running statistics by each sample's
    own, as in training, but neither updates its running statistics, so analysing a model never
    changes it. The forward runs in :func:`twice_differentiable` kernels. A ``loss`` that is a
    module is in eval mode too (a loss class, which --loss builds in training mode, with a
    dropout: refused as drawing random numbers), and its TorchScript unoptimised (one
    loaded with ``torch.jit.load`` is in no compilation unit :func:`_unoptimised` finds alone),
    also that which a loss function holds (:func:`held_scripts`).
    ``layout``: the model's as it is now (found here where not given).
    """
    layout = layout or ModelLayout.of(model)
    criterion = loss_module(loss)
    criterion_modules = () if criterion is None else tuple(criterion.modules())
    # A loss module's scripts, or those a loss function calls (not flushed: 19-34% off)
    loss_scripts = (
        [
            *(m for m in criterion_modules if isinstance(m, torch.jit.ScriptModule)),
            *forwards_scripts(criterion_modules),
        ]
        if criterion is not None or loss is None
        else held_scripts(inspect.unwrap(loss))
    )
    # Also a scripted part of an eager model: its layers were left by their running statistics
    # (the products 100% off the batch statistics' Hessian, the loss of the other mode; 99% for
    # an InstanceNorm layer's, which were not refused).
    if bn == "train" and any(scripted_running_norm(m) for m in layout.scripts):
        raise UserError(
            "the BatchNorm (or InstanceNorm) layers of a TorchScript module cannot be switched "
            "to batch statistics (`bn=train`); use the eager model, or running statistics "
            "(`bn=eval`)."
        )
    saved = [(m, m.training) for m in (*layout.modules, *criterion_modules)]
    tracked = [(m, m.track_running_stats) for m in layout.batchnorms] if bn == "train" else []
    by_sample = (
        [(m, "_apply_instance_norm", instance_statistics(m)) for m in layout.instancenorms]
        if bn == "train"
        else []
    )
    # SyncBatchNorm by each batch's own statistics, as outside torch.distributed: synced over
    # the ranks they were another function, and on the CPU torch raised (a GPU-only kernel).
    by_batch = [
        (m, "forward", lambda x, m=m: nn.modules.batchnorm._BatchNorm.forward(m, x))
        for m, _ in tracked
        if isinstance(m, nn.SyncBatchNorm)
    ]
    # The attention fast path runs only without autograd (a loss, not a gradient), and where a
    # padding mask makes it nest the batch, it gives padded positions 0, not the layer's output:
    # the loss at w + rho g (SAM sharpness) was of another function than the gradient's.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    if any(training for _, training in saved):  # (the module's own train(), if it has one)
        model.eval()
        if criterion is not None:
            criterion.eval()
    for m, _ in tracked:
        m.train()
        m.track_running_stats = False
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with (
            twice_differentiable(model, layout, loss_scripts),
            _backward_hooks_off(layout),
            patched(by_sample + by_batch),
        ):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in saved:
            if m.training != training:
                m.training = training
        for m, track in tracked:
            m.track_running_stats = track


@contextlib.contextmanager
def _backward_hooks_off(layout: ModelLayout) -> Iterator[None]:
    """The backward hooks of the model's parameters and buffers and of its modules (also those
    registered for every module) off inside, as they were after (found with ``layout``).

    They change the gradients of training (a hook that clips or scales a layer's), not the
    loss, and autograd applies them in every backward pass: the products differentiated the
    changed gradient (a hook halving one layer's gradient: lambda_1 0.56 for 0.78, converged),
    while torch.func's, which skip a tensor's hooks, gave another matrix. Forward hooks are the
    model's function, and stay.
    """
    tensors = [
        (t, t._backward_hooks) for t in layout.backward_hooked if isinstance(t, torch.Tensor)
    ]
    patches: list[tuple[object, str, Any]] = [
        (m, name, OrderedDict())
        for m in layout.backward_hooked
        if isinstance(m, nn.Module)
        for name in ("_backward_hooks", "_backward_pre_hooks")
    ]
    patches += [
        (_module_globals, name, OrderedDict())
        for name in ("_global_backward_hooks", "_global_backward_pre_hooks")
        if getattr(_module_globals, name, None)
    ]
    try:
        for t, _ in tensors:
            t._backward_hooks = None  # (torch drops the tensor's hook with it)
        with patched(patches):
            yield
    finally:
        for t, hooks in tensors:
            t._backward_hooks = hooks


def batch_statistics_error(model: nn.Module, x: Inputs) -> str | None:
    """Why BatchNorm cannot normalise ``x`` by its own statistics (a batch of one sample has
    none), or None; nothing of the model changes."""
    with torch.no_grad(), forward_mode(model, "train"):
        try:
            run_model(model, x)
        except ValueError as exc:
            return first_line(exc)
    return None


@contextlib.contextmanager
def twice_differentiable(
    model: nn.Module,
    layout: ModelLayout | None = None,
    scripts: Sequence[torch.jit.ScriptModule] = (),
) -> Iterator[None]:
    """Kernels whose backward torch can differentiate again, for the forward passes inside.

    Attention by its math kernel: the fused ones (flash, memory-efficient; on the CPU too) have no
    derivative of their backward, and every product failed in torch's words. RNNs without cuDNN,
    whose backward runs only in training mode and has no derivative either. Weight norm by its
    formula (:func:`_composed_weight_norm`). ``torch.compile``d code eagerly: AOTAutograd's
    compiled backward cannot be differentiated again (torch 2.13: "does not currently support
    double backward", or for a model trained compiled, "donated buffers"), every product of a
    compiled model failed. TorchScript unoptimised (:func:`_unoptimised`): the model's, and
    ``scripts`` beside it (a loss's).
    """
    layout = layout or ModelLayout.of(model)
    cudnn = torch.backends.cudnn.enabled
    # Only where torch.compile was loaded (a compiled model was): set_stance imports it and
    # sympy, ~0.5 s. (It is torch 2.6's; before it, compiled code runs as compiled.)
    compiling = "torch._dynamo" in sys.modules
    set_stance = getattr(torch.compiler, "set_stance", None) if compiling else None
    try:
        if layout.rnn:
            torch.backends.cudnn.enabled = False
        with (
            sdpa_kernel(SDPBackend.MATH),
            _composed_weight_norm(layout.weight_norms),
            set_stance("force_eager") if set_stance else contextlib.nullcontext(),
            _unoptimised((*layout.scripts, *scripts)),
        ):
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn


@contextlib.contextmanager
def _unoptimised(scripts: Sequence[torch.jit.ScriptModule]) -> Iterator[None]:
    """TorchScript modules ``scripts``, and every scripted free function, run by their plain
    graphs inside, each operation differentiated by autograd as in eager mode.

    The graph executor's optimised plan, which a script runs from its second call on, has its
    own derivatives, and their derivatives were wrong with no error (torch 2.13, CPU: a
    Linear-BatchNorm1d-Tanh-Dropout model in eval mode, lambda_1 1.722 for the eager model's
    1.690, converged). A plan once optimised is kept whatever the setting, so it is dropped
    first; the next call outside optimises again. (The legacy executor, profiling off, follows
    the setting at every call, and has no plan to drop: torch raises.) The free functions are
    those of torch's Python compilation unit, where ``torch.jit.script`` puts them: neither an
    eager forward that calls one (Megatron's ``@torch.jit.script`` bias_gelu: torch.func's
    products 59-87% off) nor a scripted loss (the digits MLP's lambda_1 0.936 for 0.819) holds
    a ScriptModule of the model to find.
    """
    # Private torch API (as the flush below): where a torch lacks it, the modules are flushed.
    unit = getattr(torch.jit._state, "_python_cu", None)
    methods: list[Any] = list(unit.get_functions()) if hasattr(unit, "get_functions") else []
    for script in scripts:
        methods += [script._c._get_method(name) for name in script._c._method_names()]
    for method in methods:
        with contextlib.suppress(RuntimeError):
            method._debug_flush_compilation_cache()
    with torch.jit.optimized_execution(False):
        yield


@contextlib.contextmanager
def patched(patches: Sequence[tuple[object, str, Callable[..., Any]]]) -> Iterator[None]:
    """Each ``(obj, name, fn)``: ``fn`` as ``obj``'s own ``name`` inside, as before after.

    Set on the objects, not through a TorchFunctionMode: a mode is off inside its own calls,
    such as ``autograd.grad``, where a non-reentrant ``torch.utils.checkpoint`` runs its
    block's forward again and must save what the first forward saved (torch's CheckpointError
    for a weight-normed layer in such a block, under the mode this replaced). Written in the
    objects' ``__dict__``, where setattr puts a name that is no parameter, buffer or submodule,
    past ``Module.__setattr__``'s look for those (~4 us a layer): the BatchNorm formula's 21
    layers of ResNet-20, set at every product, took 0.23 ms on this project's CPU, now 0.03.
    """
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patches]
    try:
        for obj, name, fn in patches:
            obj.__dict__[name] = fn
        yield
    finally:
        for obj, name, own in saved:
            if own is None:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = own


def _weight_norm_formula(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _composed_weight_norm(
    weight_norms: Sequence[_WeightNorm | WeightNorm],
) -> contextlib.AbstractContextManager[None]:
    """Weight norm as its formula, ``v * (g / ||v||)``, the kernel's own fallback: the fused
    kernel's double backward drops the terms through the norm (torch 2.13, CPU: a weight-
    normed layer's Hessian 14% off, with no error)."""
    patches: list[tuple[object, str, Callable[..., Any]]] = []
    for w in weight_norms:
        if isinstance(w, _WeightNorm):  # parametrizations.weight_norm: forward(g, v)
            patches.append((w, "forward", lambda g, v, w=w: _weight_norm_formula(v, g, w.dim)))
        else:  # the older hook: compute_weight(module)
            patches.append(
                (
                    w,
                    "compute_weight",
                    lambda m, w=w: _weight_norm_formula(
                        getattr(m, f"{w.name}_v"), getattr(m, f"{w.name}_g"), w.dim
                    ),
                )
            )
    return patched(patches)
