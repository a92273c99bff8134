"""Sweep overheads, measured side by side in one run on a local Ray cluster.

    python bench/sweep.py [--epochs 2] [--n-train 512] [--trials 4]

Prints:
- the same training run three ways: the plain trainer in this process, one Ray Train
  ``TorchTrainer`` (1 worker), and one Tune trial launching that TorchTrainer; the differences are
  the fixed per-trial overheads of Ray Train and of Tune;
- slot utilisation of a sweep of ``--trials`` trials on all CPUs: sum of trial training seconds /
  (wall seconds x slots), and what the measured fixed overhead implies for 5-minute trials.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--trials", type=int, default=4)
    args = p.parse_args()

    import pandas as pd
    import ray
    import torch
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from amtl.data.registry import build_datasets
    from amtl.trainer import TrainConfig, Trainer
    from sweeps.cli import connect
    from sweeps.runner import DRIVER_RESOURCES
    from sweeps.train_worker import train_loop_per_worker
    from sweeps.trial import TRIAL_KEY, TrialSpec, run_trial

    train = dict(tasks=["segmentation", "depth", "normal"], image_size=args.image_size, n_train=args.n_train,
                 n_val=128, n_test=128, epochs=args.epochs, batch_size=32, threads=1, log_every=1000)
    build_datasets("scenes", train["tasks"], image_size=args.image_size, n_train=args.n_train, n_val=128,
                   n_test=128)  # render once, outside every timing
    storage = tempfile.mkdtemp(prefix="bench-sweep-")
    spec = TrialSpec(phase="bench", train=TrainConfig(**train).to_dict(), searched={}, workers=1, cpus_per_worker=1,
                     gpus_per_worker=0, train_storage=f"{storage}/train", max_failures=2)

    torch.set_num_threads(1)
    start = time.perf_counter()
    trainer = Trainer(TrainConfig(**train), None, progress=None)
    trainer.fit()
    plain_wall = time.perf_counter() - start
    plain_train = sum(r["train_seconds"] for r in trainer.history)

    connect(None)
    slots = int(ray.cluster_resources()["CPU"])
    start = time.perf_counter()
    TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict(), torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="bench-train", storage_path=f"{storage}/direct")).fit()
    train_wall = time.perf_counter() - start

    def tune_run(name: str, n: int) -> tuple[float, pd.DataFrame]:
        start = time.perf_counter()
        grid = tune.Tuner(tune.with_resources(run_trial, DRIVER_RESOURCES),
                          param_space={TRIAL_KEY: tune.grid_search([spec.with_train(seed=s).to_dict() for s in range(n)])},
                          tune_config=tune.TuneConfig(max_concurrent_trials=slots),
                          run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
        wall = time.perf_counter() - start
        return wall, pd.DataFrame([r.metrics for r in grid])

    tune_wall, _ = tune_run("bench-tune", 1)
    sweep_wall, sweep = tune_run("bench-sweep", args.trials)
    busy = float(sweep["train_seconds_total"].sum())
    utilisation = busy / (sweep_wall * slots)
    fixed = tune_wall - plain_train  # everything a trial costs beyond its training epochs
    ray.shutdown()

    print(f"Same run ({args.epochs} epochs, {args.n_train} images {args.image_size}px, 1 thread):")
    print("| path | wall s | vs plain trainer |")
    print("|---|---|---|")
    print(f"| plain Trainer.fit in-process | {plain_wall:.1f} | 1.00x |")
    print(f"| Ray Train TorchTrainer (1 worker) | {train_wall:.1f} | {train_wall / plain_wall:.2f}x |")
    print(f"| Tune trial -> TorchTrainer | {tune_wall:.1f} | {tune_wall / plain_wall:.2f}x |")
    print(f"\nfixed per-trial overhead: Ray Train {train_wall - plain_wall:.1f} s, Tune {tune_wall - train_wall:.1f} s")
    print(f"sweep of {args.trials} trials on {slots} slots: utilisation {utilisation:.0%} "
          f"(training {busy:.0f} s of {sweep_wall * slots:.0f} slot-seconds)")
    for minutes in (5, 30):
        seconds = 60 * minutes
        print(f"implied for {minutes}-minute trials: utilisation {seconds / (seconds + fixed):.1%}, "
              f"Ray Train overhead {(train_wall - plain_wall) / seconds:.1%}")


if __name__ == "__main__":
    main()
