"""ILTP as a label-noise detector: AUROC of its instance weights for corrupt vs clean labels.

    AMTL_CACHE_DIR=/tmp/amtlcache python bench/iltp.py [--cases segmentation:permute,depth:scale]
        [--image-size 32] [--n-train 300] [--epochs 6] [--w-lr 0.1] [--threads 2] [--write-docs]

For each case ``task:kind``: corrupt ``--fraction`` of the task's training labels with that kind
(:class:`amtl.data.noise.NoisyLabels`),
train the default 3-task model once with ``balancer="iltp"`` and once with EW on the same data and
seed, then score each training instance as suspect by

- ILTP: ``-instance_scores(task)`` (a low learned weight ``exp(-s)`` = suspect),
- EW reference: the instance's task loss under the final EW model (high = suspect),

and print the AUROC of each for noisy vs clean instances as a markdown table (0.5 = chance).
"""
from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.functional import auroc

from amtl.data import collate
from amtl.data.noise import NoisyLabels
from amtl.data.registry import DataSplits, build_datasets
from amtl.trainer import TrainConfig, Trainer

TASKS = ("segmentation", "depth", "normal")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADING = "## ILTP: finding noisy labels"


def noisy_splits(clean: DataSplits, task: str, fraction: float, kind: str, seed: int) -> DataSplits:
    train = NoisyLabels(clean.train, task, fraction=fraction, seed=seed, kind=kind)
    return DataSplits(train, clean.val, clean.test, clean.num_classes, clean.num_instances, clean.tasks)


@torch.no_grad()
def instance_losses(trainer: Trainer, task: str) -> Tensor:
    """Per-instance ``task`` loss of the trained model over the (noisy) training split, by index."""
    data = trainer.data.train
    out = torch.full((len(data),), float("nan"))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False, collate_fn=collate)
    head = next(t for t in trainer.tasks if t.name == task)
    trainer.model.eval()
    for batch in loader:
        batch = trainer._to_device(batch)
        pred = trainer.model(batch["image"])[task]
        per, ok = head.sample_losses(pred, batch[task])
        out[batch["index"].cpu()] = torch.where(ok, per, float("nan")).float().cpu()
    trainer.model.train()
    return out


def binary_auroc(suspicion: Tensor, noisy: Tensor) -> float:
    keep = torch.isfinite(suspicion)  # instances with no valid pixel of the task carry no evidence
    return float(auroc(suspicion[keep], noisy[keep].long(), task="binary"))


def run(task: str, kind: str, args: argparse.Namespace, clean: DataSplits) -> dict[str, float]:
    data = noisy_splits(clean, task, args.fraction, kind, args.seed)
    common = dict(tasks=TASKS, image_size=args.image_size, n_train=args.n_train, n_val=args.n_val,
                  n_test=args.n_val, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, threads=args.threads, log_every=10**6)
    row: dict[str, float] = {}
    start = time.perf_counter()
    iltp = Trainer(TrainConfig(balancer="iltp", hparams={"w_lr": args.w_lr, "weight_decay": args.iltp_decay},
                               **common), None, data=data, progress=None)
    iltp.fit()
    noisy = data.train.noisy
    row["iltp"] = binary_auroc(-iltp.method.weighting.instance_scores(task), noisy)
    row["iltp_loss"] = binary_auroc(instance_losses(iltp, task), noisy)
    # Clean tasks: their weights should not single out the corrupt instances (near 0.5).
    others = [binary_auroc(-iltp.method.weighting.instance_scores(t), noisy) for t in TASKS if t != task]
    row["iltp_other"] = max(others, key=lambda a: abs(a - 0.5))
    ew = Trainer(TrainConfig(balancer="ew", **common), None, data=data, progress=None)
    ew.fit()
    row["ew_loss"] = binary_auroc(instance_losses(ew, task), noisy)
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [f"{int(args.fraction * 100)}% of one task's {args.n_train} training labels corrupted; "
             f"{args.image_size}x{args.image_size}, {args.epochs} epochs, batch "
             f"{args.batch_size}, model `small`, seed {args.seed}; ILTP `w_lr={args.w_lr}`, "
             f"`weight_decay={args.iltp_decay}`; CPU ({platform.machine()}), {args.threads} threads, "
             f"torch {torch.__version__}.",
             "",
             "| noisy task | corruption | ILTP: -weight | ILTP: final loss | EW: final loss "
             "| ILTP: clean tasks' -weight | time (ILTP+EW) |",
             "|---|---|---|---|---|---|---|"]
    for case, r in rows.items():
        task, kind = case.split(":")
        lines.append(f"| {task} | `{kind}` | {r['iltp']:.3f} | {r['iltp_loss']:.3f} | {r['ew_loss']:.3f} | "
                     f"{r['iltp_other']:.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def write_docs(body: str) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md; other sections stay."""
    text = DOCS.read_text()
    section = (f"{HEADING}\n\nGenerated by `python bench/iltp.py --write-docs`. AUROC of each suspicion "
               f"score for corrupt vs clean instances (1 = perfect, 0.5 = chance).\n\n{body}\n")
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="segmentation:permute,depth:scale",
                   help="comma-separated task:kind (kinds: amtl.data.noise.KINDS)")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--w-lr", type=float, default=0.1)
    p.add_argument("--iltp-decay", type=float, default=1.0, help="ILTP's weight_decay hyperparameter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clean = build_datasets("scenes", TASKS, image_size=args.image_size, n_train=args.n_train,
                           n_val=args.n_val, n_test=args.n_val)
    rows = {case: run(*case.split(":"), args, clean) for case in args.cases.split(",") if case}
    body = table(rows, args)
    print(body)
    if args.write_docs:
        write_docs(body)


if __name__ == "__main__":
    main()
