"""Surface normals: 1 - cosine on valid pixels; angle statistics."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from amtl.tasks.base import Task
from amtl.tasks.heads import DenseHead

THRESHOLDS = (11.25, 22.5, 30.0)
# The median angle over a whole split comes from a histogram (a sum, so it reduces across DDP ranks
# and needs no per-pixel storage); 0.01-degree bins make it exact to that resolution.
BIN_DEG = 0.01
N_BINS = int(180 / BIN_DEG)


def unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalise along dim 1. Same as ``F.normalize`` but about 10x faster on CPU for [B, 3, H, W]
    (measured: ``linalg_vector_norm`` over a strided dim took 22% of a training step)."""
    return x * torch.rsqrt(x.pow(2).sum(1, keepdim=True).clamp_min(eps * eps))


class NormalMetric(Metric):
    """Mean and median angular error (degrees) and the fractions within 11.25, 22.5, 30 degrees."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("angle_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", default=torch.zeros(len(THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", default=torch.zeros(N_BINS, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(1) > 0
        cos = (unit(pred.float()) * unit(target.float())).sum(1)[valid].clamp(-1, 1)
        angle = torch.rad2deg(torch.acos(cos)).double()
        self.angle_sum += angle.sum()
        self.count += angle.numel()
        self.within += torch.stack([(angle < t).sum() for t in THRESHOLDS]).double()
        bins = (angle / BIN_DEG).long().clamp(max=N_BINS - 1)
        self.hist += torch.bincount(bins, minlength=N_BINS).double()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1)
        cdf = self.hist.cumsum(0)
        median_bin = torch.searchsorted(cdf, self.count / 2)
        out = {"mean_angle": self.angle_sum / n, "median_angle": (median_bin.double() + 0.5) * BIN_DEG}
        for t, w in zip(THRESHOLDS, self.within):
            out[f"within_{t:g}"] = w / n
        return out


class Normal(Task):
    name = "normal"
    kpi = "within_11.25"
    higher_is_better = {"mean_angle": False, "median_angle": False, **{f"within_{t:g}": True for t in THRESHOLDS}}

    def head(self, in_channels: int) -> nn.Module:
        return _NormalHead(in_channels)

    def sample_losses(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target.abs().sum(1) > 0
        cos = (unit(pred.float()) * target).sum(1)
        loss = (1 - cos) * valid
        counts = valid.flatten(1).sum(1)
        return loss.flatten(1).sum(1) / counts.clamp(min=1), counts > 0

    def metric(self) -> Metric:
        return NormalMetric()


class _NormalHead(DenseHead):
    """Outputs unit vectors, so metrics and loss see normals."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, 3)

    def forward(self, representation: Tensor, size: tuple[int, int]) -> Tensor:
        return unit(super().forward(representation, size))
