"""Eigen-SAM (Luo et al., NeurIPS 2024): SAM whose perturbation leans towards the top Hessian
eigenvector, which explicitly penalises the top eigenvalue.

Perturbation, as the paper's method defines it: ``e = rho * d`` with

    d = g_hat + alpha * sign(<g, v>) * (v - <g_hat, v> g_hat),    g_hat = g / ||g||,

``v`` the unit top eigenvector of the minibatch Hessian. ``d`` is *not* renormalised (its norm is
``sqrt(1 + alpha^2 (1 - <g_hat, v>^2))``). Before an eigenvector is known, ``d = g_hat``. The
direction comes from the engine's :func:`eigensam_direction`, and ``alpha = 0`` takes the same
floating-point path as SAM (``g_hat + 0 * (...)`` is ``g_hat`` exactly), so it reproduces SAM bit
for bit. With ``adaptive=True`` the formula is applied in ASAM's rescaled coordinates
(``g -> |w| g``, ``e = rho |w| d``) with ``v`` the eigenvector of the unscaled Hessian.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import nn

from eigensam.refresh import (
    DEFAULT_TOL,
    RefreshResult,
    refresh_top_eigenvector,
)
from eigensam.sam import SAM, BaseOptimizer, check_factor
from hessian_cli.engine.alignment import eigensam_direction
from hessian_cli.engine.batches import Batch, LossFn
from hessian_cli.engine.linalg import norms
from hessian_cli.errors import UserError


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch (whose no_grad
    decorators wrap the steps): the user's line, through ``step`` or ``first_step`` alike."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


_INSIDE = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def _takes_alpha(base_optimizer: BaseOptimizer) -> bool:
    """Whether the base optimizer has a hyper-parameter of its own named ``alpha``."""
    try:
        return "alpha" in inspect.signature(base_optimizer).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


class EigenSAM(SAM):
    """SAM with the Eigen-SAM perturbation ``e = rho * d`` (module docstring).

    ``v`` lives in the optimizer state, one slice per parameter under ``"eigenvector"``, so it is
    saved, loaded and moved to the parameters' device with ``state_dict()``. The eigenvalue of
    the last refresh and the count of refreshes that found no positive curvature
    (``negative_refreshes``) are saved too: such a vector is kept but must not go unnoticed.

    The optimizer does not find ``v`` by itself: call :meth:`refresh_eigenvector` every few
    steps (``hessian-cli train`` does at every ``--eig-every``-th step, step 0 included). Until
    the first refresh it perturbs as SAM does, and says so once.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        alpha: float = 0.2,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        check_factor("alpha", alpha)
        # A group's alpha is the base optimizer's own where it takes one (RMSprop's smoothing
        # constant, ASGD's power), which it honours; elsewhere it would be ignored.
        self._base_alpha = _takes_alpha(base_optimizer)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.alpha = alpha
        self.last_eigenvalue: float | None = None
        self.refreshes = 0
        self.negative_refreshes = 0
        # v as one flat vector for every step, whose slices the state holds (one copy of v in
        # memory): valid while the state still holds exactly those slices.
        self._flat_v: torch.Tensor | None = None
        self._slices: list[torch.Tensor | None] = []
        self._warned = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # It would be ignored: d is one vector over all groups.
        if "alpha" in param_group and not self._base_alpha:
            raise ValueError(
                "alpha is one for all parameter groups (unlike rho): give it to EigenSAM itself"
            )
        super().add_param_group(param_group)

    @property
    def eigenvector(self) -> torch.Tensor | None:
        """The current ``v``, flat over all parameters in param-group order (None before any)."""
        params = [p for p, _ in self._params()]
        parts = [self.state.get(p, {}).get("eigenvector") for p in params]
        for p, part in zip(params, parts, strict=True):
            if part is not None and part.shape != p.shape:  # a parameter replaced by the user
                raise ValueError(
                    f"the eigenvector held for a parameter of shape {tuple(part.shape)} does not "
                    f"fit its shape {tuple(p.shape)} now: give one that fits to set_eigenvector"
                )
        # Stale once parameters were added, or the state was loaded, cleared or changed.
        held = self._flat_v is not None and len(self._slices) == len(params)
        if held and all(h is s for h, s in zip(parts, self._slices, strict=True)):
            return self._flat_v
        if all(part is None for part in parts):
            self._flat_v, self._slices = None, []
            return None
        device = params[0].device
        flat = torch.cat(
            [
                (torch.zeros_like(p) if part is None else part).reshape(-1).to(device)
                for p, part in zip(params, parts, strict=True)
            ]
        )
        self._hold(flat, params, [part is not None for part in parts])
        return flat

    def _hold(self, flat: torch.Tensor, params: list[torch.Tensor], kept: list[bool]) -> None:
        """Make ``flat`` the current ``v`` and the state's ``"eigenvector"`` entries (where
        ``kept``) its slices, or copies where a parameter's device or dtype differs."""
        self._flat_v, self._slices = flat, []
        for p, part, keep in zip(
            params, flat.split([p.numel() for p in params]), kept, strict=True
        ):
            if not keep:
                self._slices.append(None)
                continue
            part = part.view(p.shape)
            if (part.device, part.dtype) != (p.device, p.dtype):
                part = part.to(p)
            self.state[p]["eigenvector"] = part
            self._slices.append(part)

    def set_eigenvector(self, v: torch.Tensor, eigenvalue: float) -> None:
        """Adopt ``v`` (normalised here) as the top eigenvector, with its eigenvalue."""
        params = [p for p, _ in self._params()]
        v = v.detach().reshape(-1)
        if v.numel() != sum(p.numel() for p in params):
            raise ValueError(
                f"eigenvector has {v.numel()} entries, the optimizer has "
                f"{sum(p.numel() for p in params)} parameters"
            )
        norm = norms(v)
        if not bool(torch.isfinite(norm)) or norm == 0:
            raise ValueError("eigenvector must be finite and non-zero")
        # Looked at before anything is held: a string ("1.0") failed in the sign test after v
        # was adopted and the refresh counted, a TypeError that left them so.
        scalar = isinstance(eigenvalue, torch.Tensor) and eigenvalue.numel() == 1
        if not scalar and (isinstance(eigenvalue, bool) or not isinstance(eigenvalue, Real)):
            raise UserError(f"`eigenvalue` must be a number, not {eigenvalue!r}.")
        value = float(eigenvalue)
        dtypes = {p.dtype for p in params}
        dtype = params[0].dtype if len(dtypes) == 1 else v.dtype
        flat = (v / norm).to(device=params[0].device, dtype=dtype)
        self._hold(flat, params, [True] * len(params))
        self.last_eigenvalue = value
        self.refreshes += 1
        if value <= 0:
            self.negative_refreshes += 1

    def refresh_eigenvector(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        *,
        max_hvps: int | None = None,
        tol: float = DEFAULT_TOL,
        seed: int | None = None,
        batch_weight: Callable[[torch.Tensor], float] | None = None,
    ) -> RefreshResult:
        """Refresh ``v`` on ``batch`` by the engine, warm-started from the current ``v``; before
        there is one, the parameters' ``.grad`` (the minibatch gradient, where a backward pass
        has run) guides the random start, since the gradient leans toward v_1. ``max_hvps``
        defaults to a few products warm, more for that first, cold refresh (see
        :mod:`eigensam.refresh`).

        Call it at ``w`` (not between :meth:`first_step` and :meth:`second_step`); it leaves the
        parameters' ``.grad`` alone, so it may sit between the first backward and
        :meth:`first_step`. The result is adopted even when not converged: it is the best Ritz
        vector of a space that contains the previous ``v``. ``seed`` defaults to the refresh count
        (used only when there is no vector to warm-start from), so resumed runs repeat it.
        ``batch_weight``: what weighs the ranks' shares of ``batch`` under torchrun (see
        :class:`HessianOperator`; default their samples).
        """
        if self._is_perturbed():
            raise RuntimeError("refresh the eigenvector at w, not at the perturbed weights")
        result = refresh_top_eigenvector(
            model,
            loss_fn,
            batch,
            [p for p, _ in self._params()],
            self.eigenvector,
            max_hvps=max_hvps,
            tol=tol,
            seed=self.refreshes if seed is None else seed,
            hint=self.flat_grad(scaled=False),
            batch_weight=batch_weight,
        )
        self.set_eigenvector(result.vector, result.eigenvalue)
        return result

    def _direction(self, g: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        v = self.eigenvector
        if v is None and self.alpha > 0 and not self._warned:
            self._warned = True
            warnings.warn(
                "EigenSAM has no eigenvector yet, so it perturbs as SAM does: call "
                "refresh_eigenvector(model, loss_fn, batch) every few steps.",
                stacklevel=_caller_level(),
            )
        if v is None:
            return super()._direction(g, g_norm)
        return eigensam_direction(g, v, self.alpha, g_norm=g_norm, overwrite=True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eigensam"] = {
            "alpha": self.alpha,
            "last_eigenvalue": self.last_eigenvalue,
            "refreshes": self.refreshes,
            "negative_refreshes": self.negative_refreshes,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "eigensam" not in state_dict:
            raise ValueError("not an EigenSAM state dict: it has no eigenvector bookkeeping")
        super().load_state_dict(state_dict)
        info = state_dict["eigensam"]
        # Like rho in the param groups, the saved alpha is the run's (absent before 2026-11-30).
        self.alpha = info.get("alpha", self.alpha)
        check_factor("alpha", self.alpha)
        self.last_eigenvalue = info["last_eigenvalue"]
        self.refreshes = info["refreshes"]
        self.negative_refreshes = info["negative_refreshes"]
