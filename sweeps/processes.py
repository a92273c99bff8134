"""Processes recorded as ``(pid, start time)`` and ended later only if that pair still matches.

A PID alone may have been reused by an unrelated process by the time it is read back; its start
time tells them apart. Used by the sweep driver (what a killed driver's local Ray cluster left),
``cluster/local-cluster down`` and ``scripts/kill_resume.py``.

psutil is Ray's bundled copy (``ray/thirdparty_files``, put on ``sys.path`` by importing Ray), so
this module imports Ray lazily and adds no dependency.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import psutil as _psutil_module

#: Start times are floats from /proc; the same process reads back equal well within this.
SAME_START_TOLERANCE_S = 0.01
Identity = tuple[int, float]


def psutil():  # noqa: ANN201 (the module; typed lazily)
    """Ray's bundled psutil."""
    import ray  # noqa: F401  puts ray/thirdparty_files on sys.path
    import psutil as module
    return module


def identity(proc: "_psutil_module.Process") -> Identity:
    """``(pid, start time)`` of a live process; raises ``psutil.Error`` if it is gone."""
    return proc.pid, proc.create_time()


def find(pid: int, created: float, include_zombies: bool = False) -> "_psutil_module.Process | None":
    """The process recorded as ``(pid, created)`` if it still runs, else None (gone or PID reused)."""
    ps = psutil()
    try:
        proc = ps.Process(int(pid))
        if abs(proc.create_time() - created) >= SAME_START_TOLERANCE_S:
            return None
        if not include_zombies and proc.status() == ps.STATUS_ZOMBIE:
            return None
        return proc
    except ps.Error:
        return None


def alive(recorded: Iterable[Sequence[float]]) -> list["_psutil_module.Process"]:
    """The recorded ``(pid, start time)`` pairs that still run."""
    return [p for p in (find(int(pid), created) for pid, created in recorded) if p is not None]


def end(procs: Iterable["_psutil_module.Process"], grace_s: float = 3.0) -> list[int]:
    """SIGTERM ``procs``, SIGKILL those still running after ``grace_s``; returns their PIDs."""
    ps = psutil()
    procs = list(procs)
    for proc in procs:
        try:
            proc.terminate()
        except ps.Error:
            pass
    _, still = ps.wait_procs(procs, timeout=grace_s)
    for proc in still:
        try:
            proc.kill()
        except ps.Error:
            pass
    ps.wait_procs(still, timeout=min(grace_s, 5.0))
    return [p.pid for p in procs]
