"""Which parameters the Hessian is taken with respect to, and how they map to one flat vector."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from hessian_cli.engine.linear_operator import described
from hessian_cli.errors import UserError, a_type


@dataclass(frozen=True)
class ParamSpace:
    """An ordered set of parameters viewed as one flat vector of length ``n``.

    Tied parameters appear once (``named_parameters`` de-duplicates them), so the Hessian is
    taken with respect to the free variables of the model, not its attribute names.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        """Refuse a space of no entries: built empty, its dtype failed in an IndexError; of
        zero-size parameters only (``nn.Parameter(torch.zeros(0))``), the trace came out 0
        from no product and the density failed in a ZeroDivisionError."""
        if len(self.names) != len(self.tensors):
            raise UserError(
                f"a parameter space takes one name per tensor, not {len(self.names)} names for "
                f"{len(self.tensors)} tensors."
            )
        for name, t in zip(self.names, self.tensors, strict=True):
            # A frozen or plain tensor failed at the first product in autograd's words: "One of
            # the differentiated Tensors does not require grad"; what is no tensor in .numel.
            if not isinstance(t, torch.Tensor):
                raise UserError(f"the parameter space's {name} is {a_type(t)}, not a tensor.")
            if is_lazy(t):  # its numel failed in a ValueError quoting torch's internals
                raise UserError(
                    f"the parameter {name} is uninitialized, a lazy module's (sized by its first "
                    "input): run the model on a batch first, model(x)."
                )
            if not t.requires_grad:
                raise UserError(
                    f"the parameter space's {name} does not require gradients (frozen), so it "
                    "has no curvature to take: leave it out, as select_parameters does."
                )
        if not any(t.numel() for t in self.tensors):
            shapes = zip(self.names, self.shapes, strict=True)
            held = [f"{name} of shape {tuple(shape)}" for name, shape in shapes]
            what = f" ({_listed(held)})" if held else ""
            raise UserError(
                f"the parameters selected{what} hold no entries, so there is no Hessian to "
                "analyse: select parameters that do."
            )

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return tuple(t.shape for t in self.tensors)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(t.numel() for t in self.tensors)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for m in self.numels:
            out.append(acc)
            acc += m
        return tuple(out)

    @property
    def n(self) -> int:
        return sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def flatten(
        self, parts: Sequence[torch.Tensor | None], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Concatenate per-parameter tensors (``None`` means zero, e.g. an unused parameter),
        into ``out`` where given (a row of a block: not a new vector copied there after).

        A double backward's convolution weights come transposed (strides (9, 144, 3, 1) for a
        16x16x3x3 kernel), so their ``reshape(-1)`` copies them before the concatenation does
        again. Kept: a copy of each part straight into its place, which saved 25% of this on
        ResNet-18 on the CPU, made a ResNet-20 product dispatch 209 operations of its own
        instead of 79 (on a GPU, as many launches) and took 0.35 ms instead of 0.24.
        """
        return torch.cat(
            [
                (torch.zeros_like(t) if p is None else dense(p)).reshape(-1)
                for p, t in zip(parts, self.tensors, strict=True)
            ],
            out=out,
        )

    def flatten_batched(self, parts: Sequence[torch.Tensor | None], b: int) -> torch.Tensor:
        """Like :meth:`flatten` for tensors with a leading block dimension ``b``."""
        return torch.cat(
            [
                (t.new_zeros((b, t.numel())) if p is None else dense(p).reshape(b, -1))
                for p, t in zip(parts, self.tensors, strict=True)
            ],
            dim=1,
        )

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector ``[n]`` (or a block ``[b, n]``) into per-parameter views. One of
        another length (another space's eigenvector, in ``op.space.unflatten(v)``) failed in
        torch's "split_with_sizes expects split_sizes to sum exactly to ...", a list in
        ``.shape``."""
        if not isinstance(vec, torch.Tensor) or vec.ndim == 0 or vec.shape[-1] != self.n:
            raise UserError(
                f"the parameter space splits vectors of {self.n} entries, one per parameter, "
                f"not {described(vec)}."
            )
        lead = vec.shape[:-1]
        chunks = torch.split(vec, list(self.numels), dim=-1)
        # A tuple, not *args: a 0-d parameter (a learnable temperature) has the shape ().
        return [c.reshape(tuple(lead) + tuple(s)) for c, s in zip(chunks, self.shapes, strict=True)]

    def values(self) -> torch.Tensor:
        """The current parameter values as one flat vector (a copy)."""
        return self.flatten([t.detach() for t in self.tensors])

    @torch.no_grad()
    def copy_(self, vec: torch.Tensor) -> None:
        """In-place ``w = vec`` on the model's parameters."""
        for t, d in zip(self.tensors, self.unflatten(vec), strict=True):
            t.copy_(d)


def check_real(model: nn.Module) -> None:
    """Refuse complex parameters: casting them to a real dtype drops their imaginary parts (a
    different function), and the Hessian of a real loss in complex variables is not this one."""
    for name, p in model.named_parameters():
        if p.is_complex():
            raise UserError(
                f"the parameter {name} is complex; hessian-cli analyses real parameters only."
            )


