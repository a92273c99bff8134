"""One driver per sweep (issue 17, item 6): a second driver of a running sweep is refused at once,
and a driver killed with SIGKILL leaves no lock behind."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps import lock
from sweeps.storage import Storage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from kill_resume import TINY_SWEEP, end_session, kill_driver, start_sweep, wait_for  # noqa: E402

HOLD = ("import sys, time\nfrom sweeps.lock import acquire\nfrom sweeps.storage import Storage\n"
        "acquire(Storage(sys.argv[1]), 'sweep')\nprint('held', flush=True)\ntime.sleep(600)\n")


def test_file_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.SweepLocked, match=rf"being run by another driver \(pid {holder.pid} on "
                                                    rf"{re.escape(socket.gethostname())}, since .*kill {holder.pid}"):
            lock.acquire(Storage(tmp_path), "sweep")
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock
        holder.wait()
        held = lock.acquire(Storage(tmp_path), "sweep")
        assert json.loads((tmp_path / "sweep" / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        held.release()
        assert not (tmp_path / "sweep" / lock.LOCK_FILE).exists()  # a clean release leaves nothing
    finally:
        holder.kill()
        holder.wait()


def test_lease_refuses_while_renewed_and_is_taken_over_when_stale(tmp_path):
    """The lease (storage without OS locks, e.g. s3://), exercised on local storage."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    other = {"pid": 4242, "host": "elsewhere", "since": time.time() - 30, "token": "theirs"}
    (sweep / lock.LEASE_FILE).write_text(json.dumps({**other, "renewed": time.time() - 5}))
    with pytest.raises(lock.SweepLocked, match=r"pid 4242 on elsewhere.*kill 4242 on elsewhere"):
        lock.acquire(Storage(tmp_path), "sweep", lease=True)
    (sweep / lock.LEASE_FILE).write_text(json.dumps({**other, "renewed": time.time() - lock.LEASE_STALE_S - 1}))
    held = lock.acquire(Storage(tmp_path), "sweep", lease=True)  # its driver stopped renewing: taken over
    assert json.loads((sweep / lock.LEASE_FILE).read_text())["pid"] == os.getpid()
    held.release()
    assert not (sweep / lock.LEASE_FILE).exists()


def test_second_driver_is_refused_and_a_killed_driver_leaves_no_lock(tmp_path):
    """Real drivers: a sweep runs; a second ``--resume`` of it exits 2 in seconds and touches nothing;
    after the first driver is SIGKILLed, the lock is free and a third ``--resume`` gets past the checks."""
    store = tmp_path / "store"
    args = list(TINY_SWEEP)
    args[args.index("--n-train") + 1] = "1024"  # long enough to still run during the second start
    state = store / "s" / "state.json"
    sessions = []
    try:
        first = start_sweep(store, "s", args, log=tmp_path / "first.log")
        sessions.append(first.pid)
        wait_for(state.exists, first, 300, "state.json")
        before = state.read_bytes()
        files = {p for p in (store / "s").rglob("*") if p.is_file()}

        start = time.monotonic()
        second = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), *args, "--storage", str(store),
                                 "--name", "s", "--resume"], cwd=REPO, text=True, capture_output=True, timeout=120)
        seconds = time.monotonic() - start
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
        assert re.search(rf"run_sweep.py: error: sweep '.*/s' is being run by another driver \(pid {first.pid} on "
                         rf".*\); wait for it to finish, or stop it \(kill {first.pid} on .*\) and then rerun with "
                         rf"--resume", second.stderr), second.stderr
        assert seconds < 30, seconds  # the checks only: no Ray cluster was started
        assert first.poll() is None and state.read_bytes() == before
        assert files <= {p for p in (store / "s").rglob("*") if p.is_file()}  # nothing removed

        kill_driver(first, settle=1.0)  # the driver only; Ray's processes of its session still run
        lock.acquire(Storage(store), "s").release()  # no process it left holds the lock
        end_session(first.pid)
        third = start_sweep(store, "s", args, resume=True, log=tmp_path / "third.log")
        sessions.append(third.pid)
        wait_for(lambda: "[potentials]" in (tmp_path / "third.log").read_text(), third, 300,
                 "a [potentials] line from the third driver")
        assert "being run by" not in (tmp_path / "third.log").read_text()
    finally:
        for session in sessions:
            end_session(session)
