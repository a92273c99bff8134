"""Metric depth: L1 on valid pixels; absolute and relative error and delta1."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from amtl.tasks.base import Task
from amtl.tasks.heads import DenseHead


class DepthMetric(Metric):
    """Per-pixel sums over the whole split: abs error, rel error, delta1 = max(p/g, g/p) < 1.25."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("abs_sum", "rel_sum", "delta1_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target > 0
        p, g = pred.float()[valid], target.float()[valid]
        err = (p - g).abs()
        self.abs_sum += err.sum().double()
        self.rel_sum += (err / g).sum().double()
        # A non-positive prediction can never be within 25% of a positive depth.
        ratio = torch.maximum(p / g, g / p.clamp(min=1e-12))
        self.delta1_sum += ((ratio < 1.25) & (p > 0)).sum().double()
        self.count += valid.sum().double()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1)
        return {"abs_err": self.abs_sum / n, "rel_err": self.rel_sum / n, "delta1": self.delta1_sum / n}


class Depth(Task):
    name = "depth"
    kpi = "delta1"
    higher_is_better = {"abs_err": False, "rel_err": False, "delta1": True}

    def head(self, in_channels: int) -> nn.Module:
        return DenseHead(in_channels, 1)

    def sample_losses(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target > 0
        err = (pred.float() - target).abs() * valid
        counts = valid.flatten(1).sum(1)
        return err.flatten(1).sum(1) / counts.clamp(min=1), counts > 0

    def metric(self) -> Metric:
        return DepthMetric()
