#!/usr/bin/env python
"""Sweep multi-task balancers with Ray Train + Ray Tune + Optuna: ``python run_sweep.py --method amtl``.

Phases: single-task potentials (cached per data/model/budget), the Optuna search over methods and
their hyperparameters, then the best config of each method rerun over ``--seeds``. Results go to
``<storage>/<name>/`` (trials.parquet, leaderboard.{parquet,md,png}, weights.png) and to W&B
(offline unless an API key is set). Exit status: 0 done, 2 bad input, 1 failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import traceback
from typing import NoReturn, Sequence

from sweeps.runner import SweepOptions

BAD_INPUT_EXIT, FAILURE_EXIT = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(BAD_INPUT_EXIT, f"run_sweep.py: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = SweepOptions()
    p = _Parser(prog="run_sweep.py", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--method", "--methods", dest="methods", default=",".join(d.methods),
        help="comma-separated balancer names, weighting+aggregator combinations, or 'all'")
    add("--space", default=None, help="search-space YAML overriding search_spaces/")
    add("--samples", type=int, default=d.samples, help="search trials")
    add("--seeds", type=int, default=d.seeds, help="seeds for each method's best config")
    add("--epochs", type=int, default=d.epochs, help="training budget of every trial")
    add("--dataset", default=d.dataset, help="scenes (rendered, default), nyuv2, voc, or partial "
        "(sources labelled for different tasks; see README)")
    add("--data-root", default=None, help="root of a real dataset; partial: voc=DIR,nyuv2=DIR")
    add("--tasks", default=",".join(d.tasks))
    add("--model", default=d.model)
    add("--image-size", type=int, default=d.image_size)
    add("--n-train", type=int, default=d.n_train)
    add("--n-val", type=int, default=d.n_val)
    add("--n-test", type=int, default=d.n_test)
    add("--batch-size", type=int, default=d.batch_size, help="global batch size (split over workers)")
    add("--sampler", choices=("random", "task-balanced"), default=d.sampler,
        help="task-balanced: draw samples of rarely labelled tasks more often (partial dataset)")
    add("--lr", type=float, default=d.lr)
    add("--kpi", default=None, help="optimise this task's validation KPI instead of Delta-m")
    add("--scheduler", choices=("asha", "fifo"), default=d.scheduler)
    add("--max-concurrent", type=int, default=None, help="trials at once (default: CPUs / cpus-per-trial)")
    add("--workers-per-trial", type=int, default=d.workers_per_trial, help="DDP workers per trial")
    add("--cpus-per-trial", type=float, default=d.cpus_per_trial)
    add("--gpus-per-trial", type=float, default=d.gpus_per_trial, help="may be fractional")
    add("--address", default=None, help="an existing Ray cluster (default: a local embedded one)")
    add("--storage", default=d.storage, help="results root: a local dir or a URI pyarrow understands")
    add("--name", default=d.name, help="sweep name (a folder under --storage)")
    add("--resume", action="store_true", help="continue the sweep --name in --storage")
    add("--recompute-potentials", action="store_true", help="retrain single-task models even if cached")
    add("--wandb-project", default=d.wandb_project)
    add("--wandb-entity", default=None)
    add("--no-wandb", action="store_true", help="no W&B runs")
    add("--optuna-storage", default=None, help="SQLAlchemy URL of the Optuna study (default: SQLite file)")
    add("--seed", type=int, default=d.seed, help="searcher seed and first training seed")
    add("--stall-timeout", type=float, default=d.stall_timeout,
        help="seconds a phase may go without any trial progress (trials waiting for resources, a stuck "
             "trial) before the sweep ends with an error saying what it waited for; longer than one epoch")
    return p


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    values = vars(args).copy()
    values["methods"] = split(args.methods)
    values["tasks"] = split(args.tasks)
    return SweepOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.optuna_storage:  # W&B records the command line in every run it starts here
        from sweeps.secrets import redact_url
        sys.argv[:] = [a.replace(args.optuna_storage, redact_url(args.optuna_storage)) for a in sys.argv]
        command = [a.replace(args.optuna_storage, redact_url(args.optuna_storage)) for a in command]
    from sweeps.cli import BadInput, check_options, connect
    try:
        options = options_from_args(args)
        check_options(options)
        connect(options.address)
        from sweeps.runner import run
        run(options)
    except BadInput as err:
        print(f"run_sweep.py: error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except KeyboardInterrupt as err:
        from sweeps.interrupts import Interrupted
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"run_sweep.py: stopped by {signal.Signals(signum).name}; finished trials are kept; to continue, "
              f"run: {_resume_command(command)}", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # a failure, not bad input: say what, keep the details in the log
        from sweeps.storage import FULL_BELOW_BYTES, Storage, is_out_of_space
        logging.getLogger("amtl.sweep").debug("sweep failed", exc_info=True)
        free = Storage(args.storage).free_bytes()
        if is_out_of_space(err) or (free is not None and free < FULL_BELOW_BYTES):
            left = f" ({free} bytes free)" if free is not None else ""
            print(f"run_sweep.py: failed: the storage '{args.storage}' is out of space{left}; free space, then run: "
                  f"{_resume_command(command)} (finished trials are kept)", file=sys.stderr)
        else:
            details = _save_traceback(args.storage, args.name)
            print(f"run_sweep.py: failed: {_root_cause(err)} (finished trials are kept; {details}to continue, run: "
                  f"{_resume_command(command)})", file=sys.stderr)
        return FAILURE_EXIT
    return 0


def _root_cause(err: BaseException) -> str:
    """``Type: message`` of the innermost exception. Tune wraps a driver-side failure in a TuneError
    whose message is a whole traceback: its last line names what actually went wrong."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _save_traceback(storage: str, name: str) -> str:
    """Keep the failure's full traceback next to the sweep; say where (nothing if it cannot be written)."""
    from sweeps.storage import Storage
    try:
        store = Storage(storage)
        store.write_bytes(traceback.format_exc().encode(), name, "driver-error.txt")
    except Exception:  # a full disk or a lost object store must not hide the error itself
        return ""
    return f"details in {store.uri_of(name, 'driver-error.txt')}; "


def _resume_command(command: Sequence[str]) -> str:
    """This run's command line with ``--resume`` (a database password already redacted)."""
    return shlex.join(["python", "run_sweep.py", *[a for a in command if a != "--resume"], "--resume"])


if __name__ == "__main__":
    sys.exit(main())
