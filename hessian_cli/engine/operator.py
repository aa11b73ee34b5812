"""The curvature operator: exact Hessian-vector products for a block of vectors at a time.

H is the Hessian of the mean loss over all batches (weighted by samples, or labelled tokens)
with respect to a :class:`ParamSpace`. ``op.matmul(V)`` maps a block ``V`` of shape ``[b, n]``
to ``H V^T`` (rows), spending one forward/backward pass over the data for the whole block.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import grad, jvp, vmap

from hessian_cli.engine import distributed as dist_utils
from hessian_cli.engine.batches import (
    Batch,
    LossFn,
    batch_share,
    cast_batch,
    check_batch_weight,
    check_batches,
    model_dtype,
)
from hessian_cli.engine.batchnorm_formula import batchnorm_formula, formula_ready
from hessian_cli.engine.inputs import Inputs, inputs_to, is_inputs, run_model
from hessian_cli.engine.linalg import all_finite, norms
from hessian_cli.engine.linear_operator import check_block
from hessian_cli.engine.memory import free_bytes, graph_bytes
from hessian_cli.engine.misfit import check_scalar_loss, loss_on_outputs, model_outputs
from hessian_cli.engine.model_mode import (
    BNMode,
    ModelLayout,
    batch_statistics_error,
    forward_mode,
    has_batchnorm,
)
from hessian_cli.engine.params import ParamSpace, dense, select_parameters
from hessian_cli.engine.precision import Precision, check_precision, numerics
from hessian_cli.engine.probes import gaussian, probe_generator, rademacher
from hessian_cli.errors import NotFinite, UserError, a_type, first_line

Backend = Literal["auto", "double-backward", "func"]


@contextlib.contextmanager
def _values_set(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """``values`` in the named parameters of ``model`` for the block, the old ones (bit for bit)
    after it, whatever happens in between."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied one by either name
    saved = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


# Smallest block worth a vmapped torch.func pass on CUDA. Measured on an H200 (ResNet-18, 256
# inputs, float32, two runs, benchmarks/RESULTS.md), ms per vector: func 89-115 / 23.6-28.0 /
# 19.9 / 22.8 for blocks of 1 / 4 / 8 / 16; double backward 29.0 for one vector, batched
# 25.5-25.7 / 24.6-24.7 / 24.2 for 4 / 8 / 16. At 4 it is a wash; at 2 func lost clearly (a
# block-2 top-1 solve: 82 ms per vector with func, 31 with batched double backward).
FUNC_MIN_BLOCK = 8

# The unit of cost, a gradient pass, is timed as the fastest of this many passes that fit in
# this many seconds (at least one).
_TIMED_PASSES = 5
_TIMING_BUDGET_S = 0.05


def auto_backend(block: int, device: torch.device) -> str:
    """Double backward on CPU and for blocks under :data:`FUNC_MIN_BLOCK`; ``torch.func`` for
    larger blocks on CUDA, where one vmapped pass serves the whole block.

    On CPU a block costs as much per vector as single products (ResNet-20: double backward 2.2
    gradients, an unbatched ``jvp`` 4.3).
    """
    return "func" if block >= FUNC_MIN_BLOCK and device.type == "cuda" else "double-backward"


def _random_states(device: torch.device) -> list[torch.Tensor]:
    """The states of the random generators a forward pass on ``device`` may draw from.

    A forward that draws (dropout left on) is another function at every pass: the kept graph
    gave the Hessian of one mask, its loss not the loss at w + rho g, and the func backend's
    products a different mask each.
    """
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _same_states(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(map(torch.equal, a, b))


# The graph node an @once_differentiable backward leaves where its incoming gradient needs a
# gradient itself (torch's DelayedError); private, so looked up once and, should a torch version
# lack it, not looked for.
_ERROR_NODE = getattr(getattr(torch._C, "_functions", None), "Error", None)
# Every @once_differentiable backward is the same wrapper around its own: found by its code.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx, *grads: grads).__code__


# The integer type of each element width, in which a tensor's bit patterns are summed
_BIT_TYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s entries' bit patterns, modulo 2 to the power of their width (exact,
    in any order; a change to one entry always changes it)."""
    dense = t.to_dense() if t.layout != torch.strided else t
    if dense.is_complex():  # complex128's 16 bytes have no integer type
        dense = torch.view_as_real(dense)
    kind = _BIT_TYPES[dense.element_size()]
    return dense.view(kind).sum(dtype=kind)


def _check_no_renormalising_embedding(model: nn.Module) -> None:
    """Refuse an embedding with ``max_norm``: its forward rescales the rows it looks up in place
    (``torch.embedding_renorm_``, outside autograd), so the products were of weights other than
    the model's (the rows of a fresh ``Embedding(17, 4, max_norm=1)`` cut from norms 1.4-2.4 to 1)
    and differentiate past that rescaling."""
    name = next(
        (
            n
            for n, m in model.named_modules()
            if isinstance(m, _EMBEDDINGS) and m.max_norm is not None
        ),
        None,
    )
    if name is not None:
        where = f" {name!r}" if name else ""  # "": the model is the embedding
        raise UserError(
            f"the model's embedding{where} has max_norm set, which rescales its weights in place "
            "at every forward pass, so the Hessian would be of other weights than the model's: "
            "set its max_norm to None (after renormalising the weights, if that is wanted)."
        )


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _check_loss(loss: object, out: object, *, gradient: bool) -> None:
    """Refuse what the loss function returned where it is no scalar tensor (a float, its
    ``.item()``, or a tuple failed in ``.ndim``, an AttributeError) or, where a ``gradient``
    is being taken, one cut from the model's outputs (``.detach()``, a tensor made from its
    ``.item()``): every product was 0, the gradient of a constant, unsaid."""
    loss = check_scalar_loss(loss)
    if gradient and not loss.requires_grad and _carries_gradient(out):
        raise UserError(
            "the loss function returns a loss without a gradient (detached, or made anew from "
            "a number), though the model's outputs have one, so its Hessian would be 0: "
            "return the loss as computed from the outputs."
        )


def _carries_gradient(out: object) -> bool:
    """Whether the model's outputs (a tensor, or a tuple, list or mapping of them, as a
    transformer's are) have a gradient to give the loss."""
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    parts = (
        out.values() if isinstance(out, Mapping) else out if isinstance(out, tuple | list) else ()
    )
    return any(_carries_gradient(part) for part in parts)


