"""Small exact solvers on a Gramian, shared by the aggregators (MGDA, CAGrad, UPGrad/DualProj,
Nash-MTL, FairGrad).

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


# Ridge on the Gramian for fair_weights: with linearly dependent (or zero) task gradients
# K w = w^(-p) has no solution and the weights of the redundant tasks would grow without bound.
# Relative to each diagonal entry (so tasks of very different gradient scale are not biased), plus a
# floor for zero gradients.
_RIDGE = 1e-12
_FLOOR = 1e-30


def fair_weights(k: np.ndarray, power: float = 1.0, start: np.ndarray | None = None, max_iter: int = 20,
                 tol: float = 1e-10) -> np.ndarray:
    """Solve ``K w = w^(-power)``, ``w > 0`` (Nash-MTL: power 1; FairGrad: ``1 / alpha``).

    It is the stationarity condition of the strictly convex ``w^T K w / 2 - sum(phi(w))`` with
    ``phi' = w^(-power)`` (``phi = log`` at power 1), so a damped Newton method solves it to machine
    precision in a few steps.
    """
    t = k.shape[0]
    norm = float(np.linalg.norm(k))
    if norm <= 0:
        return np.ones(t)
    # Solve for b = w * norm^(1 / (power + 1)) with the unit-norm Gramian: (K / norm) b = b^(-power).
    scale = norm ** (1.0 / (power + 1.0))
    kn = k / norm
    kn = kn + np.diag(_RIDGE * np.diag(kn) + _FLOOR)
    b = start * scale if start is not None else np.diag(kn) ** (-1.0 / (power + 1.0))

    def phi(x: np.ndarray) -> float:
        return float(np.log(x).sum()) if power == 1.0 else float((x ** (1.0 - power)).sum()) / (1.0 - power)

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ kn @ x) - phi(x)

    for _ in range(max_iter):
        grad = kn @ b - b ** -power
        if np.linalg.norm(grad * b ** power) < tol:  # relative residual of K w = w^(-power), scale-free
            break
        step = np.linalg.solve(kn + np.diag(power * b ** (-power - 1.0)), -grad)
        # Stay in w > 0, and backtrack to decrease f (Armijo) while the decrease is measurable in f;
        # below f's rounding the Newton step is taken as it is (it is then in its quadratic region).
        lr, f0, slope = 1.0, f(b), float(grad @ step)
        neg = step < 0
        if neg.any():
            lr = min(1.0, 0.99 * float(np.min(-b[neg] / step[neg])))
        if -slope > 1e-12 * max(1.0, abs(f0)):
            while lr > 1e-12 and f(b + lr * step) > f0 + 1e-4 * lr * slope:
                lr *= 0.5
        if np.max(np.abs(lr * step) / b) < 1e-15:  # b no longer changes: solved to working precision
            break
        b = b + lr * step
    return b / scale


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex ``{w >= 0, sum w = 1}`` (sort-based)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u)
    last = np.nonzero(u * np.arange(1, len(v) + 1) > cumulative - 1.0)[0][-1]
    return np.maximum(v - (cumulative[last] - 1.0) / (last + 1), 0.0)
