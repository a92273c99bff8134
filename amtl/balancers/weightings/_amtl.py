"""Achievement-based multi-task loss (AMTL, geometric) and its arithmetic variant (``amtl-a``).

Yun & Cho, "Achievement-based Training Progress Balancing for Multi-Task Learning", ICCV 2023.
A task's *achievement* is its validation KPI relative to its single-task *potential*. With
``kappa_t`` the EMA of the KPI (momentum 0.1, the first value seeds it) and
``p_t = potential_t * (1 + margin)``, the raw priority is ``(1 - kappa_t / p_t) ** focusing`` and the
weights are ``w = softmax(raw)`` over the tasks; before the first validation every task counts as
unachieved (raw 1), i.e. ``w = 1/T``. ``amtl`` minimises the weighted geometric mean
``prod_t L_t ** w_t`` (written as detached-coefficient terms, exact gradient), ``amtl-a`` the
weighted sum ``sum_t w_t L_t``.

Deviations from the reference code, both guards: ``kappa / p`` is clamped to [0, 1], so a task
beyond its (margined) potential gets raw priority 0 instead of a meaningless power of a negative
number, and a negative KPI counts as no achievement; in the geometric objective losses are floored
at a small epsilon, because one zero loss would zero the product and ``L ** w`` has an undefined
(infinite) gradient at 0 for ``w < 1``. When some tasks are absent from a batch the geometric
exponents are renormalised over the present ones; the arithmetic sum just leaves absent tasks out.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import HParam, HParamError, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import KpiEma, geometric_terms


def amtl_weights(kappa: Sequence[float | None], potentials: Sequence[float], focusing: float,
                 margin: float) -> list[float]:
    """``softmax_t((1 - clamp(kappa_t / (p_t (1 + margin)), 0, 1)) ** focusing)``; no KPI yet = 0."""
    raw = []
    for k, p in zip(kappa, potentials):
        achieved = 0.0 if k is None else min(max(k / (p * (1.0 + margin)), 0.0), 1.0)
        raw.append((1.0 - achieved) ** focusing)
    return torch.softmax(torch.tensor(raw, dtype=torch.float64), dim=0).tolist()


@register_weighting
class AchievementBasedMTL(KpiEma, Weighting):
    name = "amtl"
    geometric = True
    needs_kpis = True
    context = ("potentials",)  # {task: single-task KPI > 0}, in the units of the validation KPIs
    hparams = (
        HParam("focusing", "float", 2.0, low=0.01, high=10.0, log=True,
               doc="focal exponent on the unachieved fraction 1 - kappa/p"),
        HParam("margin", "float", 0.05, low=0.0, high=1.0,
               doc="potentials are raised by this fraction, so tasks keep a little priority at their potential"),
    )

    def __init__(self, tasks: Sequence[str], potentials: Mapping[str, float] | None = None, **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        given = potentials or {}
        missing = [t for t in self.tasks if t not in given]
        bad = [t for t in self.tasks if t in given and not (math.isfinite(given[t]) and given[t] > 0)]
        if missing or bad:
            parts = []
            if missing:
                parts.append(f"missing for {', '.join(missing)}")
            if bad:
                parts.append(f"not a positive number for {', '.join(f'{t}={given[t]!r}' for t in bad)}")
            raise HParamError(f"'{self.name}' needs the single-task potentials {{task: KPI > 0}} of every task "
                              f"(run context: a sweep's potentials phase, or amtl.train --potentials); "
                              f"{'; '.join(parts)}")
        # Potentials of tasks not trained in this run are ignored (one potentials file per dataset).
        self.potentials = {t: float(given[t]) for t in self.tasks}
        self._init_kappa()
        self._exponents = self._compute()
        self._multipliers: dict[str, Tensor] | None = None

    def _compute(self) -> dict[str, float]:
        w = amtl_weights([self._kappa[t] for t in self.tasks], [self.potentials[t] for t in self.tasks],
                         self.focusing, self.margin)
        return dict(zip(self.tasks, w))

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        if not self.geometric:
            return {t: self._exponents[t] * loss for t, loss in step.losses.items()}
        terms, coef = geometric_terms(step.losses, self._exponents)
        self._multipliers = dict(zip(terms, coef))
        return terms

    @property
    def exponents(self) -> dict[str, float]:
        """The achievement weights ``w`` (softmax, sum 1): exponents of the geometric mean."""
        return dict(self._exponents)

    @property
    def weights(self) -> dict[str, float]:
        """``amtl-a``: ``w``. ``amtl``: the gradient multipliers ``obj * w_t / L_t`` of the last step
        (0 for tasks absent from it; ``w`` before the first step, the value for equal losses)."""
        if not self.geometric or self._multipliers is None:
            return dict(self._exponents)
        return {t: float(self._multipliers[t]) if t in self._multipliers else 0.0 for t in self.tasks}

    def _kappa_changed(self) -> None:
        self._exponents = self._compute()


@register_weighting
class AchievementBasedMTLArithmetic(AchievementBasedMTL):
    """AMTL with the weighted arithmetic mean ``sum_t w_t L_t`` (the paper's AMTL-A)."""

    name = "amtl-a"
    geometric = False

