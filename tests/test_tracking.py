"""W&B tracking: real offline runs written by wandb and read back by our record-log reader."""
import contextlib
import http.server
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from sweeps import tracking  # noqa: E402
from sweeps.tracking import TrialLogger, flatten_record, log_leaderboard, resolve_mode  # noqa: E402
from sweeps.wandb_offline import CorruptLogError, find_offline_runs, is_complete, iter_chunks, read_offline_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

FAKE_KEY = "fakekey-" + "0123456789abcdef" * 3
TASKS = ("segmentation", "depth", "normal")


@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch, tmp_path):
    """No key, no server, no home-directory state; a fresh wandb service per test.

    wandb reads its environment once per process setup, so each test tears the setup down.
    """
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT",
                 "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield
    wandb.teardown()


def _record(epoch: int) -> dict:
    """A per-epoch record shaped like ``amtl.trainer.Trainer.fit``'s."""
    return {
        "epoch": epoch, "step": 10 * epoch,
        "train_loss": {t: 1.0 / epoch + i for i, t in enumerate(TASKS)},
        "train_seconds": 1.5 * epoch, "images_per_second": 100.0 + epoch,
        "val": {"segmentation/miou": 0.1 * epoch, "depth/abs_err": 0.5 / epoch, "normal/within_11.25": 0.2 + epoch / 10},
        "kpis": {t: 0.3 * epoch + i / 7 for i, t in enumerate(TASKS)},
        "weights": {t: 1.0 + (epoch + i) / 3 for i, t in enumerate(TASKS)},
        "lr": 1e-3 / epoch, "val_delta_m": -2.5 * epoch,
    }


def _files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


def _only_run(directory: Path) -> Path:
    runs = find_offline_runs(directory)
    assert len(runs) == 1, runs
    return runs[0]


def test_resolve_mode(monkeypatch, tmp_path):
    assert resolve_mode() == "offline"
    assert resolve_mode("online") == "offline"  # no key: never prompt, go offline
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode() == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("online") == "offline"  # forced offline wins over a key
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode() == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode() == "online"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def test_flatten_record_keys():
    flat = flatten_record(_record(2))
    assert flat["val/segmentation/miou"] == pytest.approx(0.2)
    assert flat["kpi/depth"] == _record(2)["kpis"]["depth"]
    assert flat["weight/normal"] == _record(2)["weights"]["normal"]
    assert flat["train_loss/depth"] == _record(2)["train_loss"]["depth"]
    assert flat["val_delta_m"] == -5.0 and flat["epoch"] == 2 and flat["global_step"] == 20


def test_trial_logger_round_trip(tmp_path):
    directory = tmp_path / "sweep" / "wandb"
    # A config larger than a 32 KiB block makes the reader reassemble FIRST/MIDDLE/LAST chunks.
    config = {"balancer": "amtl", "hparams": {"focusing": 2.0}, "seed": 3, "notes": "n" * 70_000}
    logger = TrialLogger("amtl-test", entity=None, group="amtl", job_type="trial", tags=["amtl", "scenes"],
                         config=config, run_id="trial0001", name="amtl-0", directory=directory, mode="offline")
    assert logger.active and logger.mode == "offline"
    for epoch in (1, 2, 3):
        logger.log_epoch(_record(epoch))
    logger.set_summary({"best": {"val": {"segmentation/miou": 0.3}, "test": {"depth/abs_err": 0.2}},
                        "test_delta_m": -4.0})
    logger.finish()
    logger.finish()  # idempotent

    assert is_complete(_only_run(directory))  # finish() returned only once the log was on disk
    run = read_offline_run(_only_run(directory))  # runs sit directly in the `wandb` folder given
    assert (run.run_id, run.name, run.group, run.job_type) == ("trial0001", "amtl-0", "amtl", "trial")
    assert run.tags == ["amtl", "scenes"] and run.project == "amtl-test"
    assert run.config == config
    assert run.finished and run.exit_code == 0
    assert [row["_step"] for row in run.history] == [1, 2, 3]
    for row, epoch in zip(run.history, (1, 2, 3)):
        expected = flatten_record(_record(epoch))
        assert {k: row[k] for k in expected} == expected
    assert run.summary["best/val/segmentation/miou"] == 0.3
    assert run.summary["best/test/depth/abs_err"] == 0.2
    assert run.summary["test_delta_m"] == -4.0
    assert run.summary["val_delta_m"] == -7.5  # last logged value


