"""Ray's own snapshots of a phase, kept restorable when the disk fills while they are written.

Tune stages its driver state (``experiment_state-*.json``, the searcher's ``searcher-state-*.pkl``,
``search_gen_state-*.json``) locally and copies it into the storage *in place*; Ray Train writes each
run's ``checkpoint_manager_snapshot.json`` in place too. A full disk therefore leaves them truncated:
Tune then silently "restarts" the experiment from an empty state (new trials without the phase's
fixed config), and Train fails every later start of that run.

The copy into the storage also goes file by file, so a driver killed during it leaves whole files from
two moments: an experiment state listing a trial its searcher never suggested. Tune restores that
without complaint, and the trial's first result then fails the driver (``KeyError`` in the searcher)
on every later ``--resume``.

- :class:`SnapshotKeeper`, a Tune callback, copies Tune's driver state, whenever it changed and its
  files are whole and agree with each other, into ``<phase>/last-good/``.
- :func:`repair_phase`, before a phase is restored, puts that copy back over damaged or disagreeing
  driver state and sets damaged Train run snapshots aside (that unfinished trial then trains again
  from scratch).
"""
from __future__ import annotations

import json
import pickle
import pickletools
import time
from typing import Any, Callable

import pyarrow.fs as pafs
from ray.tune import Callback

from sweeps.storage import Storage

#: Tune's driver-state files in a phase folder, by file-name prefix.
TUNE_STATE_PREFIXES = ("experiment_state-", "search_gen_state-", "searcher-state-")
GOOD_COPY = "last-good"
#: Ray Train V2's record of a run's checkpoints, in each trial's Train run folder.
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: How often the keeper looks at Tune's files (Tune itself snapshots every 2 s here).
CHECK_EVERY_S = 2.0


#: Tune's files that are pickles (``search_gen_state-*.json`` too, whatever its name says).
PICKLED_PREFIXES = ("search_gen_state-", "searcher-state-")


def is_whole(name: str, data: bytes) -> bool:
    """Whether a JSON or pickle file's bytes are complete (a pickle is parsed, never loaded)."""
    if not data:
        return False
    try:
        if name.startswith(PICKLED_PREFIXES):
            for _ in pickletools.genops(data):  # raises on a pickle cut short
                pass
        else:
            json.loads(data)
    except Exception:  # ValueError from json, and whatever a torn pickle stream raises
        return False
    return True


def _newest(files: dict[str, bytes], prefix: str) -> bytes | None:
    names = sorted(name for name in files if name.startswith(prefix))  # what Tune restores: the newest name
    return files[names[-1]] if names else None


def agrees(files: dict[str, bytes]) -> bool:
    """Whether Tune's newest experiment state and its searcher's state (whole files) describe the
    same trials: the search generator made exactly the experiment's trials, the concurrency limiter
    waits on none other, and the searcher knows each of them. A phase without a searcher agrees."""
    experiment, generator, searcher = (_newest(files, prefix) for prefix in TUNE_STATE_PREFIXES)
    if experiment is None:
        return False
    if generator is None and searcher is None:
        return True
    try:
        trials = {json.loads(data)["trial_id"] for data, _ in json.loads(experiment)["trial_data"]}
        generated = pickle.loads(generator) if generator is not None else None
        # The searcher's pickle holds an Optuna study (and its database URL): look, do not load.
        known = ({arg for _, arg, _ in pickletools.genops(searcher) if isinstance(arg, str)}
                 if searcher is not None else trials)
    except Exception:  # not Tune's layout: treat as disagreeing, the good copy is Tune's own
        return False
    if generated is not None:
        live = generated.get("name:ConcurrencyLimiter", {}).get("live_trials", set())
        if generated.get("counter") != len(trials) or not set(live) <= trials:
            return False
    return trials <= known


def _tune_state(phase: Storage) -> dict[str, pafs.FileInfo]:
    selector = pafs.FileSelector(phase.root, allow_not_found=True)
    return {info.base_name: info for info in phase.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith(TUNE_STATE_PREFIXES)
            and info.base_name.endswith((".json", ".pkl"))}  # the names Tune's globs match, no set-aside ones


