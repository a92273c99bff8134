"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): the update
``d = alpha @ G`` is the Nash bargaining solution, characterised by ``(G G^T) alpha = 1 / alpha``
with ``alpha > 0``. That equation is the stationarity condition of the strictly convex
``f(a) = a^T K a / 2 - sum(log a)``, so a damped Newton method finds it to machine precision in a
few steps (the official code runs up to ``optim_niter`` convex-concave steps with cvxpy).
Options of the official code: ``max_norm`` clips the update norm, ``update_weights_every`` reuses
the last solution between solves.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy
from amtl.balancers.base import Aggregator, HParam
from amtl.balancers.method import register_aggregator

# Ridge on the Gramian: with linearly dependent (or zero) task gradients K a = 1/a has no solution
# and the weights of the redundant tasks would grow without bound. Relative to each diagonal entry
# (so tasks of very different gradient scale are not biased), plus a floor for zero gradients.
_RIDGE = 1e-12
_FLOOR = 1e-30


def nash_weights(k: np.ndarray, start: np.ndarray | None = None, max_iter: int = 20,
                 tol: float = 1e-10) -> np.ndarray:
    """Solve ``K a = 1 / a``, ``a > 0`` by damped Newton on ``a^T K a / 2 - sum(log a)``."""
    t = k.shape[0]
    norm = float(np.linalg.norm(k))
    if norm <= 0:
        return np.ones(t)
    # Solve for b = sqrt(norm) a with the unit-norm Gramian: (K / norm) b = 1 / b.
    kn = k / norm
    kn = kn + np.diag(_RIDGE * np.diag(kn) + _FLOOR)
    b = start * math.sqrt(norm) if start is not None else 1.0 / np.sqrt(np.diag(kn))

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ kn @ x) - float(np.log(x).sum())

    for _ in range(max_iter):
        grad = kn @ b - 1.0 / b
        if np.linalg.norm(grad * b) < tol:  # relative residual of K a = 1/a, scale-free
            break
        step = np.linalg.solve(kn + np.diag(1.0 / b ** 2), -grad)
        # Backtrack to stay in a > 0 and decrease f (Armijo).
        lr, f0, slope = 1.0, f(b), float(grad @ step)
        neg = step < 0
        if neg.any():
            lr = min(1.0, 0.99 * float(np.min(-b[neg] / step[neg])))
        while lr > 1e-12 and f(b + lr * step) > f0 + 1e-4 * lr * slope:
            lr *= 0.5
        b = b + lr * step
    return b / math.sqrt(norm)


@register_aggregator
class NashMTL(Aggregator):
    name = "nash"
    hparams = (
        HParam("max_norm", "float", 1.0, low=0.0,
               doc="clip the update norm |alpha @ G| to this value; 0 disables"),
        HParam("update_weights_every", "int", 1, low=1, doc="solve every this many steps"),
        HParam("optim_niter", "int", 20, low=1, doc="Newton iterations per solve (upper bound)"),
    )
    max_norm: float
    update_weights_every: int
    optim_niter: int

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self._step = 0
        self._alpha: np.ndarray | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        k = as_numpy(gramian)
        stale = self._alpha is not None and self._alpha.shape[0] != k.shape[0]
        if self._alpha is None or stale or self._step % self.update_weights_every == 0:
            start = None if self._alpha is None or stale else self._alpha
            self._alpha = nash_weights(k, start, self.optim_niter)
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
