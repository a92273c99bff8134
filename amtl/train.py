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
from amtl.options import add_arguments, from_namespace
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
    """The command line: one flag per :class:`TrainConfig` field, plus the run's output folder and
    the balancer's hyperparameters as JSON."""
    p = _Parser(prog="python -m amtl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (resumed if it holds a checkpoint)")
    p.add_argument("--hparams", default=None, help="balancer hyperparameters as JSON or a JSON file, e.g. "
                   f"'{{\"focusing\": 2}}' (methods: {', '.join(balancers.names()[:6])}, ...)")
    p.add_argument("--potentials", default=None, help="single-task KPIs {task: value} as JSON or a file (AMTL)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    add_arguments(p, TrainConfig)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    hparams = _json_arg(args.hparams, "--hparams") if args.hparams else {}
    potentials = _json_arg(args.potentials, "--potentials") if args.potentials else None
    return from_namespace(TrainConfig, args, hparams=hparams, potentials=potentials)


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
