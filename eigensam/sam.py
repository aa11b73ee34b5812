"""SAM (and ASAM): a drop-in ``torch.optim.Optimizer`` in the style of davda54/sam.

One step: gradient ``g`` at ``w``; move to ``w + e`` with ``e = rho * g / ||g||`` (the norm is
global over all parameter groups; with ``adaptive=True``, ASAM's ``e = rho * |w|^2 g / |||w| g||``);
gradient at ``w + e``; restore ``w`` exactly; base optimizer step with that second gradient.

Differences from davda54/sam, on purpose: the base optimizer's state (momentum buffers, Adam
moments) is part of ``state_dict()``; a zero gradient gives no perturbation instead of relying on
an epsilon; ``step(closure)`` evaluates the closure twice itself (no backward before it: one
there would be a third, wasted pass); a step interrupted at ``w + e`` goes back to ``w``; sparse
gradients work. The perturbation is formed in one flat vector (the layout Eigen-SAM's
eigenvector shares), so a first step holds about one model more than davda54's per-parameter
one besides the weights' copy (benchmarks/sam_memory.py); a model split over devices is
gathered on its first parameter's device. BatchNorm layers should not update their running
statistics on the second pass: ``step(closure)`` cannot tell the closure which pass it is, so
with BatchNorm use ``first_step``/``second_step`` and :mod:`eigensam.bn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from hessian_cli.engine.linalg import norms
from hessian_cli.errors import UserError, is_number, shown

BaseOptimizer = Callable[..., Optimizer]


class SettingError(UserError, ValueError):
    """A ``rho``, ``alpha`` or ``adaptive`` no step can use: one sentence, as the engine's
    refusals are, and a ValueError, as torch's optimizers refuse their hyper-parameters."""


def check_factor(name: str, value: float) -> None:
    """Refuse a ``rho`` or ``alpha`` that is negative, NaN (which passes a ``< 0`` test),
    infinite (which moves the weights to infinity) or not a number: a string ("0.05" from a
    config file) failed in the comparison, a bare TypeError naming neither."""
    if not is_number(value) or not 0.0 <= value < math.inf:
        raise SettingError(f"`{name}` must be a finite non-negative number, not {shown(value)}.")


def check_adaptive(value: object) -> None:
    """Refuse an ``adaptive`` that is no bool: "no" (any object but a false one) took ASAM's
    rescaled steps, another optimizer, unsaid."""
    if not isinstance(value, bool):
        raise SettingError(f"`adaptive` must be True (ASAM) or False (SAM), not {value!r}.")


def check_base(base_optimizer: object) -> None:
    """Refuse a base optimizer built already (as some SAM implementations take it): its own
    parameters and settings would be ignored, and "'SGD' object is not callable" said why not."""
    if isinstance(base_optimizer, Optimizer):
        name = type(base_optimizer).__name__
        raise TypeError(
            f"base_optimizer must be an optimizer class, such as torch.optim.{name}, which SAM "
            f"builds on its parameters with its keyword arguments (lr=..., momentum=...), not "
            f"an instance of {name}."
        )


