"""Sweep overheads, measured side by side in one run on a local Ray cluster.

    python bench/sweep.py [--epochs 2] [--n-train 512] [--rounds 3] [--trials 4]

Prints:
- the same training run four ways: the plain trainer in this process; one Ray Train
  ``TorchTrainer`` (1 worker); one Tune trial launching that TorchTrainer (what a sweep runs); and a
  bare Tune function trial running ``Trainer.fit`` in its own actor, reporting every epoch with a
  checkpoint (what a Tune-only path for single-worker trials would cost). The Ray paths run
  ``--rounds`` times, interleaved, each round in a new order, and the table shows medians; the
  differences to the plain trainer's training seconds are the fixed per-trial overheads;
- slot utilisation of a sweep of ``--trials`` trials on all CPUs: sum of trial training seconds /
  (wall seconds x slots), and what the measured fixed overhead implies for 5-minute trials.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def bare_tune_trial(config: dict[str, Any]) -> None:
    """A Tune function trial that trains in its own actor: epochs reported with a checkpoint each."""
    import ray.tune
    import torch

    from amtl.trainer import CHECKPOINT, TrainConfig, Trainer

    torch.set_num_threads(1)

    class Report:
        def on_epoch(self, record: dict[str, Any], trainer: Trainer) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_checkpoint(os.path.join(tmp, CHECKPOINT))
                ray.tune.report({"epoch": record["epoch"], "train_seconds": record["train_seconds"]},
                                checkpoint=ray.tune.Checkpoint.from_directory(tmp))

    Trainer(TrainConfig(**config["train"]), None, callbacks=[Report()], progress=None).fit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
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

    def tune_run(name: str, trainable: Any, key: str, values: list[dict[str, Any]]) -> tuple[float, pd.DataFrame]:
        start = time.perf_counter()
        grid = tune.Tuner(tune.with_resources(trainable, DRIVER_RESOURCES), param_space={key: tune.grid_search(values)},
                          tune_config=tune.TuneConfig(max_concurrent_trials=slots),
                          run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
        wall = time.perf_counter() - start
        return wall, pd.DataFrame([r.metrics for r in grid])

    def ray_train(i: int) -> float:
        start = time.perf_counter()
        TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict(), torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"bench-train-{i}", storage_path=f"{storage}/direct")).fit()
        return time.perf_counter() - start

    paths = {
        "Ray Train TorchTrainer (1 worker)": ray_train,
        "Tune trial -> TorchTrainer (a sweep's trial)":
            lambda i: tune_run(f"bench-tune-{i}", run_trial, TRIAL_KEY, [spec.to_dict()])[0],
        "bare Tune trial, Trainer.fit in its actor":
            lambda i: tune_run(f"bench-bare-{i}", bare_tune_trial, "train", [train])[0],
    }
    walls: dict[str, list[float]] = {label: [] for label in paths}
    order = list(paths)
    for i in range(args.rounds):
        random.Random(i).shuffle(order)
        for label in order:
            walls[label].append(paths[label](i))
    medians = {label: statistics.median(values) for label, values in walls.items()}

    sweep_wall, sweep = tune_run("bench-sweep", run_trial, TRIAL_KEY,
                                 [spec.with_train(seed=s).to_dict() for s in range(args.trials)])
    busy = float(sweep["train_seconds_total"].sum())
    utilisation = busy / (sweep_wall * slots)
    fixed = medians["Tune trial -> TorchTrainer (a sweep's trial)"] - plain_train
    ray.shutdown()

    print(f"Same run ({args.epochs} epochs, {args.n_train} images {args.image_size}px, 1 thread; "
          f"median of {args.rounds} interleaved rounds):")
    print("| path | wall s | vs plain trainer | fixed cost s (wall - training s) |")
    print("|---|---|---|---|")
    print(f"| plain Trainer.fit in-process | {plain_wall:.1f} | 1.00x | {plain_wall - plain_train:.1f} |")
    for label, wall in medians.items():
        print(f"| {label} | {wall:.1f} | {wall / plain_wall:.2f}x | {wall - plain_train:.1f} |")
    print(f"(all rounds: {', '.join(f'{label}: ' + ' '.join(f'{w:.1f}' for w in ws) for label, ws in walls.items())})")
    print(f"sweep of {args.trials} trials on {slots} slots: utilisation {utilisation:.0%} "
          f"(training {busy:.0f} s of {sweep_wall * slots:.0f} slot-seconds)")
    for minutes in (5, 30):
        seconds = 60 * minutes
        print(f"implied for {minutes}-minute trials: utilisation {seconds / (seconds + fixed):.1%}, "
              f"fixed cost {fixed / seconds:.1%} of a trial")


if __name__ == "__main__":
    main()
