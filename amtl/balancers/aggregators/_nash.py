"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): the update
``d = alpha @ G`` is the Nash bargaining solution, characterised by ``(G G^T) alpha = 1 / alpha``
with ``alpha > 0``. That equation is the stationarity condition of the strictly convex
``f(a) = a^T K a / 2 - sum(log a)``, so a damped Newton method finds it to machine precision in a
few steps (the official code runs up to ``optim_niter`` convex-concave steps with cvxpy).
Options of the official code: ``max_norm`` clips the update norm, ``update_weights_every`` reuses
the last solution between solves. The official code (and LibMTL) back-propagates
``sum_t alpha_t L_t``, so head t's gradient is scaled by ``alpha_t``: ``heads="weighted"``, the default;
``heads="plain"`` gives heads their task's own gradient (this code's rule before).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy, fair_weights
from amtl.balancers.base import Aggregator, HParam, heads_hparam
from amtl.balancers.method import register_aggregator

@register_aggregator
class NashMTL(Aggregator):
    name = "nash"
    hparams = (
        HParam("max_norm", "float", 1.0, low=0.0,
               doc="clip the update norm |alpha @ G| to this value; 0 disables"),
        HParam("update_weights_every", "int", 1, low=1, doc="solve every this many steps"),
        HParam("optim_niter", "int", 20, low=1, doc="Newton iterations per solve (upper bound)"),
        heads_hparam("weighted"),
    )
    max_norm: float
    update_weights_every: int
    optim_niter: int
    heads: str

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self._step = 0
        self._alpha: np.ndarray | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        k = as_numpy(gramian)
        stale = self._alpha is not None and self._alpha.shape[0] != k.shape[0]
        if self._alpha is None or stale or self._step % self.update_weights_every == 0:
            start = None if self._alpha is None or stale else self._alpha
            self._alpha = fair_weights(k, 1.0, start, self.optim_niter)
        self._step += 1
        alpha = self._alpha
        if self.max_norm > 0:
            # |alpha @ G| from the Gramian; the official code clips the shared gradient norm.
            norm = math.sqrt(max(float(alpha @ k @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return torch.from_numpy(alpha.copy()).to(gramian.device, gramian.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "alpha": None if self._alpha is None else self._alpha.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state.get("step", 0))
        alpha = state.get("alpha")
        self._alpha = None if alpha is None else np.asarray(alpha, dtype=np.float64)
