"""GradNorm: learned weights that balance gradient norms by relative training rate.

Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks", ICML 2018. With ``G_t = w_t ||grad_W L_t||`` at the last shared layer ``W``
(``step.last_shared_params``), ``Lhat_t = L_t / L_t(0)`` (``L_t(0)``: the loss at the first step the
task appeared) and ``r_t = Lhat_t / mean(Lhat)``, the weights minimise
``sum_t |G_t - mean(G) * r_t ** alpha|`` (the target treated as a constant) with their own Adam
(lr ``w_lr``, 0.025 as in the paper), then are renormalised to sum to T and kept positive.

Design: :meth:`terms` measures ``||grad_W L_t||`` (one extra backward per task, to ``W`` only, with
the graph retained; under data parallelism the ``[T, |W|]`` gradients are averaged over ranks first,
so every rank measures the global gradient) and returns ``w_t L_t`` with the *current* weights
detached, so the model's gradient is exactly ``sum_t w_t grad L_t``; the weight update happens in
:meth:`after_step` and takes effect from the next step, as in the paper. Tasks absent from a step
keep their weights; the present ones are renormalised so that all T still sum to T.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import HParam, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import as_cpu

MIN_WEIGHT = 1e-4  # Adam may step a weight below zero; a negative loss weight makes no sense


@register_weighting
class GradNorm(Weighting):
    name = "gradnorm"
    hparams = (
        HParam("alpha", "float", 1.5, low=0.0, high=5.0,
               doc="asymmetry: how strongly slow-training tasks get larger gradient norms (0: equal norms)"),
        HParam("w_lr", "float", 0.025, low=1e-5, high=1.0, log=True,
               doc="Adam learning rate of the task weights"),
    )

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._w = torch.ones(len(self.tasks), dtype=torch.float32, requires_grad=True)
        self._opt = torch.optim.Adam([self._w], lr=self.w_lr)
        self._initial = torch.full((len(self.tasks),), float("nan"))  # L_t(0); nan = not seen yet
        self._pending: tuple[list[int], Tensor, Tensor] | None = None  # (indices, norms, losses)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        tasks = list(step.losses)
        idx = [self.tasks.index(t) for t in tasks]
        params = step.last_shared_params
        if not params:
            raise ValueError("'gradnorm' needs StepInputs.last_shared_params (the last shared layer)")
        if all(step.losses[t].requires_grad for t in tasks):
            rows = []
            for t in tasks:
                grads = torch.autograd.grad(step.losses[t], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g.detach()).float().reshape(-1)
                                       for g, p in zip(grads, params)]))
            # Norms of the *global* task gradients: with several ranks, averaging the [T, D] rows is
            # the global gradient (a mean of rank norms would not be its norm).
            norms = step.ranks.mean_(torch.stack(rows)).norm(dim=1)
            losses = torch.stack([step.losses[t].detach().float().reshape(()) for t in tasks])
            self._pending = (idx, norms.cpu(), losses.cpu())
            for i, loss in zip(idx, losses.tolist()):
                if torch.isnan(self._initial[i]):
                    self._initial[i] = loss
        w = self._w.detach()
        return {t: w[i].item() * step.losses[t] for t, i in zip(tasks, idx)}

    def after_step(self, step: StepInputs) -> None:
        if self._pending is None:
            return
        idx, norms, losses = self._pending
        self._pending = None
        absent = [i for i in range(len(self.tasks)) if i not in idx]
        kept = self._w.detach()[absent].clone()
        G = self._w[idx] * norms
        rel = losses / self._initial[idx].clamp_min(1e-12)
        rate = rel / rel.mean().clamp_min(1e-12)
        target = (G.mean() * rate ** self.alpha).detach()
        self._opt.zero_grad()
        (G - target).abs().sum().backward()
        self._opt.step()
        with torch.no_grad():
            self._w[absent] = kept
            present = self._w[idx].clamp_min(MIN_WEIGHT)
            budget = max(len(self.tasks) - float(kept.sum()), MIN_WEIGHT * len(idx))
            self._w[idx] = present * budget / present.sum()

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self._w.detach().tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"w": as_cpu(self._w), "initial": self._initial.clone(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self._w.copy_(state["w"])
        self._initial = state["initial"].clone()
        self._opt.load_state_dict(state["optimizer"])
        self._pending = None
