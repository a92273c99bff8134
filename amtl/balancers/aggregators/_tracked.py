"""Aggregators that keep moving averages of the task gradients themselves (reference: LibMTL).

- **DB-MTL** (Lin et al., "Dual-Balancing for Multi-Task Learning", 2023): the gradients of
  ``log L_t`` (loss-scale balancing), smoothed across steps, ``b_t <- g_t + (beta / k^sigma)(b_t - g_t)``,
  each rescaled to the largest smoothed norm (gradient-magnitude balancing). The gradient of
  ``log(L_t + eps)`` is ``g_t / (L_t + eps)``, so the log needs no extra backward pass; heads get
  their task's log-loss gradient, as in LibMTL (``_compute_grad`` of ``log(losses + 1e-8)``).
- **MoCo** (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning", ICLR 2023):
  tracked gradients ``y_t`` of the loss-scaled unit gradients ``L_t g_t / |g_t|`` and task weights
  ``lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)`` (``gamma`` is ``lambda_step``); the
  update is ``lambda @ Y``.

Both read the terms' values as the losses their references read. A weighting's term may be zero or
negative (UW's ``exp(-s) L + s``, STCH's warm-up log-losses); its magnitude ``|v|`` is used then, so
a term's gradient is rescaled but never turned around into an ascent direction.

Both hold one ``[D]`` buffer per task (a model's worth of memory each), kept per task name so a
task absent from a step keeps its buffer. The step counter ``k`` counts this aggregator's calls.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from amtl.balancers.base import Combined, GradientMatrix, HParam, MatrixAggregator
from amtl.balancers.method import register_aggregator

#: LibMTL's floor for the logarithm and the norm ratios.
EPS = 1e-8


class _Tracking(MatrixAggregator):
    """Per-task ``[D]`` buffers and a step counter, with their state dict."""

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.steps = 0
        self.buffers: dict[str, Tensor] = {}

    def _buffer(self, task: str, like: Tensor) -> Tensor:
        stored = self.buffers.get(task)
        return torch.zeros_like(like) if stored is None else stored.to(like)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "buffers": {t: b.detach().cpu() for t, b in self.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.buffers = {t: b.clone() for t, b in (state.get("buffers") or {}).items()}


@register_aggregator
class DBMTL(_Tracking):
    name = "db-mtl"
    heads = "weighted"  # heads get d log L_t: their gradient times 1 / (L_t + eps)
    hparams = (
        HParam("beta", "float", 0.9, low=0.0, high=1.0, doc="weight of the previous gradient average"),
        HParam("beta_sigma", "float", 0.0, low=0.0, high=1.0,
               doc="decay of that weight over steps: beta / k**beta_sigma (0: constant)"),
    )
    beta: float
    beta_sigma: float

    def combine(self, matrix: GradientMatrix) -> Combined:
        self.steps += 1
        inverse = 1.0 / (matrix.values.abs() + EPS)
        log_grads = matrix.grads * inverse[:, None]
        keep = self.beta / self.steps ** self.beta_sigma
        smoothed = torch.stack([g + keep * (self._buffer(t, g) - g) for t, g in zip(matrix.tasks, log_grads)])
        self.buffers.update({t: b.detach() for t, b in zip(matrix.tasks, smoothed)})
        norms = smoothed.norm(dim=1)
        scale = norms.max() / (norms + EPS)
        # Reported weight: the multiplier of task t's loss gradient were its average this step's alone.
        return Combined(update=scale @ smoothed, weights=scale * inverse, head_weights=inverse)


@register_aggregator
class MoCo(_Tracking):
    name = "moco"
    hparams = (
        HParam("beta", "float", 0.5, low=0.0, high=1.0, doc="step size of the gradient tracking"),
        HParam("beta_sigma", "float", 0.5, low=0.0, high=1.0, doc="its decay: beta / k**beta_sigma"),
        # The paper's gamma; FAMO declares a `gamma` of its own, and `famo+moco` must build.
        HParam("lambda_step", "float", 0.1, low=1e-4, high=10.0, log=True,
               doc="step size of the task-weight update (the paper's gamma)"),
        HParam("lambda_step_sigma", "float", 0.5, low=0.0, high=1.0,
               doc="its decay: lambda_step / k**lambda_step_sigma"),
        HParam("rho", "float", 0.0, low=0.0, high=10.0, doc="l2 regularisation of the task weights"),
    )
    beta: float
    beta_sigma: float
    lambda_step: float
    lambda_step_sigma: float
    rho: float

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.lambdas: dict[str, float] = {}

    def combine(self, matrix: GradientMatrix) -> Combined:
        self.steps += 1
        grads, t = matrix.grads, len(matrix.tasks)
        scaled = grads / (grads.norm(dim=1, keepdim=True) + EPS) * matrix.values.abs()[:, None]
        step = self.beta / self.steps ** self.beta_sigma
        tracked = torch.stack([y - step * (y - g) for y, g in
                               zip((self._buffer(n, grads[0]) for n in matrix.tasks), scaled)])
        self.buffers.update({n: y.detach() for n, y in zip(matrix.tasks, tracked)})
        lam = torch.tensor([self.lambdas.get(n, 1.0 / t) for n in matrix.tasks], dtype=torch.float64,
                           device=grads.device)
        gram = (tracked @ tracked.T).double() + self.rho * torch.eye(t, dtype=torch.float64, device=grads.device)
        lam = torch.softmax(lam - self.lambda_step / self.steps ** self.lambda_step_sigma * (gram @ lam), dim=0)
        self.lambdas.update(zip(matrix.tasks, lam.tolist()))
        return Combined(update=lam.to(tracked.dtype) @ tracked, weights=lam)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lambdas": dict(self.lambdas)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lambdas = {str(t): float(v) for t, v in (state.get("lambdas") or {}).items()}
