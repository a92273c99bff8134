"""IMTL-L: the loss-balancing half of impartial multi-task learning.

Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021. With a learned scale ``s_t``
(initialised to 0) the term of task t is ``exp(s_t) * L_t - s_t``; minimising over ``s_t`` drives
every scaled loss ``exp(s_t) L_t`` towards 1, so tasks contribute on equal loss scales. ``s`` is
trained with the model (returned by :meth:`parameters`). ``imtl`` (IMTL-L with the IMTL-G gradient
aggregator) is registered as an alias by the aggregators package.
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
class ImtlL(LearnedScalars, Weighting):
    name = "imtl-l"

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._init_scalars(0.0)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        out = {}
        for t, loss in step.losses.items():
            s = self._scalar(t, loss)
            out[t] = torch.exp(s) * loss - s
        return out

    @property
    def weights(self) -> dict[str, float]:
        """The multiplier ``exp(s_t)`` of each loss."""
        return {t: math.exp(s) for t, s in zip(self.tasks, self.scalars.tolist())}
