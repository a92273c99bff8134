"""Input checks that run before any Ray work, and the cluster connection.

Every problem found here is *bad input*: one line naming it and the fix, exit status 2, and nothing
already computed is touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from amtl import plugins
from amtl.balancers import HParamError
from amtl.data.nyuv2 import DatasetError
from amtl.data.registry import DatasetConfigError, build_datasets
from amtl.models import ModelContractError
from amtl.registry import UnknownNameError
from amtl.tasks import TaskContractError
from amtl.trainer import ConfigError
from sweeps import lock, processes
from sweeps.potentials import PotentialsError
from sweeps.runner import SweepError, SweepOptions
from sweeps.space import SpaceError, load_space
from sweeps.storage import Storage, StorageError

#: Exceptions that mean the user's input is wrong (exit 2), as opposed to a failure (exit 1).
BadInput = (SweepError, SpaceError, HParamError, ConfigError, DatasetConfigError, DatasetError, StorageError,
            PotentialsError, plugins.PluginError, UnknownNameError, TaskContractError, ModelContractError)


def check_options(o: SweepOptions) -> None:
    plugins.load_all(o.train.plugins)  # first: methods, tasks, datasets and models may be theirs
    for name, value in (("samples", o.samples), ("seeds", o.seeds), ("epochs", o.train.epochs),
                        ("workers_per_trial", o.workers_per_trial)):
        if value < 1:
            raise SweepError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _check_numbers(o)
    if o.max_concurrent is not None and o.max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be at least 1, got {o.max_concurrent}")
    _check_name(o.name)
    if o.kpi is not None and o.kpi not in o.train.tasks:
        raise SweepError(f"--kpi '{o.kpi}' is not one of the sweep's tasks ({', '.join(o.train.tasks)})")
    if o.objective == "pareto" and o.kpi is not None:
        raise SweepError(f"--objective pareto and --kpi {o.kpi} both choose the search's objective; drop one")
    if o.objective == "pareto" and len(o.train.tasks) < 2:
        raise SweepError(f"--objective pareto needs two or more --tasks (got {', '.join(o.train.tasks)}); add tasks "
                         f"or drop --objective pareto")
    if o.space is not None and Path(o.space).is_dir():
        raise SweepError(f"--space '{o.space}' is a directory; give one YAML file (a method file, or a sweep "
                         f"file like sweeps/search_spaces/all.yaml)")
    if o.space is not None and not Path(o.space).is_file():
        raise SweepError(f"--space file '{o.space}' does not exist; check the path")
    if not o.address:  # an embedded cluster has this machine's resources, no more
        _check_fits_this_machine(o)
    load_space(o.compared, Path(o.space) if o.space else None)  # unknown method/hparam, bad ranges
    train = o.trial_train
    train.validate()
    if train.dataset in ("scenes", "partial") and train.data_root is None:
        _check_rendered_tasks(o)  # rendered on first use inside the trials; nothing on disk to check
    else:  # real or plugin data: check it builds now, not inside the first trial
        build_datasets(train.dataset, train.tasks, root=train.data_root, image_size=train.image_size, n_train=train.n_train,
                       n_val=train.n_val, n_test=train.n_test, seed=train.data_seed, cache_dir=train.cache_dir)
    if o.optuna_storage is not None:
        _check_sqlalchemy_url(o.optuna_storage)
    storage = Storage(o.storage)
    storage.check_writable()
    # One driver per sweep, from here to the end of this process; taken before what exists is read,
    # so that two drivers starting at once cannot both decide to run it.
    held = lock.acquire(storage, o.name)
    try:
        _check_existing(o, storage)
        if o.address:
            _check_reachable(o.address)
    except BaseException:
        held.release()  # a refused start leaves no lock (nor the empty sweep folder it made) behind
        raise


def _check_numbers(o: SweepOptions) -> None:
    """NaN passes every comparison and inf every lower bound: say finite, and what to give."""
    if not (math.isfinite(o.cpus_per_trial) and o.cpus_per_trial > 0):
        raise SweepError(f"--cpus-per-trial must be > 0 and finite, got {o.cpus_per_trial}; pass e.g. "
                         f"--cpus-per-trial 1")
    if not (math.isfinite(o.gpus_per_trial) and o.gpus_per_trial >= 0):
        raise SweepError(f"--gpus-per-trial must be >= 0 and finite, got {o.gpus_per_trial}; pass e.g. "
                         f"--gpus-per-trial 0 (CPU only) or 0.5 (two trials share a GPU)")
    if not (math.isfinite(o.train.lr) and o.train.lr > 0):
        raise SweepError(f"--lr must be > 0 and finite, got {o.train.lr}; pass e.g. --lr 0.002")


def _check_name(name: str) -> None:
    """The name is a folder (local) or a path segment (URI) and appears in commands the user types."""
    plain = (name.strip() == name and name and "/" not in name and "\\" not in name and not name.startswith(".")
             and all(c.isprintable() for c in name))
    if not plain:
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)  # keeps the message one line
        raise SweepError(f"--name '{shown}' must be a plain folder name (no '/', no leading '.', no leading or "
                         f"trailing spaces, no control characters); choose another --name")


#: Ray counts resources in units of 1/10000 and truncates each request to that.
RAY_RESOURCE_UNITS = 10_000


def _check_fits_this_machine(o: SweepOptions) -> None:
    """A trial whose workers no node can hold waits forever, silently: on the embedded cluster, whose
    only node is this machine, that is known now. Counted as Ray will: its CPU count honours cgroup
    limits; its GPUs are the visible CUDA devices; each worker's share is cut to Ray's unit."""
    w = o.workers_per_trial
    fixes = "or pass --address of a Ray cluster that has a node this large"
    for kind, per_trial, flag in (("CPU", o.cpus_per_trial, "--cpus-per-trial"),
                                  ("GPU", o.gpus_per_trial, "--gpus-per-trial")):
        if per_trial == 0:
            continue
        per_worker = per_trial / w
        units = int(per_worker * RAY_RESOURCE_UNITS)  # truncated, as Ray does (3 x 2/3 CPU fit on 2)
        if units == 0:
            raise SweepError(f"{flag} {per_trial:g} over {w} worker(s) gives each worker {per_worker:g} {kind}, "
                             f"below Ray's smallest unit (0.0001); raise {flag} or lower --workers-per-trial")
        have = _ray_cpu_count() if kind == "CPU" else _visible_gpu_count()
        need = units * w / RAY_RESOURCE_UNITS
        if units * w > have * RAY_RESOURCE_UNITS:
            what = f"{w} worker(s) x {units / RAY_RESOURCE_UNITS:g} {kind} = {need:g} {kind}" if w > 1 else \
                f"{need:g} {kind}"
            where = f"has {have:g}" if have else "has none Ray can use (check CUDA_VISIBLE_DEVICES)"
            cap = f"at most {have:g}" if have else "0 to train on CPUs"
            raise SweepError(f"one trial needs {what} on one node, but this machine (the embedded Ray cluster's "
                             f"only node) {where}; lower {flag} to {cap}, {fixes}")


def _ray_cpu_count() -> float:
    """The CPUs Ray's embedded cluster will have (cgroup quota and cpuset included)."""
    prepare_ray_import(None)  # importing Ray reads its environment: set it as connect(None) will
    from ray._private.utils import get_num_cpus
    return get_num_cpus(override_docker_cpu_warning=True)


