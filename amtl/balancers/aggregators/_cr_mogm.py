"""CR-MOGM (Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
Beyond", NeurIPS 2022): another aggregator's task weights smoothed by an exponential moving average
across steps, ``lambda_k = m lambda_(k-1) + (1 - m) lambda_hat_k`` with ``lambda_0 = lambda_hat_1``,
which is what makes stochastic MGDA-like methods converge. The reference is torchjd's
``CRMOGMWeighting`` (its ``alpha`` is ``momentum`` here: GradNorm declares an ``alpha``).

The wrapped aggregator (``inner``, default MGDA as in the paper) runs with its default
hyperparameters; PCGrad is not offered (its order needs the run's seed, and averaging its random
projections is not what the paper studies). The average restarts when the number of tasks in the
step changes (partially labelled batches).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from amtl.balancers.base import Aggregator, HParam
from amtl.balancers.method import register_aggregator

INNER = ("mgda", "upgrad", "dualproj", "imtl-g", "cagrad", "nash", "fairgrad", "aligned")


@register_aggregator
class CRMOGM(Aggregator):
    name = "cr-mogm"
    hparams = (
        HParam("momentum", "float", 0.9, low=0.0, high=1.0,
               doc="weight of the previous average (0: the inner weights as they are, 1: frozen at the first)"),
        HParam("inner", "str", "mgda", choices=INNER, doc="the aggregator whose weights are smoothed"),
    )
    momentum: float
    inner: str

    def __init__(self, **hparams: Any) -> None:
        from amtl.balancers.method import _AGGREGATORS

        super().__init__(**hparams)
        self.wrapped: Aggregator = _AGGREGATORS[self.inner]()
        self._average: Tensor | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        current = self.wrapped.weights(gramian)
        if self._average is None or self._average.shape != current.shape:
            self._average = current.detach().clone()
        else:
            self._average = self.momentum * self._average.to(current) + (1.0 - self.momentum) * current.detach()
        return self._average.clone()

    def state_dict(self) -> dict[str, Any]:
        average = None if self._average is None else self._average.detach().cpu().tolist()
        return {"average": average, "inner": self.wrapped.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        average = state.get("average")
        self._average = None if average is None else torch.tensor(average, dtype=torch.float64)
        self.wrapped.load_state_dict(state.get("inner") or {})
