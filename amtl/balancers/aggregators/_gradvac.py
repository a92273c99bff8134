"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021), as LibMTL implements it.

For each task i and each other task j (in a random order), per parameter group k: if the cosine
``phi`` of i's corrected gradient with j's gradient is below the target ``phi_hat_ijk``, add
``w g_j`` with ``w = |g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2))``,
which lifts the cosine to the target; the target then follows the observed cosine,
``phi_hat <- (1 - beta) phi_hat + beta phi``. The update is the sum of the corrected gradients.

Inside a group every corrected gradient stays a combination of that group's task gradients, so each
group needs only its own Gramian (torchjd's ``GradVacWeighting`` does the same for one group):
``group='whole'`` is one group (LibMTL's default ``group_type=0``) and ``group='parameter'`` one per
parameter tensor (its ``all_matrix``). The orders are drawn once per task and shared by all groups,
as in LibMTL's loops, from a generator seeded by the run's seed.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.base import Combined, GradientMatrix, HParam, MatrixAggregator
from amtl.balancers.method import register_aggregator

EPS = 1e-8  # LibMTL's


@register_aggregator
class GradVac(MatrixAggregator):
    name = "gradvac"
    context = ("seed",)
    DEFAULT_SEED = 0
    hparams = (
        HParam("beta", "float", 0.5, low=0.0, high=1.0, doc="step of the moving cosine targets"),
        HParam("group", "str", "whole", choices=("whole", "parameter"),
               doc="one cosine target per task pair for the whole encoder, or per parameter tensor"),
    )
    beta: float
    group: str

    def __init__(self, seed: int | None = None, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.generator = torch.Generator().manual_seed(self.DEFAULT_SEED if seed is None else int(seed))
        self.targets: dict[str, np.ndarray] = {}  # "i|j" -> phi_hat per group

    def combine(self, matrix: GradientMatrix) -> Combined:
        grads, tasks = matrix.grads, matrix.tasks
        t = len(tasks)
        sizes = [grads.shape[1]] if self.group == "whole" else matrix.blocks
        blocks = torch.split(grads, sizes, dim=1)
        if len(blocks) == 1 and matrix.gramian is not None:
            gramians = matrix.gramian[None].detach().cpu().numpy()  # the engine's: no second [T, D] product
        else:
            gramians = torch.stack([(b @ b.T).double() for b in blocks]).cpu().numpy()  # one host copy
        orders = [[j for j in torch.randperm(t, generator=self.generator).tolist() if j != i] for i in range(t)]
        coefs = np.stack([self._coefficients(k, tasks, orders, g) for g, k in enumerate(gramians)])  # [K, T]
        update = torch.cat([torch.from_numpy(c).to(b) @ b for c, b in zip(coefs, blocks)])
        # Reported weight: each task's coefficient averaged over the groups by their size.
        weights = np.average(coefs, axis=0, weights=np.asarray(sizes, dtype=np.float64))
        return Combined(update=update, weights=torch.from_numpy(weights).to(grads.device))

    def _coefficients(self, k: np.ndarray, tasks: list[str], orders: list[list[int]], group: int) -> np.ndarray:
        """Task weights of one group: the corrected gradients are ``C @ G`` with ``C = I`` + corrections."""
        t = len(tasks)
        c = np.eye(t)
        for i in range(t):
            for j in orders[i]:
                targets = self._targets(tasks[i], tasks[j], group)
                ck = c[i] @ k
                norm_i = float(np.sqrt(max(ck @ c[i], 0.0)))
                norm_j = float(np.sqrt(max(k[j, j], 0.0)))
                phi = float(ck[j]) / (norm_i * norm_j + EPS)
                hat = targets[group]
                if phi < hat:
                    sin_phi, sin_hat = np.sqrt(max(1 - phi ** 2, 0.0)), np.sqrt(max(1 - hat ** 2, 0.0))
                    c[i, j] += norm_i * (hat * sin_phi - phi * sin_hat) / (norm_j * sin_hat + EPS)
                targets[group] = (1 - self.beta) * hat + self.beta * phi
        return c.sum(0)

    def _targets(self, a: str, b: str, group: int) -> np.ndarray:
        key = f"{a}|{b}"
        if key not in self.targets:
            self.targets[key] = np.zeros(group + 1)
        elif len(self.targets[key]) <= group:
            self.targets[key] = np.pad(self.targets[key], (0, group + 1 - len(self.targets[key])))
        return self.targets[key]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "targets": {k: v.tolist() for k, v in self.targets.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.targets = {k: np.asarray(v, dtype=np.float64) for k, v in (state.get("targets") or {}).items()}