def test_resumed_trial_keeps_its_run_id(tmp_path):
    """A trial restarted from its checkpoint logs the remaining epochs under the same run id."""
    directory = tmp_path / "wandb"
    for epochs in ((1, 2), (3,)):
        with TrialLogger("p", group="g", run_id="resume01", directory=directory, mode="offline") as logger:
            for epoch in epochs:
                logger.log_epoch(_record(epoch))
    runs = [read_offline_run(path) for path in find_offline_runs(directory)]
    assert [r.run_id for r in runs] == ["resume01", "resume01"]
    assert [[row["epoch"] for row in r.history] for r in runs] == [[1, 2], [3]]


def test_disabled_mode_writes_nothing(tmp_path):
    logger = TrialLogger("p", directory=tmp_path / "wandb", mode="disabled")
    logger.log_epoch(_record(1))
    logger.set_summary({"a": 1})
    logger.finish()
    assert not logger.active and not (tmp_path / "wandb").exists()


def test_unreachable_server_falls_back_offline_without_leaking_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # loopback discard port: nothing listens
    assert resolve_mode() == "online"
    directory = tmp_path / "wandb"
    start = time.monotonic()
    logger = TrialLogger("p", group="g", job_type="trial", config={"lr": 0.1, "wandb_api_key": FAKE_KEY,
                         "note": f"key={FAKE_KEY}"}, run_id="fallback1", directory=directory, mode="online")
    assert time.monotonic() - start < 5.0
    assert logger.active and logger.mode == "offline"
    logger.log_epoch(_record(1))
    logger.finish()
    run = read_offline_run(_only_run(directory))
    assert run.run_id == "fallback1" and run.history[0]["kpi/depth"] == _record(1)["kpis"]["depth"]
    assert run.config == {"lr": 0.1, "note": "key=***"}
    assert _files_containing(tmp_path, FAKE_KEY) == []