def _check_own_space(model: nn.Module, space: ParamSpace) -> None:
    """Refuse a space whose tensor under a name of the model's parameters is another tensor
    (``select_parameters`` of another model, or of a copy): the products were blamed on a
    parameter "used under torch.no_grad, or in a torch.utils.checkpoint". A space may still hold
    tensors the model does not (a temperature the loss uses), under names of their own."""
    held = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in zip(space.names, space.tensors, strict=True):
        if name in held and held[name] is not tensor:
            raise UserError(
                f"the parameter space's {name} is not the model's {name} (a space selected from "
                "another model, or from a copy): select the parameters of this model."
            )


def _check_switches(**switches: object) -> None:
    """Refuse a switch that is no bool or None: ``keep_graph="no"`` kept the graphs (any
    object but False did), and 0 did too, where False does not."""
    for name, value in switches.items():
        if value is not None and not isinstance(value, bool):
            raise UserError(
                f"`{name}` must be True, False or None (the operator decides), not {value!r}."
            )


def _check_model_and_loss(model: object, loss_fn: object) -> None:
    """Refuse, before the batches are placed, what cannot be the model or the loss: a loss
    class failed at the first product in its constructor ("Boolean value of Tensor with more
    than one value is ambiguous", nn.MSELoss taking the outputs for size_average), a loss
    name as "'str' object is not callable", a plain function as the model in named_parameters."""
    if not isinstance(model, nn.Module):
        raise UserError(f"the model must be a torch.nn.Module, not {a_type(model)}.")
    if isinstance(loss_fn, type):
        raise UserError(
            f"the loss function is the class {loss_fn.__name__}: pass an instance, "
            f"{loss_fn.__name__}(), or a function of (outputs, targets)."
        )
    if not callable(loss_fn):
        raise UserError(
            "the loss function must be a function of (outputs, targets), such as "
            f"torch.nn.CrossEntropyLoss(), not {a_type(loss_fn)}."
        )


def _check_twice_differentiable(loss: torch.Tensor, g: torch.Tensor | None) -> None:
    """Refuse a loss whose graph holds an ``autograd.Function`` that cannot be differentiated
    again: one whose backward is ``@once_differentiable``.

    Its second derivatives are not there, and nothing raises: inside the model it leaves an
    ``Error`` node in the gradient's graph, which raises only when a backward pass runs through
    it, and the products' backward, which asks for the parameters alone, skips it (66% off on a
    tiny MLP); as the loss function, whose incoming gradient is a constant, not even that (its
    curvature was 0 with no error). Looked for in both graphs: the forward's Function classes
    and the gradient's Error nodes.
    """
    seen: set[object] = set()
    stack = [loss.grad_fn, None if g is None else g.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
        # (A NotImplemented node, the other kind without a derivative, raises by itself.)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE or (
            _ERROR_NODE is not None and type(node) is _ERROR_NODE
        ):
            raise UserError(
                "the model or loss uses an autograd.Function whose backward is "
                "@once_differentiable, so torch cannot give its second derivatives: write a "
                "backward of differentiable torch operations to analyse it."
            )
        stack.extend(f for f, _ in node.next_functions)


