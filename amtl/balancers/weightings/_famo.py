"""FAMO: fast adaptive multitask optimization.

Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023 (official code:
github.com/Cranial-XIX/FAMO). Task logits ``xi`` (zeros at start) give ``z = softmax(xi)``; the
objective is ``sum_t (z_t / c) log L_t`` with ``c = sum_t z_t / L_t`` (detached), so task t's loss
gradient is scaled by ``z_t / (c L_t)`` (these multipliers sum to 1: :attr:`weights`). After a step,
``delta_t = log L_t(before) - log L_t(after)`` and ``xi`` takes an Adam step (lr ``w_lr``, weight
decay ``gamma``) along ``J_softmax(xi)^T delta``, shifting weight toward tasks whose loss fell least.

The official update evaluates the *post-step* loss on the *same* batch, which costs an extra forward.
By default this implementation uses the next step's losses instead: at the start of :meth:`terms`
the pending update is applied with ``delta = log L(theta_t, B_t) - log L(theta_{t+1}, B_{t+1})``.
That is free and the batch difference is zero-mean noise, but the update is one step late. A trainer
that wants the exact rule calls :meth:`update` with the re-evaluated losses on the same batch after
the optimizer step; then no delayed update happens. Losses are floored at 1e-8 (the official
``+ 1e-8``) and the official "minimum losses" are 0. Tasks absent from either step get ``delta = 0``.
The official code also clips the shared gradient norm to 1: that belongs to the trainer.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import HParam, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import as_cpu

LOSS_FLOOR = 1e-8


@register_weighting
class FAMO(Weighting):
    name = "famo"
    hparams = (
        HParam("gamma", "float", 0.01, low=0.0, high=1.0,
               doc="weight decay of the task logits (the official default; the paper uses 0.001 on NYUv2)"),
        HParam("w_lr", "float", 0.025, low=1e-5, high=1.0, log=True, doc="Adam learning rate of the task logits"),
    )

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._logits = torch.zeros(len(self.tasks), dtype=torch.float32, requires_grad=True)
        self._opt = torch.optim.Adam([self._logits], lr=self.w_lr, weight_decay=self.gamma)
        self._pending: tuple[list[int], Tensor] | None = None  # (task indices, log L before the step)
        self._multipliers: dict[str, float] | None = None

    def _log_losses(self, losses: Mapping[str, Tensor]) -> tuple[list[int], Tensor]:
        idx = [self.tasks.index(t) for t in losses]
        stacked = torch.stack([losses[t].detach().float().reshape(()) for t in losses])
        return idx, stacked.clamp_min(LOSS_FLOOR).log().cpu()

    def _apply_update(self, idx: list[int], log_after: Tensor) -> None:
        assert self._pending is not None
        prev_idx, log_before = self._pending
        self._pending = None
        delta = torch.zeros(len(self.tasks))
        after = dict(zip(idx, log_after.tolist()))
        for i, before in zip(prev_idx, log_before.tolist()):
            if i in after:
                delta[i] = before - after[i]
        with torch.enable_grad():
            grad, = torch.autograd.grad(torch.softmax(self._logits, 0), self._logits, grad_outputs=delta)
        self._opt.zero_grad()
        self._logits.grad = grad
        self._opt.step()

    def update(self, losses: Mapping[str, Tensor]) -> None:
        """The official rule: call after the optimizer step with the losses re-evaluated on the
        same batch. Replaces the delayed update the next :meth:`terms` would otherwise make."""
        if self._pending is not None and losses:
            self._apply_update(*self._log_losses(losses))

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        tasks = list(step.losses)
        idx, log_now = self._log_losses(step.losses)
        if self._pending is not None:
            self._apply_update(idx, log_now)  # delayed update, see the module docstring
        z = torch.softmax(self._logits.detach(), 0)[idx]
        losses = torch.stack([step.losses[t].reshape(()) for t in tasks])
        losses = losses.to(torch.promote_types(losses.dtype, torch.float32)).clamp_min(LOSS_FLOOR)
        z = z.to(losses.device, losses.dtype)
        inv = z / losses.detach()
        c = inv.sum()
        self._multipliers = dict(zip(tasks, (inv / c).tolist()))
        if any(step.losses[t].requires_grad for t in tasks):
            self._pending = (idx, log_now)  # only training steps move the logits
        coef = z / c
        return {t: coef[i] * losses[i].log() for i, t in enumerate(tasks)}

    @property
    def weights(self) -> dict[str, float]:
        """Gradient multipliers ``z_t / (c L_t)`` of the last step (0 if absent from it);
        ``softmax(xi)`` before the first step."""
        if self._multipliers is None:
            return dict(zip(self.tasks, torch.softmax(self._logits.detach(), 0).tolist()))
        return {t: self._multipliers.get(t, 0.0) for t in self.tasks}

    @property
    def logit_weights(self) -> dict[str, float]:
        """``z = softmax(xi)``, the learned task preferences."""
        return dict(zip(self.tasks, torch.softmax(self._logits.detach(), 0).tolist()))

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else (list(self._pending[0]), self._pending[1].clone())
        return {"logits": as_cpu(self._logits), "optimizer": self._opt.state_dict(), "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self._logits.copy_(state["logits"])
        self._opt.load_state_dict(state["optimizer"])
        pending = state.get("pending")
        self._pending = None if pending is None else (list(pending[0]), pending[1].clone())
        self._multipliers = None
