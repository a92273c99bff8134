"""Small exact solvers on a Gramian, shared by MGDA and CAGrad.

They run in float64 NumPy on the CPU: the inputs are ``T x T`` and the active-set loops branch on
values, so one transfer of the Gramian is cheaper than a device sync (or a torch op) per branch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_numpy(gramian: Tensor) -> np.ndarray:
    """The Gramian as a symmetric float64 array (one device-to-host copy)."""
    k = gramian.detach().to("cpu", torch.float64).numpy()
    return (k + k.T) / 2


def nnls_gram(q: np.ndarray, c: np.ndarray, max_iter: int) -> np.ndarray:
    """Lawson-Hanson NNLS in normal-equation form: ``argmin_{x >= 0} x^T Q x / 2 - c^T x``."""
    n = q.shape[0]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-13 * max(1.0, float(np.abs(q).max()), float(np.abs(c).max()))
    for _ in range(max_iter):
        w = c - q @ x  # negative gradient: a positive entry outside the passive set can improve
        w[passive] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= tol:
            break
        passive[j] = True
        for _ in range(max_iter):
            idx = np.flatnonzero(passive)
            z = np.zeros(n)
            # lstsq, not solve: Q_PP is singular when task gradients are linearly dependent.
            z[idx] = np.linalg.lstsq(q[np.ix_(idx, idx)], c[idx], rcond=None)[0]
            if (z[idx] > 0).all():
                x = z
                break
            # Move from x towards z until the first passive coordinate reaches zero; drop it.
            bad = idx[z[idx] <= 0]
            step = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + step * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                break
    return x


def min_norm_weights(k: np.ndarray) -> np.ndarray:
    """Weights ``w`` in the simplex minimising ``w^T K w`` (the min-norm point of the hull), exactly.

    The min-norm point ``g*`` satisfies ``g_i . g* >= |g*|^2`` for every ``i``; so the solution
    ``u`` of ``min_{u >= 0} |G^T u|^2 + (1^T u - 1)^2`` rescaled to sum one is it (Lawson & Hanson's
    least-distance programming), and that NNLS needs only ``K + 1 1^T``.
    """
    t = k.shape[0]
    scale = float(np.diag(k).max()) if t else 0.0
    if t == 1 or scale <= 0:
        return np.full(t, 1.0 / t)
    # The weights are invariant to scaling K; scaling keeps 1 1^T from swamping (or vanishing in) it.
    u = nnls_gram(k / scale + 1.0, np.ones(t), 10 * t + 10)
    s = u.sum()
    return u / s if s > 0 else np.full(t, 1.0 / t)
