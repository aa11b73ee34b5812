"""A model's inputs: one tensor, ``model(x)``; several, ``model(*x)`` (a tuple or list); or named
ones, ``model(**x)`` (a dict or other mapping, as tokenizers give ``input_ids`` and
``attention_mask``).

Everything that moves, casts, slices or feeds a batch's inputs goes through here, so that a
transformer with an attention mask is analysed and trained like an image classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hessian_cli.errors import UserError, first_line

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def is_inputs(x: object) -> bool:
    """Whether ``x`` is one of the three forms (not nested: a model's arguments are tensors)."""
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return bool(x) and all(isinstance(t, torch.Tensor) for t in x)
    if isinstance(x, Mapping):
        return bool(x) and all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in x.items()
        )
    return False


def input_tensors(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x``, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x.values()) if isinstance(x, Mapping) else list(x)


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], x: Inputs) -> Inputs:
    """``x`` with ``fn`` applied to each of its tensors, in the same form (a list becomes a
    tuple, a mapping a dict)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(t) for k, t in x.items()}
    return tuple(fn(t) for t in x)


def inputs_to(x: Inputs, device: torch.device | str) -> Inputs:
    """``x`` on ``device``."""
    return map_inputs(lambda t: t.to(device), x)


def rows(x: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The samples ``index`` picks from each of ``x``'s tensors (dimension 0 is the sample's)."""
    return map_inputs(lambda t: t[index], x)


def run_model(model: nn.Module, x: Inputs, params: dict[str, torch.Tensor] | None = None) -> Any:
    """The model's outputs on ``x`` (with ``params`` in place of those parameters' values, by
    ``functional_call``)."""
    if isinstance(x, Mapping):
        args: tuple[torch.Tensor, ...] = ()
        kwargs = dict(x)
    else:
        args, kwargs = (x,) if isinstance(x, torch.Tensor) else tuple(x), {}
    try:
        if params is None:
            return model(*args, **kwargs)
        return functional_call(model, _by_place(model, params), args, kwargs, tie_weights=False)
    except (RuntimeError, ValueError) as exc:
        if (which := _integers_refused(model, x, exc)) is not None:
            raise UserError(
                f"the model failed on its {which} ({first_line(exc)}): give them as real "
                "numbers, x.float(), unless they are indices (token ids) its forward looks up."
            ) from exc
        raise


def _integers_refused(model: nn.Module, x: Inputs, exc: BaseException) -> str | None:
    """The integer inputs of ``x`` by their dtypes, and by their names where there are several
    (``"int64 inputs a and b"``), where they are what the model's forward refused (torch's
    "mat1 and mat2 must have the same dtype, but got Long and Double", said of no input), else
    None: a model with an embedding table takes integers as token ids, so its failure is
    another."""
    named = (
        {"": x}
        if isinstance(x, torch.Tensor)
        else dict(x)
        if isinstance(x, Mapping)
        else {str(i): t for i, t in enumerate(x)}  # positions: "inputs 0 and 1"
    )
    integers = {
        name: str(t.dtype).removeprefix("torch.")
        for name, t in named.items()
        if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    }
    text = str(exc)
    of_dtype = "type" in text or "implemented for" in text  # "not implemented for 'Long'"
    tables = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
    if not integers or not of_dtype or tables or isinstance(exc, torch.OutOfMemoryError):
        return None
    kinds = " and ".join(sorted(set(integers.values())))
    if isinstance(x, torch.Tensor):  # its only input, unnamed
        return f"{kinds} inputs"
    *others, last = integers
    names = f"{', '.join(others)} and {last}" if others else last
    return f"{kinds} input{'s' if others else ''} {names}"


def _by_place(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``values`` (by the names of the tensors they replace) under one name per place, a
    module's attribute, that holds one of those tensors.

    A tensor held in two places (weights tied: ``head.weight = embed.weight``) takes the value
    in both; a module held under two names (BART's embedding shared as ``shared`` and
    ``encoder.embed_tokens``) is one place, named once. torch's own tying (``tie_weights=True``)
    set such a place twice and put it back wrong: the model was left holding a plain tensor
    instead of its parameter (torch 2.13), and the next product refused it as replaced.
    """
    everything = (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    )
    held = dict(everything)
    replaced = {id(held[name]): value for name, value in values.items() if name in held}
    out = {name: value for name, value in values.items() if name not in held}  # as torch takes them
    modules = dict(model.named_modules(remove_duplicate=False))
    places: set[tuple[int, str]] = set()
    for name, tensor in everything:
        if id(tensor) not in replaced:
            continue
        owner, _, attribute = name.rpartition(".")
        place = (id(modules[owner]), attribute)
        if place not in places:
            places.add(place)
            out[name] = replaced[id(tensor)]
    return out


def describe_samples(x: Inputs) -> str:
    """The shape of one sample of ``x`` (a batch) for messages: ``shape (1, 8, 8)``, or
    ``input_ids of shape (16,) and attention_mask of shape (16,)``."""
    shapes = [f"shape {tuple(t.shape[1:])}" for t in input_tensors(x)]
    if isinstance(x, torch.Tensor):
        return shapes[0]
    names = list(x) if isinstance(x, Mapping) else [f"input {i}" for i in range(len(shapes))]
    parts = [f"{name} of {shape}" for name, shape in zip(names, shapes, strict=True)]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
