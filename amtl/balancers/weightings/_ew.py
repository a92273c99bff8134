"""Equal weighting (EW): the objective is the plain sum of task losses.

Sum, not mean: with T tasks the gradient is T times that of the mean, which only rescales the
learning rate for SGD and changes nothing for Adam. LibMTL and the AMTL reference code use the sum.
"""
from __future__ import annotations

from torch import Tensor

from amtl.balancers.base import StepInputs, Weighting
from amtl.balancers.method import register_weighting


@register_weighting
class EqualWeighting(Weighting):
    name = "ew"

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        return dict(step.losses)
