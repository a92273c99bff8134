"""A method = a weighting + an optional aggregator + a gradient source; the registry builds one by name.

The engine in :meth:`Method.backward` fills ``.grad`` of every trainable parameter:

- weighting only: one backward of ``sum(terms)``; no extra cost over plain summation.
- with an aggregator, ``source`` picks the gradients the aggregator sees:
  ``shared`` (all shared parameters; exact), ``last`` (the last shared layer's parameters) or
  ``representation`` (the shared representation; the "UB" variants). The aggregator turns their
  Gramian into task weights ``alpha``; shared parameters receive ``sum_t alpha_t grad(term_t)`` and
  task-specific heads their own task's gradient (times ``alpha_t`` where ``Aggregator.heads`` says so).
  A :class:`~amtl.balancers.base.MatrixAggregator` instead reads the flat ``[T, D]`` matrix of all
  shared parameters and returns the shared parameters' update itself.

Under data parallelism (``StepInputs.ranks`` of size N > 1) the aggregator sees the global batch's
Gramian, so every rank computes the same ``alpha`` as one process would: parameter-space task
gradients (``shared``/``last``) are averaged over ranks before the Gramian (one collective over a
``[T, D]`` buffer), and for ``representation`` the ``[T, T]`` Gramians of the ranks' sample blocks
are summed (divided by N^2, see :class:`~amtl.distributed.Collectives`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers._layerwise import LayerwiseGramian
from amtl.balancers.base import (Aggregator, Combined, GradientMatrix, HParam, HParamError, MatrixAggregator, Rows,
                                 StepInputs, Weighting, combine_rows, gramian_of, pairwise_gramian)

SOURCES = ("shared", "last", "representation")
#: Keyword arguments of :func:`make` that describe the run rather than the method.
CONTEXT_KEYS = ("num_instances", "seed", "potentials")
SOURCE_HPARAM = HParam("source", "str", "shared", choices=SOURCES,
                       doc="gradients the aggregator sees: all shared parameters, the last shared "
                           "layer, or the shared representation (UB)")

_WEIGHTINGS: dict[str, type[Weighting]] = {}
_AGGREGATORS: dict[str, type[Aggregator]] = {}
#: Names that stand for a fixed weighting+aggregator pair (e.g. ``imtl`` = IMTL-L + IMTL-G).
_ALIASES: dict[str, tuple[str, str | None]] = {}


def register_weighting(cls: type[Weighting]) -> type[Weighting]:
    if not cls.name or cls.name in _WEIGHTINGS or cls.name in _AGGREGATORS:
        raise ValueError(f"weighting name {cls.name!r} is empty or taken")
    _WEIGHTINGS[cls.name] = cls
    return cls


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    if not cls.name or cls.name in _WEIGHTINGS or cls.name in _AGGREGATORS:
        raise ValueError(f"aggregator name {cls.name!r} is empty or taken")
    _AGGREGATORS[cls.name] = cls
    return cls


def register_alias(name: str, weighting: str, aggregator: str | None) -> None:
    _ALIASES[name] = (weighting, aggregator)


@dataclass
class StepReport:
    """What one balancer step tells the trainer: task weights and gradient diagnostics."""

    weights: dict[str, float]
    cosines: dict[str, float] = field(default_factory=dict)  # "a|b" -> cosine of task gradients
    condition_number: float | None = None                    # of the Gramian G G^T


def _resolve(name: str) -> tuple[str, str | None]:
    """``amtl`` -> (amtl, None); ``pcgrad`` -> (ew, pcgrad); ``amtl+pcgrad`` -> (amtl, pcgrad)."""
    name = name.strip().lower()
    if name in _ALIASES:
        return _ALIASES[name]
    if "+" in name:
        left, _, right = name.partition("+")
        if left not in _WEIGHTINGS:
            raise HParamError(f"unknown weighting '{left}' in '{name}' (weightings: {', '.join(sorted(_WEIGHTINGS))})")
        if right not in _AGGREGATORS:
            raise HParamError(f"unknown aggregator '{right}' in '{name}' (aggregators: {', '.join(sorted(_AGGREGATORS))})")
        return left, right
    if name in _WEIGHTINGS:
        return name, None
    if name in _AGGREGATORS:
        return "ew", name
    raise HParamError(f"unknown balancer '{name}' (known: {', '.join(names())}, or weighting+aggregator)")


def component(name: str) -> type[Weighting] | type[Aggregator] | None:
    """The weighting or aggregator class registered as ``name`` (None for aliases and unknown names)."""
    return _WEIGHTINGS.get(name) or _AGGREGATORS.get(name)


def names() -> list[str]:
    """Every single method name (combinations ``weighting+aggregator`` are also accepted)."""
    return sorted(set(_WEIGHTINGS) | set(_AGGREGATORS) | set(_ALIASES))


def hparam_specs(name: str) -> dict[str, HParam]:
    """Hyperparameters of a method name, including ``source`` when it has an aggregator."""
    weighting, aggregator = _resolve(name)
    specs = {h.name: h for h in _WEIGHTINGS[weighting].hparams}
    if aggregator is not None:
        for h in _AGGREGATORS[aggregator].hparams:
            if h.name in specs:
                raise TypeError(f"hyperparameter {h.name!r} declared by both {weighting} and {aggregator}")
            specs[h.name] = h
        specs["source"] = source_hparam(_AGGREGATORS[aggregator])
    return specs


def source_hparam(cls: type[Aggregator]) -> HParam:
    """``source`` with the choices the aggregator can read (all three, or ``shared`` alone)."""
    if cls.sources == SOURCES:
        return SOURCE_HPARAM
    return replace(SOURCE_HPARAM, choices=cls.sources,
                   doc=f"{SOURCE_HPARAM.doc}; '{cls.name}' reads gradient entries of all shared parameters")


def context_keys(name: str) -> set[str]:
    """The run context (:data:`CONTEXT_KEYS`) a method name reads, e.g. ``{"potentials"}`` for AMTL."""
    weighting, aggregator = _resolve(name)
    keys = set(_WEIGHTINGS[weighting].context)
    return keys | set(_AGGREGATORS[aggregator].context) if aggregator is not None else keys


def registry() -> dict[str, dict[str, HParam]]:
    """Every method name with its hyperparameter specs."""
    return {n: hparam_specs(n) for n in names()}


def make(name: str, tasks: Sequence[str], **hparams: Any) -> "Method":
    """Build a method by name, e.g. ``make("amtl+pcgrad", tasks=["segmentation", "depth"], focusing=2)``.

    Each hyperparameter goes to the component that declares it; an unknown one is an error.
    Keyword arguments that are not hyperparameters but run context (:data:`CONTEXT_KEYS`: the training
    ``seed`` of stochastic methods, ``num_instances`` of instance-level ones, the single-task
    ``potentials`` of AMTL) go to the weighting and the aggregator that declare them in ``context``.
    """
    weighting_name, aggregator_name = _resolve(name)
    specs = hparam_specs(name)
    source = hparams.pop("source", "shared")
    w_cls = _WEIGHTINGS[weighting_name]
    offered = {k: hparams.pop(k) for k in CONTEXT_KEYS if k in hparams}

    def context(cls: type) -> dict[str, Any]:
        return {k: v for k, v in offered.items() if k in cls.context}

    unknown = sorted(set(hparams) - set(specs))
    if unknown:
        raise HParamError(f"'{name}' has no hyperparameter {', '.join(map(repr, unknown))} "
                          f"(valid: {', '.join(specs) or 'none'})")
    w_kwargs = {k: v for k, v in hparams.items() if k in {h.name for h in w_cls.hparams}}
    weighting = w_cls(tasks, **w_kwargs, **context(w_cls))
    aggregator = None
    if aggregator_name is not None:
        a_cls = _AGGREGATORS[aggregator_name]
        aggregator = a_cls(**{k: v for k, v in hparams.items() if k in {h.name for h in a_cls.hparams}},
                           **context(a_cls))
        source = source_hparam(a_cls).validate(source, name)
    elif source != "shared":
        raise HParamError(f"'{name}' has no gradient aggregator, so 'source' does not apply")
    return Method(name, weighting, aggregator, source)


class Method:
    """A weighting, an optional aggregator and the gradient source the aggregator reads."""

    def __init__(self, name: str, weighting: Weighting, aggregator: Aggregator | None = None,
                 source: str = "shared") -> None:
        self.name = name
        self.weighting = weighting
        self.aggregator = aggregator
        self.source = source
        self.tasks = weighting.tasks
        self._last_alpha: dict[str, float] | None = None
        self._last_inputs: StepInputs | None = None
        #: ``source='shared'``: form the Gramian layer by layer (see ``_layerwise``) where the
        #: encoder allows it; False forces the plain per-task VJPs (same result, for comparisons).
        self.layerwise = True

    # -- events forwarded to the weighting ---------------------------------------------------
    def parameters(self) -> list[Tensor]:
        return self.weighting.parameters()

    def after_step(self, step: StepInputs | None = None) -> None:
        """Call after the optimizer step (GradNorm and others update themselves here); by default
        with the inputs of the last :func:`backward` call."""
        step = step if step is not None else self._last_inputs
        if step is not None:
            self.weighting.after_step(step)

    def on_epoch_end(self, mean_train_losses: Mapping[str, float]) -> None:
        self.weighting.on_epoch_end(mean_train_losses)

    def on_validation(self, kpis: Mapping[str, float]) -> None:
        self.weighting.on_validation(kpis)

    @property
    def weights(self) -> dict[str, float]:
        """Effective task weights: the weighting's weights times the aggregator's alphas."""
        w = self.weighting.weights
        if self._last_alpha is None:
            return dict(w)
        return {t: w[t] * self._last_alpha.get(t, 0.0) for t in w}

    @property
    def needs_kpis(self) -> bool:
        return self.weighting.needs_kpis

    def state_dict(self) -> dict[str, Any]:
        state = {"weighting": self.weighting.state_dict()}
        if self.aggregator is not None:
            state["aggregator"] = self.aggregator.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weighting.load_state_dict(state.get("weighting", {}))
        if self.aggregator is not None:
            self.aggregator.load_state_dict(state.get("aggregator", {}))

    # -- the engine ------------------------------------------------------------------------
    def backward(self, step: StepInputs, diagnose: bool = False,
                 loss_scale: Tensor | float | None = None) -> StepReport:
        """Fill ``.grad`` of model and weighting parameters for one step.

        ``loss_scale`` (fp16 mixed precision: ``GradScaler.scale``'s factor) multiplies every term
        before differentiation, so ``.grad`` holds ``loss_scale`` times the gradient exactly as after
        ``scaler.scale(loss).backward()``; the aggregator still sees the unscaled Gramian. If that
        Gramian is not finite (an inf/nan task gradient) the aggregator is skipped and ``alpha`` is
        all ones: the update is then non-finite too, and the scaler skips the step.

        ``diagnose`` asks for gradient cosines and the Gramian's condition number even when the
        method has no aggregator (then measured on the representation: cheap, heads only).

        With an aggregator and ``step.representation`` given, the shared parameters are assumed to
        reach the losses only through the representation ``z`` (the model contract). Then each task
        costs one backward through its own head, giving ``dL_t/dz`` and the head's gradient at once;
        the encoder is traversed once more per task for ``source='shared'`` (``z``'s vector-Jacobian
        product with ``dL_t/dz``; input gradients only, where the layer-wise engine of
        :mod:`amtl.balancers._layerwise` handles the encoder), and once in total for
        ``last``/``representation`` (with ``sum_t alpha_t dL_t/dz``). No head is traversed twice.
        """
        terms = self.weighting.terms(step)
        tasks = list(terms)
        if self.aggregator is None:
            report = StepReport(weights=self.weights)
            if diagnose and step.representation is not None and len(tasks) > 1:
                grads = _flat_grads(terms, [step.representation], retain_graph=True)
                _fill_diagnostics(report, tasks, gramian_of(grads))
            objective = torch.stack(list(terms.values())).sum()
            (objective if loss_scale is None else objective * loss_scale).backward()
            return report
        if loss_scale is not None:
            terms = {t: term * loss_scale for t, term in terms.items()}

        own = step.task_params + [p for p in self.weighting.parameters() if p.requires_grad]
        z = step.representation
        if self.source == "representation" and z is None:
            raise ValueError("source='representation' needs StepInputs.representation")
        chain = z is not None and z.grad_fn is not None
        # Gradients are always computed with autograd.grad, never read back from .grad: each row of
        # G is one task's gradient alone. (The official AMTL trainer's PCGrad/CAGrad never zeroed
        # .grad between its per-task backward passes, so each "task gradient" was a running sum.)
        own_rows: OwnGrads = []
        # A MatrixAggregator reads the flat [T, D] matrix itself, so no engine may skip forming it.
        entries = isinstance(self.aggregator, MatrixAggregator)
        split = entries and self.aggregator.independent_batches > 1
        if chain and not split:
            rep, own_rows = _task_pass(terms, z, own)  # [T, *z.shape]
        layerwise = None
        batches = None
        if self.source == "representation":
            rows, grads = None, rep.flatten(1)
        else:
            params = step.shared_params if self.source == "shared" else step.last_shared_params
            if not params:
                field_name = "shared_params" if self.source == "shared" else "last_shared_params"
                raise ValueError(f"source={self.source!r} needs StepInputs.{field_name}")
            # The shared-source passes may free the encoder graph at the end: nothing traverses it later.
            if (self.source == "shared" and chain and self.layerwise and step.ranks.size == 1
                    and len(tasks) <= _PAIRWISE_MAX_TASKS and not entries):
                # None where the encoder has a parametrised op it cannot handle: then the plain VJPs.
                layerwise = LayerwiseGramian.build(z, params, rep, release=True)
            if split:
                rows = None
                grads, batches, own_rows = _split_batch_rows(step, terms, params, own,
                                                             self.aggregator.independent_batches, self.name)
            else:
                if layerwise is None:
                    if chain:
                        rows = _vjp_rows(z, params, rep, release=self.source == "shared")
                    else:
                        rows, own_rows = _direct_rows(terms, params, own)
                grads = None
                if layerwise is None and (step.ranks.size > 1 or len(tasks) > _PAIRWISE_MAX_TASKS or entries):
                    grads = _flatten_rows(rows, params)
                    rows = None
                if step.ranks.size > 1:
                    # Parameters are shared by all ranks: the global task gradients are the rank mean.
                    step.ranks.mean_(grads)
        if layerwise is not None:
            gramian = layerwise.gramian
        else:
            gramian = gramian_of(grads) if rows is None else pairwise_gramian(rows)
        if self.source == "representation" and step.ranks.size > 1:
            # Each rank holds its own samples' block of the global dL_t/dz (times N), so the global
            # Gramian is the sum of the blocks' Gramians over N^2: one [T, T] collective.
            gramian = step.ranks.sum_(gramian) / step.ranks.size ** 2
        if loss_scale is not None:
            gramian = gramian / torch.as_tensor(loss_scale, dtype=gramian.dtype, device=gramian.device) ** 2
        combined = None
        if loss_scale is None or bool(torch.isfinite(gramian).all()):
            if entries:
                combined = self._combine(tasks, terms, grads, params, loss_scale, batches, gramian)
                alpha = combined.weights.to(gramian)
            else:
                alpha = self.aggregator.weights(gramian).to(gramian.device)
        else:
            # An overflowed scaled gradient: the scaler will skip this step on every rank (the
            # Gramian is global, so all ranks land here); solvers must not see the inf/nan.
            gramian = torch.eye(len(tasks), dtype=gramian.dtype, device=gramian.device)
            alpha = torch.ones(len(tasks), dtype=gramian.dtype, device=gramian.device)
        report = _report_alpha(self, tasks, alpha, gramian)
        # Heads (and weighting parameters): their own task's gradient, or alpha_t times it as when
        # sum_t alpha_t L_t is back-propagated (the official code of Nash-MTL; see Aggregator.heads).
        head_alpha = None
        if self.aggregator.heads == "weighted":
            head_alpha = list(self._last_alpha.values())
            if combined is not None and combined.head_weights is not None:
                head_alpha = combined.head_weights.tolist()
        _accumulate_own(own, own_rows, head_alpha)

        if self.source == "shared":
            if combined is not None:
                update = combined.update.to(grads.dtype)
                _assign_flat(step.shared_params, update if loss_scale is None else update * loss_scale)
            elif layerwise is not None:
                _accumulate(step.shared_params, layerwise.update(list(self._last_alpha.values())))
            elif rows is None:
                _assign_flat(step.shared_params, alpha.to(grads.dtype) @ grads)
            else:
                _accumulate(step.shared_params, combine_rows(rows, list(self._last_alpha.values())))
        elif chain:
            update = torch.tensordot(alpha.to(rep.dtype), rep, dims=1)
            torch.autograd.backward(z, update, inputs=step.shared_params)
        else:
            weighted = torch.stack([a * terms[t] for a, t in zip(alpha.to(terms[tasks[0]].dtype), tasks)]).sum()
            torch.autograd.backward(weighted, inputs=step.shared_params)
        return report

    def _combine(self, tasks: list[str], terms: Mapping[str, Tensor], grads: Tensor, params: list[Tensor],
                 loss_scale: Tensor | float | None, batches: Tensor | None, gramian: Tensor) -> Combined:
        """Serve a :class:`MatrixAggregator` its unscaled matrix, the terms' values and the blocks."""
        values = torch.stack([terms[t].detach() for t in tasks]).to(grads.dtype)
        if loss_scale is not None:
            grads, values = grads / loss_scale, values / loss_scale
            batches = None if batches is None else batches / loss_scale
        matrix = GradientMatrix(grads, tasks, values, [p.numel() for p in params], batches, gramian)
        return self.aggregator.combine(matrix)


def backward(method: Method, losses: Mapping[str, Tensor], shared: Iterable[Tensor], heads: Iterable[Tensor],
             representation: Tensor | None = None, last_shared: Iterable[Tensor] = (), step: int = 0,
             epoch: int = 0) -> StepReport:
    """One balancer step inside your own training loop: fill ``.grad`` of ``shared`` and ``heads``.

    ``losses``: each task's scalar loss; ``shared``: the parameters all tasks use (the encoder);
    ``heads``: the task-specific ones (each receives its task's gradient, times alpha_t where the
    aggregator weights heads: ``Aggregator.heads``). ``representation``,
    the encoder output the heads read, lets gradient methods traverse each head once and is needed
    for ``source='representation'``; ``last_shared`` for ``source='last'``. Then call
    ``optimizer.step()`` and ``method.after_step()``; give validation KPIs (higher is better) to
    ``method.on_validation`` for methods that read them (AMTL, DTP), and each epoch's mean training
    losses to ``method.on_epoch_end`` (DWA). The optimizer also updates ``method.parameters()`` (UW).
    """
    if "num_instances" in method.weighting.context:
        raise HParamError(f"'{method.name}' weights single training samples; it runs in amtl's Trainer, "
                          f"which feeds it sample ids and per-sample losses")
    inputs = StepInputs(losses=dict(losses), shared_params=list(shared), task_params=list(heads),
                        last_shared_params=list(last_shared), representation=representation, step=step,
                        epoch=epoch)
    report = method.backward(inputs)
    method._last_inputs = inputs  # for after_step(); the Trainer passes its inputs itself
    return report


def _report_alpha(method: Method, tasks: list[str], alpha: Tensor, gramian: Tensor) -> StepReport:
    """Record alpha and the Gramian diagnostics with one device-to-host copy of each."""
    method._last_alpha = dict(zip(tasks, alpha.detach().cpu().tolist()))
    report = StepReport(weights=method.weights)
    _fill_diagnostics(report, tasks, gramian)
    return report


def _task_pass(terms: Mapping[str, Tensor], z: Tensor, own: list[Tensor]) -> tuple[Tensor, OwnGrads]:
    """``dterm_t/dz`` for every task, stacked, and each task's gradients w.r.t. ``own``.

    One backward per task that stops at ``z``: it traverses only that task's head.
    """
    rows, own_rows = [], []
    for term in terms.values():
        out = torch.autograd.grad(term, [z] + own, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(z) if out[0] is None else out[0])
        own_rows.append(list(out[1:]))
    return torch.stack(rows), own_rows


#: Per task, its gradients w.r.t. the heads and weighting parameters (None where it does not reach one).
OwnGrads = list[list[Tensor | None]]


def _accumulate_own(own: list[Tensor], own_rows: OwnGrads, alpha: Sequence[float] | None) -> None:
    """Add ``sum_t alpha_t * own_rows[t]`` (``alpha`` None: plain sum) to the ``own`` parameters' ``.grad``."""
    acc: list[Tensor | None] = [None] * len(own)
    for t, row in enumerate(own_rows):
        for i, g in enumerate(row):
            if g is None:
                continue
            g = g if alpha is None else g * alpha[t]
            acc[i] = g if acc[i] is None else acc[i] + g
    _accumulate(own, acc)


# Up to this many tasks the Gramian is summed from per-parameter dot products (T(T+1)/2 per
# parameter), which reads each gradient once and skips copying them into a [T, D] matrix; beyond
# it the number of small products grows faster than one flat matmul costs.
_PAIRWISE_MAX_TASKS = 6


def _split_batch_rows(step: StepInputs, terms: Mapping[str, Tensor], params: list[Tensor], own: list[Tensor],
                      parts: int, name: str) -> tuple[Tensor, Tensor, OwnGrads]:
    """The whole batch's ``[T, D]`` task gradients, the same on ``parts`` disjoint parts of the batch
    ``[P, T, D]`` (see ``MatrixAggregator.independent_batches``), both global, and each task's
    gradients w.r.t. ``own``.

    Every term reaches the parameters through the per-sample losses, so a part's gradient is the
    vector-Jacobian product of those losses with ``d term / d l_i`` kept on the part's samples. The
    raw part gradients sum to the whole batch's; each is then rescaled to its part's mean
    (labelled samples of the task in the part, counted over all ranks; 0 for a part without one).
    """
    if step.sample_ids is None or set(step.sample_losses) != set(terms):
        raise HParamError(f"'{name}' splits each batch into independent parts; it needs per-sample losses and sample "
                          f"ids, which amtl's Trainer gives (not the backward() of a loop of your own)")
    tasks = list(terms)
    outputs = [step.sample_losses[t] for t in tasks]
    part = (step.sample_ids.to(outputs[0].device) + step.step) % parts
    masks = [part == k for k in range(parts)]
    ref = params[0]
    raw = torch.zeros(parts, len(tasks), sum(p.numel() for p in params), dtype=ref.dtype, device=ref.device)
    own_rows: OwnGrads = []
    for t, term in enumerate(terms.values()):
        out = torch.autograd.grad(term, outputs + own, retain_graph=True, allow_unused=True)
        # The per-sample losses this term depends on (its own task's, for every weighting here).
        used = [(o, g) for o, g in zip(outputs, out[:len(tasks)]) if g is not None]
        own_rows.append(list(out[len(tasks):]))
        for k, mask in enumerate(masks):
            if not used:
                continue
            grads = torch.autograd.grad([o for o, _ in used], params, grad_outputs=[g * mask for _, g in used],
                                        retain_graph=True, allow_unused=True)
            _flatten_into(raw[k, t], grads, params)
    counts = torch.stack([torch.stack([(step.valid[t] & mask).sum() for t in tasks]) for mask in masks])
    counts = step.ranks.sum_(counts.to(raw.dtype))  # [P, T] labelled samples per part, all ranks
    step.ranks.mean_(raw)
    whole = raw.sum(0)
    scale = torch.where(counts > 0, counts.sum(0) / counts.clamp(min=1), torch.zeros_like(counts))
    return whole, raw * scale[:, :, None], own_rows


def _vjp_rows(z: Tensor, params: list[Tensor], rep: Tensor, release: bool) -> Rows:
    """Row ``t``: the gradient w.r.t. ``params`` of ``<z, rep[t]>``, i.e. task ``t``'s gradient."""
    rows = []
    for t in range(rep.shape[0]):
        last = release and t == rep.shape[0] - 1
        out = torch.autograd.grad(z, params, grad_outputs=rep[t], retain_graph=not last, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(out, params)])
    return rows


