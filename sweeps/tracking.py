"""Weights & Biases logging for sweeps: one run per trial, plus a leaderboard run.

W&B is used directly from inside the trainable rather than through Ray's ``WandbLoggerCallback``:
with wandb 0.31 in offline mode the callback left some runs as header-only files, while direct use
delivered every run. Nothing here imports Ray, so it runs (and is tested) without a cluster.

Tracking must never stop or stall a sweep: the mode falls back to offline when no API key is
available, an unreachable or misconfigured server costs at most a few seconds before the run goes
offline, and any error while logging disables logging for that run after one warning.

Epochs survive a killed trial (ASHA stops trials by SIGKILL: no atexit hook, no ``finish()``).
wandb-core, not the SDK, holds what is lost: ``log`` hands the record to its socket before
returning, but wandb-core writes an offline log in whole 32 KiB blocks (a partial block only every
~15 s and when the run's stream closes), and the service wandb starts by itself exits together with
the process that started it, dropping that buffer. Trials therefore use a wandb-core of their own
process started *detached* (own session, so also out of reach of a process-group kill). A detached
watcher beside it sees the trial's process end and sends the core the teardown wandb sends at a
normal exit: the core closes every run's stream, which writes history, summary (latest values) and
exit record, then exits. The core's own idle shutdown is not trusted with that: under CPU load
wandb-core 0.31's idle shutdown was seen to exit before closing the stream (6 of 50 killed trials
with three busy loops on two cores), leaving a header-only log; it stays as the backstop, after
``SERVICE_IDLE_TIMEOUT_S``. A short-lived launcher process starts both and exits, so neither is a
child of the trial: Ray kills the child processes of a worker it ends. If the core cannot be
started, wandb's own service is used, as before.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import netrc
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlparse

from sweeps.wandb_offline import wait_complete

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# Prefixes of the per-epoch record's dict-valued fields in the logged keys (``kpi/depth``).
_PREFIXES = {"val": "val", "kpis": "kpi", "weights": "weight", "train_loss": "train_loss"}
# The trainer's optimizer step counter would clash with W&B's own ``_step``.
_RENAMES = {"step": "global_step"}
_SECRET_WORDS = ("api_key", "apikey", "token", "password", "secret")
# Budget of the pre-flight request; with the offline start after it, fallback stays under 5 s.
_PROBE_TIMEOUT_S = 2.0

# Seconds a trial's detached wandb-core waits after its last client went before it shuts down by
# itself: the backstop should the watcher fail, long enough that the watcher's teardown comes first.
# Without /proc there is no watcher, and the idle shutdown is all there is.
SERVICE_IDLE_TIMEOUT_S = 60 if Path("/proc/self/stat").exists() else 3
_SERVICE_ENV = "WANDB_SERVICE"  # wandb.env.SERVICE: the service a new wandb connection uses
# Interpreter start and ``import wandb`` (~0.4 s) plus wandb's own wait for the core (30 s by default).
_LAUNCH_TIMEOUT_S = 60.0
# Run by the launcher (argv: idle timeout, the watcher's code, the trial's pid): start a detached
# wandb-core and, where /proc exists, its detached watcher; print the core's pid and WANDB_SERVICE
# token; exit. (wandb's handle shows the pid only on its Popen; any error makes the launcher fail,
# hence the fallback.)
_LAUNCHER = """
import os, subprocess, sys, wandb
from wandb.sdk.lib.service import service_process
core = service_process.start_detached(wandb.Settings(), idle_timeout=sys.argv[1])
if os.path.exists("/proc/self/stat"):
    subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3], str(core._process.pid), core.token.env_value],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
print(core._process.pid, core.token.env_value, flush=True)
"""
# Run detached (argv: the trial's pid, its core's pid, the core's WANDB_SERVICE token): wait until the
# trial's process is gone, then send its core wandb's teardown (finish every run, then exit). It
# imports wandb only then, so a waiting watcher costs a bare interpreter. A process is known by its
# start time in /proc/<pid>/stat, so a reused pid does not keep the watcher waiting.
_WATCHER = """
import os, sys, time
trial, core, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]
trial_started, core_started = start_time(trial), start_time(core)
while trial_started is not None and start_time(trial) == trial_started:
    if start_time(core) != core_started:
        sys.exit()
    time.sleep(0.1)
