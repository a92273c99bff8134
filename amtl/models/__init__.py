"""Multi-task models: a shared encoder and one head per task."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from amtl.models.backbones import BACKBONES, TorchvisionEncoder
from amtl.models.base import MultiTaskModel
from amtl.models.small import SmallEncoderDecoder
from amtl.tasks.base import Task

MODELS = ("small", *BACKBONES)


def build_model(name: str, tasks: Sequence[Task], width: int | None = None,
                weights_path: str | Path | None = None) -> MultiTaskModel:
    """``small`` (default, CPU-friendly) or a torchvision trunk from ``BACKBONES``."""
    if name == "small":
        if weights_path is not None:
            raise ValueError("the 'small' model has no pretrained weights; drop weights_path")
        encoder: SmallEncoderDecoder | TorchvisionEncoder = SmallEncoderDecoder(width or 32)
    elif name in BACKBONES:
        encoder = TorchvisionEncoder(name, width or 64, weights_path)
    else:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    heads = {t.name: t.head(encoder.out_channels) for t in tasks}
    return MultiTaskModel(encoder, heads, last_shared=encoder.last)


__all__ = ["BACKBONES", "MODELS", "MultiTaskModel", "build_model"]
