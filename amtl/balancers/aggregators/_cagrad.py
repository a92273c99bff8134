"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021):
the update maximises the worst task improvement within a ball of radius ``c |g0|`` around the mean
gradient ``g0``. Its dual is ``min_{w in simplex} g_w . g0 + c |g0| |g_w|`` and the update is
``d = g0 + (c |g0| / |g_w|) g_w``, divided by ``1 + c^2`` (``rescale=1``) or ``1 + c``
(``rescale=2``) as in the official code (Cranial-XIX/CAGrad). The dual is solved on the Gramian to
machine precision: for ``mu > 0`` the minimiser of ``g_w . g0 + mu |g_w|^2 / 2`` is the min-norm
point of the hull of ``g_i + g0 / mu`` (an exact NNLS), and ``mu |g_w(mu)|`` increases with ``mu``,
so a bisection finds the ``mu = c |g0| / |g_w|`` that makes it the dual's minimiser.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from amtl.balancers.aggregators._simplex import as_numpy, min_norm_weights
from amtl.balancers.base import Aggregator, HParam
from amtl.balancers.method import register_aggregator


def cagrad_dual(k: np.ndarray, radius: float, iters: int = 200) -> np.ndarray:
    """``argmin_{w in simplex} w^T K b + radius * sqrt(w^T K w)`` with ``b = 1/T`` (``radius > 0``)."""
    kb = k.mean(axis=1)
    g0_sq = float(kb.mean())

    def solve(mu: float) -> tuple[np.ndarray, float]:
        # Gramian of the shifted gradients g_i + g0 / mu.
        shifted = k + (kb[:, None] + kb[None, :]) / mu + g0_sq / mu ** 2
        w = min_norm_weights(shifted)
        return w, math.sqrt(max(float(w @ k @ w), 0.0))

    lo, hi = math.log(radius) - 1.0, math.log(radius) + 1.0
    w, s = solve(math.exp(lo))
    while math.exp(lo) * s >= radius and lo > -700:
        lo -= 4.0
        w, s = solve(math.exp(lo))
    w, s = solve(math.exp(hi))
    while math.exp(hi) * s <= radius and hi < 700:
        hi += 4.0
        w, s = solve(math.exp(hi))
    if math.exp(hi) * s <= radius:  # 0 is in the hull: g_w -> 0 (Pareto-stationary point)
        return w
    for _ in range(iters):  # mu |g_w(mu)| is nondecreasing in mu
        mid = (lo + hi) / 2
        w, s = solve(math.exp(mid))
        if math.exp(mid) * s < radius:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return solve(math.exp(hi))[0]


@register_aggregator
class CAGrad(Aggregator):
    name = "cagrad"
    hparams = (
        HParam("c", "float", 0.5, low=0.0, high=10.0,
               doc="radius of the ball around the mean gradient, in units of |g0|"),
        HParam("rescale", "int", 1, choices=(0, 1, 2),
               doc="divide the update by 1 (0), 1 + c^2 (1) or 1 + c (2), as in the official code"),
    )
    c: float
    rescale: int

    def weights(self, gramian: Tensor) -> Tensor:
        k = as_numpy(gramian)
        t = k.shape[0]
        alpha = np.full(t, 1.0 / t)
        g0_norm = math.sqrt(max(float(k.mean()), 0.0))
        if self.c > 0 and g0_norm > 0:
            radius = self.c * g0_norm
            w = cagrad_dual(k, radius)
            gw_norm = math.sqrt(max(float(w @ k @ w), 0.0))
            # Below this |g_w| the direction g_w/|g_w| is noise: keep the mean (Pareto-stationary).
            if gw_norm > 1e-10 * g0_norm:
                alpha = alpha + (radius / gw_norm) * w
        alpha = alpha / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        return torch.from_numpy(alpha).to(gramian.device, gramian.dtype)
