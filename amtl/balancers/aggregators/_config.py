"""ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
ICLR 2025; the reference is torchjd's ``ConFIG``, adapted from the official tum-pbs/ConFIG): the
update points along ``v = pinv(U) 1``, the direction with equal cosine to every unit task gradient
(rows of ``U = D^-1 G``, ``D`` the gradient norms), and its length is the sum of the task gradients'
components along it: ``d = (sum_i g_i . v_hat) v_hat``.

Only the Gramian is needed: ``pinv(U) = U^T (U U^T)^+``, so ``v = G^T beta`` with
``beta = D^-1 (D^-1 K D^-1)^+ 1`` and ``d = alpha @ G``, ``alpha = (1^T K beta / beta^T K beta) beta``.
A zero gradient has a zero unit row, as in the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amtl.balancers.base import Aggregator
from amtl.balancers.method import register_aggregator


@register_aggregator
class ConFIG(Aggregator):
    name = "config"

    def weights(self, gramian: Tensor) -> Tensor:
        k = (gramian + gramian.T) / 2
        norms = k.diagonal().clamp(min=0).sqrt()
        inverse = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
        units = inverse[:, None] * k * inverse[None, :]  # Gramian of the unit gradients
        beta = inverse * (torch.linalg.pinv(units, hermitian=True) @ torch.ones_like(norms))
        square = beta @ k @ beta  # |v|^2
        if square <= 0:
            return torch.zeros_like(norms)
        return (k.sum(dim=0) @ beta / square) * beta