def has_tune_snapshot(phase: Storage) -> bool:
    """Whether Tune wrote an experiment snapshot of the phase (what a restore needs)."""
    return any(name.startswith("experiment_state-") for name in _tune_state(phase))


def keep_good_copy(phase: Storage) -> bool:
    """Copy Tune's driver state into ``last-good/`` if its files are whole and agree; False if not."""
    files = {name: phase.read_bytes(name) for name in _tune_state(phase)}
    if not files or not all(is_whole(name, data) for name, data in files.items()) or not agrees(files):
        return False
    for name, data in files.items():
        phase.write_bytes(data, GOOD_COPY, name)  # each write is atomic (temporary name, then move)
    for name in set(_good_copy_names(phase)) - set(files):  # Tune replaced a file: drop the old one
        phase.fs.delete_file(phase.path(GOOD_COPY, name))
    return True


def _good_copy_names(phase: Storage) -> list[str]:
    selector = pafs.FileSelector(phase.path(GOOD_COPY), allow_not_found=True)
    return [i.base_name for i in phase.fs.get_file_info(selector) if i.type == pafs.FileType.File
            and not i.base_name.startswith(".") and ".tmp-" not in i.base_name]


def _set_aside(phase: Storage, path: str) -> str:
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    phase.fs.move(path, aside)
    return aside.rsplit("/", 1)[-1]


def repair_phase(phase: Storage, say: Callable[[str], None]) -> None:
    """Make a phase's Ray snapshots loadable again before Tune restores it (see the module doc)."""
    state = {name: phase.read_bytes(name) for name in _tune_state(phase)}
    damaged = sorted(name for name, data in state.items() if not is_whole(name, data))
    problem = (f"damaged ({', '.join(damaged)})" if damaged else
               None if agrees(state) else "written at two moments (the driver stopped while copying it)")
    if problem:
        good = _good_copy_names(phase)
        if not good:
            raise RuntimeError(f"Tune's experiment state in '{phase.uri}' is {problem} and no good copy was "
                               f"kept; move the phase folder away and rerun with --resume to start that phase "
                               f"again (its finished trials are in the Optuna study)")
        for name in state:
            _set_aside(phase, phase.path(name))
        for name in good:
            phase.write_bytes(phase.read_bytes(GOOD_COPY, name), name)
        say(f"Tune state {problem} replaced by the last good copy; trials that finished after it are "
            f"restored as running and finish again from their checkpoints")
    selector = pafs.FileSelector(phase.path("train"), allow_not_found=True)
    for run in phase.fs.get_file_info(selector):
        snapshot = f"{run.path}/{TRAIN_SNAPSHOT}"
        if run.type != pafs.FileType.Directory or phase.fs.get_file_info(snapshot).type != pafs.FileType.File:
            continue
        with phase.fs.open_input_stream(snapshot) as f:
            data = f.read()
        if not is_whole(TRAIN_SNAPSHOT, data):
            aside = _set_aside(phase, snapshot)
            say(f"{run.base_name}: its Ray Train snapshot was damaged ({len(data)} bytes, kept as {aside}); "
                f"that trial starts its training over")


class SnapshotKeeper(Callback):
    """Tune callback: after Tune's periodic snapshot, keep a whole copy of it (see the module doc)."""

    def __init__(self, phase_uri: str) -> None:
        self.phase_uri = phase_uri
        self._phase: Storage | None = None
        self._seen: dict[str, Any] = {}
        self._next_check = 0.0

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks: keep the file system out
        return {"phase_uri": self.phase_uri, "_phase": None, "_seen": {}, "_next_check": 0.0}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        try:
            if self._phase is None:
                self._phase = Storage(self.phase_uri)
            stamps = {name: info.mtime_ns for name, info in _tune_state(self._phase).items()}
            if stamps and stamps != self._seen and keep_good_copy(self._phase):
                self._seen = stamps
        except OSError:  # e.g. the disk is full right now: the previous good copy stays as it was
            pass