def _visible_gpu_count() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES applies), which is what Ray counts."""
    import torch
    return torch.cuda.device_count()


def _check_existing(o: SweepOptions, storage: Storage) -> None:
    """What is already in ``storage``: never start over a sweep by accident, never run on a bad cache."""
    from sweeps import potentials as pot
    from sweeps.runner import check_resume

    check_resume(o, storage)
    if not o.recompute_potentials and storage.exists(pot.FILE):
        pot.check(storage, o.trial_train.to_dict(), o.train.tasks)


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes: ``ray.init`` waits about 2 minutes for a GCS that never answers."""
    import socket

    if address == "auto":  # Ray finds the local cluster's address itself, and fails fast without one
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    default_port = 10001 if address.startswith("ray://") else 6379
    if not host:
        host, port = host_port, str(default_port)
    if not port.isdigit():
        raise SweepError(f"--address '{address}' is not HOST:PORT; give e.g. 10.0.0.1:6379, ray://10.0.0.1:10001 "
                         f"or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise SweepError(f"cannot reach the Ray cluster at '{address}' ({err.__class__.__name__}: {err}); check the "
                         f"address, that the head node runs `ray start --head`, and the firewall") from None


def _check_rendered_tasks(o: SweepOptions) -> None:
    from amtl.data.registry import check_tasks, dataset_tasks
    check_tasks(o.train.dataset, o.train.tasks, dataset_tasks(o.train.dataset))


