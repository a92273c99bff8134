"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): each task gradient
is projected off the normal plane of every other task gradient it conflicts with (negative inner
product), visiting the others in a random order, and the projected gradients are summed. Each
projected gradient stays a linear combination of the task gradients, so tracking its coefficients
needs only the Gramian. The order comes from the aggregator's own generator, seeded by the run's
training seed (context, not a hyperparameter) and saved in ``state_dict``: runs resume reproducibly,
DDP ranks draw the same order, and each training seed draws its own orders.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy
from amtl.balancers.base import Aggregator
from amtl.balancers.method import register_aggregator


@register_aggregator
class PCGrad(Aggregator):
    name = "pcgrad"
    context = ("seed",)
    DEFAULT_SEED = 0

    def __init__(self, seed: int | None = None, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.generator = torch.Generator().manual_seed(self.DEFAULT_SEED if seed is None else int(seed))

    def weights(self, gramian: Tensor) -> Tensor:
        k = as_numpy(gramian)
        t = k.shape[0]
        alpha = np.zeros(t)
        for i in range(t):
            coef = np.zeros(t)  # g_i^PC = coef @ G
            coef[i] = 1.0
            for j in torch.randperm(t, generator=self.generator).tolist():
                if j == i or k[j, j] <= 0:
                    continue
                inner = float(k[j] @ coef)  # g_i^PC . g_j
                if inner < 0:
                    coef[j] -= inner / k[j, j]
            alpha += coef
        return torch.from_numpy(alpha).to(gramian.device, gramian.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