class HessianOperator:
    """Hessian of the mean loss of ``model`` over ``batches`` with respect to ``params``.

    Backends: ``double-backward`` differentiates the gradient again (a loop of backward passes,
    or one batched pass with ``is_grads_batched``) and keeps each batch's first-order graph
    across products while memory allows (:meth:`_keeps`), its eval-mode BatchNorm layers by
    their formula (:mod:`batchnorm_formula`: fewer operators to differentiate twice, the same
    function); ``func`` uses ``torch.func``
    forward-over-reverse (``vmap`` of ``jvp`` of ``grad``), which shares one forward/backward
    pass among all vectors of a block. ``auto`` chooses per product (:meth:`backend_for`).

    ``precision`` (:mod:`precision`) applies to the products only; losses and gradients are
    always computed in full precision.

    Batches are weighted by their samples, or by ``batch_weight(targets)`` where a batch's loss
    is a mean over something else (the labels the built-in cross-entropy counts, not -100:
    :func:`hessian_cli.specs.losses.labelled_count`).

    Distributed (``distributed=None``: whenever a process group is initialised): each rank passes
    ITS batches, contiguous pieces of one global list in rank order (see
    :func:`distributed.shard`); weights use the global total, and products, gradients and
    losses are summed over ranks, so every rank sees the same operator and the solvers, given the
    same seeds, run identically everywhere. A rank may hold no batch at all.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        params: ParamSpace | str | Iterable[str] | Iterable[torch.Tensor] | None = None,
        *,
        bn: BNMode = "eval",
        backend: Backend = "auto",
        keep_graph: bool | None = None,
        batched_backward: bool | None = None,
        precision: Precision = "full",
        distributed: bool | None = None,
        batch_weight: Callable[[torch.Tensor], float] | None = None,
    ) -> None:
        _check_model_and_loss(model, loss_fn)
        _check_switches(
            keep_graph=keep_graph, batched_backward=batched_backward, distributed=distributed
        )
        check_batches(batches)
        check_batch_weight(batch_weight)
        self.distributed = dist_utils.is_distributed() if distributed is None else distributed
        self.model = model
        self.loss_fn = loss_fn
        self.space = params if isinstance(params, ParamSpace) else select_parameters(model, params)
        _check_own_space(model, self.space)
        self.n = self.space.n
        self.dtype = self.space.dtype
        self.device = self.space.device
        # In 16 bits the products are far off (a bfloat16 MLP's trace came out 0.66 for 2.42,
        # called exact) and torch has no QR for the solvers: eigenpairs failed in a traceback.
        if narrow := {str(t.dtype)[6:] for t in self.space.tensors if t.element_size() < 4}:
            raise UserError(
                f"the parameters are {', '.join(sorted(narrow))}, and the Hessian is computed in "
                'float32 or float64: cast the model (`model.float()`); `precision="bf16"` '
                "runs the products under bfloat16 autocast."
            )
        if bn not in ("eval", "train"):
            raise UserError(f"unknown BatchNorm mode {bn!r}: use eval or train.")
        self.bn = bn
        _check_no_renormalising_embedding(model)
        # The model's dtype for the data (cast_batch): float32 data for a float64 model failed
        # at the first product, in torch's words.
        self._data_dtype = model_dtype(model)
        # The analysed tensors that are the model's parameters (a space may hold others, e.g. a
        # temperature the loss uses): they must stay the model's (see _check_bound).
        registered = {id(p) for p in model.parameters()}
        self._registered = [t for t in self.space.tensors if id(t) in registered]
        # Checked and placed one batch at a time (a generator, read once, or a DataLoader: the
        # source is never held beside the placed copies); under torch.distributed every rank
        # refuses together, before the collectives below.
        # What each batch's mean loss is a mean over: its samples, or (batch_weight) e.g. its
        # labelled tokens, so that the mean over all of them does not depend on the batching.
        with dist_utils.fail_together() if self.distributed else contextlib.nullcontext():
            self.batches = [self._placed(batch, bn) for batch in batches]
            shares = [batch_share(batch_weight, y) for _, y in self.batches]
            if any(not share > 0 for share in shares):  # its mean is 0/0: NaN everywhere
                raise UserError(
                    "a batch holds nothing its loss averages over (no label but -100, say): "
                    "leave it out."
                )
        counts = [len(self.batches)]
        local_samples = sum(len(y) for _, y in self.batches)
        self.num_samples = local_samples
        total = sum(shares)
        if self.distributed:
            counts = dist_utils.all_gather_ints(len(self.batches))
            self.num_samples = int(dist_utils.sum_scalar(float(local_samples)))
            total = dist_utils.sum_scalar(total)
        if self.num_samples == 0 or not total > 0:
            raise UserError("no data to compute the Hessian on: no batch holds a sample.")
        # Global index of this rank's first batch: minibatch statistics follow the global order.
        self.batch_offset = sum(counts[: dist_utils.world()[0]]) if self.distributed else 0
        self.weights = [share / total for share in shares]
        if backend not in ("auto", "double-backward", "func"):
            raise UserError(f"unknown HVP backend {backend!r}: use auto, double-backward or func.")
        self.backend = backend
        self.backends_used: set[str] = set()
        # torch.func cannot call a TorchScript model with other values ("The stateless API
        # can't be used with Jitted modules"): double backward there. Through a scripted part it
        # is exact, as the scripts run unoptimised (_unoptimised; by the optimised plan a
        # scripted Sequential's products were 0.5-1.0 off, with no error).
        # An embedding's padding row has no gradient (its backward masks it), but forward mode
        # carries its tangent on: torch.func's products had a column for it that the zero row
        # does not mirror (an Embedding(padding_idx=0) under a linear layer: 0.24 asymmetric,
        # eigenvalues of another matrix). Double backward masks both, as the dense Hessian does.
        self._func_ok = not isinstance(model, torch.jit.ScriptModule) and not any(
            isinstance(m, nn.Embedding) and m.padding_idx is not None for m in model.modules()
        )
        self.precision = check_precision(precision, self.device, self.dtype)
        # None: keep one batch's graph; several batches' while they fit (_keeps).
        self.keep_graph = keep_graph
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor | None, list[bool]]] = {}
        self._graph_versions: tuple[tuple[int, int], ...] = ()  # the weights' at the last build
        self._graph_values = torch.zeros(0, dtype=torch.int64)  # and their _values_digest
        self._holding = 0  # depth of weights_held() blocks
        self._looked = False  # whether the weights were looked at inside the current one
        self._layout: ModelLayout | None = None  # the model's modules, as found at that look
        # The forward mode inside a held block, from its first product to its end (matmul)
        self._held_mode: contextlib.ExitStack | None = None
        # The BatchNorm layers by their formula in the kept graphs (batchnorm_formula), as at
        # the last build: a graph is differentiated with the layers it was built with.
        self._formula_layers: tuple[nn.Module, ...] = ()
        self._graph_bytes = 0  # memory held by the kept graphs
        # Batches whose loss was seen finite inside the current weights_held block (since a
        # release: another precision), for _first_order_graph
        self._finite_batches: set[int] = set()
        self._graph_checked = False  # whether a first-order graph was seen to be differentiable
        self._forward_checked = False  # whether a forward pass was seen to draw no random numbers
        self._writes_checked = False  # and to leave the model's parameters as they were
        self._graph_budget: int | None = None  # how much they may hold (set at the first one)
        self._graphs_full = False  # the last graph built did not fit the budget
        self._unfit: set[int] = set()  # the batches whose graph did not fit it
        self._columns: dict[tuple[bool, ...], torch.Tensor] = {}
        # On CPU a loop of single products beats the vmapped backward per vector (measured on
        # ResNet-20: 1.5 vs 2.4-4.9 gradient-equivalents, benchmarks/RESULTS.md).
        self._batched_backward_ok = (
            self.device.type != "cpu" if batched_backward is None else batched_backward
        )
        self.max_block: int | None = None  # set when a block ran out of device memory
        self._checks_products = True  # whether matmul looks for NaN or inf (unchecked_products)
        self.hvp_count = 0
        self.passes = 0
        self.hvp_seconds = 0.0

    def _placed(self, batch: object, bn: BNMode) -> Batch:
        """A batch checked and on the operator's device (and dtype, see the constructor)."""
        pair = isinstance(batch, (tuple, list)) and len(batch) == 2
        if not (pair and is_inputs(batch[0]) and isinstance(batch[1], torch.Tensor)):
            kinds = (
                f"({', '.join(type(t).__name__ for t in batch)})"
                if isinstance(batch, (tuple, list))
                else a_type(batch)
            )
            # A pair (x, y) given as the batches yields x, then y: each is taken for a batch.
            hint = ": pass a list of batches, [(x, y)]" if isinstance(batch, torch.Tensor) else ""
            raise UserError(
                "each batch must be (inputs, targets): a tensor of targets beside a tensor of "
                f"inputs, a tuple of them or a dict of named ones, not {kinds}{hint}."
            )
        if batch[1].ndim == 0:  # a dataset's sample (x_i, y_i): len(y) failed, a TypeError
            raise UserError(
                "each batch's targets must hold one entry per sample, not a single number: pass "
                "batches (a DataLoader), not the samples of a dataset."
            )
        x, y = cast_batch((batch[0], batch[1]), self._data_dtype)
        x, y = inputs_to(x, self.device), y.to(self.device)
        if bn == "train" and len(y) == 1 and has_batchnorm(self.model):
            if (why := batch_statistics_error(self.model, x)) is not None:
                raise UserError(
                    f"a batch of one sample has no statistics for BatchNorm (bn='train'): "
                    f"{why}; drop it (drop_last=True) or use bn='eval'."
                )
        return x, y

    def backend_for(self, block: int) -> str:
        """The backend that computes a product of ``block`` vectors (``auto``:
        :func:`auto_backend`)."""
        wanted = auto_backend(block, self.device) if self.backend == "auto" else self.backend
        return wanted if wanted != "func" or self._func_ok else "double-backward"

    # --- losses and gradients -------------------------------------------------------------

    def _batch_loss(
        self,
        x: Inputs,
        y: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        before = None if self._forward_checked else _random_states(self.device)
        # Of the model's own parameters (functional_call's values are others)
        versions = None if self._writes_checked or params is not None else self._versions()
        # A model that fails on the first batch, and a loss on any (a label past the outputs in a
        # later one), say what does not fit, where torch's words named neither. (A later batch's
        # lookup out of an embedding table is said by the caller, of all the batches.)
        first = before is not None
        out = model_outputs(self.model, x, params) if first else run_model(self.model, x, params)
        # Looked at between the two too: a loss function that draws (F.dropout) was blamed on the
        # model, "the model draws random numbers in eval mode", where the model drew none.
        model_drew = first and not _same_states(before, _random_states(self.device))
        loss = loss_on_outputs(self.loss_fn, out, y, x)
        if before is not None:
            self._forward_checked = True
            if model_drew:
                raise UserError(
                    "the model draws random numbers in eval mode (F.dropout, whose default is "
                    "training=True, say), so each pass is of another function: make its forward "
                    "deterministic in eval mode, e.g. F.dropout(x, p, training=self.training)."
                )
            if not _same_states(before, _random_states(self.device)):
                raise UserError(
                    "the loss function draws random numbers (F.dropout, whose default is "
                    "training=True, say), so each pass is of another function: make it "
                    "deterministic, e.g. without the dropout."
                )
        if versions is not None:
            self._writes_checked = True
            self._check_parameters_kept(versions)
        _check_loss(loss, out, gradient=torch.is_grad_enabled())
        # Under torch.distributed one rank's share alone may be bad: its NaN reaches every rank
        # through the sums, which are checked (a rank raising here alone left the others waiting
        # and its message claimed work that rank 0 then dropped).
        if check and not self.distributed:
            self.check_losses(loss.detach())
        return loss

    def _check_parameters_kept(self, versions: tuple[tuple[int, int], ...]) -> None:
        """Refuse a forward pass that wrote to a parameter of the model in place (``versions``:
        :meth:`_versions` before it): ``F.embedding(..., max_norm=...)`` rescales the rows it
        looks up (a table's norms 1.6-2.9 cut to 1) outside autograd, so the products were of
        the plain lookup at the cut weights (lambda_1 0.380 where the model's rescaled lookup
        has 0.377), unsaid, and the model's weights were no longer the checkpoint's."""
        names = [n for n, _ in self.model.named_parameters()]
        changed = zip(names, versions, self._versions(), strict=False)  # (buffers after them)
        name = next((n for n, then, now in changed if then != now), None)
        if name is not None:
            raise UserError(
                f"the model's forward pass changed its parameter {name!r} in place "
                "(F.embedding with max_norm, say), so the Hessian would be of other weights "
                "than the model's: make the forward leave its parameters as they are."
            )

    def check_losses(self, losses: torch.Tensor | float) -> None:
        """Raise, in one sentence, where a loss (a sum over ranks, or gathered from them: then
        every rank raises alike) is not finite."""
        if not bool(torch.isfinite(torch.as_tensor(losses)).all()):
            raise (dist_utils.CollectiveNotFinite if self.distributed else NotFinite)(
                "the loss is not finite (NaN or inf) on the analysed data: "
                "check the weights and the data."
            )

    def loss(self, params: dict[str, torch.Tensor] | None = None) -> float:
        """The weighted mean loss over all batches (with ``params`` in place of those
        parameters' values, by ``functional_call``)."""
        # functional_call cannot take a TorchScript module: its values are set and put back,
        # which invalidates the graphs kept from them (in-place changes), so they go first.
        scripted = params is not None and isinstance(self.model, torch.jit.ScriptModule)
        if scripted:
            self.release()
        with (
            torch.no_grad(),
            forward_mode(self.model, self.bn, loss=self.loss_fn),
            numerics("full", self.device),
            _values_set(self.model, params) if scripted else contextlib.nullcontext(),
        ):
            local = sum(
                w * self._batch_loss(x, y, None if scripted else params).item()
                for w, (x, y) in zip(self.weights, self.batches, strict=True)
            )
        total = self._sum_scalar(local)
        self.check_losses(total)
        return total

    def _sum_scalar(self, value: float) -> float:
        return dist_utils.sum_scalar(value, self.device) if self.distributed else value

    def check_model(self) -> None:
        """Refuse now, on this rank's first batch and without a collective, a model whose
        Hessian autograd would get wrong (see :meth:`_first_order_graph`'s checks), which the
        first product or gradient does otherwise: under torchrun inside ``fail_together`` every
        rank refuses together, in one message, instead of each rank on its own. The batch's
        graph is kept for the products where graphs are kept, so it is built in their precision
        (a full-precision one made every later bf16 product of that batch a float32 pass)."""
        if not self.batches or self._graph_checked:
            return
        with (
            torch.enable_grad(),
            forward_mode(self.model, self.bn, loss=self.loss_fn),
            numerics(self.precision, self.device),
        ):
            self._first_order_graph(0)

    def gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss and its gradient as a flat vector (one pass over the data)."""
        total, g = 0.0, torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for (loss, gb), w in zip(self.batch_gradients(), self.weights, strict=True):
            total += w * loss
            g.add_(gb, alpha=w)
        if self.distributed:
            dist_utils.all_reduce_sum(g)
        total = self._sum_scalar(total)
        self.check_losses(total)
        return total, g

    def gradient_seconds(self) -> float:
        """Seconds of one plain gradient pass over this rank's batches: the unit of cost.

        Measured apart from the analysis, after it, so that torch's first-call set-up (on a
        2,410-parameter MLP the first gradient took 100 ms, the next ~1 ms) and the kept graphs'
        construction do not inflate it; the fastest of up to ``_TIMED_PASSES`` passes, as many
        as fit in ``_TIMING_BUDGET_S`` (one pass of a millisecond varied 4x between runs on a
        busy machine; a pass longer than the budget is timed once). Nothing is kept; CUDA is
        synchronised around each pass. The forward mode is set once, outside the timed passes:
        a TorchScript model's plain plan is made anew at each entry (0.35 ms, a 0.55 ms gradient
        of a 1,242-parameter model).
        """
        best, spent = math.inf, 0.0
        with (
            torch.enable_grad(),
            forward_mode(self.model, self.bn, loss=self.loss_fn),
            numerics("full", self.device),
        ):
            for _ in range(_TIMED_PASSES):
                self._synchronize()
                start = time.perf_counter()
                for x, y in self.batches:
                    self._derivatives(self._batch_loss(x, y))
                self._synchronize()
                seconds = time.perf_counter() - start
                best, spent = min(best, seconds), spent + seconds
                if spent >= _TIMING_BUDGET_S:
                    break
        return best

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch_gradients(self, limit: int | None = None) -> Iterator[tuple[float, torch.Tensor]]:
        """Per-batch mean loss and gradient of this rank's batches among the first ``limit``.

        ``limit`` counts batches in global order. Nothing is summed over ranks: minibatch
        statistics are per batch, so callers gather them with :meth:`gather_batch_rows`, and
        the losses with them, for :meth:`check_losses`.
        """
        local = None if limit is None else max(0, limit - self.batch_offset)
        self._drop_graphs_of_changed_values()
        with (
            torch.enable_grad(),
            forward_mode(self.model, self.bn, loss=self.loss_fn),
            numerics("full", self.device),
        ):
            for i, (x, y) in enumerate(self.batches[:local]):
                if self._gradient_from_graph():
                    yield self._graph_gradient(i)
                    continue
                loss = self._batch_loss(x, y)
                yield loss.item(), self.space.flatten(self._derivatives(loss))

    def _gradient_from_graph(self) -> bool:
        """Whether gradients come from the first-order graphs, building them for the products.

        Where the graphs are kept (one batch; several while they fit), the products need that
        pass anyway, so the gradient costs nothing more; elsewhere a plain backward is cheaper.
        Reduced-precision products build theirs in that precision, so not there.
        """
        if self.precision != "full":
            return False
        if not self._budgeted:
            return self.keep_graph is not False
        # While _keeps may keep them: until one did not fit, where the free memory is known.
        if self._graph_budget is None:
            return self._free_memory() is not None
        return self._graph_budget > 0 and not self._graphs_full

    @property
    def _budgeted(self) -> bool:
        """Whether the memory budget of :meth:`_keeps` decides which graphs are kept (several
        batches, ``keep_graph`` not forced either way)."""
        return self.keep_graph is None and len(self.batches) > 1

    def _graph_gradient(self, i: int) -> tuple[float, torch.Tensor]:
        """Batch ``i``'s loss and gradient from its first-order graph: the graph's own where
        every parameter is used (a vector of zeros was made and dropped beside it, a write of
        ``n`` entries a batch), else scattered among zeros."""
        loss, g, used = self._first_order_graph(i)
        cols = None if g is None else self._used_columns(used)
        if g is not None and cols is None:
            return loss.item(), g.detach()
        flat = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        if g is not None:
            flat.index_copy_(0, cols, g.detach())
        return loss.item(), flat

    def gather_batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-batch results of every rank, in global batch order (``rows`` in one process)."""
        return dist_utils.all_gather_rows(rows) if self.distributed else rows

    def loss_at(self, delta: torch.Tensor) -> float:
        """The mean loss at ``w + delta``, evaluated functionally: the weights are never changed,
        so the first-order graphs kept from them stay valid (changing the weights in place made
        the next product fail) and no rounding is left behind."""
        shifted = zip(
            self.space.names, self.space.tensors, self.space.unflatten(delta), strict=True
        )
        return self.loss({name: t.detach() + d for name, t, d in shifted})

    # --- Hessian-vector products ----------------------------------------------------------

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        """``H`` applied to each row of ``block`` (shape ``[b, n]`` or ``[n]``)."""
        check_block(block, self.n)  # [2, 2, n] was said to be of length 2, a ValueError
        single = block.ndim == 1
        V = block.reshape(1, -1) if single else block
        if len(V) == 0:  # no product: no pass, nothing to count
            return torch.zeros(0, self.n, dtype=self.dtype, device=self.device)
        start = time.perf_counter()
        V = V.to(device=self.device, dtype=self.dtype)
        out: torch.Tensor | None = None
        if not self._looked:
            self._drop_graphs_of_changed_values()
            self._layout = ModelLayout.of(self.model)
        # Products need autograd, also for a caller inside torch.no_grad() (an optimizer's step),
        # and the forward mode also where a kept graph is differentiated: a non-reentrant
        # torch.utils.checkpoint runs its block's forward again inside the backward.
        with (
            torch.enable_grad(),
            self._product_mode(),
            numerics(self.precision, self.device),
        ):
            for i, (w, (x, y)) in enumerate(zip(self.weights, self.batches, strict=True)):
                part = self._batch_hvp(i, x, y, V)  # a new tensor: scaled in place
                if out is None:
                    out = part if w == 1 else part.mul_(w)
                else:
                    out.add_(part, alpha=w)
        if out is None:  # a rank without batches
            out = torch.zeros_like(V)
        if self.distributed:
            dist_utils.all_reduce_sum(out)
        if self._checks_products and not all_finite(out):  # the solvers would fail later
            raise self.not_finite()
        self.hvp_count += V.shape[0]
        self.passes += 1
        self.hvp_seconds += time.perf_counter() - start
        self._looked = self._holding > 0
        return out[0] if single else out

    def not_finite(self) -> NotFinite:
        """The error for products that are not finite: raised by :meth:`matmul`, or by a caller
        that looks at them itself (:meth:`unchecked_products`)."""
        return (dist_utils.CollectiveNotFinite if self.distributed else NotFinite)(
            "the Hessian-vector products are not finite (NaN or inf): the loss's second "
            "derivatives are undefined or infinite at these weights."
        )

    @contextlib.contextmanager
    def unchecked_products(self) -> Iterator[None]:
        """Products inside are not looked at for NaN or inf: the caller reads something that
        each of them enters anyway (the eigensolver's projected matrices, on the host) and
        raises :meth:`not_finite` where that is not finite. A look is a read of the device, on
        a GPU a wait for the product, and an ``aminmax`` over the block (0.3 ms of CPU time a
        ResNet-20 product)."""
        saved, self._checks_products = self._checks_products, False
        try:
            yield
        finally:
            self._checks_products = saved

    def _product_mode(self) -> contextlib.AbstractContextManager[None]:
        """The forward mode for one product; inside weights_held, set at its first product and
        left on to its end (entered and left at every product: ~0.3 ms of host work on
        ResNet-20, whose double backward on one input takes ~8 ms on the CPU)."""
        if self._held_mode is not None:
            return contextlib.nullcontext()
        mode = forward_mode(self.model, self.bn, self._layout, self.loss_fn)
        if not self._holding:
            return mode
        stack = contextlib.ExitStack()
        stack.enter_context(mode)  # (where it raises, nothing is held)
        self._held_mode = stack
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def weights_held(self) -> Iterator[None]:
        """Products inside look for changed weights (and walk the model's modules for its
        forward mode) at the first call only.

        A kept graph is of the weights it was built at, so each product compares the weights'
        version counters and values with those (:meth:`_first_order_graph`,
        :meth:`_drop_graphs_of_changed_values`): walks over every parameter and buffer and a
        sum of each, 2 ms a product of ResNet-20 on one input on the CPU (autograd's own double
        backward: 8 ms), and on a GPU, where products wait on the host, a kernel per tensor.
        The solvers hold the weights for a whole solve, in which nothing writes them; a caller
        may hold them likewise. A graph built inside still records the weights' values as
        they are then, for the products after the block. From the first product to the end of
        the block the model stays in the products' forward mode (:func:`forward_mode`: eval
        mode, backward hooks off), restored as it was when the block ends, also on an error.
        """
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                self._looked = False
                self._finite_batches = set()
                mode, self._held_mode = self._held_mode, None
                if mode is not None:
                    mode.close()

    __matmul__ = matmul

    def _batch_hvp(self, i: int, x: Inputs, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Batch ``i``'s products in pieces of at most ``max_block`` rows.

        A piece that runs out of device memory is halved, and the smaller size is kept for later
        products: callers may pass all their vectors at once (a vmapped block needs memory in
        proportion to its size). A single vector that does not fit first frees the graphs kept
        for other batches; only then is it an error.
        """
        parts, start = [], 0
        while start < len(V):
            size = min(self.max_block or len(V), len(V) - start)
            try:
                parts.append(self._hvp(self.backend_for(size), i, x, y, V[start : start + size]))
            except torch.cuda.OutOfMemoryError:
                if size > 1:
                    self.max_block = size // 2
                elif self._budgeted and self._graphs:
                    self.release()
                    self._graph_budget = 0  # rebuild every batch's graph from now on
                else:
                    raise
                continue
            start += size
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(V.dtype)

    def _hvp(
        self, backend: str, i: int, x: Inputs, y: torch.Tensor, V: torch.Tensor
    ) -> torch.Tensor:
        if backend == "func":  # backend_for gives it only while _func_ok
            try:
                out = self._hvp_func(x, y, V)
                self.backends_used.add("func")
                return out
            except (torch.cuda.OutOfMemoryError, UserError):
                raise
            except Exception:
                # Some ops lack forward-mode rules under vmap (e.g. mse_loss's backward raises
                # "ZeroTensors are immutable" in torch 2.13): double backward computes the same.
                # A model or loss that fails on the batch (a TypeError of a tuple of outputs, a
                # ValueError of batch sizes) fails there too, said in one sentence (_batch_loss).
                self._func_ok = False
        self.backends_used.add("double-backward")
        try:
            return self._hvp_double(i, V)
        except RuntimeError as exc:
            # An operation whose backward torch cannot differentiate (MultiMarginLoss's) leaves
            # a NotImplemented node in the gradient's graph, which raises when a product runs
            # through it: "unexpected RuntimeError" on the command line.
            text = str(exc)
            if not (text.startswith("derivative for ") and "is not implemented" in text):
                raise
            raise UserError(
                "the model or loss uses an operation that torch has no second derivative for "
                f"({first_line(exc)}), so its Hessian cannot be taken: write it of operations "
                "that have one, or choose another loss."
            ) from exc

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Products in full precision inside the block: how reduced-precision results are checked.

        A kept first-order graph belongs to one precision, so it is dropped on the way in and out.
        """
        if self.precision == "full":
            yield
            return
        saved, self.precision = self.precision, "full"
        self.release()
        try:
            yield
        finally:
            self.release()
            self.precision = saved

    def precision_error(self, num_vectors: int = 2, seed: int = 0) -> float:
        """Relative error ``||H_p V - H V|| / ||H V||`` of this operator's products on random
        ``V`` against full-precision ones (0 in full precision; costs ``2 * num_vectors`` HVPs)."""
        if self.precision == "full":
            return 0.0
        gen = probe_generator(self, seed)
        V = gaussian((num_vectors, self.n), generator=gen, dtype=self.dtype, device=self.device)
        fast = self.matmul(V)
        with self.full_precision():
            exact = self.matmul(V)
        error, size = norms((fast - exact).flatten()), norms(exact.flatten())
        return float(error / size.clamp_min(torch.finfo(self.dtype).tiny))

    def _first_order_graph(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
        """Batch ``i``'s loss, its flat gradient with the graph, and which parameters it uses."""
        # Kept graphs are of the weights (and buffers) they were built at: an operator used
        # again after a training step or a load_state_dict gave the old Hessian (a change that
        # autograd had saved raised its own error instead). Seen here: in-place changes (their
        # version counters) and new tensors (their storage), of every parameter, also those
        # not analysed; writes through ``.data``, which move neither, by their values once per
        # call (_drop_graphs_of_changed_values). Both once per solve inside weights_held.
        if not self._looked:
            versions = self._versions()
            if versions != self._graph_versions:
                self._check_bound()
                if self._graphs:
                    self.release()
                self._graph_versions = versions
        if i in self._graphs:
            return self._graphs[i]
        x, y = self.batches[i]
        before = self._allocated()
        layout = self._layout or ModelLayout.of(self.model)
        self._formula_layers = tuple(m for m in layout.batchnorms if formula_ready(m))
        with batchnorm_formula(self._formula_layers):
            # Inside weights_held a rebuilt graph's loss is of the same weights, data and
            # precision: looked at once, not at every product (a host read, on a GPU a wait for
            # the batch's forward before its backward is queued: 8 a product over 8 batches).
            loss = self._batch_loss(x, y, check=not (self._holding and i in self._finite_batches))
            if self._holding:
                self._finite_batches.add(i)
            parts = self._derivatives(loss, create_graph=True)
        used = [p is not None for p in parts]
        # An unused parameter has no gradient: its Hessian rows and columns are zero.
        # nn.Embedding(sparse=True) gives a sparse gradient; its dense form is differentiable.
        flat = [dense(p).reshape(-1) for p in parts if p is not None]
        g = torch.cat(flat) if any(used) else None
        if not self._graph_checked:
            _check_twice_differentiable(loss, g)
            self._check_unused(x, y, used)
            self._graph_checked = True

        def size() -> int:  # (on the CPU its saved tensors, which a checkpoint makes again)
            with batchnorm_formula(self._formula_layers):
                return self._graph_size(before, loss, g)

        kept = self._keeps(i, size)
        if kept:
            self._graphs[i] = (loss, g, used)
        # The versions after each build, kept or not: a forward that updates a buffer of its own
        # (a counter) must not make the next product rebuild every batch's graph. The values
        # _drop_graphs_of_changed_values compares, where they may have moved: a graph kept, a
        # tensor written in place; not after each batch rebuilt beside kept graphs (a float64
        # sum of every tensor: ResNet-18 on the CPU, 121 ms of CPU time a batch and product).
        versions = self._versions()
        if self._graphs and (kept or versions != self._graph_versions):
            self._graph_values = self._values_digest()
        self._graph_versions = versions
        return loss, g, used

    def _check_unused(self, x: Inputs, y: torch.Tensor, used: list[bool]) -> None:
        """Refuse parameters that autograd finds unused but that change the batch's loss.

        Their rows and columns of the Hessian would be zero: a ``torch.utils.checkpoint`` with
        ``use_reentrant=True`` on inputs that need no gradient (a network's first block on the
        data) runs its block without autograd, and torch only warns. Two forward passes without
        autograd, where some parameter is unused: with those parameters moved in a random-sign
        direction (a uniform shift, which a LayerNorm or a softmax cancels, went unseen), and
        as they are; the losses compared within a few roundings, a 16-bit model's from its
        outputs in float32 (a bfloat16 loss cannot show a change of 0.1%). A TorchScript module,
        which cannot be called with other values, is looked at through a copy that takes them
        in place (the graph just built keeps the model's own; unlooked at, a layer used under
        torch.no_grad had zero rows and columns).
        """
        unused = [name for name, u in zip(self.space.names, used, strict=True) if not u]
        if not unused:
            return
        scripted = isinstance(self.model, torch.jit.ScriptModule)
        model = copy.deepcopy(self.model) if scripted else self.model
        values = {
            name: t.detach() for name, t in zip(self.space.names, self.space.tensors, strict=True)
        }
        gen = torch.Generator().manual_seed(0)
        for name in unused:
            t = values[name]
            signs = rademacher(tuple(t.shape), generator=gen, dtype=t.dtype, device=t.device)
            values[name] = t + 0.1 * (t.abs().mean() + 1) * signs

        def loss_at(params: dict[str, torch.Tensor]) -> float:
            with _values_set(model, params) if scripted else contextlib.nullcontext():
                out = run_model(model, x, None if scripted else params)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.itemsize < 4:
                out = out.float()
            return float(self.loss_fn(out, y).detach())

        with torch.no_grad():  # not _batch_loss: a loss made infinite by the move is a change
            moved, base = loss_at(values), loss_at({})
        if not abs(moved - base) <= 8 * torch.finfo(torch.float32).eps * abs(base):  # NaN too
            raise UserError(
                f"the loss changes with {unused[0]}, but autograd gives it no gradient (it is "
                "used under torch.no_grad, or in a torch.utils.checkpoint with "
                "use_reentrant=True whose inputs need none): call checkpoint with "
                "use_reentrant=False, or freeze it (requires_grad_(False))."
            )

    def _derivatives(
        self, loss: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor | None, ...]:
        """The loss's gradient per analysed tensor (None where unused); a reentrant checkpoint,
        which cannot give it, refused in one sentence."""
        if not loss.requires_grad:  # none used (or all without autograd: see _check_unused)
            return (None,) * len(self.space.tensors)
        try:
            return torch.autograd.grad(
                loss, self.space.tensors, create_graph=create_graph, allow_unused=True
            )
        except RuntimeError as exc:
            if "use_reentrant=True" not in str(exc):
                raise
            raise UserError(
                "the model calls torch.utils.checkpoint with use_reentrant=True, which cannot "
                "give the gradient of the parameters alone: call it with use_reentrant=False."
            ) from exc

    def _check_bound(self) -> None:
        """Refuse products of parameters the model no longer holds (``load_state_dict(...,
        assign=True)`` puts new ones in: the products were of the old, silently), or of a model
        moved to another dtype or device (torch's "mat1 and mat2" said it)."""
        held = {id(p) for p in self.model.parameters()}
        if any(id(t) not in held for t in self._registered):
            raise UserError(
                "the model's parameters were replaced (e.g. load_state_dict(assign=True)) since "
                "this operator was made: make a new HessianOperator."
            )
        first = self.space.tensors[0]  # the operator's dtype and device are its
        if (first.dtype, first.device) != (self.dtype, self.device):
            raise UserError(
                "the model was moved to another dtype or device since this operator was made: "
                "make a new HessianOperator."
            )

    def _drop_graphs_of_changed_values(self) -> None:
        """Free the kept graphs where a weight's or buffer's values changed unseen by
        :meth:`_versions`: writes through ``.data`` (an EMA's ``p.data.lerp_``, a
        ``p.data.copy_``) move no version counter, and the products were of the old weights,
        certified (a 0.64 top eigenvalue reported where it was 0.95). One sum per tensor, read
        once per call (per solve inside weights_held); a change that keeps every tensor's sum (a
        permutation) is not seen."""
        if not self._graphs:
            return
        if not torch.equal(self._values_digest(), self._graph_values):
            self.release()

    def _values_digest(self) -> torch.Tensor:
        """The sum of each parameter's and buffer's bit patterns, as integers of their width that
        wrap around, on the operator's device: a write to any one entry changes it.

        Float64 sums of the values missed a write beside an inf (a mask of 0 and -inf sums to
        -inf whatever else it holds: the products stayed those of the old mask) and took 18.5 ms
        for ResNet-18 on the CPU, where these take 2.7 (integer adds at the tensor's own width).
        """
        with torch.no_grad():
            tensors = (*self.model.parameters(), *self.model.buffers())
            sums = [_bit_sum(t).to(self.device) for t in tensors]  # (no_grad: no detach)
            return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)

    def _versions(self) -> tuple[tuple[int, int], ...]:
        """The storage and in-place change counter of each tensor a kept graph depends on."""
        tensors = (*self.model.parameters(), *self.model.buffers())
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _keeps(self, i: int, size: Callable[[], int]) -> bool:
        """Whether to keep batch ``i``'s first-order graph, which holds ``size()`` bytes.

        Several batches' graphs are kept while together they hold at most half of the memory
        that was free when the first one was built (on the CPU, shared by this machine's ranks:
        half of it split among them): a kept graph saves its forward and first backward (on an
        H200, ResNet-18 over 256 inputs: 27.5 instead of 39.5 ms per batch and vector; on 2 CPU
        cores, ResNet-20 over 4 x 64 inputs: 7 instead of 11.7 s per product), and the other
        half is left to the products themselves. A graph that did not fit is not measured again
        until a release: the kept ones only grow till then (on the CPU a measure walks the
        graph, 11 ms of CPU time for ResNet-20 on one input, at every product that rebuilt it).
        """
        if not self._budgeted:
            return self.keep_graph is not False
        if i in self._unfit:
            self._graphs_full = True
            return False
        bytes_ = size()
        if self._graph_budget is None:
            free = self._free_memory()
            self._graph_budget = 0 if free is None else (free + bytes_) // 2
            if self.device.type == "cpu":
                self._graph_budget //= dist_utils.local_world_size()
        fits = 0 < self._graph_budget and self._graph_bytes + bytes_ <= self._graph_budget
        if fits:
            self._graph_bytes += bytes_
        else:
            self._unfit.add(i)
        self._graphs_full = not fits
        return fits

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _graph_size(self, before: int, loss: torch.Tensor, g: torch.Tensor | None) -> int:
        """Memory held by a first-order graph built since :meth:`_allocated` was ``before``: the
        allocator's count on CUDA, the graph's saved tensors elsewhere."""
        if self.device.type == "cuda":
            return self._allocated() - before
        return graph_bytes(loss) if g is None else graph_bytes(loss, g)

    def _free_memory(self) -> int | None:
        """Memory still available to this process (None where the platform does not say)."""
        return free_bytes(self.device)

    def _hvp_double(self, i: int, V: torch.Tensor) -> torch.Tensor:
        _, g, used = self._first_order_graph(i)
        if g is None or not g.requires_grad:
            return torch.zeros_like(V)
        keep = [t for t, u in zip(self.space.tensors, used, strict=True) if u]
        used_cols = self._used_columns(used)
        # Parameters of mixed dtypes have their gradient joined in the promoted dtype.
        Vu = (V[:, used_cols] if used_cols is not None else V).to(g.dtype)
        with batchnorm_formula(self._formula_layers):  # as the graph was built
            if self._batched_backward_ok and V.shape[0] > 1:
                try:
                    parts = torch.autograd.grad(
                        g, keep, Vu, retain_graph=True, allow_unused=True, is_grads_batched=True
                    )
                    return self._scatter(parts, used, V.shape[0])
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError:
                    self._batched_backward_ok = False  # an op without a batching rule: loop
            if len(V) == 1:
                return self._product_row(g, Vu[0], keep, used)[None]
            # Each row into its place in the block (in V's dtype, as _batch_hvp returns it): all
            # rows and then their concatenation held the block twice (ResNet-20, a block of 8
            # on one input: 17.7 MiB allocated at the peak of a product, 12.7 now), and a row
            # made apart was one more copy of it
            out = torch.empty_like(V)
            for j, v in enumerate(Vu):
                self._product_row(g, v, keep, used, out[j])
        return out

    def _product_row(
        self,
        g: torch.Tensor,
        v: torch.Tensor,
        keep: list[torch.Tensor],
        used: list[bool],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One product of the gradient ``g``'s graph with ``v``, as one flat vector (``out``)."""
        # The gradient of the scalar <g, v>, not grad_outputs=v: the same products, but torch
        # checks grad_outputs' shapes with sympy, whose import costs ~0.5 s.
        parts = torch.autograd.grad(torch.dot(g, v), keep, retain_graph=True, allow_unused=True)
        # Flattened as one vector, then made a row: not an unsqueeze per tensor first
        return self._scatter(parts, used, out=out)

    def _used_columns(self, used: list[bool]) -> torch.Tensor | None:
        """Indices of the used parameters' entries (built once per pattern: n-long on the host)."""
        if all(used):
            return None
        key = tuple(used)
        if key not in self._columns:
            mask = torch.cat(
                [
                    torch.full((m,), u, dtype=torch.bool)
                    for m, u in zip(self.space.numels, used, strict=True)
                ]
            )
            self._columns[key] = mask.nonzero().squeeze(1).to(self.device)
        return self._columns[key]

    def _scatter(
        self,
        parts: Sequence[torch.Tensor | None],
        used: list[bool],
        b: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The used parameters' ``parts`` as one flat vector (``b`` None; into ``out`` where
        given) or ``[b, n]`` block."""
        it = iter(parts)
        spread = [next(it) if u else None for u in used]
        if b is None:
            return self.space.flatten(spread, out)
        return self.space.flatten_batched(spread, b)

    def _hvp_func(self, x: Inputs, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        names = self.space.names
        primals = tuple(t.detach() for t in self.space.tensors)

        def loss_of(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
            out = run_model(self.model, x, dict(zip(names, p, strict=True)))
            loss = self.loss_fn(out, y)
            _check_loss(loss, out, gradient=True)
            return loss

        grad_fn = grad(loss_of)

        def hvp_one(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return jvp(grad_fn, (primals,), (tuple(self.space.unflatten(v)),))[1]

        # No autograd outside the transforms (grad ignores it): the model's parameters outside
        # the space still require gradients, and through them the products carried a graph of
        # every pass into the solver's basis and results (3 MB for 3 vectors of 127 entries).
        with torch.no_grad():
            parts = vmap(hvp_one)(V)
        return self.space.flatten_batched(parts, V.shape[0])

    def release(self) -> None:
        """Free the kept first-order graphs (e.g. before the weights change, or to make room).

        How many may be kept again is measured anew at the next one: the memory free then may
        differ from when the first was built (a solver's basis took its share since)."""
        self._graphs = {}
        self._finite_batches = set()
        self._graph_bytes = 0
        self._graph_budget = None
        self._graphs_full = False
        self._unfit = set()
