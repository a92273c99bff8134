"""The cloud cluster configs in cluster/ (no cloud is reachable here): each is checked with the
tool that will read it (Ray's launcher schema, run_sweep.py's own parser) and for what this
project needs of it: its code installed with the constraints file, token auth, GPUs, secrets."""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["RayCluster", "RayJob"]
    assert all(d["apiVersion"] == "ray.io/v1" for d in docs)
    return {d["kind"]: d for d in docs}


def test_aws_config_passes_rays_launcher_schema(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))  # raises on a wrong or unknown key
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 8  # a typo the schema must catch
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_aws_config_has_a_cpu_head_and_autoscaling_gpu_workers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = [t for name, t in types.items() if name != aws["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU instance families
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= aws["max_workers"]
    assert aws["idle_timeout_minutes"] > 0


def test_aws_setup_installs_this_project_with_the_constraints_file(aws):
    assert aws["file_mounts"] == {"~/amtl-sweep": "."}
    installs = [c for c in aws["setup_commands"] if "pip install" in c and "amtl-sweep" in c]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert words[words.index("-c") + 1] == "~/amtl-sweep/constraints.txt"
    assert '-e "$HOME/amtl-sweep[postgres]"' in installs[0]  # editable: synced code takes effect


def test_aws_nodes_start_with_token_auth_and_secrets_from_the_environment(aws):
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert len(start) == 1
        command = start[0]
        assert "RAY_AUTH_MODE=token" in command and 'RAY_AUTH_TOKEN="$(secret ray-auth-token)"' in command
        for name in ("WANDB_API_KEY", "PGPASSWORD"):
            assert re.search(rf'{name}="\$\(secret [a-z-]+\)"', command), name
        assert "disabled" not in command
    head = next(c for c in aws["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "--head" in head


def test_kuberay_cluster_has_token_auth_a_cpu_head_and_autoscaling_gpu_workers(kuberay):
    cluster = kuberay["RayCluster"]["spec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in [*cluster["headGroupSpec"]["template"]["spec"]["containers"], worker]:
        secrets = {e["name"]: e for e in container["env"]}
        for name in ("WANDB_API_KEY", "PGPASSWORD"):  # from a Secret, never a literal value
            assert "value" not in secrets[name] and secrets[name]["valueFrom"]["secretKeyRef"]["name"]


def test_kuberay_pods_run_an_image_that_installs_this_project(kuberay):
    cluster, job = kuberay["RayCluster"], kuberay["RayJob"]
    containers = [*cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"],
                  *[c for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]],
                  *job["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1 and containers[0]["image"].endswith("/amtl-sweep:0.1.0")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-", dockerfile, re.M)
    assert base and base.group(1) == cluster["spec"]["rayVersion"]  # the image's Ray is the declared one
    run = [line for line in dockerfile.splitlines() if line.startswith("RUN ") and "pip install" in line]
    # A regular install, as a user's: the search spaces must come as package data.
    assert run and "-c constraints.txt" in run[-1] and '".[postgres]"' in run[-1] and " -e " not in run[-1]
    copied = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY "))
    for needed in ("pyproject.toml", "constraints.txt", "run_sweep.py", "amtl", "sweeps", "cluster/sweep.yaml"):
        assert needed in copied, needed


def test_kuberay_job_runs_a_valid_sweep_on_that_cluster(kuberay):
    from run_sweep import parse_options

    job = kuberay["RayJob"]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": kuberay["RayCluster"]["metadata"]["name"]}
    words = shlex.split(job["entrypoint"])
    assert words[0] == "amtl-sweep"  # the command the image's install puts on the PATH
    image_root = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    options, _ = parse_options([w.replace(image_root, str(REPO)) for w in words[1:]])  # the CLI itself accepts it
    assert options.address == "auto" and options.resume  # a retried submission continues the sweep
    assert options.storage.startswith("s3://") and options.optuna_storage.startswith("postgresql://")
    assert ":" not in options.optuna_storage.split("//", 1)[1].split("@", 1)[0]  # no password in the URL
    assert 0 < options.gpus_per_trial < 1


def test_missing_database_driver_is_bad_input(tmp_path):
    """A URL naming a driver that is not installed fails before any Ray work, in one line."""
    done = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), "--storage", str(tmp_path), "--no-wandb",
                           "--optuna-storage", "postgresql+pg8000://amtl:secret@127.0.0.1/optuna"],
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "pg8000" in done.stderr and "pip install" in done.stderr
    assert "secret" not in done.stderr  # a URL's password is never echoed


def test_local_cluster_refuses_to_start_without_token_auth(tmp_path):
    base = tmp_path / "c"
    done = subprocess.run([sys.executable, str(CLUSTER / "local-cluster"), "up", "--dir", str(base)],
                          env={"PATH": "", "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "RAY_AUTH_MODE is 'disabled'" in done.stderr and not base.exists()  # nothing was started


@pytest.mark.parametrize("address, local", [(None, True), ("127.0.0.1:6379", True), ("localhost:6379", True),
                                            ("[::1]:6379", True), ("127.0.0.2:1", True), ("auto", False),
                                            ("10.0.0.5:6379", False), ("head.example.org:6379", False)])
def test_which_addresses_keep_ray_on_loopback(address, local):
    from sweeps.cli import is_loopback_address

    assert is_loopback_address(address) is local
