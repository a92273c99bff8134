"""Geometric loss strategy (GLS): the objective is the geometric mean ``(prod_t L_t) ** (1/T)``.

Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
Multi-Task Learning", CVPR Workshops 2019. The mean is taken over the tasks present in the batch.
It is written as terms ``c_t L_t`` with ``c_t = detach(obj / (T L_t))`` (see
:func:`geometric_terms`): the terms sum to the objective and each carries its exact share of the
gradient, so GLS combines with any aggregator. Losses are floored at a small epsilon so a zero loss
cannot zero the product.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from amtl.balancers.base import StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import geometric_terms


@register_weighting
class GeometricLossStrategy(Weighting):
    name = "gls"

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._multipliers: dict[str, Tensor] | None = None

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        terms, coef = geometric_terms(step.losses, {t: 1.0 for t in step.losses})
        self._multipliers = dict(zip(terms, coef))
        return terms

    @property
    def weights(self) -> dict[str, float]:
        """Gradient multipliers ``obj / (T L_t)`` of the last step (0 for tasks absent from it);
        ``1/T`` before the first step (the multiplier when all losses are equal)."""
        if self._multipliers is None:
            return {t: 1.0 / len(self.tasks) for t in self.tasks}
        return {t: float(self._multipliers[t]) if t in self._multipliers else 0.0 for t in self.tasks}
