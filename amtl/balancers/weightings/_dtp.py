"""Dynamic task prioritization (DTP): a task-level focal loss on validation KPIs.

Guo et al., "Dynamic Task Prioritization for Multitask Learning", ECCV 2018.
``w_t = -(1 - kappa_t) ** focusing * log(kappa_t)`` where ``kappa_t`` in [0, 1] is an EMA
(momentum 0.1, the first value seeds it) of task t's validation KPI (higher is better), fed through
:meth:`on_validation`. Hard tasks (low KPI) get large weights. Weights are 1 before the first
validation and are not normalised (as in the paper). KPIs are clamped to ``[1e-6, 1]``: KPIs must be
fractions for the focal form to mean anything, and ``log 0`` would be infinite. The default focusing
of 1 follows the AMTL reference implementation of DTP (the paper tunes it per task).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from amtl.balancers.base import HParam, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import KpiEma

KPI_FLOOR = 1e-6


def dtp_weight(kappa: float, focusing: float) -> float:
    k = min(max(kappa, KPI_FLOOR), 1.0)
    return -((1.0 - k) ** focusing) * math.log(k)


@register_weighting
class DynamicTaskPrioritization(KpiEma, Weighting):
    name = "dtp"
    needs_kpis = True
    hparams = (HParam("focusing", "float", 1.0, low=0.0, high=10.0,
                      doc="focal exponent gamma; 0 gives the plain -log(kappa) weight"),)

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._init_kappa()

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        w = self.weights
        return {t: w[t] * loss for t, loss in step.losses.items()}

    @property
    def weights(self) -> dict[str, float]:
        return {t: 1.0 if k is None else dtp_weight(k, self.focusing) for t, k in self._kappa.items()}
