"""GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020), the combination step of Algorithm 1 (lines 10-15) on the gradient entries,
as torchjd's ``GradDrop`` applies it to any Jacobian: per entry, the positive-sign purity
``P = (1 + sum_t g_t / sum_t |g_t|) / 2`` and a uniform draw ``U``; task t keeps its entry where it
is positive and ``P > U`` or negative and ``P < U``, and ``leak`` lets that share of every dropped
entry through. The update is the sum of the kept entries.

LibMTL applies it to the representation's gradients instead (with the input's sign, summed over the
batch). Here it reads the shared parameters' gradients, which makes the masks and the update the
same under data parallelism as in one process: every rank holds the global matrix and draws the same
``U`` from the run's seed (each step's draw seeds a generator on the gradients' device, so no
``[D]`` tensor crosses from the host).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from amtl.balancers.base import Combined, GradientMatrix, HParam, MatrixAggregator
from amtl.balancers.method import register_aggregator


@register_aggregator
class GradDrop(MatrixAggregator):
    name = "graddrop"
    context = ("seed",)
    DEFAULT_SEED = 0
    hparams = (HParam("leak", "float", 0.0, low=0.0, high=1.0,
                      doc="share of every dropped gradient entry let through (0: pure sign dropout)"),)
    leak: float

    def __init__(self, seed: int | None = None, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.generator = torch.Generator().manual_seed(self.DEFAULT_SEED if seed is None else int(seed))

    def combine(self, matrix: GradientMatrix) -> Combined:
        grads = matrix.grads
        purity = 0.5 * (1.0 + grads.sum(0) / grads.abs().sum(0).clamp(min=torch.finfo(grads.dtype).tiny))
        draw_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        device_generator = torch.Generator(device=grads.device).manual_seed(draw_seed)
        uniform = torch.rand(purity.shape, generator=device_generator, device=grads.device, dtype=grads.dtype)
        keep = ((purity > uniform) & (grads > 0)) | ((purity < uniform) & (grads < 0))  # [T, D]
        masked = grads * (self.leak + (1.0 - self.leak) * keep.to(grads.dtype))
        # Reported weight: the share of its gradient each task contributes, <masked_t, g_t> / |g_t|^2.
        norms = (grads * grads).sum(1)
        kept = (masked * grads).sum(1) / norms.clamp(min=torch.finfo(grads.dtype).tiny)
        return Combined(update=masked.sum(0), weights=torch.where(norms > 0, kept, torch.ones_like(kept)).double())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
