"""The model contract: a shared encoder and one head per task."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

# Per-channel statistics used to normalise [0, 1] images inside the model, so every dataset can hand
# over plain images and a pretrained torchvision trunk sees the input it was trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiTaskModel(nn.Module):
    """``encoder`` maps images to the shared representation; ``heads[task]`` maps it to predictions.

    Gradient balancers need three views of the shared part, all declared here:
    ``shared_parameters()`` (every encoder parameter), ``last_shared_layer()`` (the module whose
    output is the representation) and the representation itself (returned by ``encode``).
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], last_shared: nn.Module,
                 out_size_from_input: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self._last_shared = [last_shared]  # a list so it is not registered twice as a submodule
        self.out_size_from_input = out_size_from_input

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def encode(self, images: Tensor) -> Tensor:
        """The shared representation ``[B, C, h, w]``."""
        return self.encoder(images)

    def decode(self, representation: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """Every head's prediction at input resolution ``size``."""
        return {task: head(representation, size) for task, head in self.heads.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(images), tuple(images.shape[-2:]))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def last_shared_layer(self) -> nn.Module:
        return self._last_shared[0]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.last_shared_layer().parameters() if p.requires_grad]
