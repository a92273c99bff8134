"""The cluster path, for real: a two-node Ray cluster on this machine (``cluster/local-cluster``),
sweeps driven by ``run_sweep.py --address`` in their own processes, and an Optuna study in a real
PostgreSQL server that survives a killed driver.

Each node has one CPU, so two one-worker trials run on different nodes and a two-worker trial
needs both. The two sweeps share one storage: the first computes the single-task potentials, the
second (two-worker trials, its driver killed and resumed) reuses them.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "cluster" / "local-cluster"
#: The cheapest sweep that still runs every phase (see tests/test_sweep.py).
TINY = ["--tasks", "segmentation,depth", "--image-size", "32", "--n-train", "32", "--n-val", "16", "--n-test", "16",
        "--batch-size", "16", "--epochs", "1", "--seeds", "1", "--scheduler", "fifo", "--no-wandb",
        "--reference", "none"]


def driver_env() -> dict[str, str]:
    """A driver's environment: this checkout first on the path, and no test-session Ray settings,
    so that ``run_sweep.py`` itself must keep a 127.0.0.1 cluster on loopback and authenticate."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def run_sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), *args], env=driver_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def cluster_processes(state: dict) -> list:
    """The live processes ``up`` recorded (same PID *and* start time) and their descendants."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil

    found = {}
    for entry in state["processes"]:
        try:
            proc = psutil.Process(entry["pid"])
            if abs(proc.create_time() - entry["create_time"]) < 1e-3:
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def non_loopback_listeners(procs: list) -> list[str]:
    """TCP listeners and unconnected UDP sockets of ``procs`` bound to anything but loopback."""
    import psutil

    bad = []
    for proc in procs:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # 2: SOCK_DGRAM
            if not listening:
                continue
            ip = ipaddress.ip_address(c.laddr.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is IPv4 loopback
            if not ip.is_loopback:
                bad.append(f"{proc.name()} (pid {proc.pid}) on {c.laddr.ip}:{c.laddr.port}")
    return bad


@pytest.fixture(scope="module")
def local_cluster():
    # Short and private: Ray's Unix socket paths under it must stay below 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="amtl-c-", dir="/tmp"))
    up = subprocess.run([sys.executable, str(LOCAL_CLUSTER), "up", "--dir", str(base), "--cpus-per-node", "1"],
                        env=driver_env(), capture_output=True, text=True, timeout=240)
    state_file = base / "state.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads(state_file.read_text())
        address = up.stdout.strip().splitlines()[-1]
        assert address == state["address"] and address.startswith("127.0.0.1:")
        yield {"address": address, "dir": base, "state": state, "storage": base / "sweeps"}
    finally:
        if state_file.exists():  # the last test normally took it down
            subprocess.run([sys.executable, str(LOCAL_CLUSTER), "down", "--dir", str(base)], timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def cluster_nodes(address: str) -> dict[str, str]:
    """Node id -> IP of every live node, as a driver of the cluster sees them."""
    code = ("import json, sys\nfrom sweeps.cli import connect\nconnect(sys.argv[1])\nimport ray\n"
            "print(json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))")
    done = subprocess.run([sys.executable, "-c", code, address], env=driver_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def spread_sweep(local_cluster):
    """Potentials (2 tasks), 2 search trials and 1 seed rerun, 1 worker each, on the 2-node cluster."""
    storage = local_cluster["storage"]
    run_sweep("--address", local_cluster["address"], "--storage", str(storage), "--name", "spread",
              "--samples", "2", *TINY)
    return pd.read_parquet(storage / "spread" / "trials.parquet")


def test_local_cluster_has_two_loopback_nodes_and_listens_on_loopback_only(local_cluster):
    nodes = cluster_nodes(local_cluster["address"])
    assert len(nodes) == 2 and set(nodes.values()) == {"127.0.0.1"}, nodes
    procs = cluster_processes(local_cluster["state"])
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names and sum(p.name() == "raylet" for p in procs) == 2, names
    assert non_loopback_listeners(procs) == []


def test_a_driver_with_the_wrong_token_is_refused(local_cluster, tmp_path):
    env = {**driver_env(), "RAY_AUTH_TOKEN": "0" * 32}  # outranks the token file
    done = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), "--address", local_cluster["address"],
                           "--storage", str(tmp_path), "--no-wandb", *TINY], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("run_sweep.py: error: cannot reach the Ray cluster") and "token" in last
    assert "Traceback" not in done.stderr


def test_sweep_with_address_runs_trials_on_both_nodes(local_cluster, spread_sweep):
    nodes = cluster_nodes(local_cluster["address"])
    trials = spread_sweep
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    assert set(trials["node_id"]) == set(nodes), trials[["phase", "node_id"]]
    assert set(trials["node_ip"]) == {"127.0.0.1"}
    assert (trials["worker_node_ids"] == trials["node_id"]).all()  # one worker: its own node


def test_a_plugin_only_the_driver_has_runs_on_both_nodes(local_cluster, tmp_path):
    """The plugin file lies in a temporary folder on no worker's path: the sweep ships it with the
    job's runtime environment (``py_modules``) and every trial process imports the shipped copy."""
    plugin = tmp_path / "elsewhere" / "points_on_cluster.py"
    plugin.parent.mkdir()
    shutil.copy(REPO / "tests" / "plugin_points.py", plugin)
    storage = tmp_path / "store"
    run_sweep("--address", local_cluster["address"], "--storage", str(storage), "--name", "plugin",
              "--plugin", str(plugin), "--dataset", "points", "--tasks", "first,second", "--model", "mlp",
              "--method", "tilted", "--samples", "3", "--n-train", "200", "--n-val", "50", "--n-test", "50",
              "--batch-size", "32", "--epochs", "1", "--seeds", "1", "--scheduler", "fifo", "--no-wandb",
              "--reference", "none")
    trials = pd.read_parquet(storage / "plugin" / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    assert set(trials["node_id"]) == set(cluster_nodes(local_cluster["address"])), trials[["phase", "node_id"]]
    board = pd.read_parquet(storage / "plugin" / "leaderboard.parquet")
    assert list(board["method"]) == ["tilted"]


# -- PostgreSQL --------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql; install the Debian package "
                    "'postgresql' (`.ci/run` does)")
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 (password auth), torn down afterwards.

    initdb refuses to run as root, so as root the server runs as the ``postgres`` account the
    Debian package creates. The password reaches clients through ``PGPASSWORD``, never the URL.
    """
    from ray._common.network_utils import find_free_port

    bin_dir = _postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="amtl-pg-", dir="/tmp"))
    password = os.urandom(12).hex()
    (base / "pw").write_text(password)
    as_server: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pw", "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    port = find_free_port()
    data, log = base / "data", base / "server.log"

    def server(*command: str) -> None:
        done = subprocess.run([*as_server, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            server_log = log.read_text()[-1500:] if log.exists() else ""
            pytest.fail(f"PostgreSQL: `{' '.join(command)}` failed: {done.stderr.strip()[-1500:]} {server_log}")

    server(str(bin_dir / "initdb"), "-D", str(data), "-U", "amtl", "--auth=scram-sha-256",
           f"--pwfile={base / 'pw'}", "-E", "UTF8")
    try:
        server(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
               f"-c listen_addresses=127.0.0.1 -p {port} -k {base}", "start")
        os.environ["PGPASSWORD"] = password  # inherited by drivers; libpq reads it
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "amtl", "optuna"],
                       check=True, timeout=60)
        yield {"url": f"postgresql://amtl@127.0.0.1:{port}/optuna", "port": port}
    finally:
        os.environ.pop("PGPASSWORD", None)
        subprocess.run([*as_server, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def killed_sweep(local_cluster, spread_sweep, postgres):
    """A DDP sweep (2 workers of 1 CPU per trial, so each trial needs both 1-CPU nodes) with its
    Optuna study in PostgreSQL: the driver is SIGKILLed once a search trial is in the study, then
    rerun with --resume. It reuses the first sweep's potentials."""
    import optuna

    storage, url = local_cluster["storage"], postgres["url"]
    args = ["--address", local_cluster["address"], "--storage", str(storage), "--name", "pg",
            "--optuna-storage", url, "--samples", "2", "--workers-per-trial", "2", "--cpus-per-trial", "2", *TINY]
    driver = subprocess.Popen([sys.executable, str(REPO / "run_sweep.py"), *args], env=driver_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before: list[optuna.trial.FrozenTrial] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                before = optuna.load_study(study_name="pg", storage=url).get_trials(
                    states=(optuna.trial.TrialState.COMPLETE,))
            except KeyError:  # the driver has not created the study yet
                pass
            if before:
                break
            time.sleep(1)
        assert driver.poll() is None, f"the driver ended before the kill: {driver.stderr.read()[-2000:]}"
        assert before, "no search trial completed within 300 s"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL
    assert not (storage / "pg" / "leaderboard.md").exists()  # really interrupted mid-sweep
    resumed = run_sweep(*args, "--resume")
    return {"before": before, "url": url, "dir": storage / "pg", "stdout": resumed.stdout}


def test_optuna_study_in_postgres_survives_a_killed_driver(killed_sweep):
    import optuna

    study = optuna.load_study(study_name="pg", storage=killed_sweep["url"])
    after = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    for trial in killed_sweep["before"]:  # the trials finished before the kill are still there, unchanged
        assert after[trial.number].params == trial.params and after[trial.number].values == trial.values
    assert len(after) >= 2 and len(after) > len(killed_sweep["before"])  # the study went on in the same database
    assert all(t.user_attrs["method"] == "amtl" for t in after.values())  # readable with Optuna alone
    assert "reusing single-task results" in killed_sweep["stdout"]
    trials = pd.read_parquet(killed_sweep["dir"] / "trials.parquet")
    assert set(trials["phase"]) == {"search", "seeds"} and (trials["status"] == "TERMINATED").all()
    assert (killed_sweep["dir"] / "leaderboard.md").exists()


def test_ddp_trial_places_one_worker_on_each_node(local_cluster, killed_sweep):
    """Two workers of one CPU each on nodes of one CPU each: Ray Train must use both nodes."""
    trials = pd.read_parquet(killed_sweep["dir"] / "trials.parquet")
    nodes = set(cluster_nodes(local_cluster["address"]))
    for workers, rank0 in zip(trials["worker_node_ids"], trials["node_id"]):
        assert len(workers.split(",")) == 2 and set(workers.split(",")) == nodes and workers.split(",")[0] == rank0
    assert trials["test_delta_m"].notna().all()


def test_down_stops_exactly_the_processes_up_started(local_cluster, ray_cluster):
    """Runs last: the test session's own Ray cluster (started here if not yet) must survive."""
    procs = cluster_processes(local_cluster["state"])
    assert procs
    done = subprocess.run([sys.executable, str(LOCAL_CLUSTER), "down", "--dir", str(local_cluster["dir"])],
                          env=driver_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not any(p.is_running() and p.status() != "zombie" for p in procs)
    assert not (local_cluster["dir"] / "state.json").exists()
    assert ray_cluster.cluster_resources().get("CPU", 0) >= 1  # the session cluster is untouched
    again = subprocess.run([sys.executable, str(LOCAL_CLUSTER), "down", "--dir", str(local_cluster["dir"])],
                           env=driver_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "nothing to stop" in again.stderr and "Traceback" not in again.stderr


def test_embedded_cluster_listens_on_loopback_only(ray_cluster):
    """The local cluster run_sweep.py starts without --address (the session's, via connect(None))."""
    import psutil

    me = psutil.Process()
    assert ray_cluster.util.get_node_ip_address() == "127.0.0.1"
    children = me.children(recursive=True)
    assert any(p.name() == "raylet" for p in children)
    assert non_loopback_listeners([me, *children]) == []
