"""Where the layer-wise Gramian's time goes, on bench/balancers.py's model (docs/balancers.md, "Engine").

One task: a full VJP of the representation w.r.t. all shared parameters (the plain engine's pass)
against the input-gradient pass of the layer-wise engine. Then per conv, T tasks: option A (T weight
gradients, their dot products and the combination) against option B (patch-kernel Gramian and the
one combined weight gradient), and the option the multiply-add count picks.

    python bench/layerwise.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.autograd.graph import GradientEdge

from amtl.balancers import _layerwise as lw
from amtl.balancers.base import combine_rows, pairwise_gramian
from amtl.models import build_model
from amtl.tasks import make_task


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, [make_task(t, num_classes=13) for t in ("segmentation", "depth", "normal")]).train()
    params = model.shared_parameters()
    z = model.encode(torch.rand(args.batch, 3, args.size, args.size))
    convs, direct = lw.find_layers(z, params)
    edges = [GradientEdge(c.node, 0) for c in convs]
    rep = torch.randn(args.tasks, *z.shape)
    n = max(3, args.repeats // 2)
    full = median_ms(lambda: torch.autograd.grad(z, params, rep[0], retain_graph=True), n)
    inputs_only = median_ms(lambda: torch.autograd.grad(z, edges + [params[i] for i in direct], rep[0],
                                                        retain_graph=True), n)
    print(f"one task: full VJP {full:.1f} ms, input-gradient pass (+ norm/bias parameters) {inputs_only:.1f} ms")
    rows = [torch.autograd.grad(z, edges, r, retain_graph=True) for r in rep]
    alpha = [1.0 / args.tasks] * args.tasks
    print("\n| conv weight | output | A (ms) | B (ms) | picked |\n|---|---|---|---|---|")
    total = {"A": 0.0, "B": 0.0, "picked": 0.0}
    for k, conv in enumerate(convs):
        deltas = [row[k] for row in rows]
        shape = params[conv.weight].shape
        engine = lw.LayerwiseGramian(params, [], [], [[] for _ in deltas])

        def option_a():
            grads = [engine._weight_grad(conv, d) for d in deltas]
            rows = [[g] for g in grads]
            pairwise_gramian(rows)
            combine_rows(rows, alpha)

        positions = deltas[0].shape[0] * deltas[0].shape[2] * deltas[0].shape[3]
        kernel_cost, conv.channel_gram = lw._kernel_cost(conv.input.shape, shape, positions, conv.padding)

        def option_b():
            engine._kernel_gramian(conv, deltas)
            d = torch.tensordot(torch.tensor(alpha), conv.deltas, dims=1)
            return d.T @ conv.unfolded

        picks_b = lw._prefers_kernel(positions, shape[1] * shape[2] * shape[3], shape[0], len(deltas), kernel_cost)
        a = median_ms(option_a, args.repeats)
        b = median_ms(option_b, args.repeats) if positions <= lw._KERNEL_MAX_POSITIONS else float("nan")
        total["A"] += a
        total["B"] += b if b == b else a
        total["picked"] += b if picks_b else a
        form = " (channel Gramian)" if conv.channel_gram else ""
        print(f"| {tuple(shape)} | {tuple(deltas[0].shape[-2:])} | {a:.1f} | {b:.1f}{form} | {'B' if picks_b else 'A'} |")
    print(f"\nsums (ms): A everywhere {total['A']:.1f}, B wherever allowed (else A) {total['B']:.1f}, "
          f"as picked {total['picked']:.1f}")


if __name__ == "__main__":
    main()
