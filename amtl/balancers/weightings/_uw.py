"""Uncertainty weighting (UW): task weights from learned homoscedastic uncertainties.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018. With learned log-variances ``s_t = log sigma_t^2`` (initialised to 0)
the term of task t is ``0.5 * exp(-s_t) * L_t + 0.5 * s_t``: the Gaussian-likelihood form
``L / (2 sigma^2) + log sigma``, used for every task (the paper drops the 1/2 for classification;
using one form keeps tasks comparable and equals LibMTL's). ``s`` is optimised jointly with the
model: :meth:`parameters` returns it for the trainer's optimizer. Its optimum is ``s_t = log L_t``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import LearnedScalars


@register_weighting
class UncertaintyWeighting(LearnedScalars, Weighting):
    name = "uw"

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._init_scalars(0.0)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        out = {}
        for t, loss in step.losses.items():
            s = self._scalar(t, loss)
            out[t] = 0.5 * torch.exp(-s) * loss + 0.5 * s
        return out

    @property
    def weights(self) -> dict[str, float]:
        """The multiplier ``0.5 exp(-s_t)`` of each loss."""
        return {t: 0.5 * math.exp(-s) for t, s in zip(self.tasks, self.scalars.tolist())}
