"""Random loss weighting (RLW): fresh random task weights every step.

Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
TMLR 2022. ``w = softmax(z)``, ``z ~ N(0, I_T)`` drawn each step, so the weights sum to 1.
The draws come from the object's own :class:`torch.Generator` (seeded by the ``seed`` context
keyword, default 0), whose state is saved in :meth:`state_dict`: runs are reproducible, resumable,
and every DDP rank that builds the weighting with the same seed draws the same weights. All T
weights are drawn every step, whichever tasks are present, so the stream never depends on the batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import StepInputs, Weighting
from amtl.balancers.method import register_weighting


@register_weighting
class RandomLossWeighting(Weighting):
    name = "rlw"
    context = ("seed",)
    DEFAULT_SEED = 0

    def __init__(self, tasks: Sequence[str], seed: int | None = None, **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.DEFAULT_SEED if seed is None else int(seed))
        self._weights = torch.full((len(self.tasks),), 1.0 / len(self.tasks), dtype=torch.float64)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        z = torch.randn(len(self.tasks), generator=self._generator, dtype=torch.float64)
        self._weights = torch.softmax(z, dim=0)
        return {t: float(self._weights[self.tasks.index(t)]) * loss for t, loss in step.losses.items()}

    @property
    def weights(self) -> dict[str, float]:
        """The last draw (``1/T`` each before the first step)."""
        return dict(zip(self.tasks, self._weights.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "weights": self._weights.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._weights = state["weights"].clone().to(torch.float64)
