"""Stochastic MGDA-like methods that read gradients from independent mini-batches (reference: LibMTL,
whose trainer draws three batches per step for them). Here each batch is split into three disjoint
parts instead (``MatrixAggregator.independent_batches``), so every method sees the same data per
step; the parts change every step.

- **MoDo** (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning", NeurIPS 2023):
  ``lambda <- Proj_simplex(lambda - gamma (G_1 G_2^T lambda + rho lambda))``, update ``lambda @ G_3``.
- **SDMGrad** (Xiao et al., "Direction-oriented Multi-objective Learning", NeurIPS 2023): ``w`` from
  20 projected SGD steps (lr 5, momentum 0.5: LibMTL's) on ``w^T A w / 2 + lambda w^T A 1 / T`` with
  ``A = G_2 G_3^T`` normalised by the mean of ``sqrt(diag A)``, update
  ``(w @ G_1 + lambda mean_t G_1) / (1 + lambda)``.

The weights are kept per task name and the projected steps run in float64 on the host ([T, T]).
Heads get their whole-batch gradient (LibMTL: the mean of the three batches' for MoDo; SDMGrad's
sum of the three there is a factor 3 left alone here).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import project_simplex
from amtl.balancers.base import Combined, GradientMatrix, HParam, MatrixAggregator
from amtl.balancers.method import register_aggregator


class _DoubleSampling(MatrixAggregator):
    independent_batches = 3

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.lambdas: dict[str, float] = {}

    @staticmethod
    def parts(matrix: GradientMatrix) -> Tensor:
        """``[3, T, D]``: the parts, or three copies of the one matrix ``aggregate`` was given."""
        return matrix.batches if matrix.batches is not None else matrix.grads.expand(3, *matrix.grads.shape)

    def _start(self, tasks: list[str]) -> np.ndarray:
        return np.array([self.lambdas.get(t, 1.0 / len(tasks)) for t in tasks])

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": dict(self.lambdas)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lambdas = {str(t): float(v) for t, v in (state.get("lambdas") or {}).items()}


@register_aggregator
class MoDo(_DoubleSampling):
    name = "modo"
    hparams = (
        # The paper's gamma (LibMTL's MoDo_gamma); FAMO declares a `gamma` of its own.
        HParam("lambda_step", "float", 1e-3, low=1e-6, high=10.0, log=True,
               doc="step size of the task-weight update (the paper's gamma)"),
        HParam("rho", "float", 0.1, low=0.0, high=10.0, doc="l2 regularisation of the task weights"),
    )
    lambda_step: float
    rho: float

    def combine(self, matrix: GradientMatrix) -> Combined:
        parts = self.parts(matrix)
        cross = (parts[0] @ parts[1].T).detach().to("cpu", torch.float64).numpy()
        lam = self._start(matrix.tasks)
        lam = project_simplex(lam - self.lambda_step * (cross @ lam + self.rho * lam))
        self.lambdas.update(zip(matrix.tasks, lam.tolist()))
        weights = torch.from_numpy(lam).to(parts.device)
        return Combined(update=weights.to(parts.dtype) @ parts[2], weights=weights)


@register_aggregator
class SDMGrad(_DoubleSampling):
    name = "sdmgrad"
    MOMENTUM = 0.5
    hparams = (
        HParam("pull", "float", 0.3, low=0.0, high=10.0,
               doc="the paper's lambda: how far the update is pulled towards the mean gradient"),
        HParam("inner_lr", "float", 5.0, low=1e-2, high=100.0, log=True,
               doc="learning rate of the inner projected SGD (LibMTL 5, the official code 10)"),
        HParam("optim_niter", "int", 20, low=1, high=200, doc="inner projected SGD steps per training step"),
    )
    pull: float
    inner_lr: float
    optim_niter: int

    def combine(self, matrix: GradientMatrix) -> Combined:
        parts = self.parts(matrix)
        t = len(matrix.tasks)
        a = (parts[1] @ parts[2].T).detach().to("cpu", torch.float64).numpy()
        scale = np.sqrt(np.clip(np.diag(a), 0.0, None)).mean()
        a = a / (scale ** 2 + 1e-8)
        toward_mean = a.mean(axis=1)
        w, velocity = self._start(matrix.tasks), None
        for _ in range(self.optim_niter):  # torch.optim.SGD(momentum=0.5), fresh every step as in LibMTL
            grad = a @ w + self.pull * toward_mean
            velocity = grad if velocity is None else self.MOMENTUM * velocity + grad
            w = project_simplex(w - self.inner_lr * velocity)
        self.lambdas.update(zip(matrix.tasks, w.tolist()))
        alpha = torch.from_numpy((w + self.pull / t) / (1.0 + self.pull)).to(parts.device)
        return Combined(update=alpha.to(parts.dtype) @ parts[0], weights=alpha)
