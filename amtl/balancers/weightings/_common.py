"""Helpers shared by the weightings: the geometric mean as a sum of terms, KPI EMAs, device moves."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: Floor for losses inside a geometric mean. A zero loss would zero the whole product, and
#: ``L**w`` has an infinite derivative at 0 for ``w < 1`` (the known bug of weighted geometric
#: losses), so geometric objectives use ``max(L, GEOMETRIC_EPS)``.
GEOMETRIC_EPS = 1e-8

#: EMA momentum of validation KPIs (AMTL and DTP reference code): ``kappa <- m * new + (1 - m) * kappa``.
KPI_MOMENTUM = 0.1


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision losses (autocast) would make the product/log unstable: use at least float32.
    return torch.promote_types(x.dtype, torch.float32)


def geometric_terms(losses: Mapping[str, Tensor], exponents: Mapping[str, float],
                    eps: float = GEOMETRIC_EPS) -> tuple[dict[str, Tensor], Tensor]:
    """Terms ``c_t * L_t`` whose sum is the weighted geometric mean ``prod_t L_t ** w_t``.

    ``w`` are ``exponents`` of the tasks present, renormalised to sum to 1 over them (so the mean
    of the present tasks stays a mean). ``c_t = detach(obj * w_t / L_t)``: then ``sum_t c_t L_t``
    equals ``obj`` and ``c_t grad L_t`` is exactly task t's share of ``grad obj``.
    Returns the terms and the multipliers ``c`` (detached, in the order of ``losses``).
    """
    tasks = list(losses)
    stacked = torch.stack([losses[t].reshape(()) for t in tasks])
    stacked = stacked.to(_compute_dtype(stacked))
    w = torch.tensor([float(exponents[t]) for t in tasks], dtype=stacked.dtype, device=stacked.device)
    w = w / w.sum()
    clamped = stacked.clamp_min(eps)  # zero-loss guard, see GEOMETRIC_EPS
    base = clamped.detach()
    objective = torch.exp((w * base.log()).sum())  # log-space: no under/overflow of the product
    coef = objective * w / base
    terms = {t: coef[i] * clamped[i] for i, t in enumerate(tasks)}
    return terms, coef


def exact_share_terms(losses: Mapping[str, Tensor],
                      objective: Callable[[Tensor], Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Terms ``c_t * L_t + k_t`` whose sum is ``objective(L)`` (of the stacked losses, in the order of
    ``losses``) and whose gradients are each task's exact share ``d obj / d L_t * grad L_t``.

    ``c_t = d obj / d L_t`` and the constants ``k_t`` are detached, so any differentiable objective
    of the task losses combines with any aggregator. Returns the terms and the multipliers ``c``.
    """
    tasks = list(losses)
    stacked = torch.stack([losses[t].reshape(()) for t in tasks])
    stacked = stacked.to(_compute_dtype(stacked))
    base = stacked.detach().requires_grad_(True)
    with torch.enable_grad():
        value = objective(base)
        (coef,) = torch.autograd.grad(value, base)
    offset = (value.detach() - (coef * base.detach()).sum()) / len(tasks)
    return {t: coef[i] * stacked[i] + offset for i, t in enumerate(tasks)}, coef


def ema_update(old: float | None, new: float, momentum: float = KPI_MOMENTUM) -> float:
    """``momentum * new + (1 - momentum) * old``; the first value seeds the average."""
    return new if old is None else momentum * new + (1.0 - momentum) * old


def finite_kpis(kpis: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """The finite KPIs of known tasks (others are ignored: a task may not be validated every time)."""
    out = {}
    for t in tasks:
        if t in kpis and kpis[t] is not None and math.isfinite(float(kpis[t])):
            out[t] = float(kpis[t])
    return out


class KpiEma:
    """Mixin: per-task EMA ``kappa`` of validation KPIs, with its save/load (AMTL and DTP).

    Subclasses call ``_init_kappa()`` after ``Weighting.__init__`` and may override
    ``_kappa_changed`` to recompute what depends on ``kappa``.
    """

    tasks: list[str]

    def _init_kappa(self) -> None:
        self._kappa: dict[str, float | None] = {t: None for t in self.tasks}

    def _kappa_changed(self) -> None:
        """Hook after ``kappa`` changed (validation or loading a checkpoint)."""

    @property
    def kappa(self) -> dict[str, float | None]:
        return dict(self._kappa)

    def on_validation(self, kpis: Mapping[str, float]) -> None:
        for t, v in finite_kpis(kpis, self.tasks).items():
            self._kappa[t] = ema_update(self._kappa[t], v)
        self._kappa_changed()

    def state_dict(self) -> dict[str, Any]:
        return {"kappa": dict(self._kappa)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._kappa = {t: state["kappa"].get(t) for t in self.tasks}
        self._kappa_changed()


def follow_device(param: Tensor, device: torch.device) -> None:
    """Move a weighting's own parameter to the losses' device in place.

    Weightings are built on CPU before the trainer picks a device; swapping ``.data`` keeps the
    Parameter object, so an optimizer that already holds it keeps working.
    """
    if param.device != device:
        param.data = param.data.to(device)
        if param.grad is not None:
            param.grad = param.grad.to(device)


def move_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move an optimizer's per-parameter state tensors (Adam moments) to ``device``."""
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, Tensor) and v.device != device and v.ndim > 0:
                state[k] = v.to(device)


def as_cpu(x: Tensor) -> Tensor:
    return x.detach().to("cpu").clone()


def load_into(param: Tensor | nn.Parameter, value: Tensor) -> None:
    """Copy a saved tensor into an existing parameter, on the parameter's device."""
    with torch.no_grad():
        param.copy_(value.to(param.device, param.dtype))


class LearnedScalars:
    """One learnable scalar per task (UW log-variances, IMTL-L scales), trained by the trainer's
    optimizer through :meth:`Weighting.parameters`; mixed into a :class:`Weighting`."""

    tasks: list[str]
    name: str

    def _init_scalars(self, init: float = 0.0) -> None:
        self.scalars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def _scalar(self, task: str, like: Tensor) -> Tensor:
        follow_device(self.scalars, like.device)
        return self.scalars[self.tasks.index(task)]

    def parameters(self) -> list[Tensor]:
        return [self.scalars]

    def state_dict(self) -> dict[str, Any]:
        return {"scalars": as_cpu(self.scalars)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_into(self.scalars, state["scalars"])