if core_started is None or start_time(core) != core_started:
    sys.exit()
os.environ["WANDB_SERVICE"] = token
from wandb.proto import wandb_server_pb2 as spb
from wandb.sdk.lib import asyncio_manager
from wandb.sdk.lib.service import service_token
asyncer = asyncio_manager.AsyncioManager()
asyncer.start()
client = service_token.from_env().connect(asyncer=asyncer)
async def teardown():
    await client.publish(spb.ServerRequest(inform_teardown=spb.ServerInformTeardownRequest(exit_code=1)))
    await client.close()
asyncer.run(teardown)
asyncer.join()
"""
_HAVE_PROC = Path("/proc/self/cmdline").exists()

# The detached wandb-core this process started (its pid and WANDB_SERVICE token) and the pid that started it.
_service: tuple[int, str] | None = None
_service_pid: int | None = None
_service_broken = False
_service_lock = threading.Lock()

# Run ids of the live runs this process opened, so a failed online start knows whether tearing
# down the process-wide wandb service would end somebody else's run.
_live: set[str] = set()
_live_lock = threading.Lock()


def _quiet() -> None:
    # wandb prints banners and may ask for a key on a TTY; sweeps and CI have neither.
    os.environ.setdefault("WANDB_SILENT", "true")


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _api_key() -> str | None:
    """The key W&B would use without asking: ``WANDB_API_KEY``, else the netrc entry of the server."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(_base_url()).hostname or ""
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            return auth[2]
    return None


def resolve_mode(requested: str | None = None) -> str:
    """The W&B mode to use: ``disabled`` when asked, ``online`` only with an API key, else ``offline``.

    ``requested`` None defers to ``WANDB_MODE``. ``WANDB_MODE=offline`` (or ``dryrun``) forces
    offline even when ``online`` is requested. Never prompts for a key.
    """
    _quiet()
    env = (os.environ.get("WANDB_MODE") or "").strip().lower()
    mode = (requested or env or "online").strip().lower()
    if mode == "dryrun":
        mode = "offline"
    if mode not in MODES:
        raise ValueError(f"unknown W&B mode {requested or env!r}; use one of {', '.join(MODES)}")
    if mode == "disabled":
        return "disabled"
    if mode == "offline" or env in ("offline", "dryrun"):
        return "offline"
    return "online" if _api_key() else "offline"


def _core_running(pid: int) -> bool:
    """Whether wandb-core ``pid`` runs. It is not our child, so there is no handle to poll."""
    if _HAVE_PROC:  # a zombie's cmdline is empty; a reused pid is another program
        try:
            return b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _service_alive() -> bool:
    """Whether this process's detached wandb-core is running (False when there is none)."""
    if _service is None or _service_pid != os.getpid():  # a forked child does not own its parent's
        return False
    return _core_running(_service[0])


def _launch_service() -> tuple[int, str]:
    """Start a detached wandb-core and its watcher through a launcher process; return the core's pid
    and WANDB_SERVICE token.

    The launcher exits once the core listens, so the parent of both becomes init (or a subreaper):
    whoever kills this process's children (Ray, ending a worker) does not reach them.
    """
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, f"{SERVICE_IDLE_TIMEOUT_S}s", _WATCHER, str(os.getpid())],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_LAUNCH_TIMEOUT_S)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = done.stderr.strip().splitlines()
        raise RuntimeError(f"launcher exited with {done.returncode}: {error[-1] if error else 'no output'}")
    pid, token = lines[-1].split(" ", 1)
    return int(pid), token


