"""Trainer throughput on the default model: training and evaluation images/s.

    python bench/trainer.py [--image-size 64] [--batch-size 32] [--steps 30] [--threads 2]

Renders (or reads from cache) a small scene split, warms up, then times whole training steps
(forward, masked losses, balancer backward, optimizer) and evaluation batches. Prints a markdown row.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from amtl.trainer import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="small")
    p.add_argument("--balancer", default="ew")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch_size * (args.steps + 5)
    cfg = TrainConfig(image_size=args.image_size, batch_size=args.batch_size, n_train=n, n_val=args.batch_size * 5,
                      n_test=args.batch_size, model=args.model, balancer=args.balancer, threads=args.threads)
    trainer = Trainer(cfg, None, progress=None)
    batches = [trainer._to_device(b) for b in trainer._loader(trainer.data.train, shuffle=True)][: args.steps + 5]
    for b in batches[:5]:  # warm-up: allocator, thread pools
        trainer.train_step(b)
    times = []
    for b in batches[5:]:
        t = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    trainer.evaluate("val")
    eval_seconds = time.perf_counter() - t
    step = statistics.median(times)
    params = sum(p.numel() for p in trainer.model.parameters())
    print("| model | params | image | batch | threads | train step (median) | train img/s | eval img/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {params / 1e3:.0f}k | {args.image_size} | {args.batch_size} | {args.threads} | "
          f"{step * 1e3:.1f} ms | {args.batch_size / step:.0f} | {len(trainer.data.val) / eval_seconds:.0f} |")


if __name__ == "__main__":
    main()
