"""Credentials never reach a file the sweep writes, and an unreachable W&B server costs no trial.

One real sweep (its own local Ray cluster, real Optuna, real W&B) runs with known fake secrets: a
W&B API key whose server (``WANDB_BASE_URL``) does not answer, a Ray auth token, and a password in
the ``--optuna-storage`` URL. Then every byte under the storage folder (Parquet, JSON, Tune's
pickles and trial folders, W&B offline runs) is searched for them.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sweeps.secrets import redact_url
from sweeps.wandb_offline import find_offline_runs, read_offline_run

REPO = Path(__file__).resolve().parent.parent
WANDB_KEY = "fa4e0c0ffee1234567890abcdef0123456789abc"  # 40 hex characters, like a real key
RAY_TOKEN = "amtltesttoken0123456789abcdef0123456789abcdef0123456789abcdef01"
DB_PASSWORD = "pw-Zq8Xv3Lr9"


def test_redact_url_hides_passwords_and_secret_query_values():
    assert redact_url("postgresql://amtl:pw-1@db:5432/optuna") == "postgresql://amtl:REDACTED@db:5432/optuna"
    assert redact_url("sqlite:////x/o.db?password=pw-1&timeout=5") == "sqlite:////x/o.db?password=REDACTED&timeout=5"
    assert redact_url("postgresql://u@h/d?sslmode=require&auth_token=t-1") == \
        "postgresql://u@h/d?auth_token=REDACTED&sslmode=require"  # SQLAlchemy sorts the query
    assert redact_url("sqlite:///plain.db") == "sqlite:///plain.db"
    assert redact_url("not a url but user:pw-1@host") == "REDACTED"


def _files_containing(root: Path, needles: dict[str, bytes]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for name, needle in needles.items():
                if needle in data:
                    hits.setdefault(name, []).append(str(path.relative_to(root)))
    return hits


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    storage = tmp_path_factory.mktemp("secret-sweep")
    url = f"sqlite:///{storage / 'optuna-db' / 'study.db'}?password={DB_PASSWORD}"
    env = {**os.environ, "WANDB_API_KEY": WANDB_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "RAY_AUTH_TOKEN": RAY_TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_MODE", None)
    argv = [sys.executable, str(REPO / "run_sweep.py"), "--method", "amtl", "--samples", "1", "--seeds", "1",
            "--epochs", "1", "--tasks", "segmentation,depth", "--image-size", "32", "--n-train", "32", "--n-val", "16",
            "--n-test", "16", "--batch-size", "16", "--max-concurrent", "2", "--storage", str(storage),
            "--name", "secret", "--optuna-storage", url, "--reference", "none"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:  # a clean exit shuts its cluster down; this only guards against a hung or failed run
        sys.path.insert(0, str(REPO / "scripts"))
        from kill_resume import end_session
        end_session(proc.pid)
    return {"storage": storage, "code": proc.returncode, "output": output, "url": url}


def test_sweep_with_unreachable_wandb_goes_on_offline(sweep):
    assert sweep["code"] == 0, sweep["output"][-3000:]
    trials = pd.read_parquet(sweep["storage"] / "secret" / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    runs = [read_offline_run(p) for p in find_offline_runs(sweep["storage"] / "secret" / "wandb")]
    # Every trial and the leaderboard were logged, offline, though a key was set.
    assert sorted(r.run_id for r in runs if r.job_type != "leaderboard") == sorted(trials["trial_id"])
    assert sum(r.job_type == "leaderboard" for r in runs) == 1


def test_no_secret_in_any_written_file(sweep):
    assert sweep["code"] == 0, sweep["output"][-3000:]
    needles = {
        "wandb key": WANDB_KEY.encode(),
        "wandb basic auth": base64.b64encode(f"api:{WANDB_KEY}".encode()),
        "ray token": RAY_TOKEN.encode(),
        "db password": DB_PASSWORD.encode(),
    }
    root = sweep["storage"]
    assert len([p for p in root.rglob("*") if p.is_file()]) > 50  # Tune, Train, W&B and result files
    assert _files_containing(root, needles) == {}
    for name, needle in needles.items():
        assert needle.decode() not in sweep["output"], f"{name} printed"
    state = json.loads((root / "secret" / "state.json").read_text())
    assert state["options"]["optuna_storage"] == redact_url(sweep["url"])
    assert (root / "optuna-db" / "study.db").stat().st_size > 0  # the study really used that URL
