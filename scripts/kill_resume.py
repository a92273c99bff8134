#!/usr/bin/env python
"""Kill a sweep's driver with SIGKILL again and again, resume it each time, and count what survived.

    python scripts/kill_resume.py --kills 5 --storage /tmp/kr        # prints one line per round, then totals

Each round starts ``run_sweep.py`` (``--resume`` after the first), waits a random time between
``--min-wait`` and ``--max-wait`` seconds of progress, SIGKILLs the driver only (as the OOM killer
or a lost node would), and counts the Ray processes that outlived it. A final run finishes the sweep;
the totals check that every trial that finished before a kill is in ``trials.parquet`` exactly once,
that ``history.parquet`` has one row per trial and epoch, and that nothing the drivers started is
still running. ``tests/test_faults.py`` uses the same helpers for two fixed kill points.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import ray  # noqa: F401  Ray bundles psutil (ray/thirdparty_files) and puts it on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository, also when not installed
from sweeps import processes  # noqa: E402

#: A small sweep: 2 single-task potentials, 3 search trials over two methods (2 at once, so the third
#: runs alone after two finished), the best of each method x 1 seed.
TINY_SWEEP = ["--method", "ew,dwa", "--samples", "3", "--seeds", "1", "--epochs", "2", "--tasks",
              "segmentation,depth", "--image-size", "32", "--n-train", "64", "--n-val", "16", "--n-test", "16",
              "--batch-size", "16", "--max-concurrent", "2", "--scheduler", "fifo", "--no-wandb"]


def start_sweep(storage: Path, name: str, args: Sequence[str] = TINY_SWEEP, resume: bool = False,
                env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """``run_sweep.py`` in its own session, so everything it starts can be found by session id."""
    argv = [sys.executable, str(REPO / "run_sweep.py"), *args, "--storage", str(storage), "--name", name]
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(argv + (["--resume"] if resume else []), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def session_processes(session_id: int) -> list[tuple[int, float]]:
    """(pid, start time) of every live process in a session (what a driver and its cluster started)."""
    psutil = processes.psutil()
    found = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc.pid, proc.info["create_time"]))
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def alive(recorded: Sequence[tuple[int, float]]) -> list[int]:
    """PIDs of the recorded (pid, start time) pairs that still run."""
    return [proc.pid for proc in processes.alive(recorded)]


def end_session(session_id: int) -> None:
    """Last resort for a test or this script: SIGKILL whatever a session still runs."""
    for pid, _ in session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def results(sweep_dir: Path, phase: str) -> dict[str, list[dict]]:
    """Trial id -> Tune results written so far in ``<sweep>/<phase>/*/result.json``."""
    out: dict[str, list[dict]] = {}
    for path in (sweep_dir / phase).glob("*/result.json"):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line being written
                break
        if records:
            out[records[0].get("trial_id", path.parent.name)] = records
    return out


def finished(sweep_dir: Path, phase: str) -> set[str]:
    """Trials of ``phase`` that finished *and* are in Tune's last experiment snapshot, i.e. what a
    resume must keep (a trial finished after the snapshot is unknown to it and may be rerun)."""
    snapshots = list((sweep_dir / phase).glob("experiment_state-*.json"))
    if not snapshots:
        return set()
    snapshot_time = max(p.stat().st_mtime for p in snapshots)
    done = set()
    for trial_dir in (sweep_dir / phase).iterdir():
        path = trial_dir / "result.json"
        try:
            if path.stat().st_mtime < snapshot_time and any(json.loads(line).get("final")
                                                           for line in path.read_text().splitlines()):
                done.add(json.loads(path.read_text().splitlines()[0])["trial_id"])
        except (OSError, ValueError, KeyError):
            continue
    return done


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the sweep exited (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f}s")
        time.sleep(0.2)


def kill_driver(proc: subprocess.Popen, settle: float = 5.0) -> list[tuple[int, float]]:
    """SIGKILL the driver only; after ``settle`` seconds return what of its session still runs."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(settle)
    return session_processes(proc.pid)


def check(sweep_dir: Path, kept: set[str]) -> dict[str, int]:
    """Counts of the finished sweep; raises AssertionError where a fault lost or doubled work."""
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    history = pd.read_parquet(sweep_dir / "history.parquet")
    board = pd.read_parquet(sweep_dir / "leaderboard.parquet")
    assert trials["trial_id"].is_unique, trials["trial_id"].value_counts()
    missing = kept - set(trials["trial_id"])
    assert not missing, f"finished before a kill but not in trials.parquet: {missing}"
    duplicated = history.duplicated(subset=["trial_id", "epoch"]).sum()
    assert duplicated == 0, f"{duplicated} duplicate history rows"
    compared = trials[trials["phase"] != "potentials"]
    assert int(board["trials"].sum()) == len(compared), (board[["method", "trials"]], len(compared))
    return {"trials": len(trials), "kept_across_kills": len(kept), "history_rows": len(history),
            "terminated": int((trials["status"] == "TERMINATED").sum()), "leaderboard_trials": int(board["trials"].sum())}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--storage", type=Path, required=True)
    p.add_argument("--name", default="kill-resume")
    p.add_argument("--min-wait", type=float, default=5.0)
    p.add_argument("--max-wait", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    sweep_dir = args.storage / args.name
    log = args.storage / f"{args.name}.log"
    args.storage.mkdir(parents=True, exist_ok=True)
    kept: set[str] = set()
    sessions: list[int] = []
    try:
        for round_ in range(args.kills):
            proc = start_sweep(args.storage, args.name, resume=round_ > 0, log=log)
            sessions.append(proc.pid)
            wait = rng.uniform(args.min_wait, args.max_wait)
            time.sleep(wait)
            if proc.poll() is not None:
                print(f"round {round_}: the sweep ended (status {proc.returncode}) before the kill at {wait:.0f}s")
                break
            done = set().union(*(finished(sweep_dir, ph) for ph in ("potentials", "search", "seeds")))
            leftovers = kill_driver(proc)
            kept |= done
            print(f"round {round_}: killed after {wait:.0f}s; {len(done)} trial(s) finished so far; "
                  f"{len(leftovers)} process(es) outlived the driver", flush=True)
        else:
            proc = None
        final = start_sweep(args.storage, args.name, resume=True, log=log)
        sessions.append(final.pid)
        status = final.wait()
        print(f"final run: status {status}")
        stale = [pid for session in sessions[:-1] for pid, _ in session_processes(session)]
        print(f"processes of killed drivers still running after the final run: {len(stale)}")
        print(json.dumps(check(sweep_dir, kept)))
        return 0 if status == 0 and not stale else 1
    finally:
        for session in sessions:
            end_session(session)


if __name__ == "__main__":
    sys.exit(main())
