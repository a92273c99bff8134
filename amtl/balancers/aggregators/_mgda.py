"""MGDA (Desideri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018): the update is the minimum-norm point of the convex hull of the task gradients, a
common descent direction whenever one exists. Solved exactly on the Gramian by an active-set NNLS
(finite termination) instead of the paper's Frank-Wolfe iterations, which stop at a tolerance.
The paper's algorithm updates each task's own parameters with that task's gradient (``heads="plain"``,
the default); its official code (intel-isl/MultiObjectiveOptimization) back-propagates
``sum_t alpha_t L_t``, scaling head t's gradient by ``alpha_t`` (``heads="weighted"``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy, min_norm_weights
from amtl.balancers.base import Aggregator, heads_hparam
from amtl.balancers.method import register_aggregator


@register_aggregator
class MGDA(Aggregator):
    name = "mgda"
    hparams = (heads_hparam("plain"),)
    heads: str

    def weights(self, gramian: Tensor) -> Tensor:
        w = min_norm_weights(as_numpy(gramian))
        return torch.from_numpy(w).to(gramian.device, gramian.dtype)
