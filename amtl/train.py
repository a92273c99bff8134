"""Single-run CLI: ``python -m amtl.train --tasks segmentation,depth,normal --epochs 5 --out DIR``.

Writes ``DIR/metrics.json`` (``{"val": {...}, "test": {...}}`` with ``task/metric`` keys), the
checkpoint, ``epochs.jsonl`` and ``steps.jsonl``. Running again with the same ``--out`` resumes.
Bad input exits with status 2 and one line naming the problem and the fix.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from amtl import balancers
from amtl.trainer import CHECKPOINT, NonFiniteLossError, TrainConfig, Trainer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _json_arg(value: str, what: str) -> dict[str, Any]:
    """A JSON object given inline or as a path to a .json file."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{what} '{value}' is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON ({err.msg} at line {err.lineno}); "
                         f"give e.g. '{{\"focusing\": 2}}'") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="python -m amtl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated tasks")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds a checkpoint)")
    p.add_argument("--dataset", default=d.dataset, help="scenes (rendered, default), nyuv2, voc, or partial "
                   "(sources labelled for different tasks; see README)")
    p.add_argument("--data-root", default=None, help="dataset root for real datasets; partial: voc=DIR,nyuv2=DIR")
    p.add_argument("--model", default=d.model, help="small (default) or a torchvision backbone name")
    p.add_argument("--weights-path", default=None, help="local backbone state dict (nothing is downloaded)")
    p.add_argument("--balancer", default=d.balancer, help=f"method name, e.g. {', '.join(balancers.names()[:6])}, ... or A+B")
    p.add_argument("--hparams", default=None, help="balancer hyperparameters as JSON or a JSON file")
    p.add_argument("--potentials", default=None, help="single-task KPIs {task: value} as JSON or a file (AMTL)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--sampler", default=d.sampler, help="random (default) or task-balanced (every task's labels "
                   "about equally often, for partially labelled data)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--optimizer", default=d.optimizer)
    p.add_argument("--schedule", default=d.schedule)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--n-test", type=int, default=d.n_test)
    p.add_argument("--augment", action="store_true", help="random scale-crop and flip (NYUv2)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA")
    p.add_argument("--amp-dtype", default=d.amp_dtype,
                   help="autocast dtype on CUDA: bfloat16, or float16 (adds a gradient scaler)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order, stochastic balancers")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="which rendered dataset (kept across --seed)")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--diagnose-every", type=int, default=d.diagnose_every,
                   help="gradient cosines/condition number every N steps (0: only for aggregators)")
    p.add_argument("--cache-dir", default=None, help="where rendered datasets are cached")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    hparams = _json_arg(args.hparams, "--hparams") if args.hparams else {}
    if args.potentials:
        hparams["potentials"] = _json_arg(args.potentials, "--potentials")
    return TrainConfig(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), dataset=args.dataset,
        data_root=args.data_root, image_size=args.image_size, n_train=args.n_train, n_val=args.n_val,
        n_test=args.n_test, augment=args.augment, model=args.model, weights_path=args.weights_path,
        balancer=args.balancer, hparams=hparams, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, sampler=args.sampler, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, schedule=args.schedule, device=args.device, amp=not args.no_amp,
        amp_dtype=args.amp_dtype, seed=args.seed, data_seed=args.data_seed,
        num_workers=args.num_workers, threads=args.threads, diagnose_every=args.diagnose_every,
        cache_dir=args.cache_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.no_resume and (out / CHECKPOINT).exists():
            raise ValueError(f"'{out}' already holds a run; pass a new --out, or drop --no-resume to continue it")
        config = config_from_args(args)
        trainer = Trainer(config, out)
        result = trainer.fit(resume=True)
    except NonFiniteLossError as err:
        print(f"amtl.train: failed: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:  # bad input: config, data, hyperparameters
        print(f"amtl.train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amtl.train: interrupted; rerun the same command to resume from {out / CHECKPOINT}", file=sys.stderr)
        return 130
    print(json.dumps({"val": result["val"], "test": result["test"]}, indent=2))
    print(f"wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