class SAM(Optimizer):
    """Sharpness-Aware Minimization around ``base_optimizer`` (a class such as ``torch.optim.SGD``,
    built here on the same ``param_groups`` with ``**kwargs``).

    The parameter groups are shared with the base optimizer, so learning-rate schedulers acting
    on this optimizer reach it. ``rho`` and ``adaptive`` are per-group hyper-parameters.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        check_factor("rho", rho)
        check_adaptive(adaptive)
        check_base(base_optimizer)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _params(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Every parameter with its group, in param-group order (the flat-vector layout)."""
        for group in self.param_groups:  # a group added through the base optimizer lacks these
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def _is_perturbed(self) -> bool:
        return any("old_p" in self.state.get(p, {}) for p, _ in self._params())

    def flat_grad(self, scaled: bool = True) -> torch.Tensor:
        """The gradient as one vector in the optimizer's parameter order, the layout of its
        perturbations and eigenvectors (zero where ``grad`` is None), scaled by ``|w|`` for ASAM
        unless ``scaled`` is False."""
        pairs = self._params()
        device = pairs[0][0].device  # a model split over devices: the vector lives on the first
        parts = []
        for p, group in pairs:
            g = torch.zeros_like(p) if p.grad is None else p.grad
            if g.is_sparse:  # e.g. nn.Embedding(sparse=True); the base step keeps it sparse
                g = g.to_dense()
            parts.append((p.abs() * g if scaled and group["adaptive"] else g).reshape(-1))
        return torch.cat([part.to(device) for part in parts])

    def _direction(self, g: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        """The unit-``rho`` perturbation direction for the (scaled) gradient ``g`` of norm
        ``g_norm`` (1 for a zero gradient), formed in ``g``: a copy made for this step."""
        return g.div_(g_norm)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` (parameters without a gradient stay put: they do not affect the
        loss of this step; nor do frozen ones, which a zeroed gradient may outlive); the old
        weights are kept in the state until :meth:`second_step`."""
        if self._is_perturbed():
            raise RuntimeError("first_step called twice without second_step in between")
        if all(p.grad is None for p, _ in self._params()):
            raise RuntimeError("first_step found no gradients: run backward before it")
        for group in self.param_groups:
            check_factor("rho", group["rho"])
            check_adaptive(group["adaptive"])
        g = self.flat_grad()
        g_norm = norms(g)
        # A zero gradient has no direction: divided by 1 it stays zero (no perturbation, no 0/0);
        # one that is not finite (NaN or inf) perturbs nothing either. d is formed in g: the
        # step's peak is one vector and the weights' copy below.
        moves = (g_norm > 0) & torch.isfinite(g_norm)
        d = self._direction(g, torch.where(moves, g_norm, torch.ones_like(g_norm)))
        d.masked_fill_(~moves, 0.0)
        pairs = self._params()
        for (p, group), d_p in zip(pairs, d.split([p.numel() for p, _ in pairs]), strict=True):
            if p.grad is None or not p.requires_grad:
                continue
            e = group["rho"] * d_p.view_as(p).to(p.device)
            if group["adaptive"]:
                e = e * p.abs()
            self.state[p]["old_p"] = p.detach().clone()
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Go back to ``w`` after :meth:`first_step` without a base step: for a pass at ``w + e``
        that failed (out of memory, say), so that the weights saved or used next are ``w``."""
        for p, _ in self._params():
            old = self.state.get(p, {}).pop("old_p", None)
            if old is not None:
                p.copy_(old)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` bit for bit and take the base optimizer's step with the current grads."""
        if not self._is_perturbed():
            raise RuntimeError("second_step called without first_step before it")
        self.restore()
        self.base_optimizer.step()
        # What a learning-rate scheduler wrapping step() looks for: this was the step.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    # An enabled torch.amp.GradScaler's step() then leaves the gradients scaled and calls step()
    # with its scale and overflow flag set on the optimizer (``grad_scale``, ``found_inf``).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """A whole SAM step; ``closure`` zeroes the grads, computes the loss, calls backward and
        returns the loss, and is called at ``w`` then at ``w + e``. Returns the loss at ``w``.

        If the second call raises, the weights are back at ``w`` (no step taken) before the
        exception goes on. A model with BatchNorm: see the module docstring.

        With a ``torch.amp.GradScaler``: ``first_step`` after the first scaled backward (its
        direction does not depend on the scale), then ``scaler.step(opt)`` after the second, which
        takes the second step with the unscaled gradients, or goes back to ``w`` without one where
        they overflowed; ``scaler.step(opt, closure)`` is refused. A disabled scaler (``enabled=
        False``) calls ``step()`` itself: after ``first_step``, that is :meth:`second_step`.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # called by GradScaler.step
            return self._scaled_second_step(closure, found_inf)
        if closure is None and self._is_perturbed():  # a disabled GradScaler's step(opt)
            self.second_step()
            return None
        if closure is None:
            raise ValueError("SAM needs a closure: it evaluates the gradient twice per step")
        closure = torch.enable_grad()(closure)
        loss = closure()
        if all(p.grad is None for p, _ in self._params()):  # first_step's words name no closure
            raise RuntimeError(
                "the closure left no gradients: it must call backward on the loss (and return it)"
            )
        self.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    def _scaled_second_step(
        self, closure: Callable[[], torch.Tensor] | None, found_inf: torch.Tensor
    ) -> None:
        if closure is not None or not self._is_perturbed():
            del self.grad_scale, self.found_inf  # GradScaler removes them only after a return
            raise RuntimeError(
                "with a GradScaler, call first_step after the first scaled backward and "
                "scaler.step(optimizer) after the second, without a closure (whose gradients "
                "would reach the base step still scaled)"
            )
        if found_inf.item():  # GradScaler skips this step and lowers its scale
            self.restore()
            return
        scale = getattr(self, "grad_scale", None)  # None where scaler.unscale_ has run
        if scale is not None:
            inv = scale.double().reciprocal().float()  # as GradScaler.unscale_ does
            for p, _ in self._params():
                if p.grad is not None:
                    p.grad.mul_(inv.to(p.grad.device))
        self.second_step()

    def state_dict(self) -> dict[str, Any]:
        """Own state and param groups, plus the base optimizer's state under ``base_state``."""
        state = super().state_dict()
        state["base_state"] = self.base_optimizer.state_dict()["state"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_state" not in state_dict:
            raise ValueError("not a SAM state dict: it has no base optimizer state")
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(
            {"state": state_dict["base_state"], "param_groups": state_dict["param_groups"]}
        )
        # Loading replaces the group dicts: share them again so schedulers reach the base.
        self.base_optimizer.param_groups = self.param_groups
