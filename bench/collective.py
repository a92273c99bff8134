"""Cost of exact gradient balancing under data parallelism, beside a plain data-parallel step.

    python bench/collective.py [--image-size 64] [--batch-size 32] [--rounds 20] [--backend gloo]

Two processes (gloo on CPU; ``--backend nccl`` needs two GPUs) train the default model. Per round,
each method takes one whole training step (forward, losses, balancer backward, gradient
all-reduces, optimizer), methods interleaved so that load changes hit all of them alike; the median
over rounds is reported as a ratio to EW's step, the plain data-parallel step (one all-reduce of
all gradients). Beside it, the extra collective each method adds is timed alone, on buffers of the
real sizes, as a ratio to the same EW step.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TASKS = ("segmentation", "depth", "normal")
#: (label, balancer, hparams, extra collective it adds per step)
METHODS = [
    ("ew", "ew", {}, "none"),
    ("mgda, source=shared", "mgda", {"source": "shared"}, "mean of [T, D_shared] (replaces the shared all-reduce)"),
    ("mgda, source=last", "mgda", {"source": "last"}, "mean of [T, D_last]"),
    ("mgda, source=representation", "mgda", {"source": "representation"}, "sum of [T, T]"),
    ("gradnorm", "gradnorm", {}, "mean of [T, D_last]"),
    ("iltp", "iltp", {}, "gather of [b, 1 + 2T]"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, device: torch.device) -> float:
    dist.barrier()  # every rank starts together: the time includes waiting for the slower one
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    from amtl.data.registry import build_datasets
    from amtl.distributed import Collectives, all_reduce_mean_
    from amtl.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    n_train = args.batch_size * (args.rounds + args.warmup)
    data = build_datasets("scenes", TASKS, image_size=args.image_size, n_train=n_train, n_val=8, n_test=8)
    trainers, batches = {}, None
    for label, balancer, hparams, _ in METHODS:
        config = TrainConfig(tasks=TASKS, image_size=args.image_size, n_train=n_train, n_val=8, n_test=8,
                             batch_size=args.batch_size, balancer=balancer, hparams=hparams, threads=args.threads,
                             device=device.type if device.type == "cpu" else str(device))
        trainers[label] = Trainer(config, None, data=data, progress=None)
        if batches is None:
            loader = trainers[label]._loader(data.train, shuffle=True)
            batches = [trainers[label]._to_device(b) for b in loader]
    steps = {label: [] for label in trainers}
    for i, batch in enumerate(batches[:args.rounds + args.warmup]):
        for label, trainer in trainers.items():
            seconds = _timed(lambda: trainer.train_step(batch), device)
            if i >= args.warmup:
                steps[label].append(seconds)

    # The extra collectives alone, on buffers of the sizes the methods use.
    model = trainers["ew"].model
    t = len(TASKS)
    shared = sum(p.numel() for p in model.shared_parameters())
    last = sum(p.numel() for p in model.last_shared_parameters())
    local = args.batch_size // 2
    ranks = Collectives(2)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    f64 = dict(dtype=torch.float64, device=device)
    by_shared, by_last = torch.zeros(t, shared, device=device), torch.zeros(t, last, device=device)
    gramian, gathered = torch.zeros(t, t, **f64), torch.zeros(local, 1 + 2 * t, **f64)
    buffers = {
        "all-reduce of every gradient (EW's)": lambda: all_reduce_mean_(grads),
        f"mean of [T, D_shared] = [{t}, {shared}]": lambda: ranks.mean_(by_shared),
        f"mean of [T, D_last] = [{t}, {last}]": lambda: ranks.mean_(by_last),
        f"sum of [T, T] = [{t}, {t}] float64": lambda: ranks.sum_(gramian),
        f"gather of [b, 1 + 2T] = [{local}, {1 + 2 * t}] float64": lambda: ranks.cat(gathered),
    }
    collectives = {name: [] for name in buffers}
    for i in range(args.rounds + args.warmup):
        for name, fn in buffers.items():
            seconds = _timed(fn, device)
            if i >= args.warmup:
                collectives[name].append(seconds)
    if rank == 0:
        queue.put(({k: statistics.median(v) for k, v in steps.items()},
                   {k: statistics.median(v) for k, v in collectives.items()},
                   sum(p.numel() for p in model.parameters())))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (16 per process)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from amtl.data.registry import build_datasets
    build_datasets("scenes", TASKS, image_size=args.image_size, n_train=args.batch_size * (args.rounds + args.warmup),
                   n_val=8, n_test=8)  # render once, outside the workers and every timing
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args, _free_port(), queue), nprocs=2, join=True)
    steps, collectives, params = queue.get()
    plain = steps["ew"]
    print(f"2 processes, {args.backend}, {args.threads} thread(s) each, global batch {args.batch_size} of "
          f"{args.image_size}x{args.image_size}, {params / 1e3:.0f}k parameters, median of {args.rounds} rounds\n")
    print("| method | extra collective | train step (median) | vs plain DDP step (EW) |")
    print("|---|---|---|---|")
    for label, _, _, extra in METHODS:
        print(f"| {label} | {extra} | {steps[label] * 1e3:.1f} ms | {steps[label] / plain:.2f}x |")
    print("\n| collective alone | median | share of a plain DDP step (EW) |")
    print("|---|---|---|")
    for name, seconds in collectives.items():
        print(f"| {name} | {seconds * 1e3:.2f} ms | {100 * seconds / plain:.3f}% |")


if __name__ == "__main__":
    main()