def _direct_rows(terms: Mapping[str, Tensor], params: list[Tensor], own: list[Tensor]) -> tuple[Rows, OwnGrads]:
    """Per-task gradients w.r.t. ``params`` straight from the losses (no representation given), and
    w.r.t. ``own``."""
    rows, own_rows = [], []
    for term in terms.values():
        out = torch.autograd.grad(term, params + own, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(out[:len(params)], params)])
        own_rows.append(list(out[len(params):]))
    return rows, own_rows


def _flatten_rows(rows: Rows, params: list[Tensor]) -> Tensor:
    """The ``[T, D]`` gradient matrix (for the cross-rank mean, or many tasks)."""
    ref = rows[0][0] if params else torch.zeros(0)
    grads = torch.empty(len(rows), sum(p.numel() for p in params), dtype=ref.dtype, device=ref.device)
    for t, row in enumerate(rows):
        _flatten_into(grads[t], row, params)
    return grads


def _flatten_into(row: Tensor, grads: Sequence[Tensor | None], params: list[Tensor]) -> None:
    """Copy per-parameter gradients into one row of a flat matrix (``None``: zeros)."""
    offset = 0
    for g, p in zip(grads, params):
        n = p.numel()
        if g is None:
            row[offset:offset + n].zero_()
        else:
            row[offset:offset + n].copy_(g.reshape(-1))
        offset += n


