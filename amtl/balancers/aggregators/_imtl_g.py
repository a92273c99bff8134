"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the update ``d = alpha @ G``
with ``sum(alpha) = 1`` whose projections onto every unit task gradient are equal. In Gramian terms
``d . g_i / |g_i|`` equal for all ``i`` means ``K alpha`` is proportional to the gradient norms, so
``alpha ~ K^+ sqrt(diag K)``; the pseudo-inverse keeps linearly dependent gradients well defined.
``imtl`` names the paper's full method: the IMTL-L loss weighting with this aggregator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amtl.balancers.base import Aggregator
from amtl.balancers.method import register_aggregator, register_alias


@register_aggregator
class IMTLG(Aggregator):
    name = "imtl-g"

    def weights(self, gramian: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp(min=0).sqrt()
        v = torch.linalg.pinv(gramian, hermitian=True) @ norms
        total = v.sum()
        # sum(v) = norms^T K^+ norms >= 0; it is 0 only when every gradient is 0.
        return torch.where(total > 0, v / total.clamp(min=1e-300), torch.zeros_like(v))


# Resolved at make() time, so it does not matter whether the weighting imtl-l is registered yet.
register_alias("imtl", "imtl-l", "imtl-g")