class _FakeServer(http.server.BaseHTTPRequestHandler):
    """Loopback stand-in for a W&B server: ``viewer_ok`` says whether the key check passes."""

    viewer_ok = False

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.viewer_ok and b"viewer" in body and b"resume" not in body.lower():
            payload, status = b'{"data": {"viewer": {"id": "u1"}}}', 200
        else:
            payload, status = b'{"errors": [{"message": "bad key"}]}', 401 if not self.viewer_ok else 500
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(kind: str):
    """Yield the base URL of a loopback server that is ``silent``, ``rejects`` keys or ``breaks`` init."""
    if kind == "silent":
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(64)  # never accepted: connections open, requests hang
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
        return
    handler = type("Handler", (_FakeServer,), {"viewer_ok": kind == "breaks"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["silent", "rejects"])
def test_unusable_server_falls_back_offline_within_5s(monkeypatch, tmp_path, kind):
    """A host that never answers, or one that refuses the key: offline within 5 s, data intact."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    directory = tmp_path / "wandb"
    with _serve(kind) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        start = time.monotonic()
        logger = TrialLogger("p", config={"lr": 0.1}, run_id=f"{kind}1", directory=directory, mode="online")
        elapsed = time.monotonic() - start
    assert logger.active and logger.mode == "offline"
    assert elapsed < 5.0
    for epoch in (1, 2):
        logger.log_epoch(_record(epoch))
    logger.finish()
    run = read_offline_run(_only_run(directory))
    assert run.run_id == f"{kind}1" and [r["_step"] for r in run.history] == [1, 2]
    assert not list(directory.glob("run-*"))  # no online run folder
    assert _files_containing(tmp_path, FAKE_KEY) == []


def test_failed_online_init_recovers_offline(monkeypatch, tmp_path):
    """The key check passes but wandb.init fails: the wandb service restarts, the same id goes offline."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    directory = tmp_path / "wandb"
    with _serve("breaks") as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        logger = TrialLogger("p", run_id="breaks1", directory=directory, mode="online", init_timeout=1.0)
    assert logger.active and logger.mode == "offline" and logger.run_id == "breaks1"
    logger.log_epoch(_record(1))
    logger.finish()
    run = read_offline_run(_only_run(directory))
    assert run.run_id == "breaks1" and run.history[0]["epoch"] == 1
    assert not list(directory.glob("run-*"))  # the failed attempt's header-only folder is gone
    assert _files_containing(tmp_path, FAKE_KEY) == []


def test_leaderboard_table_and_images(tmp_path):
    from PIL import Image

    plot = tmp_path / "pareto.png"
    Image.new("RGB", (8, 6), (200, 30, 30)).save(plot)
    rows = [
        {"method": "amtl", "best_config": {"focusing": 2.0, "lr": 0.001}, "delta_m_mean": -3.25,
         "delta_m_ci": [-4.0, -2.5], "kpi/segmentation": 0.71, "kpi/depth": 0.8, "compute_seconds": 120.5},
        {"method": "ew", "best_config": {"lr": 0.003}, "delta_m_mean": 1.5,
         "delta_m_ci": [0.5, 2.5], "kpi/segmentation": 0.66, "kpi/depth": 0.74, "compute_seconds": 98.0},
    ]
    directory = tmp_path / "wandb"
    run_dir = log_leaderboard("p", None, "sweep-1", directory, "offline", rows, {"pareto": plot})
    assert run_dir is not None and run_dir == _only_run(directory)
    run = read_offline_run(run_dir)
    assert run.job_type == "leaderboard" and run.group == "sweep-1"
    table = run.tables["leaderboard"]
    assert table["columns"] == list(rows[0])
    expected = [[json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in row.values()]
                for row in rows]
    assert table["data"] == expected
    assert json.loads(table["data"][0][1]) == rows[0]["best_config"]
    assert run.summary["pareto"]["_type"] == "image-file"
    assert (run_dir / "files" / run.summary["pareto"]["path"]).is_file()


def test_logging_errors_are_swallowed_and_warned_once(tmp_path, caplog):
    logger = TrialLogger("p", run_id="broken1", directory=tmp_path / "wandb", mode="offline")
    assert logger.active
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        logger.log({"unserialisable": object()})  # wandb raises TypeError inside log
        assert not logger.active
        logger.log_epoch(_record(1))
        logger.set_summary({"x": 1})
        logger.finish()
    warnings = [r for r in caplog.records if r.name == tracking.__name__]
    assert len(warnings) == 1 and "broken1" in warnings[0].getMessage()

    other = TrialLogger("p", run_id="broken2", directory=tmp_path / "wandb", mode="offline")
    other._run.finish()  # closed behind the logger's back: wandb's log raises UsageError
    other.log_epoch(_record(1))
    other.set_summary({"x": 1})
    other.finish()
    assert not other.active


def test_reader_rejects_foreign_and_tolerates_truncated_logs(tmp_path):
    with pytest.raises(CorruptLogError):
        list(iter_chunks(b"not a wandb log at all"))
    logger = TrialLogger("p", run_id="trunc1", directory=tmp_path / "wandb", mode="offline")
    logger.log_epoch(_record(1))
    logger.finish()
    log_file = next(_only_run(tmp_path / "wandb").glob("run-*.wandb"))
    data = log_file.read_bytes()
    assert len(list(iter_chunks(data[:-3]))) == len(list(iter_chunks(data))) - 1
    corrupt = bytearray(data)
    corrupt[20] ^= 0xFF
    with pytest.raises(CorruptLogError):
        list(iter_chunks(bytes(corrupt)))


# A trial stopped by ASHA, or one whose worker died, ends by SIGKILL: no atexit hook, no finish().
# Ray also kills the worker's child processes. The child logs its epochs, says so, then waits.
_KILLED_TRIAL = """
import json, sys
from sweeps import tracking
from sweeps.tracking import TrialLogger

logger = TrialLogger("p", group="g", job_type="trial", run_id="killed1", directory=sys.argv[1], mode="offline")
for record in json.loads(sys.argv[2]):
    logger.log_epoch(record)
print("logged", tracking._service[0], flush=True)
sys.stdin.read()  # until killed (or the test goes away)
"""


def _descendants(pid: int) -> list[int]:
    """Pids of the child processes of ``pid``, recursively, from /proc (as psutil's ``children``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes through /proc")
def test_epochs_of_a_killed_trial_reach_disk(tmp_path):
    """Every epoch logged before a SIGKILL is in the offline run, and its summary holds the last values.

    The kill takes the trial's process group and every child process of the trial, as Ray does when
    it ends a worker: whatever writes the log must be neither. The trial's wandb-core is ended by its
    watcher's teardown, well before its idle shutdown (the backstop, which under load can exit
    without closing the run's stream) could have ended it.
    """
    directory = tmp_path / "wandb"
    records = [_record(1), _record(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_TRIAL, str(directory), json.dumps(records)],
                                 env=env, cwd=tmp_path, start_new_session=True, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 120)
            line = child.stdout.readline() if ready else ""
            if line.startswith("logged "):
                core = int(line.split()[1])
                victims = _descendants(child.pid)  # collected first: once the trial is dead they are orphans
                killed_at = time.monotonic()
                os.killpg(child.pid, signal.SIGKILL)
                for pid in victims:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            child.kill()
            child.communicate(timeout=30)
        stderr.seek(0)
        assert line.startswith("logged ") and child.returncode == -signal.SIGKILL, stderr.read()
    run_dir = _only_run(directory)
    expected = flatten_record(records[-1])
    # Half the idle backstop: a core that ends sooner was ended by the watcher.
    deadline = killed_at + tracking.SERVICE_IDLE_TIMEOUT_S / 2
    while tracking._core_running(core) and time.monotonic() < deadline:
        time.sleep(0.1)
    core_exit_s = time.monotonic() - killed_at
    run = read_offline_run(run_dir)
    # Say what the trial printed and what wandb-core logged (its debug-internal.log says whether the
    # stream was closed: "stream: finishing up").
    logs = {f.name: f.read_text()[-1500:] for f in sorted((run_dir / "logs").glob("debug-*.log"))}
    why = f"trial stderr: {(tmp_path / 'stderr.txt').read_text()[-2000:]!r}; log bytes: " \
          f"{[f.stat().st_size for f in run_dir.glob('run-*.wandb')]}; wandb logs: {logs}"
    assert not tracking._core_running(core), f"wandb-core still runs {core_exit_s:.1f} s after the kill; {why}"
    assert run.run_id == "killed1" and run.group == "g", why
    assert [row["_step"] for row in run.history] == [1, 2]
    for row, record in zip(run.history, records):
        assert {k: row.get(k) for k in flatten_record(record)} == flatten_record(record)
    assert {k: run.summary.get(k) for k in expected} == expected


def test_failed_service_launch_falls_back_to_wandbs_own(monkeypatch, tmp_path, caplog):
    """A launcher that cannot start wandb-core (here: one that fails at once) costs a warning, not the run."""
    monkeypatch.setattr(tracking, "_LAUNCHER", "import sys; sys.exit('no wandb-core here')")
    monkeypatch.setattr(tracking, "_service", None)
    monkeypatch.setattr(tracking, "_service_broken", False)
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        with TrialLogger("p", run_id="fallback2", directory=tmp_path / "wandb", mode="offline") as logger:
            logger.log_epoch(_record(1))
    assert "no wandb-core here" in caplog.text
    run = read_offline_run(_only_run(tmp_path / "wandb"))
    assert run.finished and [row["_step"] for row in run.history] == [1]
