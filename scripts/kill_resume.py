#!/usr/bin/env python
"""Stop a sweep's driver again and again at points chosen from its progress, resume it each time,
and check that every trial that finished before a stop is kept exactly once.

    python scripts/kill_resume.py --kills 5 --storage /tmp/kr        # one line per kill, then totals
    python scripts/kill_resume.py --kills 3 --signal INT --group ...  # Ctrl-C in a terminal instead

Each round starts ``run_sweep.py`` (``--resume`` after the first) and watches the sweep on disk
(Tune's experiment snapshots, each trial's Ray Train checkpoints, ``state.json``) until the round's
kill point, cycling through the kinds in ``KINDS``:

- ``phase``: a phase just changed (``state.json`` gained a finished phase, or a phase folder appeared);
- ``mid-epoch``: a trial trained in this driver's life has reported an epoch but not its last one;
- ``finished``: ``--after`` more trials finished (in Tune's snapshot) since the previous kill.

Every kill point also needs at least one finished trial, so each kill puts finished trials at risk.
Then it sends ``--signal`` to the driver (or its process group with ``--group``): KILL as the OOM
killer or a lost node would; INT or TERM must make the driver exit by itself within ``--stop-timeout``.
A final run finishes the sweep; the totals say how many finished trials a kill put at risk, how many
of those are missing from ``trials.parquet`` (lost, must be 0), whether ``check`` passed (no
duplicates in ``trials.parquet`` or ``history.parquet``), and whether anything a stopped driver
started still runs. ``tests/test_faults.py`` runs this loop and uses the helpers for fixed kill points.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import ray  # noqa: F401  Ray bundles psutil (ray/thirdparty_files) and puts it on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository, also when not installed
from sweeps import processes  # noqa: E402
from sweeps.trial import FINAL_KEY  # noqa: E402

#: A small sweep: 2 single-task potentials, 3 search trials over two methods (2 at once, so the third
#: runs alone after two finished; a joint search, so 3 in all), the best of each method x 1 seed.
TINY_SWEEP = ["--method", "ew,dwa", "--search", "joint", "--samples", "3", "--seeds", "1", "--epochs", "2", "--tasks",
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


PHASES = ("potentials", "search", "seeds")


def finished(sweep_dir: Path, phase: str) -> set[str]:
    """Trials of ``phase`` that finished in Tune's newest experiment snapshot, i.e. what a resume
    keeps as they are (a trial that finished after the snapshot is unknown to it and may rerun).

    Read from the snapshot itself, the newest by the time in its name (each driver life starts
    one) as Tune picks it: mtimes say nothing, as Tune copies every snapshot and ``result.json``
    from its staging folder again and again. A snapshot being written reads as nothing."""
    snapshots = list((sweep_dir / phase).glob("experiment_state-*.json"))
    if not snapshots:
        return set()
    try:
        newest = max(snapshots, key=lambda path: path.name)  # experiment_state-YYYY-MM-DD_HH-MM-SS.json
        done = set()
        for state, metadata in json.loads(newest.read_text())["trial_data"]:
            state, last = json.loads(state), json.loads(metadata).get("last_result") or {}
            # TERMINATED without the trial's final report: stopped, not finished (a clean stop's end);
            # ERROR: lost after its retries, which a resume continues.
            if state["status"] == "TERMINATED" and last.get(FINAL_KEY):
                done.add(state["trial_id"])
        return done
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def finished_all(sweep_dir: Path) -> set[str]:
    """Trials of every phase that a resume must keep."""
    return set().union(*(finished(sweep_dir, phase) for phase in PHASES))


def epochs_reported(sweep_dir: Path, since: float) -> dict[str, int]:
    """Trial id -> epochs checkpointed by its Ray Train run, for trials that checkpointed after
    ``since`` (wall clock), i.e. trained in the current driver's life.

    Train checkpoints every epoch as it ends; Tune's ``result.json`` gets a short trial's epochs in
    one burst at its end, too late to tell that a trial is between epochs."""
    out = {}
    for run in sweep_dir.glob("*/train/train-*"):
        try:
            times = [path.stat().st_mtime for path in run.glob("checkpoint_2*") if path.is_dir()]
        except OSError:  # a checkpoint being moved into place
            continue
        if times and max(times) > since:
            out[run.name.removeprefix("train-")] = len(times)
    return out


def phase_signature(sweep_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(finished phases in ``state.json``, phase folders that exist), which change at a phase change;
    None while ``state.json`` is missing or being written (not a change)."""
    try:
        done = tuple(json.loads((sweep_dir / "state.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return None
    return done, tuple(phase for phase in PHASES if (sweep_dir / phase).is_dir())


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
    return stop_driver(proc, signal.SIGKILL, settle=settle).leftovers


@dataclass
class Stop:
    """How a driver ended after its signal."""

    status: int | None
    leftovers: list[tuple[int, float]]
    problem: str | None = None


def stop_driver(proc: subprocess.Popen, sig: int = signal.SIGKILL, group: bool = False,
                stop_timeout: float = 120.0, settle: float = 5.0) -> Stop:
    """Send ``sig`` to the driver (its process group with ``group``, as Ctrl-C in a terminal does).

    SIGINT and SIGTERM are clean stops: the driver must exit by itself with status 128 + signal
    within ``stop_timeout``, else it is SIGKILLed and the stop is a problem. After ``settle``
    seconds, the leftovers are what of the driver's session still runs."""
    # start_sweep makes the driver a session (and so process group) leader: its pgid is its pid.
    (os.killpg if group else os.kill)(proc.pid, sig)
    problem = None
    if sig == signal.SIGKILL:
        proc.wait()
    else:
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            problem = f"the driver did not exit within {stop_timeout:.0f}s of {signal.Signals(sig).name}"
        else:
            if proc.returncode != 128 + sig:
                problem = f"the driver exited with status {proc.returncode} after {signal.Signals(sig).name}, " \
                          f"not {128 + sig}"
    time.sleep(settle)
    return Stop(proc.returncode, session_processes(proc.pid), problem)


#: Kill points, cycled through round by round (see the module docstring). This order lets a small
#: sweep take every kind more than once: a phase change (potentials done), mid-epoch in the search,
#: a search trial finished, the next phase change (search done), mid-epoch in the seeds phase, ...
KINDS = ("phase", "mid-epoch", "finished")


def sweep_args(samples: int = 6, epochs: int = 3, base: Sequence[str] = TINY_SWEEP) -> list[str]:
    """TINY_SWEEP with ``samples`` search trials and ``epochs`` epochs each: the fifo scheduler runs
    every search trial to its end, and epochs after the first give a trial a mid-epoch window."""
    args = list(base)
    args[args.index("--samples") + 1] = str(samples)
    args[args.index("--epochs") + 1] = str(epochs)
    return args


def wait_kill_point(kind: str, proc: subprocess.Popen, sweep_dir: Path, seen: set[str], kept: set[str],
                    since: float, epochs: int, after: int = 1, timeout: float = 1200.0,
                    poll: float = 0.1) -> bool:
    """Watch the sweep until the kill point ``kind`` (with at least one finished trial); False if
    the sweep ended first. ``seen`` gains every finished trial observed; ``kept`` holds those that
    earlier kills put at risk; ``since`` is when this driver started (wall clock)."""
    deadline = time.monotonic() + timeout
    previous = phase_signature(sweep_dir)
    while proc.poll() is None:
        seen |= finished_all(sweep_dir)
        signature = phase_signature(sweep_dir)
        if kind == "phase":  # the moment it changes: not a change seen rounds ago
            hit = None not in (signature, previous) and signature != previous
        elif kind == "mid-epoch":
            hit = any(1 <= n < epochs and trial not in seen for trial, n in epochs_reported(sweep_dir, since).items())
        elif kind == "finished":
            hit = len(seen - kept) >= after
        else:
            raise ValueError(f"unknown kill point {kind!r}; one of {', '.join(KINDS)}")
        if hit and seen:
            return True
        previous = signature if signature is not None else previous
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {kind} kill point after {timeout:.0f}s")
        time.sleep(poll)
    return False


@dataclass
class Kill:
    """One round: where the driver was stopped and what that put at risk."""

    kind: str
    seconds: float  # since the loop started
    at_risk: set[str]  # trials finished before this kill: a resume must keep them
    new: int  # of those, finished since the previous kill
    stop: Stop


@dataclass
class Outcome:
    """What the kill loop found; ``ok`` when nothing was lost, doubled or left running."""

    requested: int
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final_status: int | None = None
    lost: set[str] = field(default_factory=set)
    stale: list[int] = field(default_factory=list)
    counts: dict[str, int] | None = None
    check_error: str | None = None

    @property
    def kept(self) -> set[str]:
        return set().union(*(kill.at_risk for kill in self.kills))

    @property
    def kills_at_risk(self) -> int:
        """Kills that put at least one finished trial at risk."""
        return sum(1 for kill in self.kills if kill.at_risk)

    @property
    def ok(self) -> bool:
        return (not self.problems and self.final_status == 0 and not self.lost and not self.stale
                and self.check_error is None and self.kills_at_risk == self.requested)


def kill_loop(storage: Path, name: str, kills: int, sweep: Sequence[str] | None = None,
              kinds: Sequence[str] = KINDS, sig: int = signal.SIGKILL, group: bool = False, after: int = 1,
              round_timeout: float = 1200.0, stop_timeout: float = 120.0, final_timeout: float = 1800.0,
              settle: float = 5.0, log: Path | None = None,
              say: Callable[[str], None] = lambda line: print(line, flush=True)) -> Outcome:
    """Run the sweep, stopping its driver ``kills`` times at progress-chosen points (cycling through
    ``kinds``) and resuming it after each; then finish it and check what survived."""
    sweep = list(sweep if sweep is not None else sweep_args())
    epochs = int(sweep[sweep.index("--epochs") + 1])
    sweep_dir = storage / name
    storage.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(requested=kills)
    sessions: list[int] = []
    seen: set[str] = set()
    start = time.monotonic()
    try:
        for round_ in range(kills):
            kind = kinds[round_ % len(kinds)]
            proc = start_sweep(storage, name, args=sweep, resume=round_ > 0, log=log)
            sessions.append(proc.pid)
            since = time.time()  # checkpoints after this were written by this driver's trials
            try:
                reached = wait_kill_point(kind, proc, sweep_dir, seen, outcome.kept, since, epochs, after,
                                          round_timeout)
            except TimeoutError as err:
                outcome.problems.append(f"kill {round_ + 1}: {err}")
                say(outcome.problems[-1])
                stop_driver(proc, signal.SIGKILL, settle=0)
                break
            if not reached:
                outcome.problems.append(f"kill {round_ + 1} ({kind}): the sweep ended (status {proc.returncode}) "
                                        f"before the kill point")
                say(outcome.problems[-1])
                break
            seconds = time.monotonic() - start
            stop = stop_driver(proc, sig, group, stop_timeout, settle)
            # What the resume will read: the snapshots as the stopped driver left them.
            at_risk = seen | finished_all(sweep_dir)
            seen |= at_risk
            kill = Kill(kind, seconds, at_risk, len(at_risk - outcome.kept), stop)
            outcome.kills.append(kill)
            if stop.problem:
                outcome.problems.append(f"kill {round_ + 1}: {stop.problem}")
            say(f"kill {round_ + 1}/{kills} {kind:<9} at {seconds:5.0f}s: {len(at_risk)} finished trial(s) at risk "
                f"({kill.new} new), driver status {stop.status}, {len(stop.leftovers)} process(es) outlived it"
                + (f"; {stop.problem}" if stop.problem else ""))
        final = start_sweep(storage, name, args=sweep, resume=True, log=log)
        sessions.append(final.pid)
        try:
            outcome.final_status = final.wait(timeout=final_timeout)
        except subprocess.TimeoutExpired:
            outcome.problems.append(f"the final run did not finish within {final_timeout:.0f}s")
        say(f"final run: status {outcome.final_status} at {time.monotonic() - start:.0f}s")
        outcome.stale = [pid for session in sessions[:-1] for pid, _ in session_processes(session)]
        try:
            outcome.lost = outcome.kept - set(pd.read_parquet(sweep_dir / "trials.parquet")["trial_id"])
        except OSError as err:
            outcome.lost, outcome.check_error = outcome.kept, f"no trials.parquet: {err}"
        if outcome.check_error is None:
            try:
                outcome.counts = check(sweep_dir, outcome.kept)
            except (AssertionError, OSError) as err:
                outcome.check_error = str(err).splitlines()[0] if str(err) else type(err).__name__
    finally:
        for session in sessions:
            end_session(session)
    return outcome


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


def summary(outcome: Outcome) -> list[str]:
    """The totals, as lines."""
    risks = ", ".join(str(len(kill.at_risk)) for kill in outcome.kills)
    lines = [f"kills: {len(outcome.kills)} of {outcome.requested}; that put finished trials at risk: "
             f"{outcome.kills_at_risk} ({risks} trial(s))",
             f"finished before a kill: {len(outcome.kept)} trial(s); lost (missing from trials.parquet): "
             f"{len(outcome.lost)}" + (f" {sorted(outcome.lost)}" if outcome.lost else ""),
             f"processes of stopped drivers still running after the final run: {len(outcome.stale)}",
             f"check: {json.dumps(outcome.counts)}" if outcome.check_error is None
             else f"check FAILED: {outcome.check_error}"]
    lines += [f"problem: {problem}" for problem in outcome.problems]
    lines.append("OK" if outcome.ok else "FAILED")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--storage", type=Path, required=True)
    p.add_argument("--name", default="kill-resume")
    p.add_argument("--samples", type=int, default=6, help="search trials of the tiny sweep")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every trial (>= 2 for mid-epoch kills)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"kill points to cycle through ({', '.join(KINDS)})")
    p.add_argument("--after", type=int, default=1, help="'finished' kill: this many more trials finished")
    p.add_argument("--signal", choices=("KILL", "INT", "TERM"), default="KILL", help="sent to the driver")
    p.add_argument("--group", action="store_true", help="signal the driver's process group (as Ctrl-C does)")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="INT/TERM: seconds the driver has to exit")
    p.add_argument("--round-timeout", type=float, default=1200.0, help="seconds to wait for a kill point")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        p.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.epochs < 2 and "mid-epoch" in kinds:
        p.error("--epochs must be at least 2 for mid-epoch kills")
    outcome = kill_loop(args.storage, args.name, args.kills, sweep_args(args.samples, args.epochs), kinds,
                        getattr(signal, f"SIG{args.signal}"), args.group, args.after, args.round_timeout,
                        args.stop_timeout, log=args.storage / f"{args.name}.log")
    for line in summary(outcome):
        print(line)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
