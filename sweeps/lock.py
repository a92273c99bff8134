"""One driver per sweep: a lock taken before any Ray work and held for the life of the driver.

Two drivers on one sweep (a second ``--resume`` of a running sweep) would restore the same Tune
experiments and run the same trials twice at once, each overwriting the other's results.

* Local storage: ``fcntl.flock`` on ``<sweep>/.driver.lock``. The kernel drops the lock when the
  driver's process ends, however it ends (SIGKILL, OOM), so a dead driver never leaves it stuck.
  The holder writes its pid, host and start time into the file so a refusal can name it.
* Other storage (``s3://`` and other pyarrow URIs have no locks): a lease file ``<sweep>/.driver.lease``
  that a daemon thread renews every :data:`LEASE_RENEW_S`; a lease not renewed for
  :data:`LEASE_STALE_S` is taken over. It compares wall clocks of the hosts (NTP keeps them within
  far less than that) and it is best effort: two drivers starting within the same instant may both
  win a race on a store without conditional writes.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from sweeps.runner import SweepError
from sweeps.storage import Storage

LOCK_FILE = ".driver.lock"
LEASE_FILE = ".driver.lease"
LEASE_RENEW_S = 10.0
LEASE_STALE_S = 60.0


class SweepLocked(SweepError):
    """Another live driver runs this sweep."""


class _Held:
    """What :func:`acquire` returns; the last :meth:`release` gives the sweep up (process exit does too)."""

    count = 0  # acquisitions by this process not yet released

    def release(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self._release()

    def _release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


#: Locks this process holds, by sweep URI: one process is one driver, so taking its own lock again
#: (``run_sweep.main`` called twice in one process, as the tests do) is not a conflict. Kept here so
#: that nothing is garbage-collected (and closed) while the driver lives.
_HELD: dict[str, _Held] = {}


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another driver (it is still starting)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"another driver (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since})"


def _refusal(sweep: Storage, holder: dict[str, Any] | None) -> SweepLocked:
    pid = holder.get("pid") if holder else None
    stop = f"stop it (kill {pid} on {holder.get('host')})" if pid else "stop it"
    return SweepLocked(f"sweep '{sweep.uri}' is being run by {_describe(holder)}; wait for it to finish, or "
                       f"{stop} and then rerun with --resume")


def acquire(storage: Storage, name: str, lease: bool | None = None) -> _Held:
    """Lock sweep ``name`` in ``storage`` for this process, or raise :class:`SweepLocked`.

    ``lease`` picks the mechanism; by default a file lock where the storage is local, a lease elsewhere.
    """
    sweep = Storage(storage.uri_of(name))
    key = sweep.uri
    if key not in _HELD:
        use_lease = (not sweep.is_local) if lease is None else lease
        _HELD[key] = _Lease(sweep) if use_lease else _FileLock(sweep)
    held = _HELD[key]
    held.count += 1
    return held


class _FileLock(_Held):
    def __init__(self, sweep: Storage) -> None:
        import fcntl

        self.key = sweep.uri
        self.dir = sweep.root
        self.path = os.path.join(sweep.root, LOCK_FILE)
        self.made_dir = not os.path.isdir(self.dir)
        while True:
            try:
                os.makedirs(self.dir, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
            except OSError as err:
                raise SweepError(f"cannot create the sweep's lock file '{self.path}' ({err.strerror or err}); "
                                 f"fix the permissions of '{self.dir}' or pass another --storage") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._undo_dir()
                raise _refusal(sweep, holder) from None
            # A releasing holder unlinks the file while still holding it; if that happened between
            # our open and flock, we hold a lock on a file no one else will open: take the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        atexit.register(self._release)

    def _release(self) -> None:
        """Remove the file, then unlock (in that order: see the check in ``__init__``)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._undo_dir()
        _HELD.pop(self.key, None)

    def _undo_dir(self) -> None:
        if self.made_dir:  # a refused or failed start leaves no empty sweep folder behind
            try:
                os.rmdir(self.dir)
            except OSError:
                pass


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):
        return None


class _Lease(_Held):
    def __init__(self, sweep: Storage) -> None:
        self.sweep = sweep
        self.key = sweep.uri
        self.token = uuid.uuid4().hex
        self.holder = _holder()
        current = self._read()
        if current is not None and time.time() - current.get("renewed", 0) < LEASE_STALE_S:
            raise _refusal(sweep, current)
        self._write()
        time.sleep(0.5)  # a driver that wrote at the same moment: the later write wins, the other yields
        current = self._read()
        if current is None or current.get("token") != self.token:
            raise _refusal(sweep, current)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="sweep-lease", daemon=True)
        self.thread.start()
        atexit.register(self._release)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.sweep.read_bytes(LEASE_FILE))
        except (OSError, ValueError):  # none yet, or half written
            return None

    def _write(self) -> None:
        record = {**self.holder, "token": self.token, "renewed": time.time()}
        self.sweep.write_bytes(json.dumps(record).encode(), LEASE_FILE)

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_RENEW_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - storage briefly unreachable (pyarrow raises many types): retry
                continue

    def _release(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        current = self._read()
        if current is not None and current.get("token") == self.token:
            try:
                self.sweep.fs.delete_file(self.sweep.path(LEASE_FILE))
            except OSError:
                pass
        _HELD.pop(self.key, None)
