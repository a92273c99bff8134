"""UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024;
the reference code is torchjd's ``UPGradWeighting`` and ``DualProjWeighting``).

Both project onto the dual cone of the task gradients ``{x : G x >= 0}``, the directions that
conflict with no task. By the paper's Proposition 1 the projection of ``u^T G`` is ``v^T G`` with
``v = argmin_{v >= u} v^T K v`` (``K = G G^T``), so each needs only the Gramian:

- **UPGrad** projects every task's own gradient (``u = e_i / T``) and sums the projections;
- **DualProj** projects the mean gradient (``u = 1 / T``).

With ``v = u + z`` the program is ``min_{z >= 0} z^T K z / 2 + (K u)^T z``, an NNLS solved exactly by
the active-set solver MGDA uses. torchjd solves the same program with quadprog after adding
``1e-4 I`` to the trace-normalised Gramian (quadprog needs it positive definite); here no
regularisation is needed, so the output is exactly non-conflicting (``K v >= 0``) and agrees with
torchjd's to the size of that regulariser (``tests/balancers/test_aggregators.py``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy, nnls_gram
from amtl.balancers.base import Aggregator
from amtl.balancers.method import register_aggregator


def project_weights(k: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin_{v >= u} v^T K v``: the weights of the projection of ``u^T G`` onto the dual cone."""
    t = k.shape[0]
    scale = float(np.diag(k).max()) if t else 0.0
    if scale <= 0:  # every gradient is zero: any weights give the zero update
        return u.copy()
    q = k / scale  # the solution does not depend on K's scale; this keeps the tolerances meaningful
    return u + nnls_gram(q, -(q @ u), 10 * t + 10)


class _DualCone(Aggregator):
    """Sums the dual-cone projections of the vectors ``u^T G`` for ``u`` in :meth:`projected`."""

    def projected(self, t: int) -> np.ndarray:
        """The ``u`` vectors to project, one per row."""
        raise NotImplementedError

    def weights(self, gramian: Tensor) -> Tensor:
        k = as_numpy(gramian)
        w = sum((project_weights(k, u) for u in self.projected(k.shape[0])), start=np.zeros(k.shape[0]))
        return torch.from_numpy(w).to(gramian.device, gramian.dtype)


@register_aggregator
class UPGrad(_DualCone):
    name = "upgrad"

    def projected(self, t: int) -> np.ndarray:
        return np.eye(t) / t  # each task's own gradient, scaled 1/T


@register_aggregator
class DualProj(_DualCone):
    name = "dualproj"

    def projected(self, t: int) -> np.ndarray:
        return np.full((1, t), 1.0 / t)  # the mean gradient
