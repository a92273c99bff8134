"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR
2023): the task gradients are replaced by the closest orthogonal system, rescaled to the smallest
singular value, so the aligned gradient system has condition number one. From the eigendecomposition
``K = V diag(lambda) V^T`` truncated at a rank tolerance, ``B = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T``
maps ``G`` to the aligned gradients ``B G``; the update is their sum (official code), ``alpha = B 1``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amtl.balancers.base import Aggregator, HParam
from amtl.balancers.method import register_aggregator

# The Gramian comes from float32 gradients: eigenvalues below float32 noise are not directions.
_EPS = torch.finfo(torch.float32).eps


@register_aggregator
class AlignedMTL(Aggregator):
    name = "aligned"
    hparams = (HParam("scale_mode", "str", "min", choices=("min", "median", "rmse"),
                      doc="singular value the aligned system is scaled to: the smallest kept "
                          "(paper), the median, or the root mean square (official code option)"),)
    scale_mode: str

    def weights(self, gramian: Tensor) -> Tensor:
        t = gramian.shape[0]
        lam, vec = torch.linalg.eigh(gramian)
        keep = lam > lam.max() * t * _EPS
        lam = torch.where(keep, lam, torch.ones_like(lam))
        if self.scale_mode == "min":
            scale = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
        elif self.scale_mode == "median":
            scale = lam[keep].median()  # boolean indexing syncs; only on this non-default mode
        else:
            scale = (lam * keep).sum() / keep.sum().clamp(min=1)
        inv_sqrt = torch.where(keep, (scale / lam).sqrt(), torch.zeros_like(lam))
        balance = (vec * inv_sqrt) @ vec.T
        alpha = balance.sum(dim=1)
        # An all-zero Gramian keeps nothing: fall back to the plain sum.
        return torch.where(keep.any(), alpha, torch.ones_like(alpha))
