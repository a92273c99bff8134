#!/usr/bin/env python
"""Sweep multi-task balancers with Ray Train + Ray Tune + Optuna: ``python run_sweep.py --method amtl``.

Phases: single-task potentials (cached per data/model/budget), the Optuna search over methods and
their hyperparameters, then the best config of each method rerun over ``--seeds``. Results go to
``<storage>/<name>/`` (report.html, trials.parquet, leaderboard.{parquet,md,png}, the plots) and to W&B
(offline unless an API key is set); ``--report`` rebuilds them from the stored results. Exit status:
0 done, 2 bad input, 1 failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import traceback
from typing import Any, Mapping, NoReturn, Sequence

from amtl.options import OptionsError, add_arguments, from_namespace, read_yaml
from sweeps.runner import SweepOptions

BAD_INPUT_EXIT, FAILURE_EXIT = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(BAD_INPUT_EXIT, f"run_sweep.py: error: {message} (see --help)\n")


def build_parser(config: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line, one flag per :class:`SweepOptions` field; ``config`` (a ``--config`` file's
    options) replaces their defaults, so flags given on the command line override the file."""
    p = _Parser(prog="run_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="YAML file of options (keys: the flags' names without '--'; "
                   "e.g. a sweep's saved <storage>/<name>/sweep.yaml); flags given here override it")
    add_arguments(p, SweepOptions)
    if config:
        p.set_defaults(**config)
    return p


def parse_options(argv: Sequence[str] | None = None) -> tuple[SweepOptions, argparse.Namespace]:
    """Options from ``--config FILE`` (if given) and the flags; the flags win. Exits 2 on bad input."""
    first = build_parser().parse_args(argv)
    config = {}
    if first.config:
        try:
            config = read_yaml(first.config, SweepOptions)
        except OptionsError as err:
            build_parser().error(str(err))
    args = build_parser(config).parse_args(argv)
    return from_namespace(SweepOptions, args), args


def main(argv: Sequence[str] | None = None) -> int:
    options, args = parse_options(argv)
    command = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.optuna_storage:  # W&B records the command line in every run it starts here
        from sweeps.secrets import redact_url
        sys.argv[:] = [a.replace(args.optuna_storage, redact_url(args.optuna_storage)) for a in sys.argv]
        command = [a.replace(args.optuna_storage, redact_url(args.optuna_storage)) for a in command]
    from amtl import plugins
    from sweeps.cli import BadInput, check_options, connect
    try:
        if options.report:  # nothing to train: no cluster, no checks of what a run would need
            from sweeps.runner import report
            report(options)
            return 0
        check_options(options)
        connect(options.address, plugins.files(options.train.plugins))
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
