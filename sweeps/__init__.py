"""Ray Train / Ray Tune / Optuna sweeps over multi-task balancers.

From Python (a notebook, a script)::

    import sweeps
    board = sweeps.sweep(methods=["amtl", "dwa"], samples=8, n_train=500, storage="runs/sweeps", name="mine")

``run_sweep.py`` (the ``amtl-sweep`` command) is the same with options from the command line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from sweeps.runner import SweepOptions


def sweep(options: SweepOptions | None = None, /, **changes: Any) -> pd.DataFrame:
    """Run (or, with ``resume=True``, continue) a sweep and return its leaderboard.

    ``options`` (default: :class:`~sweeps.runner.SweepOptions`'s defaults) with ``changes`` applied by
    option name, training options included, e.g. ``sweep(methods=["ew", "amtl"], samples=4, epochs=2)``. Bad options raise
    :class:`~sweeps.cli.BadInput` (a ValueError naming the fix) before any Ray work. The sweep joins
    ``options.address``, or the Ray cluster this process already uses, or starts an embedded one.
    """
    from amtl import plugins
    from amtl.options import with_values
    from sweeps.cli import check_options, connect
    from sweeps.runner import SweepOptions, run

    chosen = with_values(options or SweepOptions(), **changes)
    check_options(chosen)
    connect(chosen.address, plugins.files(chosen.train.plugins))
    return run(chosen)
