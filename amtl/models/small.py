"""The default model: a small U-Net-style encoder-decoder, fast on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amtl.models.base import IMAGENET_MEAN, IMAGENET_STD


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm: per-sample statistics, so DDP shards compute exactly what one process would.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class SmallEncoderDecoder(nn.Module):
    """Encoder to 1/8 resolution, decoder with skips back to 1/2; output ``[B, width, H/2, W/2]``.

    ``width=32`` gives about 170k parameters. ``self.last`` is the last shared layer.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = _block(3, w // 2)
        self.down1 = _block(w // 2, w, stride=2)             # 1/2
        self.down2 = _block(w, 2 * w, stride=2)              # 1/4
        self.down3 = nn.Sequential(_block(2 * w, 2 * w, stride=2), _block(2 * w, 2 * w, dilation=2))  # 1/8
        self.up2 = _block(4 * w, 2 * w)                      # 1/4, with skip from down2
        self.last = _block(3 * w, w)                         # 1/2, with skip from down1
        self.out_channels = w

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std
        s1 = self.down1(self.stem(x))
        s2 = self.down2(s1)
        s3 = self.down3(s2)
        u2 = self.up2(torch.cat([F.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False), s2], 1))
        return self.last(torch.cat([F.interpolate(u2, size=s1.shape[-2:], mode="bilinear", align_corners=False), s1], 1))
