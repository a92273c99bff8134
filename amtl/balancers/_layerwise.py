"""Exact ``source='shared'`` Gramian without T full encoder backward passes ("layer-wise Gramian").

The plain engine runs one vector-Jacobian product of ``z`` per task w.r.t. every shared parameter:
each computes the input gradients *and* the weight gradients of the whole encoder. But the per-task
weight gradients are needed only for the Gramian, and the final update ``sum_t alpha_t g_t`` is
linear in the layers' output gradients. So here:

1. the autograd graph of ``z`` is walked to find the nodes that own shared parameters (2-D
   convolutions, batch/group norms); anything else owning one means falling back (``None``);
2. per task, one pass that asks autograd only for the gradient ``delta_t`` w.r.t. each such node's
   output (``GradientEdge(node, 0)``): autograd then skips every weight gradient;
3. per layer, the Gramian contribution from ``delta_1..delta_T`` and the saved forward input:
   option A forms the T weight gradients in one batched call and takes their dot products;
   option B (low resolution: few positions N, many weights) uses ``<g_s, g_t> = <D_s, U U^T D_t>``
   with ``U`` the unfolded input, and later needs one weight gradient of ``sum_t alpha_t D_t``;
   norm scales/shifts and biases have closed forms (sums of ``delta * x_hat`` and ``delta``);
4. once ``alpha`` is known, :meth:`LayerwiseGramian.update` returns each parameter's combined gradient.

Everything stays exact: the same sums as autograd's, only in another order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

# Nodes that may own shared parameters, with the next_functions slots of (weight, bias).
_CONV = "ConvolutionBackward0"
_BATCH_NORM = "NativeBatchNormBackward0"
_GROUP_NORM = "NativeGroupNormBackward0"
_PARAM_SLOTS = {1: "weight", 2: "bias"}
# Option B keeps an N x N kernel; above this many positions it would not be cheaper anyway (the
# cost model below says so long before), and this bounds its memory (4096^2 floats = 64 MiB).
_KERNEL_MAX_POSITIONS = 4096


@dataclass
class _Layer:
    """One parametrised node: where its parameters sit in ``params`` and what its forward saved."""

    node: Node
    kind: str                      # "conv" or "norm"
    weight: int | None = None      # index into params
    bias: int | None = None
    saved: dict = field(default_factory=dict)
    kernel: bool = False           # option B (conv only)


def _accumulate_grad_edges(node: Node) -> list[tuple[int, Tensor]]:
    """(slot, leaf tensor) for every ``next_functions`` entry that accumulates into a leaf."""
    return [(slot, fn.variable) for slot, (fn, _) in enumerate(node.next_functions)
            if fn is not None and hasattr(fn, "variable")]


def _layer_of(node: Node, leaves: list[tuple[int, Tensor]], index: dict[int, int]) -> _Layer | None:
    """Describe a parametrised node, or ``None`` if this engine cannot handle it."""
    name = type(node).__name__
    if any(slot not in _PARAM_SLOTS or id(leaf) not in index for slot, leaf in leaves):
        return None  # a parameter in another role (e.g. through a cast), or not a shared parameter
    slots = {_PARAM_SLOTS[slot]: index[id(leaf)] for slot, leaf in leaves}
    if name == _CONV:
        x = node._saved_input
        if node._saved_transposed or node._saved_groups != 1 or x is None or x.dim() != 4:
            return None
        if any(o != 0 for o in node._saved_output_padding):
            return None
        saved = {"input": x, "stride": tuple(node._saved_stride), "padding": tuple(node._saved_padding),
                 "dilation": tuple(node._saved_dilation)}
        return _Layer(node, "conv", saved=saved, **slots)
    if name == _BATCH_NORM:
        if not node._saved_training:
            return None  # eval-mode statistics: rare while training, not worth a second formula
        x, mean, invstd = node._saved_input, node._saved_result1, node._saved_result2
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return _Layer(node, "norm", saved={"xhat": lambda: (x - mean.view(shape)) * invstd.view(shape)}, **slots)
    if name == _GROUP_NORM:
        x, mean, rstd, groups = node._saved_input, node._saved_result1, node._saved_result2, node._saved_group
        if x.dim() < 2:
            return None

        def xhat() -> Tensor:
            g = x.reshape(x.shape[0], groups, -1)
            return ((g - mean.reshape(x.shape[0], groups, 1)) * rstd.reshape(x.shape[0], groups, 1)).view_as(x)
        return _Layer(node, "norm", saved={"xhat": xhat}, **slots)
    return None


def find_layers(z: Tensor, params: Sequence[Tensor]) -> list[_Layer] | None:
    """Every node of ``z``'s graph that owns shared parameters, or ``None`` where this engine must
    not be used: a parameter owned by an unsupported node (or through a cast), owned twice, or a
    leaf that is not a shared parameter.

    The graph is new every step (and so are its saved tensors), so nothing here is cached; the walk
    touches each node once (~170 nodes on the ResNet-18 model).
    """
    if z.grad_fn is None:
        return None
    index = {id(p): i for i, p in enumerate(params)}
    owned: set[int] = set()
    layers = []
    seen: set[Node] = set()
    stack = [z.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        leaves = _accumulate_grad_edges(node)
        if leaves:
            layer = _layer_of(node, leaves, index)
            if layer is None:
                return None
            for i in (layer.weight, layer.bias):
                if i is not None:
                    if i in owned:
                        return None
                    owned.add(i)
            layers.append(layer)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None and not hasattr(fn, "variable"))
    return layers


def _choose_kernel(layer: _Layer, out_channels: int, tasks: int) -> bool:
    """Option B if its multiply-adds are fewer than option A's (see the module docstring).

    A: T weight gradients, T * N * p * out. B: the kernel U U^T (N^2 p), K D_t for every task
    (T N^2 out) and one weight gradient of the combined delta (N p out). p = in * kh * kw.
    """
    x, w = layer.saved["input"], layer.saved["weight_shape"]
    n = x.shape[0] * layer.saved["out_hw"][0] * layer.saved["out_hw"][1]
    p = w[1] * w[2] * w[3]
    if n > _KERNEL_MAX_POSITIONS:
        return False
    cost_a = tasks * n * p * out_channels
    cost_b = n * n * p + tasks * n * n * out_channels + n * p * out_channels
    return cost_b < cost_a


class LayerwiseGramian:
    """The float64 Gramian of the tasks' shared-parameter gradients, and later their combination.

    Build with :meth:`build` (``None``: use the plain engine); ``rep[t]`` is ``dterm_t/dz``.
    """

    def __init__(self, params: Sequence[Tensor], layers: list[_Layer], deltas: list[Tensor],
                 force: str | None = None) -> None:
        self.params = list(params)
        self.layers = layers
        tasks = deltas[0].shape[0] if deltas else 0
        gram = None
        # Per parameter: [T, *shape] per-task gradients (option A, norms, biases) or, for option B
        # weights, None (its gradient comes from the combined delta in update()).
        self._per_task: dict[int, Tensor] = {}
        for layer, d in zip(layers, deltas):  # d: [T, B, C, *spatial]
            part = self._layer_gramian(layer, d, tasks, force)
            gram = part if gram is None else gram + part
        self.gramian = gram if gram is not None else \
            torch.zeros(tasks, tasks, dtype=torch.float64, device=self.params[0].device)

    @classmethod
    def build(cls, z: Tensor, params: Sequence[Tensor], rep: Tensor, release: bool,
              force: str | None = None) -> "LayerwiseGramian | None":
        """Run the T input-gradient-only passes; ``None`` if the graph is not one this engine handles.

        ``release`` frees the graph after the last pass (nothing traverses it afterwards; the saved
        tensors the layers need are held by the layers). ``force`` ("A"/"B") overrides the per-layer
        choice, for tests and measurements.
        """
        layers = find_layers(z, params)
        if not layers:
            return None
        for layer in layers:
            if layer.weight is not None:
                layer.saved["weight_shape"] = tuple(params[layer.weight].shape)
        edges = [GradientEdge(layer.node, 0) for layer in layers]
        per_task = []
        for t in range(rep.shape[0]):
            last = release and t == rep.shape[0] - 1
            per_task.append(torch.autograd.grad(z, edges, grad_outputs=rep[t], retain_graph=not last,
                                                allow_unused=True))
        deltas = []
        for i in range(len(layers)):
            ref = next((row[i] for row in per_task if row[i] is not None), None)
            if ref is None:  # no task reaches this layer: all its gradients are zero
                deltas.append(None)
                continue
            deltas.append(torch.stack([torch.zeros_like(ref) if row[i] is None else row[i] for row in per_task]))
        return cls(params, layers, deltas, force)

    # -- per-layer Gramians ----------------------------------------------------------------
    def _layer_gramian(self, layer: _Layer, d: Tensor | None, tasks: int, force: str | None) -> Tensor | None:
        if d is None:
            return None
        reduce = [1] + list(range(3, d.dim()))  # every dimension but task and channel
        parts = []
        if layer.bias is not None:
            b = d.sum(reduce)
            self._per_task[layer.bias] = b
            parts.append(b @ b.T)
        if layer.weight is not None:
            if layer.kind == "norm":
                g = (d * layer.saved["xhat"]().unsqueeze(0)).sum(reduce)
                self._per_task[layer.weight] = g
                parts.append(g @ g.T)
            else:
                parts.append(self._conv_gramian(layer, d, tasks, force))
        return sum(p.to(torch.float64) for p in parts) if parts else None

    def _conv_gramian(self, layer: _Layer, d: Tensor, tasks: int, force: str | None) -> Tensor:
        s = layer.saved
        shape, x = s["weight_shape"], s["input"]
        s["out_hw"] = tuple(d.shape[-2:])
        layer.kernel = _choose_kernel(layer, shape[0], tasks) if force is None else force == "B"
        if layer.kernel:
            u = _unfold(x, shape, s)                                    # [N, p]
            dm = d.permute(0, 1, 3, 4, 2).reshape(tasks, -1, shape[0])  # [T, N, out], rows as u's
            kd = torch.matmul(u @ u.T, dm)                              # K D_t for every t
            s["unfolded"], s["dm"] = u, dm
            return dm.reshape(tasks, -1) @ kd.reshape(tasks, -1).T
        # Option A: the T deltas side by side as T*out output channels give the T weight
        # gradients in one call (weight is only read for its shape).
        stacked = d.transpose(0, 1).reshape(d.shape[1], tasks * shape[0], *d.shape[3:])
        weight = stacked.new_empty(1).expand(tasks * shape[0], *shape[1:])
        g = torch.ops.aten.convolution_backward(stacked, x, weight, None, s["stride"], s["padding"],
                                                s["dilation"], False, [0, 0], 1, (False, True, False))[1]
        g = g.reshape(tasks, -1)
        self._per_task[layer.weight] = g.view(tasks, *shape)
        return g @ g.T

    # -- the update ------------------------------------------------------------------------
    def update(self, alpha: Sequence[float]) -> list[Tensor]:
        """``sum_t alpha_t g_t`` for every parameter (zeros for one no task reaches)."""
        grads: list[Tensor | None] = [None] * len(self.params)
        for i, per_task in self._per_task.items():
            grads[i] = _combine(per_task, alpha)
        for layer in self.layers:
            if layer.kernel:  # option B: one weight gradient of the combined delta, U^T D
                s = layer.saved
                dm = _combine(s["dm"], alpha)                          # [N, out]
                grads[layer.weight] = (dm.T @ s["unfolded"]).view(s["weight_shape"])
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]


def _combine(per_task: Tensor, alpha: Sequence[float]) -> Tensor:
    out = per_task[0] * alpha[0]
    for row, a in zip(per_task[1:], alpha[1:]):
        out.add_(row, alpha=a)
    return out


def _unfold(x: Tensor, weight_shape: tuple[int, ...], s: dict) -> Tensor:
    """The conv input's patches as ``[B * H_out * W_out, in * kh * kw]`` (the weight's layout)."""
    u = F.unfold(x, weight_shape[2:], dilation=s["dilation"], padding=s["padding"], stride=s["stride"])
    return u.transpose(1, 2).reshape(-1, u.shape[1])