def _accumulate(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Add to ``.grad`` as ``backward`` would (so gradient accumulation across calls still works)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone() if g.requires_grad else g
        else:
            p.grad.add_(g)


def _flat_grads(terms: Mapping[str, Tensor], inputs: list[Tensor], retain_graph: bool) -> Tensor:
    """Per-task gradients of ``terms`` w.r.t. ``inputs``, flattened into ``[T, D]``."""
    rows = []
    for term in terms.values():
        grads = torch.autograd.grad(term, inputs, retain_graph=retain_graph, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1)
                               for g, x in zip(grads, inputs)]))
    return torch.stack(rows)


def _assign_flat(params: list[Tensor], flat: Tensor) -> None:
    """Add slices of ``flat`` to ``.grad``; a fresh ``.grad`` is a view of ``flat`` (no copy)."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
        offset += n


def _fill_diagnostics(report: StepReport, tasks: list[str], gramian: Tensor) -> None:
    gramian = gramian.detach().cpu()  # one small copy; every number below is read on the host
    norms = gramian.diagonal().clamp(min=1e-30).sqrt()
    cos = (gramian / (norms[:, None] * norms[None, :])).tolist()
    report.cosines = {f"{a}|{b}": cos[i][j]
                      for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
    eig = torch.linalg.eigvalsh(gramian)
    report.condition_number = float(eig[-1] / eig[0].clamp(min=1e-30))
