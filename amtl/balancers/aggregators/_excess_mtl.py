"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024).

Each task's excess risk is estimated from its gradient and a diagonal (AdaGrad-like) curvature,
``w_t = sum_d g_td^2 / sqrt(S_td + 1e-7)`` with ``S_t`` the running sum of ``g_t^2``, divided by the
task's first estimate (scale processing); the task weights take an exponentiated-gradient step
``lambda_t <- lambda_t exp(eta w_t)`` and are renormalised to sum to the number of tasks. The update
is ``lambda @ G`` and heads get ``lambda_t`` times their gradient: LibMTL back-propagates
``sum_t lambda_t L_t``. As in LibMTL and the official code the weights start at one and the first
step only records the first estimate; as in torchjd the division adds 1e-7 (a task whose first
gradient is zero would otherwise divide by zero).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from amtl.balancers.base import Combined, GradientMatrix, HParam, MatrixAggregator
from amtl.balancers.method import register_aggregator


@register_aggregator
class ExcessMTL(MatrixAggregator):
    name = "excess-mtl"
    heads = "weighted"
    hparams = (
        HParam("robust_step_size", "float", 1e-2, low=1e-5, high=10.0, log=True,
               doc="step size eta of the exponentiated task-weight update"),
    )
    robust_step_size: float

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.squares: dict[str, Tensor] = {}   # S_t, one [D] sum per task
        self.first: dict[str, float] = {}      # each task's first excess-risk estimate
        self.lambdas: dict[str, float] = {}

    def combine(self, matrix: GradientMatrix) -> Combined:
        grads = matrix.grads
        squares = grads.detach() ** 2
        risks = []
        for task, sq in zip(matrix.tasks, squares):
            stored = self.squares.get(task)
            total = sq.clone() if stored is None else stored.to(sq).add_(sq)
            self.squares[task] = total
            risks.append((sq / torch.sqrt(total + 1e-7)).sum())
        risks = torch.stack(risks).double().tolist()
        steps = []
        for task, risk in zip(matrix.tasks, risks):
            if task not in self.first:
                self.first[task] = risk  # first sight of the task: record, do not step
                steps.append(0.0)
            else:
                steps.append(self.robust_step_size * risk / (self.first[task] + 1e-7))
        # lambda_t exp(step_t), renormalised, in log space (torchjd's form): no overflow at large steps.
        logits = torch.tensor([self.lambdas.get(t, 1.0) for t in matrix.tasks], dtype=torch.float64).log()
        lam_t = torch.softmax(logits + torch.tensor(steps, dtype=torch.float64), dim=0) * len(steps)
        self.lambdas.update(zip(matrix.tasks, lam_t.tolist()))
        lam_t = lam_t.to(grads.device)
        return Combined(update=lam_t.to(grads.dtype) @ grads, weights=lam_t)

    def state_dict(self) -> dict[str, Any]:
        return {"squares": {t: s.detach().cpu() for t, s in self.squares.items()},
                "first": dict(self.first), "lambdas": dict(self.lambdas)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.squares = {t: s.clone() for t, s in (state.get("squares") or {}).items()}
        self.first = {str(t): float(v) for t, v in (state.get("first") or {}).items()}
        self.lambdas = {str(t): float(v) for t, v in (state.get("lambdas") or {}).items()}
