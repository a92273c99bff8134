"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024): the update
``d = w @ G`` with ``(G G^T) w = w^(-1/alpha)``, ``w > 0``, the alpha-fair allocation of progress
among tasks (alpha = 1 is Nash-MTL's bargaining solution; alpha -> infinity approaches max-min
fairness; the official code treats alpha = 0 as equal weights, which is out of range here).

The official code (OptMN-Lab/fairgrad, also torchjd's ``FairGradWeighting``) runs SciPy's
``least_squares`` from equal weights; the equation is the stationarity condition of a strictly
convex program, so the damped Newton solver Nash-MTL uses finds its unique root to machine
precision. The hyperparameter is ``fairness`` (the paper's alpha; GradNorm has an ``alpha``); its default
2.0 is the official run scripts' alpha.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy, fair_weights
from amtl.balancers.base import Aggregator, HParam
from amtl.balancers.method import register_aggregator


@register_aggregator
class FairGrad(Aggregator):
    name = "fairgrad"
    # Not "alpha": GradNorm declares one, and a weighting+aggregator pair shares one namespace.
    hparams = (HParam("fairness", "float", 2.0, low=0.1, high=10.0, log=True,
                      doc="the paper's alpha: 1 is Nash-MTL, larger favours the worst-off task"),)
    fairness: float

    def weights(self, gramian: Tensor) -> Tensor:
        w = fair_weights(as_numpy(gramian), 1.0 / self.fairness, max_iter=100)
        return torch.from_numpy(w).to(gramian.device, gramian.dtype)
