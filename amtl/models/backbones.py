"""torchvision trunks (ResNet-18/50, MobileNetV3, EfficientNet-V2-S) as shared encoders.

Nothing is downloaded: weights are random unless ``weights_path`` points to a local state dict of
the torchvision classification model (e.g. a file saved from ``resnet18(weights=...)``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from amtl.models.base import IMAGENET_MEAN, IMAGENET_STD

BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_v2_s")


def _stages(model: nn.Module, name: str) -> nn.Sequential:
    """The trunk as a sequence of stages (classifier dropped)."""
    if name.startswith("resnet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4)
    return model.features


class TorchvisionEncoder(nn.Module):
    """A torchvision trunk fused at strides 8 and 32 into a representation at stride 8.

    Dense tasks need spatial detail that the stride-32 output lacks, so the stride-8 features are
    added to the upsampled deep ones (a one-level FPN). ``self.last`` is the last shared layer.
    """

    def __init__(self, name: str = "resnet18", width: int = 64, weights_path: str | Path | None = None) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
        model = getattr(torchvision.models, name)(weights=None)
        if weights_path is not None:
            load_local_weights(model, weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stages = _stages(model, name)
        # Probe once to find the last stage at stride <= 8 and the channel counts.
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64)
            self._mid, mid_ch, deep_ch = 0, 0, 0
            for i, stage in enumerate(self.stages.eval()):
                x = stage(x)
                if 64 // x.shape[-1] <= 8:
                    self._mid, mid_ch = i, x.shape[1]
                deep_ch = x.shape[1]
        self.stages.train()
        self.lateral_mid = nn.Conv2d(mid_ch, width, 1)
        self.lateral_deep = nn.Conv2d(deep_ch, width, 1)
        self.last = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(min(8, width), width), nn.ReLU(inplace=True))
        self.out_channels = width

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std
        mid = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == self._mid:
                mid = x
        fused = self.lateral_mid(mid) + F.interpolate(self.lateral_deep(x), size=mid.shape[-2:],
                                                      mode="bilinear", align_corners=False)
        return self.last(fused)


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local torchvision state dict; the classifier head may be missing or differ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist; pass a local .pth state dict")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(f"weights file '{path}' does not fit the backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