def _service_token() -> str | None:
    """``WANDB_SERVICE`` value of this process's detached wandb-core, started if need be.

    None leaves the choice to wandb: a service named in the environment (a shared one someone set
    up), or wandb's own after a failed start (warned once).
    """
    global _service, _service_pid, _service_broken
    with _service_lock:
        current = os.environ.get(_SERVICE_ENV)
        token = _service[1] if _service is not None and _service_alive() else None
        if current and current != token:
            return None
        if token:
            return token
        if _service_broken:
            return None
        try:
            _service = _launch_service()
            _service_pid = os.getpid()
            return _service[1]
        except Exception as e:  # an older or newer wandb without this API, or a failed start
            _service_broken = True
            _service = None
            log.warning("cannot start a detached wandb service (%s: %s); using wandb's own, so a killed "
                        "trial may lose its last epochs", type(e).__name__, e)
            return None


def _stop_service() -> None:
    """End this process's detached wandb-core (it holds no live run); the next start makes another."""
    global _service
    with _service_lock:
        alive = _service_alive()
        service, _service = _service, None
        if alive and service is not None:
            with contextlib.suppress(OSError):  # it may have idled out since
                os.kill(service[0], signal.SIGTERM)


@contextlib.contextmanager
def _detached_service() -> Iterator[bool]:
    """Point wandb at this process's detached wandb-core while a run starts; yields whether it did.

    wandb reads ``WANDB_SERVICE`` only when it connects, so the variable is put back afterwards
    and processes started later do not inherit a service they do not own.
    """
    token = _service_token()
    if token is None:
        yield False
        return
    previous = os.environ.get(_SERVICE_ENV)
    os.environ[_SERVICE_ENV] = token
    try:
        yield True
    finally:
        if previous is None:
            os.environ.pop(_SERVICE_ENV, None)
        else:
            os.environ[_SERVICE_ENV] = previous