def select_parameters(
    model: nn.Module, patterns: str | Iterable[str] | Iterable[torch.Tensor] | None = None
) -> ParamSpace:
    """All trainable parameters of ``model`` whose names match any glob in ``patterns`` (one
    glob, or several, also joined by commas: ``"fc.*,layer3.*"``), or that are among the given
    parameters (``model[2].parameters()``).

    Frozen parameters (``requires_grad=False``) are never included: their curvature is not a
    direction the model can move in. A tied parameter is matched by any of its names and
    included once, under the first that matched.
    """
    if not isinstance(model, nn.Module):  # the globs first (swapped) failed in named_parameters
        raise UserError(f"the model must be a torch.nn.Module, not {a_type(model)}.")
    check_real(model)
    # One glob or parameter, not its letters or rows; anything else, refused by _selectors.
    if isinstance(patterns, (str, torch.Tensor)) or not isinstance(patterns, Iterable | None):
        patterns = [patterns]
    given = None if patterns is None else list(patterns)
    if given is not None:
        given = [part for g in given for part in _selectors(g)]
        if not given:  # an empty selection (a layer without parameters) is not "all"
            raise UserError("params selects no parameters: give name globs or parameters.")
    by_tensor = given is not None and any(isinstance(g, torch.Tensor) for g in given)
    if by_tensor:
        if not all(isinstance(g, torch.Tensor) for g in given):
            raise UserError("params takes parameters of the model or name globs, not both.")
        ids = {id(g) for g in given}
        if not ids <= {id(p) for p in model.parameters()}:
            raise UserError("params holds a tensor that is not a parameter of the model.")
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    frozen = []
    used: set[str] = set()  # the globs that matched a trainable parameter
    for name, p in model.named_parameters(remove_duplicate=False):
        matched = (
            [] if by_tensor or not given else [g for g in given if fnmatch.fnmatchcase(name, g)]
        )
        wanted = id(p) in ids if by_tensor else not given or bool(matched)
        if wanted:
            if not p.requires_grad:
                frozen.append(name)
            else:
                used.update(matched)
                if id(p) not in chosen:
                    chosen[id(p)] = (name, p)
    held = [n for n, p in model.named_parameters() if p.requires_grad]
    if not chosen:
        what = (
            "among those given"
            if by_tensor
            else f"matching {', '.join(given)}"
            if given
            else "that require gradients"
        )
        why = (
            _why_unmatched(model, given, frozen, held)
            if given and not by_tensor
            else f" ({_listed(frozen)} frozen)"
            if frozen
            else ""
        )
        raise UserError(f"the model has no trainable parameters {what}{why}.")
    # A glob beside others that matches nothing trainable (a typo, a frozen layer) selected
    # nothing, unsaid: the Hessian was of the other globs' parameters alone.
    unused = [g for g in given or () if not by_tensor and g not in used]
    if unused:
        raise UserError(
            f"the model has no trainable parameters matching {', '.join(unused)}"
            f"{_why_unmatched(model, unused, frozen, held)}; leave it out or correct it."
        )
    names, tensors = zip(*chosen.values(), strict=True)
    return ParamSpace(names=tuple(names), tensors=tuple(tensors))


def _why_unmatched(model: nn.Module, globs: list[str], frozen: list[str], held: list[str]) -> str:
    """Why ``globs`` select no trainable parameter, in parentheses: globs given as one with
    spaces between them, else the frozen parameters they match, else the buffers (a
    BatchNorm's running statistics are no parameters), else the parameters there are (a
    weight norm's are not named .weight); "" where there are none."""

    def hits(names: list[str]) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]

    if spaced := [g for g in globs if len(g.split()) > 1]:  # --params 'fc.* layer3.*'
        return (
            f" (no name holds a space: separate globs with commas, {','.join(spaced[0].split())!r})"
        )
    if frozen_hits := hits(frozen):
        return f" ({_listed(frozen_hits)} frozen)"
    if buffers := hits([n for n, _ in model.named_buffers()]):
        are = "is a buffer, not a parameter" if len(buffers) == 1 else "are buffers, not parameters"
        return f" ({_listed(buffers)} {are})"
    return f" (its parameters: {_listed(held, 4)})" if held else ""


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _selectors(item: object) -> list:
    """The globs or parameters one entry of ``params`` gives: named_parameters()'s (name,
    parameter) pairs mean the parameter, a tuple of globs its globs, and globs joined by
    commas each (``"0.*, 2.weight"`` matched nothing, and was told to join its globs with
    commas, ``'0.*,,2.weight'``); an empty glob none."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
        return [item[1]]
    if isinstance(item, (tuple, list)) and all(isinstance(g, str) for g in item):
        return [g for glob in item for g in _selectors(glob)]
    if isinstance(item, str):
        return [g.strip() for g in item.split(",") if g.strip()]
    if not isinstance(item, torch.Tensor):  # [1] failed in len(), 5 in iter(): TypeErrors
        raise UserError(f"params takes name globs or parameters of the model, not {a_type(item)}.")
    return [item]


def dense(part: torch.Tensor) -> torch.Tensor:
    """A derivative as a dense tensor: nn.Embedding(sparse=True)'s are sparse."""
    return part.to_dense() if part.is_sparse else part
