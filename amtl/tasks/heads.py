"""A small dense prediction head shared by the dense tasks."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DenseHead(nn.Module):
    """conv3x3 -> GroupNorm -> ReLU -> conv1x1, then bilinear upsampling to the input size.

    GroupNorm rather than BatchNorm: its output does not depend on the other samples of the batch, so
    a DDP step over shards equals the single-process step over the whole batch.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(min(8, hidden), hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, representation: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.body(representation)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out