def _server_accepts_key(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether the W&B server answers a tiny authenticated query within ``timeout`` seconds.

    A failed ``wandb.init`` leaves its run id registered in the process-wide wandb service, and
    recovering costs a service restart (several seconds). One cheap request first catches the
    usual failures (no network, silent host, wrong URL, rejected key) before wandb sees the run.
    The key goes only to the configured server, as wandb itself would send it.
    """
    key = _api_key()
    if not key:
        return False
    auth = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(
        _base_url().rstrip("/") + "/graphql", data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
        return bool((body.get("data") or {}).get("viewer"))
    except Exception as e:  # URLError, HTTPError (401/404/5xx), timeouts, non-JSON answers
        log.warning("W&B server %s is not usable (%s); logging offline", _base_url(), type(e).__name__)
        return False


def _scrub(value: Any) -> Any:
    """Copy of a config without secrets: keys that name one are dropped, the API key is masked."""
    key = _api_key()
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items()
                if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and key and key in value:
        return value.replace(key, "***")
    return value


def _number(value: Any) -> float | int | None:
    if isinstance(value, (str, bytes)):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:  # numpy scalars and 0-d tensors
        return float(value)
    except (TypeError, ValueError):
        return None


def flatten_record(record: Mapping[str, Any]) -> dict[str, float | int]:
    """Per-epoch trainer record as flat W&B keys (``val/segmentation/miou``, ``weight/normal``)."""
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            prefix = _PREFIXES.get(key, key)
            for sub, v in value.items():
                number = _number(v)
                if number is not None:
                    out[f"{prefix}/{sub}"] = number
        else:
            number = _number(value)
            if number is not None:
                out[_RENAMES.get(key, key)] = number
    return out


def _flatten_summary(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_summary(value, name + "/"))
        else:
            out[name] = value
    return out


def _json_cell(value: Any) -> Any:
    """Table cells are scalars; configs and other structures travel as JSON strings."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, sort_keys=True, default=str)
    number = _number(value)  # numpy scalars
    return number if number is not None else str(value)


class TrialLogger:
    """One W&B run per trial; every method is safe to call whatever state wandb is in.

    Runs are written under ``directory``: when it is named ``wandb`` (the sweep passes
    ``<storage>/<sweep>/wandb``) the run folders go directly inside it, otherwise inside
    ``directory/wandb`` (wandb always appends that name to its root).
    """

    def __init__(self, project: str, entity: str | None = None, group: str | None = None,
                 job_type: str | None = None, tags: Sequence[str] = (), config: Mapping[str, Any] | None = None,
                 run_id: str | None = None, name: str | None = None, directory: str | Path = "wandb",
                 mode: str | None = None, init_timeout: float = 5.0, finish_timeout: float = 30.0) -> None:
        self.mode = resolve_mode(mode)
        self._finish_timeout = finish_timeout
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.directory = Path(directory)
        self._run: Any = None
        self._failed = False
        if self.mode == "disabled":
            return
        self._kwargs = dict(project=project, entity=entity, group=group, job_type=job_type,
                            tags=list(tags) or None, config=_scrub(dict(config or {})), id=self.run_id,
                            name=name, resume="allow", reinit="create_new")
        root = self.directory.parent if self.directory.name == "wandb" else self.directory
        self.directory = root / "wandb"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._disable("cannot create the W&B directory", e)
            return
        self._root = root
        if self.mode == "online":
            self._run = self._start_online(init_timeout)
        if self._run is None and not self._failed:
            self.mode = "offline"
            self._run = self._start("offline", init_timeout=30.0)
        if self._run is not None:
            with _live_lock:
                _live.add(self.run_id)

    # -- start-up ----------------------------------------------------------------------------
    def _settings(self, init_timeout: float) -> Any:
        import wandb

        # console="off": no stdout capture inside Ray workers; no code or git snapshot per trial.
        return wandb.Settings(silent=True, init_timeout=init_timeout, console="off", save_code=False,
                              use_dot_wandb=False, root_dir=str(self._root))

    def _init(self, mode: str, init_timeout: float) -> Any:
        import wandb

        for attempt in (1, 2):
            with _detached_service() as own:
                try:
                    if own:
                        wandb.setup()  # connects now: a fresh service's idle clock runs until then
                    return wandb.init(dir=str(self._root), mode=mode, settings=self._settings(init_timeout),
                                      **self._kwargs)
                except Exception:
                    # Our service idled out between the liveness check and the connect (possible
                    # only after a wandb.teardown in this process): once more with a fresh one.
                    if not own or attempt == 2 or _service_alive():
                        raise
        raise AssertionError("unreachable")

    def _start(self, mode: str, init_timeout: float) -> Any:
        try:
            return self._init(mode, init_timeout)
        except Exception as e:  # wandb raises many types (CommError, UsageError, ServerResponseError ...)
            if mode == "offline":
                self._disable("could not start an offline W&B run", e)
            else:
                log.warning("W&B online start failed (%s: %s); logging this trial offline",
                            type(e).__name__, e)
            return None

    def _start_online(self, init_timeout: float) -> Any:
        if not _server_accepts_key():
            return None
        pattern = f"run-*-{self.run_id}"
        before = set(self.directory.glob(pattern))
        run = self._start("online", init_timeout)
        if run is not None:
            return run
        # The failed attempt's folder holds only a header; drop it so readers do not see a run.
        for stale in set(self.directory.glob(pattern)) - before:
            shutil.rmtree(stale, ignore_errors=True)
        # The failed start left its stream registered in the wandb service: reusing the run id
        # there blocks forever ("run ID is in use"). Restart the service when no other run of
        # this process needs it; otherwise keep the offline copy under a distinct id.
        with _live_lock:
            others = bool(_live)
        if others:
            self.run_id = f"{self.run_id}-offline"
            self._kwargs["id"] = self.run_id
        else:
            try:
                import wandb

                wandb.teardown()
            except Exception as e:
                log.warning("wandb teardown after a failed online start: %s", e)
            _stop_service()  # a detached service outlives the teardown, and so would the stale id
        return None

    def _disable(self, what: str, error: BaseException) -> None:
        if not self._failed:
            log.warning("%s (%s: %s); W&B logging is off for run %s", what, type(error).__name__, error, self.run_id)
        self._failed = True
        run, self._run = self._run, None
        with _live_lock:
            _live.discard(self.run_id)
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # already broken; finishing is best effort
                pass

    # -- logging -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether a run is open and logging."""
        return self._run is not None

    @property
    def run_dir(self) -> Path | None:
        """Folder of this run (``offline-run-...`` or ``run-...``), None when not logging."""
        if self._run is None:
            return None
        try:
            return Path(self._run.settings.sync_dir)
        except Exception:
            return None

    def log(self, values: Mapping[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """Log arbitrary values (W&B media objects included) at ``step``; ``commit`` as in ``wandb.log``."""
        if self._run is None:
            return
        try:
            self._run.log(dict(values), step=step, commit=commit)
        except Exception as e:
            self._disable("W&B log failed", e)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Log one trainer epoch record: metrics, KPIs, task weights and losses at ``step=epoch``."""
        values = flatten_record(record)
        epoch = values.get("epoch")
        # commit: an epoch is a complete row. Without it wandb-core holds a row with an explicit step
        # back until the next step arrives, so the last epoch would wait for the next one or the end.
        self.log(values, step=int(epoch) if epoch is not None and math.isfinite(epoch) else None, commit=True)

    def on_epoch(self, record: Mapping[str, Any], trainer: Any = None) -> None:
        """Trainer callback hook: ``Trainer(callbacks=[logger])`` logs every epoch."""
        self.log_epoch(record)

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (best val/test metrics, Delta-m); nested dicts become ``a/b`` keys."""
        if self._run is None:
            return
        try:
            for key, value in _flatten_summary(values).items():
                self._run.summary[key] = value
        except Exception as e:
            self._disable("W&B summary update failed", e)

    def finish(self) -> None:
        """Close the run (idempotent); offline, return once its log is complete on disk."""
        run_dir = self.run_dir
        run, self._run = self._run, None
        with _live_lock:
            _live.discard(self.run_id)
        if run is None:
            return
        try:
            run.finish()
        except Exception as e:
            if not self._failed:
                log.warning("W&B finish failed for run %s (%s: %s)", self.run_id, type(e).__name__, e)
            self._failed = True
            return
        # Offline, finish() returns before wandb's service writes the log; a Ray worker that exits
        # or is killed right after would leave a header-only file, so wait for the exit record.
        # (Online, finish() already waits for the server.)
        if self.mode == "offline" and run_dir is not None and not wait_complete(run_dir, timeout=self._finish_timeout):
            log.warning("W&B run %s: log in %s not complete after %.0f s", self.run_id, run_dir,
                        self._finish_timeout)

    def __enter__(self) -> "TrialLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def _wandb_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A ``wandb.Table`` of ``rows`` (columns: the union of their keys in first-seen order; dicts and
    lists such as a best config are stored as JSON strings)."""
    import wandb
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    data = [[_json_cell(row.get(c)) for c in columns] for row in rows]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def log_leaderboard(project: str, entity: str | None, group: str | None, directory: str | Path, mode: str | None,
                    rows: list[dict[str, Any]], images: Mapping[str, Path] | None = None,
                    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                    page: Path | None = None) -> Path | None:
    """Log the sweep's leaderboard as a run of job type ``leaderboard``.

    ``rows`` become the ``leaderboard`` table, each of ``tables`` (e.g. ``significance``, ``pareto``)
    a table of its name; every image in ``images`` is logged under its name, and ``page`` (the
    report) as an HTML panel ``report``. Returns the run's folder, None when nothing was logged.
    """
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    logger = TrialLogger(project, entity=entity, group=group, job_type="leaderboard", tags=("leaderboard",),
                         config={"rows": len(rows), "columns": columns}, directory=directory, mode=mode)
    if not logger.active:
        return None
    run_dir = logger.run_dir
    try:
        import wandb

        logger.log({"leaderboard": _wandb_table(rows),
                    **{name: _wandb_table(table) for name, table in (tables or {}).items() if table}})
        media = {}
        for name, path in (images or {}).items():
            if Path(path).is_file():
                media[name] = wandb.Image(str(path))
            else:
                log.warning("leaderboard image %s not found at %s; skipped", name, path)
        if page is not None and Path(page).is_file():
            media["report"] = wandb.Html(str(page))
        if media:
            logger.log(media)
    except Exception as e:
        logger._disable("W&B leaderboard logging failed", e)
    finally:
        logger.finish()
    return run_dir
