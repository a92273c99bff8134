"""Dynamic weight average (DWA): weights from the rate of change of each task's epoch loss.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
``w_k = K softmax(r_k / T)`` with ``r_k = L_k(e-1) / L_k(e-2)`` the ratio of the last two epoch-mean
training losses (fed through :meth:`on_epoch_end`) and ``T`` the temperature; the weights sum to K.
Weights are 1 for the first two epochs (no ratio yet). A task missing from either of the last two
epochs gets ratio 1 (no observed change).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import HParam, StepInputs, Weighting
from amtl.balancers.method import register_weighting


def dwa_weights(ratios: Sequence[float], temperature: float) -> list[float]:
    """``K softmax(r / T)``.

    The ratio is *divided* by the temperature, as in the DWA paper and the MTAN code. The official
    AMTL repository (Samsung/Achievement-based-MTL, ``scale_based.DWA``) stores ``L / T`` as the
    previous loss and then divides by it, which computes ``exp(r * T)``: the temperature sharpens
    instead of smoothing. That bug is fixed here (regression test in tests/balancers).
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    return (len(ratios) * torch.softmax(r / temperature, dim=0)).tolist()


@register_weighting
class DynamicWeightAverage(Weighting):
    name = "dwa"
    hparams = (HParam("temperature", "float", 2.0, low=1e-3, high=100.0, log=True,
                      doc="softmax temperature T; larger values give more uniform weights"),)

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._history: list[dict[str, float]] = []  # epoch-mean training losses, oldest first
        self._weights = {t: 1.0 for t in self.tasks}

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        return {t: self._weights[t] * loss for t, loss in step.losses.items()}

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def on_epoch_end(self, mean_train_losses: Mapping[str, float]) -> None:
        self._history.append({t: float(v) for t, v in mean_train_losses.items()
                              if t in self.tasks and math.isfinite(float(v))})
        self._history = self._history[-2:]  # only the last two epochs are ever read
        self._recompute()

    def _recompute(self) -> None:
        if len(self._history) < 2:
            self._weights = {t: 1.0 for t in self.tasks}
            return
        older, newer = self._history
        ratios = [newer[t] / older[t] if t in older and t in newer and older[t] > 0 else 1.0
                  for t in self.tasks]
        self._weights = dict(zip(self.tasks, dwa_weights(ratios, self.temperature)))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = [dict(h) for h in state["history"]]
        self._recompute()
