"""Exact ``source='shared'`` Gramian without T full encoder backward passes ("layer-wise Gramian").

The plain engine runs one vector-Jacobian product of ``z`` per task w.r.t. every shared parameter:
each computes the input gradients *and* all weight gradients of the encoder. But the per-task conv
weight gradients are needed only for the Gramian, and the update ``sum_t alpha_t g_t`` is linear in
the layers' output gradients. So here:

1. the autograd graph of ``z`` is walked to find which node owns each shared parameter: 2-D
   convolutions (groups 1) and normalisation layers are supported; any other owner, a parameter
   owned twice, reached through a cast (autocast) or carrying a tensor hook means falling back to
   the plain engine;
2. per task, one pass asks autograd for the gradient ``delta_t`` w.r.t. each conv's *output*
   (``GradientEdge(node, 0)``) instead of its weight, so the engine skips the conv weight gradients.
   The same pass returns the norm scales/shifts and conv biases directly: their backward already
   forms the sums these gradients are (``sum delta * x_hat``, ``sum delta``) to get the input
   gradient, so asking for them costs little (docs/benchmarks.md, "Balancer step time");
3. per conv, from ``delta_1..delta_T`` and the input the forward saved, one of two exact forms:
   A: the T weight gradients (one ``convolution_backward`` each, weight gradient only), kept for
      the Gramian's dot products and the update;
   B: at low resolution (few positions N, many weights) the patch-kernel identity
      ``<g_s, g_t> = <D_s, U U^T D_t>`` (``U``: unfolded input ``[N, in*kh*kw]``, ``D_t``:
      ``delta_t`` as ``[N, out]``), then after ``alpha`` one weight gradient ``U^T sum_t alpha_t D_t``.
      ``U U^T`` is either that product or, where cheaper, a sum of kh*kw shifted slices of the
      input's channel Gramian (:func:`_patch_kernel`);
   A multiply-add count, with a margin measured on CPU, picks one per layer (:func:`_prefers_kernel`);
4. :meth:`LayerwiseGramian.update` returns every parameter's ``sum_t alpha_t g_t``.

Nothing is approximated: the same sums as autograd's, in another order (float64: ~1e-15 relative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from amtl.balancers.base import combine_rows, pairwise_gramian

_CONV = "ConvolutionBackward0"
# Nodes whose parameters autograd returns directly in the input-gradient passes (cheap: see step 2).
_NORMS = ("NativeBatchNormBackward0", "NativeGroupNormBackward0", "NativeLayerNormBackward0",
          "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
# Option B holds an N x N kernel; the FLOP count rejects it long before this many positions, and
# this bounds its memory (4096^2 floats = 64 MiB) whatever the shapes.
_KERNEL_MAX_POSITIONS = 4096


@dataclass
class _Conv:
    """A 2-D convolution whose weight (``params[weight]``) gets the layer-wise treatment."""

    node: Node
    weight: int
    input: Tensor          # as saved by the forward
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: bool = False   # option B
    channel_gram: bool = False  # option B's U U^T from the channel Gramian (:func:`_patch_kernel`)
    unfolded: Tensor | None = None  # option B: U [N, p]
    deltas: Tensor | None = None    # option B: D [T, N, out]


def _leaf_edges(node: Node) -> list[tuple[int, Tensor]]:
    """(slot, leaf) for each ``next_functions`` entry that accumulates into a leaf tensor."""
    return [(slot, fn.variable) for slot, (fn, _) in enumerate(node.next_functions)
            if fn is not None and hasattr(fn, "variable")]


def find_layers(z: Tensor, params: Sequence[Tensor]) -> tuple[list[_Conv], list[int]] | None:
    """Conv layers (weights done layer-wise) and indices of directly returned parameters, or ``None``
    where this engine must not be used (then the plain VJPs run).

    The graph and its saved tensors are new every step, so nothing is cached; the walk visits each
    node once (about 170 nodes on the ResNet-18 model).
    """
    if z.grad_fn is None or any(getattr(p, "_backward_hooks", None) for p in params):
        return None  # tensor hooks on a conv weight would not see its (never formed) per-task gradient
    index = {id(p): i for i, p in enumerate(params)}
    owned: set[int] = set()
    convs: list[_Conv] = []
    direct: list[int] = []
    seen: set[Node] = set()
    stack = [z.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        for slot, leaf in _leaf_edges(node):
            i = index.get(id(leaf))
            if i is None or i in owned:
                return None  # not a shared parameter, or one used twice
            owned.add(i)
            if name == _CONV and slot == 1:
                conv = _conv_layer(node, i)
                if conv is None:
                    return None
                convs.append(conv)
            elif (name == _CONV and slot == 2) or (name in _NORMS and slot in (1, 2)):
                direct.append(i)  # a conv bias, a norm scale or shift
            else:
                return None  # an unsupported owner (embedding, matmul, a cast under autocast, ...)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None and not hasattr(fn, "variable"))
    return convs, direct


def _conv_layer(node: Node, weight: int) -> _Conv | None:
    x = node._saved_input
    if node._saved_transposed or node._saved_groups != 1 or x is None or x.dim() != 4:
        return None
    # Detached: the saved input is an activation with a history, and the products below must not
    # record a graph for double backward.
    return _Conv(node, weight, x.detach(), tuple(node._saved_stride), tuple(node._saved_padding),
                 tuple(node._saved_dilation))


def _kernel_cost(shape: Sequence[int], weight: Sequence[int], positions: int,
                 padding: Sequence[int]) -> tuple[int, bool]:
    """Multiply-adds of ``U U^T`` and whether the channel-Gramian form is the cheaper one.

    ``shape``: the conv input ``[n, in, h, w]``; ``weight``: ``[out, in, kh, kw]``; ``positions``:
    N = n * output height * width. Unfolded: N^2 in kh kw. Channel Gramian: (n h w)^2 in for the
    Gramian (h, w unpadded: padding adds only zero entries) plus kh kw N^2 additions. At stride 1 that
    is about kh*kw times fewer (ResNet-18 layer3 at 64x64: 17M against 151M); at stride 2 the input
    has ~4x the output's positions and unfolding wins. The padded Gramian is held at once, so it is
    bounded like the kernel: at most ``_KERNEL_MAX_POSITIONS`` padded input positions.
    """
    n, c, h, w = shape
    taps = weight[2] * weight[3]
    unfolded = positions * positions * c * taps
    channel = (n * h * w) ** 2 * c + taps * positions * positions
    fits = n * (h + 2 * padding[0]) * (w + 2 * padding[1]) <= _KERNEL_MAX_POSITIONS
    return (channel, True) if fits and channel < unfolded else (unfolded, False)


def _prefers_kernel(n: int, p: int, out: int, tasks: int, kernel_cost: int) -> bool:
    """Option B if it needs at most 2/3 of option A's multiply-adds (n positions, p = in*kh*kw).

    A: T weight gradients (T N p out) and their dot products (T^2 p out / 2).
    B: the kernel U U^T (``kernel_cost``, from :func:`_kernel_cost`), K D_t for every task
    (T N^2 out), the final weight gradient (N p out).
    The margin: on CPU, B's plain matrix products run about 1.5x fewer multiply-adds per second
    than the conv weight-gradient kernels of A (bench/balancers.py's model; docs/benchmarks.md), so
    B must need clearly fewer of them to win.
    """
    if n > _KERNEL_MAX_POSITIONS:
        return False
    cost_a = tasks * n * p * out + tasks * tasks * p * out // 2
    cost_b = kernel_cost + tasks * n * n * out + n * p * out
    return 3 * cost_b <= 2 * cost_a


def _patch_kernel(conv: _Conv, x: Tensor, weight_shape: Sequence[int], out_hw: Sequence[int]) -> Tensor:
    """``U U^T`` ``[N, N]`` (rows (y, x, b)) without unfolding: entry ((y, x, b), (y', x', b')) is
    ``sum_(i, j) <x[b, :, y s + i d, x s + j d], x[b', :, y' s + i d, x' s + j d]>`` over the kernel
    taps of the zero-padded input (s stride, d dilation), i.e. a sum of kh*kw strided slices of the
    channel Gramian of ``x``. Laid out ``[h, w, h, w, n, n]`` so each slice has contiguous n x n
    blocks: with batch-major rows the 6-D slices sum at half the speed.
    """
    n, c, h, w = x.shape
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    ho, wo = out_hw
    rows = x.permute(2, 3, 0, 1).reshape(h * w * n, c)
    gram = (rows @ rows.T).view(h, w, n, h, w, n).permute(0, 1, 3, 4, 2, 5)
    padded = gram.new_zeros(h + 2 * ph, w + 2 * pw, h + 2 * ph, w + 2 * pw, n, n)
    padded[ph:ph + h, pw:pw + w, ph:ph + h, pw:pw + w] = gram
    kernel = None
    for i in range(weight_shape[2]):
        ys = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        for j in range(weight_shape[3]):
            xs = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            tap = padded[ys, xs, ys, xs]
            kernel = tap.clone() if kernel is None else kernel.add_(tap)
    return kernel.permute(0, 1, 4, 2, 3, 5).reshape(ho * wo * n, ho * wo * n)


class LayerwiseGramian:
    """The float64 Gramian of the tasks' shared-parameter gradients, then their combination.

    Build with :meth:`build` (``None``: use the plain engine).
    """

    def __init__(self, params: Sequence[Tensor], convs: list[_Conv], direct: list[int],
                 rows: list[list[Tensor | None]], force: str | None = None) -> None:
        self.params = list(params)
        self.convs = convs
        tasks = len(rows)
        # Explicit per-task gradients (direct parameters and option-A conv weights): index -> [T].
        explicit: dict[int, list[Tensor]] = {}

        def keep(i: int, grads: list[Tensor | None]) -> None:
            if any(g is not None for g in grads):
                explicit[i] = [torch.zeros_like(self.params[i]) if g is None else g for g in grads]

        for k, i in enumerate(direct):
            keep(i, [row[len(convs) + k] for row in rows])
        self.gramian = torch.zeros(tasks, tasks, dtype=torch.float64, device=self.params[0].device)
        for k, conv in enumerate(convs):
            deltas = [row[k] for row in rows]
            if all(d is None for d in deltas):
                continue  # no task reaches this layer: its gradients are zero
            ref = next(d for d in deltas if d is not None)
            deltas = [torch.zeros_like(ref) if d is None else d for d in deltas]
            shape = self.params[conv.weight].shape
            n, p = ref.shape[0] * ref.shape[2] * ref.shape[3], shape[1] * shape[2] * shape[3]
            kernel_cost, conv.channel_gram = _kernel_cost(conv.input.shape, shape, n, conv.padding)
            conv.kernel = (_prefers_kernel(n, p, shape[0], tasks, kernel_cost) if force is None
                           else force == "B")
            if conv.kernel:
                self.gramian += self._kernel_gramian(conv, deltas)
            else:
                keep(conv.weight, [self._weight_grad(conv, d) for d in deltas])
        #: Parameters with explicit per-task gradients, and those gradients as rows[t][k].
        self.explicit_params = list(explicit)
        self.explicit_rows = [[explicit[i][t] for i in self.explicit_params] for t in range(tasks)]
        if self.explicit_params:
            self.gramian += pairwise_gramian(self.explicit_rows)

    @classmethod
    def build(cls, z: Tensor, params: Sequence[Tensor], rep: Tensor, release: bool,
              force: str | None = None) -> "LayerwiseGramian | None":
        """Run the T input-gradient passes of ``z`` (``rep[t]``: ``dterm_t/dz``) and form the Gramian.

        ``release`` frees the graph after the last pass (the convs keep the inputs they need).
        ``force`` ("A" or "B") overrides every conv's choice, for tests and measurements.
        """
        found = find_layers(z, params)
        if found is None or not found[0]:
            return None
        convs, direct = found
        inputs = [GradientEdge(conv.node, 0) for conv in convs] + [params[i] for i in direct]
        rows = []
        for t in range(rep.shape[0]):
            last = release and t == rep.shape[0] - 1
            rows.append(list(torch.autograd.grad(z, inputs, grad_outputs=rep[t], retain_graph=not last,
                                                 allow_unused=True)))
        return cls(params, convs, direct, rows, force)

    def _weight_grad(self, conv: _Conv, delta: Tensor) -> Tensor:
        """The conv's weight gradient for output gradient ``delta`` (weight gradient only)."""
        weight = self.params[conv.weight].detach()  # read for its shape; no graph to record
        return torch.ops.aten.convolution_backward(
            delta, conv.input, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1,
            (False, True, False))[1]

    def _kernel_gramian(self, conv: _Conv, deltas: list[Tensor]) -> Tensor:
        """Option B: ``[<D_s, U U^T D_t>]_{s,t}``; keeps U and D for :meth:`update`."""
        shape = self.params[conv.weight].shape
        # K's entries are sums over whole patches: in float32 at least, so half precision cannot overflow.
        dtype = torch.promote_types(conv.input.dtype, torch.float32)
        x = conv.input.to(dtype)
        u = F.unfold(x, shape[2:], dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        u = u.permute(2, 0, 1).reshape(-1, u.shape[1])                    # [N, p], rows (y, x, b)
        # D [T, N, out] in one copy (into [T, h, w, n, out]): stacking the permuted views, not
        # permuting the stack.
        d = torch.stack([dt.permute(2, 3, 0, 1) for dt in deltas]).to(dtype).view(len(deltas), -1, shape[0])
        kernel = _patch_kernel(conv, x, shape, deltas[0].shape[2:]) if conv.channel_gram else u @ u.T
        kd = torch.matmul(kernel, d)
        conv.unfolded, conv.deltas = u, d
        return (d.reshape(len(deltas), -1) @ kd.reshape(len(deltas), -1).T).to(torch.float64)

    def update(self, alpha: Sequence[float]) -> list[Tensor]:
        """``sum_t alpha_t g_t`` for every parameter (zeros for one that no task reaches).

        Call once: it reuses the per-task gradient buffers (the Gramian is formed already).
        """
        grads: list[Tensor | None] = [None] * len(self.params)
        if self.explicit_params:
            for i, g in zip(self.explicit_params, combine_rows(self.explicit_rows, alpha)):
                grads[i] = g
        for conv in self.convs:
            if conv.kernel:  # one weight gradient of the combined output gradient: U^T D
                d = torch.tensordot(torch.tensor(alpha, dtype=conv.deltas.dtype, device=conv.deltas.device),
                                    conv.deltas, dims=1)
                weight = self.params[conv.weight]
                grads[conv.weight] = (d.T @ conv.unfolded).view_as(weight).to(weight.dtype)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