def _check_sqlalchemy_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:  # messages never repeat the URL: it may hold a password
        dialect = make_url(url).get_dialect()
        dialect.import_dbapi()
    except ArgumentError:
        raise SweepError("--optuna-storage is not a SQLAlchemy URL; give e.g. sqlite:///optuna.db or "
                         "postgresql://user@host/db") from None
    except NoSuchModuleError:
        raise SweepError("--optuna-storage names a database SQLAlchemy does not know; give e.g. "
                         "sqlite:///optuna.db or postgresql://user@host/db") from None
    except ImportError as err:
        raise SweepError(f"--optuna-storage needs the database driver '{err.name}', which is not installed; "
                         f"install it (for postgresql:// URLs: pip install 'amtl-sweep[postgres]')") from None


#: Ray Train V2's controller polls its workers every 2 s by default, so each state change (start,
#: finish) waits up to that long; polling at 0.5 s cuts a trial's fixed cost (docs/benchmarks.md).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


#: Ray maps a 127.0.0.1 node or cluster address to the host's outward-facing IP and binds its
#: servers there, unless told the cluster is confined to this host (a switch named after its first
#: use, laptops); it is read when Ray is imported.
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback_address(address: str | None) -> bool:
    """Whether ``address`` (``host:port``, or None for an embedded cluster) keeps Ray on this host."""
    import ipaddress
    if not address:
        return True
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_ray_import(address: str | None) -> None:
    """Set what Ray reads when it is imported, for a driver of ``address`` (no-op once Ray is imported)."""
    import os
    import sys

    if "ray" not in sys.modules:  # both are read when Ray is imported
        if is_loopback_address(address):
            os.environ[SINGLE_HOST_ENV] = "0"
        if address:  # Ray authenticates a driver given an address only when told to; keep it on
            os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect(address: str | None, plugin_files: Sequence[Path] = ()) -> None:
    """Join ``address`` or start a local embedded cluster; either listens on 127.0.0.1 only when local.

    ``plugin_files`` (``--plugin`` files) go to every node of a cluster with the job's runtime
    environment (``py_modules``), and its processes import them by module name: the files need not
    exist there. A local cluster's processes read them where they are. A process that joined Ray
    already cannot ship anything more.
    """
    import os

    prepare_ray_import(address)
    import ray
    if ray.is_initialized():
        return
    for key, value in TRAIN_ENV.items():  # a local cluster's processes inherit the driver's environment
        os.environ.setdefault(key, value)
    from sweeps.worker_setup import HOOK
    if address:
        try:  # on a real cluster the job's runtime environment carries it to every process
            env_vars = {k: os.environ[k] for k in TRAIN_ENV}
            runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": HOOK}
            if plugin_files:  # trials import the shipped copies by module name (amtl.plugins)
                runtime_env["py_modules"] = [str(f) for f in plugin_files]
                env_vars[plugins.SHIPPED_ENV] = ",".join(f.stem for f in plugin_files)
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as err:
            raise SweepError(f"cannot reach the Ray cluster at '{address}' ({str(err).splitlines()[0]}); "
                             f"check the address and that RAY_AUTH_MODE and the token match the cluster") from None
        return
    end_orphaned_clusters()
    ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": HOOK})
    _record_local_cluster()


# -- the local cluster's processes ------------------------------------------------------------------
# A driver killed with SIGKILL cannot shut down the local cluster it started; GCS and raylet follow it,
# but Ray's dashboard and runtime-env agents were seen running on. So the driver records what it
# started (pid + start time, which guards against pid reuse) and the next local start ends what a
# dead driver left. A clean exit removes its record.

def _records_dir() -> Path:
    import os
    import tempfile
    return Path(tempfile.gettempdir()) / f"amtl-ray-{os.getuid()}"


def _record_local_cluster() -> None:
    import atexit
    import json

    psutil = processes.psutil()
    me = psutil.Process()
    started = []
    for child in me.children(recursive=True):
        try:
            started.append(processes.identity(child))
        except psutil.Error:  # already gone (an idle worker)
            continue
    directory = _records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / f"{me.pid}.json"
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"driver": processes.identity(me), "processes": started}))
    tmp.replace(record)
    atexit.register(record.unlink, missing_ok=True)


def end_orphaned_clusters() -> list[int]:
    """End what local clusters of dead drivers left running; returns the pids ended."""
    import json

    ended: list[int] = []
    directory = _records_dir()
    for record in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if processes.find(*data["driver"]) is not None:
            continue  # its driver still runs: its cluster is in use
        ended += processes.end(processes.alive(data["processes"]))
        record.unlink(missing_ok=True)
    return ended
